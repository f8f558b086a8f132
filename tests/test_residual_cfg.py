"""Residual CFG (StreamDiffusion section 3.3) in the stream engine, against a float64 reference of its equations.

The reference runs one frame through its steps by hand in the eps form of the paper
(``eps = eps_neg' + g (eps_pos - eps_neg')``, ``eps_neg' = delta (x - x0_ref) / sigma``) with the
tiny UNet called directly; the engine must give the same frame (float64: rounding only).
"""
import pytest
import torch

import comfy.patcher_extension
from host import tiny_models
from streamv2v.nodes.engine import FRESH, StreamSettings, run_stream
from streamv2v.nodes.engine.device_vae import DeviceCodec
from streamv2v.nodes.engine.model import strength_sigmas
from streamv2v.nodes.bank_nodes import ExtendedAttentionPatch, FeatureBankNode, FeatureFusionPatch
from streamv2v.streamv2v_core import BANKS
from streamv2v.streamv2v_core.stream.guidance import ONE_TIME_NEGATIVE, SELF_NEGATIVE, residual_guidance
from streamv2v.streamv2v_core.stream.pipeline import NoiseSource

SIZE, F64 = 64, torch.float64


@pytest.fixture(scope="module")
def host():
    return tiny_models.float64_stream_parts()


def frames_of(n, seed=3):
    g = torch.Generator().manual_seed(seed)
    canvas = torch.nn.functional.interpolate(torch.rand(1, 3, 16, 16 + n, generator=g), scale_factor=SIZE / 16,
                                             mode="bilinear")[0].permute(1, 2, 0)
    return torch.stack([canvas[:, 2 * i: 2 * i + SIZE] for i in range(n)]).contiguous()


def stream(model, vae, pos, neg, frames, **kw):
    settings = StreamSettings(**(dict(seed=1, steps=4, strength=0.5, cfg=2.0) | kw))
    outs = [None] * frames.shape[0]
    with torch.inference_mode():
        run_stream(model, pos, neg, vae, iter(frames), settings, lambda out: outs.__setitem__(out.index, out.image))
    return torch.stack(outs)


def reference_frame(host, frame, mode, cfg=2.0, delta=0.8, seed=1, steps=4, strength=0.5):
    """One frame by hand: SDEdit + LCM re-noising, residual CFG in the paper's eps form."""
    model, vae, pos, neg = host
    base = model.model
    codec = DeviceCodec(vae)
    sampling = base.model_sampling
    sigmas = strength_sigmas(sampling, steps, strength)
    with torch.inference_mode():
        x0 = base.process_latent_in(codec.encode(frame)).to(F64)
        noise = NoiseSource(seed, True)
        x = sampling.noise_scaling(torch.tensor([sigmas[0]], dtype=F64), noise.one(0, 0, x0), x0, False)
        x0_ref = x0
        for step in range(steps):
            sigma = torch.tensor([sigmas[step]], dtype=F64)
            if mode == ONE_TIME_NEGATIVE and step == 0:  # the negative pass rides in the frame's call (2 rows)
                d_pos, x0_ref = base.apply_model(torch.cat([x, x]), torch.cat([sigma, sigma]),
                                                 c_crossattn=torch.cat([pos[0][0], neg[0][0]])).split(1)
            else:
                d_pos = base.apply_model(x, sigma, c_crossattn=pos[0][0])
            eps_pos = (x - d_pos) / sigma
            eps_neg = delta * (x - x0_ref) / sigma
            eps = eps_neg + cfg * (eps_pos - eps_neg)
            denoised = x - sigma * eps
            if step + 1 < steps:
                nxt = torch.tensor([sigmas[step + 1]], dtype=F64).view(1, 1, 1, 1)
                x = sampling.noise_scaling(nxt, noise.one(0, step + 1, x0), denoised, False)
        return codec.decode(base.process_latent_out(denoised))


def test_residual_guidance_is_the_papers_eps_form_in_float64():
    g = torch.Generator().manual_seed(0)
    x, d, x0 = (torch.randn(3, 4, 8, 8, generator=g, dtype=F64) for _ in range(3))
    sigma = torch.rand(3, 1, 1, 1, generator=g, dtype=F64) * 10 + 0.1
    eps_pos, eps_neg = (x - d) / sigma, 0.7 * (x - x0) / sigma
    expected = x - sigma * (eps_neg + 3.5 * (eps_pos - eps_neg))
    torch.testing.assert_close(residual_guidance(x, d, x0, 3.5, 0.7), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", [SELF_NEGATIVE, ONE_TIME_NEGATIVE])
def test_each_residual_mode_equals_its_float64_reference(host, mode):
    model, vae, pos, neg = host
    frame = frames_of(1)
    out = stream(model, vae, pos, neg, frame, guidance=mode, residual_delta=0.8)
    torch.testing.assert_close(out[0], reference_frame(host, frame[0], mode), rtol=0, atol=1e-6)


def counted(model):
    rows = []

    def count(executor, *args, **kwargs):
        rows.append(args[0].shape[0])
        return executor(*args, **kwargs)

    clone = model.clone()
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test.rows", count)
    return clone, rows


def test_rows_per_frame_residual_costs_what_no_guidance_costs(host):
    model, vae, pos, neg = host
    frames = frames_of(6)
    costs = {}
    for label, kw in {"cfg 1": dict(cfg=1.0), "full cfg 2": dict(cfg=2.0),
                      "self-negative cfg 2": dict(cfg=2.0, guidance=SELF_NEGATIVE),
                      "one-time cfg 2": dict(cfg=2.0, guidance=ONE_TIME_NEGATIVE)}.items():
        clone, rows = counted(model)
        costs[label] = (stream(clone, vae, pos, neg, frames, **kw), sum(rows))
    assert costs["self-negative cfg 2"][1] == costs["cfg 1"][1] == 6 * 4
    assert costs["one-time cfg 2"][1] == 6 * 4 + 6  # one negative row per frame
    assert costs["full cfg 2"][1] == 2 * 6 * 4
    unguided = costs["cfg 1"][0]
    for label in ("self-negative cfg 2", "one-time cfg 2"):
        assert (costs[label][0] - unguided).abs().max() > 1e-3, f"{label} changed nothing"


def banked(model, name):
    BANKS.remove(name)
    handle = FeatureBankNode.execute(name, "dyme", 1, 1, 0).args[0]
    model = ExtendedAttentionPatch.execute(model, handle, "all").args[0]
    return FeatureFusionPatch.execute(model, handle, 0.75, 0.9, "low-res decoder").args[0]


@pytest.mark.parametrize("mode", [SELF_NEGATIVE, ONE_TIME_NEGATIVE])
def test_stream_batch_equals_sequential_with_residual_cfg(host, mode):
    model, vae, pos, neg = host
    frames = frames_of(6)
    batched = stream(banked(model, f"rcfg-{mode}"), vae, pos, neg, frames, guidance=mode, bank_start=FRESH)
    sequential = stream(banked(model, f"rcfg-{mode}"), vae, pos, neg, frames, guidance=mode, stream_batch=False)
    torch.testing.assert_close(batched, sequential, rtol=0, atol=1e-4)


def test_guidance_in_a_server_queue_with_edits_and_a_cached_requeue(comfy_server):
    """As users work: one server, a loop with residual self-negative guidance at cfg 2 (non-default), re-queued
    unchanged (cached: nothing runs, no new file), then edited to full CFG and to one-time negative (each runs
    again and gives other frames)."""
    from host.clips import make_clip, read_back
    from host.prompts import loop_prompt

    make_clip(comfy_server.input_dir / "rcfg.mp4", frames=6, tone=False)
    prompt = loop_prompt("rcfg/self", file="rcfg.mp4", cfg=2.0, guidance=SELF_NEGATIVE, max_frames=6)
    videos = {}
    comfy_server.run(prompt)
    files = sorted(comfy_server.output_dir.rglob("*.mp4"))
    entry = comfy_server.run(prompt)
    cached = {n for kind, data in entry["status"]["messages"] if kind == "execution_cached" for n in data["nodes"]}
    assert cached == set(prompt) and sorted(comfy_server.output_dir.rglob("*.mp4")) == files
    videos["self"] = read_back(max(comfy_server.output_dir.glob("rcfg/self*.mp4")))[0]
    for label, mode in (("full", "full CFG"), ("once", ONE_TIME_NEGATIVE)):
        prompt["3"]["inputs"].update(guidance=mode, filename_prefix=f"rcfg/{label}")
        comfy_server.run(prompt)
        videos[label] = read_back(max(comfy_server.output_dir.glob(f"rcfg/{label}*.mp4")))[0]
    for label in ("full", "once"):
        assert videos[label].shape == videos["self"].shape
        diff = abs(videos[label].astype(float) - videos["self"].astype(float)).mean()
        assert diff > 0.5, f"{label} gave the self-negative frames (mean difference {diff:.3f} / 255)"
