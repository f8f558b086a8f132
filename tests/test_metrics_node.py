"""StreamV2VMetrics node: same numbers as streamv2v_core.metrics, clear errors, CLIP path, real server run.

Synthetic moving textures (64x64, 6 frames); the CLIP path uses a tiny random CLIP vision model
built with ComfyUI's own ``comfy.clip_vision.ClipVisionModel`` from a small config json.
"""
import json
import math

import numpy as np
import pytest
import torch

cv2 = pytest.importorskip("cv2")

from streamv2v.nodes.metrics_nodes import StreamV2VMetrics, clip_embeddings  # noqa: E402
from streamv2v.streamv2v_core.metrics import (  # noqa: E402
    chunk_boundary_pairs,
    clip_frame_consistency,
    flow_magnitude_std,
    mawe,
    scene_cut_frames,
    scene_cuts,
    seam_stats,
    warp_error,
)


def texture(h, w, seed):
    r = np.random.default_rng(seed).random((h, w, 3)).astype(np.float32)
    t = cv2.GaussianBlur(r, (0, 0), 3.0)
    return (t - t.min()) / (t.max() - t.min())


def moving(T=6, H=64, W=64, d=2, seed=0):
    """``torch.float32 [T, H, W, 3]``: a texture sliding right by ``d`` px per frame."""
    canvas = texture(H, W + d * T, seed)
    return torch.from_numpy(np.stack([canvas[:, d * (T - t):d * (T - t) + W] for t in range(T)]).copy())


def flickering(source, amount=0.08, seed=1):
    """The source plus per-frame brightness flicker and noise (a plausible 'restyled' output)."""
    g = torch.Generator().manual_seed(seed)
    gain = 1 + amount * torch.randn(source.shape[0], 1, 1, 1, generator=g)
    return (source * gain + 0.02 * torch.randn(source.shape, generator=g)).clamp(0, 1)


def run(**kwargs):
    return StreamV2VMetrics.execute(**kwargs)


def test_node_gives_the_metrics_functions_numbers():
    source = moving()
    output = flickering(source)
    result = run(images=output, source_images=source)
    warp, ofs, value, cuts, clip_score, plot, summary, flow_std, report = result.args
    report = json.loads(report)

    expected_warp = warp_error(output, source)
    expected = mawe(output, source)
    assert warp == pytest.approx(expected_warp.mean, rel=1e-9)
    assert ofs == pytest.approx(expected.flow_score, rel=1e-9)
    assert value == pytest.approx(expected.mawe, rel=1e-9)
    assert cuts == scene_cuts(output) and isinstance(cuts, int)
    assert math.isnan(clip_score)
    assert warp > 0 and ofs > 1  # flicker is an error; 2 px/frame motion gives OFS ~4
    assert plot.shape == (1, 320, 640, 3) and plot.dtype == torch.float32
    assert 0.0 <= float(plot.min()) and float(plot.max()) <= 1.0
    assert f"{warp:.3f}" in summary and "flow from source" in summary and "not measured" in summary
    assert result.ui.as_dict() == {"text": (summary,)}
    # smoothness is the output's own flow, even when the warp error's flow comes from the source
    assert flow_std == pytest.approx(flow_magnitude_std(output), rel=1e-9)
    assert report["seams"] is None  # no chunk layout given
    assert report["warp_error"] == pytest.approx(warp) and report["flow_std"] == pytest.approx(flow_std)
    assert report["clip_consistency"] is None and report["scene_cuts"] == cuts


def test_node_measures_the_chunk_seams():
    source = moving(T=17)
    output = flickering(source)
    args = run(images=output, chunk_length=3, chunk_overlap=1, frames_per_latent=4).args
    flow_std, seams = args[7], json.loads(args[8])["seams"]
    seam_mawe, seam_cuts, seam_std = seams["mawe"], seams["scene_cuts"], seams["flow_std"]
    motion = mawe(output)
    pairs = chunk_boundary_pairs(17, 3, 1, frames_per_latent=4)
    expected = seam_stats(motion, motion.magnitude_per_pair, scene_cut_frames(output), pairs)
    assert pairs == [4, 8]
    assert seam_mawe == pytest.approx(expected.mawe, rel=1e-9)
    assert seam_std == pytest.approx(expected.flow_std, rel=1e-9) and seam_cuts == expected.scene_cuts == 0
    assert flow_std == pytest.approx(flow_magnitude_std(output), rel=1e-9)
    assert "at chunk seams (2 frame pairs)" in args[6]


def test_without_source_flow_comes_from_the_output():
    output = flickering(moving())
    warp, ofs, value, *_ = run(images=output).args
    assert warp == pytest.approx(warp_error(output).mean, rel=1e-9)
    assert value == pytest.approx(mawe(output).mawe, rel=1e-9)
    assert "flow from output" in run(images=output).args[6]


def test_flow_size_resizes_before_measuring():
    source = moving()
    output = flickering(source)
    warp, ofs, *_ = run(images=output, source_images=source, flow_size=32).args
    assert warp == pytest.approx(warp_error(output, source, size=(32, 32)).mean, rel=1e-9)
    assert ofs == pytest.approx(mawe(output, source, size=(32, 32)).flow_score, rel=1e-9)


def test_static_video_is_perfectly_consistent():
    still = moving(d=0)
    warp, ofs, value, cuts, *_ = run(images=still, source_images=still).args
    assert warp == 0.0 and ofs == pytest.approx(0.0, abs=1e-6) and cuts == 0
    assert value == math.inf or math.isnan(value) or value == 0.0


@pytest.mark.parametrize("images, source, message", [
    (torch.rand(1, 32, 32, 3), None, "at least 2 frames"),
    (torch.rand(4, 32, 32, 3), torch.rand(3, 32, 32, 3), "has 3 frame(s) but `images` has 4"),
    (torch.rand(4, 32, 32, 3), torch.rand(4, 32, 40, 3), "40x32 but `images` are 32x32"),
])
def test_clear_errors(images, source, message):
    with pytest.raises(ValueError) as info:
        run(images=images, source_images=source)
    assert message in str(info.value)


@pytest.mark.parametrize("chunks, message", [
    ({"chunk_length": 4, "chunk_overlap": 4}, "chunk_overlap (4) must be smaller than chunk_length (4)"),
    ({"chunk_length": 4, "chunk_overlap": 1, "frames_per_latent": 4}, "6 frames cannot come from latents of 4"),
])
def test_clear_errors_for_the_chunk_layout(chunks, message):
    with pytest.raises(ValueError) as info:
        run(images=moving(), **chunks)
    assert message in str(info.value)


# --------------------------------------------------------------------------- CLIP vision

@pytest.fixture(scope="module")
def tiny_clip_vision(tmp_path_factory):
    """ComfyUI's ClipVisionModel with a tiny ViT config (hidden 32, 2 layers, 32 px, 8 px patches)."""
    import comfy.clip_vision
    from host.tiny_models import init_params_

    config = {"attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": 32,
              "image_size": 32, "intermediate_size": 64, "layer_norm_eps": 1e-5,
              "model_type": "clip_vision_model", "num_attention_heads": 4, "num_channels": 3,
              "num_hidden_layers": 2, "patch_size": 8, "projection_dim": 16}
    path = tmp_path_factory.mktemp("clip_vision") / "tiny_clip_vision.json"
    path.write_text(json.dumps(config))
    model = comfy.clip_vision.ClipVisionModel(str(path))
    init_params_(model.model, seed=3)
    return model


def test_clip_consistency_uses_clip_vision_embeddings(tiny_clip_vision):
    source = moving(T=20)  # more frames than one CLIP batch (16): chunking must not change the result
    output = flickering(source)
    clip_score = run(images=output, source_images=source, clip_vision=tiny_clip_vision).args[4]

    embeds = tiny_clip_vision.encode_image(output).image_embeds
    assert embeds.shape == (20, 16)
    assert clip_score == pytest.approx(clip_frame_consistency(embeds), abs=1e-3)
    assert -100.0 <= clip_score <= 100.0
    assert clip_embeddings(tiny_clip_vision, output, batch=7).shape == (20, 16)

    still = moving(T=3, d=0)
    assert run(images=still, clip_vision=tiny_clip_vision).args[4] == pytest.approx(100.0, abs=1e-3)


# --------------------------------------------------------------------------- real ComfyUI

def test_runs_in_comfyui(comfy_server):
    info = comfy_server.object_info("StreamV2VMetrics")["StreamV2VMetrics"]
    assert info["display_name"] == "StreamV2V Temporal Consistency"
    # the first eight outputs keep their slots (saved workflows link them by index); no stand-in numbers after
    assert info["output"] == ["FLOAT", "FLOAT", "FLOAT", "INT", "FLOAT", "IMAGE", "STRING", "FLOAT", "STRING"]
    assert info["output_name"][-1] == "report"
    assert set(info["input"]["optional"]) == {"source_images", "clip_vision", "flow_size", "chunk_length",
                                              "chunk_overlap", "frames_per_latent"}
    for section in info["input"].values():
        for name, spec in section.items():
            assert spec[1].get("tooltip"), f"input {name} has no tooltip"

    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 4, "color": 8421504}},
        "2": {"class_type": "StreamV2VMetrics", "inputs": {"images": ["1", 0], "source_images": ["1", 0]}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 5]}},
    }
    entry = comfy_server.run(prompt, timeout=120)
    text = entry["outputs"]["2"]["text"][0]
    assert text.startswith("warp error: 0.000") and "scene cuts: 0" in text
    assert entry["outputs"]["3"]["images"], "the plot was not previewed"
