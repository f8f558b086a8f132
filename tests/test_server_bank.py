"""The bank in a real headless ComfyUI server, used the way people use ComfyUI.

Prompts queued one after another with edits in between (on 0.3.75's clone semantics and on
emulated 0.38 semantics, where patch objects are shared between clones), cached nodes re-used,
a video queued in chunks (VideoHelperSuite meta-batches, Auto Queue), comfystream-style API
workflows run once per frame, readable reasons for every clear, and the memory released by
the bank routes and ComfyUI's "Free memory".
"""
import json
import pathlib
import urllib.error
import urllib.request

import av
import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from host.comfy038 import ENV as EMULATE_038
from host.server import ComfyServer, PromptRejected

PACK_NODES = ["FeatureBank", "ExtendedAttentionPatch", "FeatureFusionPatch", "StreamV2VSampler"]
API_DIR = pathlib.Path(__file__).resolve().parent.parent / "workflows" / "api"


def bank_prompt(bank_name="srv", seed=0, size=64, model_seed=0, alpha=0.75, prefix="bank", ff=True,
                ea_blocks="all", second_sampler=False):
    prompt = {
        "1": {"class_type": "TinyCheckpointLoader", "inputs": {"kind": "sd15", "seed": model_seed, "vae": "taesd"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a watercolor painting"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "10": {"class_type": "FeatureBank", "inputs": {"name": bank_name, "mode": "dyme", "size": 1, "interval": 1,
                                                       "seed": 0}},
        "11": {"class_type": "ExtendedAttentionPatch", "inputs": {"model": ["1", 0], "bank": ["10", 0],
                                                                  "blocks": ea_blocks}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["12", 0] if ff else ["11", 0], "positive": ["2", 0], "negative": ["3", 0],
            "latent_image": ["4", 0], "seed": seed, "steps": 4, "cfg": 2.0, "sampler_name": "lcm",
            "scheduler": "sgm_uniform", "denoise": 1.0}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": f"latents/{prefix}"}},
    }
    if ff:
        prompt["12"] = {"class_type": "FeatureFusionPatch", "inputs": {
            "model": ["11", 0], "bank": ["10", 0], "alpha": alpha, "threshold": 0.9, "blocks": "low-res decoder"}}
    if second_sampler:  # a second sampler on the EA model in the same prompt
        prompt["7"] = {"class_type": "KSampler", "inputs": {**prompt["5"]["inputs"], "model": ["11", 0],
                                                           "seed": seed + 100}}
        prompt["8"] = {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": f"latents/{prefix}b"}}
    return prompt


def latent_of(server, entry):
    (path,) = [p for p in server.output_files(entry) if p.suffix == ".latent"]
    return safetensors.torch.load_file(str(path))["latent_tensor"]


def tensors_of(server, entry):
    (path,) = [p for p in server.output_files(entry) if p.suffix == ".safetensors"]
    return safetensors.torch.load_file(str(path))["images"]


def http(server, method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(server.url + path, data=data, method=method,  # state changes take only JSON
                                     headers={"Content-Type": "application/json"} if method == "POST" else {})
    with urllib.request.urlopen(request, timeout=30) as response:
        raw = response.read()
    return json.loads(raw) if raw else None


def banks(server):
    return {b["name"]: b for b in http(server, "GET", "/streamv2v/banks")["banks"]}


@pytest.fixture(scope="module")
def server_038():
    """A second server whose ModelPatcher.clone() shares patch objects, as ComfyUI 0.38 does."""
    with ComfyServer(env={EMULATE_038: "1"}) as srv:
        assert "emulating ComfyUI 0.38's clone()" in srv.log_text()
        yield srv


def test_pack_loads_and_lists_its_nodes(comfy_server):
    info = comfy_server.object_info()
    missing = [n for n in PACK_NODES if n not in info]
    assert not missing, f"not listed: {missing}; log:\n{comfy_server.log_tail()}"
    assert not [f for f in comfy_server.import_failures() if "streamv2v" in f]
    for node in PACK_NODES:
        for group in ("required", "optional"):
            for name, spec in info[node]["input"].get(group, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node}.{name} has no tooltip"
    assert "reset" not in info["FeatureBank"]["input"]["required"], "a cacheable node: no per-run reset input"


@pytest.mark.parametrize("semantics", ["0.3.75", "0.38"])
def test_the_edits_users_make_between_runs(comfy_server, server_038, semantics):
    """EA -> KSampler, then FF inserted, alpha changed, EA blocks changed, a second sampler on the EA
    model: each queued in one server, cached nodes re-used (issue 9: FF on a cached EA model crashed)."""
    server = comfy_server if semantics == "0.3.75" else server_038
    name = f"edits-{semantics}"
    steps = [bank_prompt(name, seed=1, ff=False, prefix="e1"),
             bank_prompt(name, seed=2, prefix="e2"),
             bank_prompt(name, seed=3, alpha=0.5, prefix="e3"),
             bank_prompt(name, seed=4, ea_blocks="decoder", prefix="e4"),
             bank_prompt(name, seed=5, ff=False, second_sampler=True, prefix="e5")]
    log_start = len(server.log_text())
    for prompt in steps:
        entry = server.run(prompt)
        assert torch.isfinite(latent_of(server, entry) if "7" not in prompt else torch.zeros(1)).all()
    assert banks(server)[name]["frames_seen"] == 6
    assert "Traceback" not in server.log_text()[log_start:]


def test_bank_lives_across_prompts_and_the_clear_route_clears_it(comfy_server):
    """An unchanged FeatureBank node is cached; the bank it names carries on from prompt to prompt."""
    first = latent_of(comfy_server, comfy_server.run(bank_prompt("srv", seed=1, prefix="a")))
    with_past = latent_of(comfy_server, comfy_server.run(bank_prompt("srv", seed=2, prefix="b")))
    fresh = latent_of(comfy_server, comfy_server.run(bank_prompt("srv-fresh", seed=2, prefix="c")))
    assert first.shape == with_past.shape == fresh.shape
    assert (with_past - fresh).abs().max() > 1e-3, "the second prompt did not see the first prompt's bank"
    status = http(comfy_server, "POST", "/streamv2v/banks/srv/clear")["status"]
    assert status["frames_seen"] == 0 and status["last_reset"] == "cleared with the Clear bank button"
    cleared = latent_of(comfy_server, comfy_server.run(bank_prompt("srv", seed=3, prefix="d")))
    # An unchanged re-queue runs nothing (ComfyUI's cache), so it cannot advance the bank either.
    comfy_server.run(bank_prompt("srv", seed=3, prefix="d"))
    assert banks(comfy_server)["srv"]["frames_seen"] == 1
    other_fresh = latent_of(comfy_server, comfy_server.run(bank_prompt("srv-fresh2", seed=3, prefix="e")))
    assert (cleared - other_fresh).abs().max() == 0, "clearing did not clear the bank"
    with pytest.raises(urllib.error.HTTPError) as missing:
        http(comfy_server, "POST", "/streamv2v/banks/no-such-bank/clear")
    assert missing.value.code == 404


def test_every_clear_logs_a_reason_a_person_understands(comfy_server):
    comfy_server.run(bank_prompt(bank_name="chg", size=64, prefix="e"))
    comfy_server.run(bank_prompt(bank_name="chg", size=96, prefix="f"))
    comfy_server.run(bank_prompt(bank_name="chg", size=96, model_seed=7, prefix="g"))
    lines = [line for line in comfy_server.log_text().splitlines() if "bank 'chg' cleared" in line]
    assert any(line.endswith("cleared: frame size changed 64x64 -> 96x96") for line in lines), lines
    assert any(line.endswith("cleared: model (checkpoint or model loader) changed") for line in lines), lines
    assert not [line for line in lines if "0x" in line or "@" in line or "-" * 4 in line]
    assert banks(comfy_server)["chg"]["last_reset"] == "model (checkpoint or model loader) changed"


def test_out_of_range_input_is_refused_before_anything_runs(comfy_server):
    with pytest.raises(PromptRejected) as error:
        comfy_server.queue_prompt(bank_prompt(bank_name="bad", alpha=1.5))
    assert "alpha" in str(error.value)


# --------------------------------------------------------------------------- a video in chunks

CLIP_FRAMES = 24


def write_clip(path, frames=CLIP_FRAMES, size=64, fps=12):
    """An H.264 clip of a smooth texture sliding 2 px per frame."""
    g = np.random.default_rng(0)
    canvas = np.asarray(Image.fromarray(g.integers(0, 255, (16, 16 + frames, 3), np.uint8)).resize(
        ((16 + frames) * size // 16, size), Image.BILINEAR))
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv444p"
        stream.options = {"crf": "0"}
        for i in range(frames):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(canvas[:, 2 * i: 2 * i + size]),
                                                              format="rgb24")))
        out.mux(stream.encode(None))


def chunk_prompt(images, bank_name, bank_start, fixed_noise, prefix):
    """A float64 tiny UNet: one frame at a time vs a stream batch differ in float32 only by rounding,
    which can flip one of the paper's hard decisions (see test_stream_exact.py)."""
    return {
        "model": {"class_type": "TinyCheckpointLoader",
                  "inputs": {"kind": "sd15", "seed": 0, "vae": "taesd", "dtype": "float64"}},
        "cond": {"class_type": "TinyConditioning", "inputs": {"kind": "sd15", "seed": 1}},
        "bank": {"class_type": "FeatureBank", "inputs": {"name": bank_name, "mode": "dyme", "size": 1, "interval": 4,
                                                         "seed": 0}},
        "ea": {"class_type": "ExtendedAttentionPatch", "inputs": {"model": ["model", 0], "bank": ["bank", 0],
                                                                  "blocks": "all"}},
        "ff": {"class_type": "FeatureFusionPatch", "inputs": {"model": ["ea", 0], "bank": ["bank", 0], "alpha": 0.75,
                                                              "threshold": 0.9, "blocks": "low-res decoder"}},
        **images,
        "sampler": {"class_type": "StreamV2VSampler", "inputs": {
            "model": ["ff", 0], "positive": ["cond", 0], "negative": ["cond", 0], "vae": ["model", 2],
            "images": ["frames", 0], "seed": 3, "steps": 4, "strength": 0.4, "cfg": 1.0, "stream_batch": True,
            "fixed_noise": fixed_noise, "bank_start": bank_start}},
        "save": {"class_type": "TinySaveTensor", "inputs": {"images": ["sampler", 0], "filename_prefix": prefix}},
    }


def whole_clip_images(clip_name):
    return {"video": {"class_type": "LoadVideo", "inputs": {"file": clip_name}},
            "frames": {"class_type": "GetVideoComponents", "inputs": {"video": ["video", 0]}}}


@pytest.mark.parametrize("fixed_noise", [True, False])
def test_a_video_queued_in_chunks_gives_the_frames_of_one_run(comfy_server, fixed_noise):
    """VideoHelperSuite's meta-batch pattern (the same prompt queued once per chunk, with a frame offset)
    and Auto Queue (the same prompt re-queued; Next Frame advances): 3 x 8 frames = one 24-frame run."""
    clip = f"chunks_{fixed_noise}.mp4"
    write_clip(comfy_server.input_dir / clip)
    name = f"chunks-{fixed_noise}"
    whole = tensors_of(comfy_server, comfy_server.run(
        chunk_prompt(whole_clip_images(clip), name, "fresh", fixed_noise, "chunks/whole")))
    assert whole.shape[0] == CLIP_FRAMES

    http(comfy_server, "POST", f"/streamv2v/banks/{name}/clear")  # a new clip: the user clears the bank
    parts = []
    for offset in range(0, CLIP_FRAMES, 8):  # VHS meta-batch: a chunk of 8 frames per queued prompt
        images = {**whole_clip_images(clip), "chunk": {"class_type": "ImageFromBatch", "inputs": {
            "image": ["frames", 0], "batch_index": offset, "length": 8}}}
        images["frames_chunk"] = images.pop("chunk")
        prompt = chunk_prompt(images, name, "continue", fixed_noise, f"chunks/meta{offset}")
        prompt["sampler"]["inputs"]["images"] = ["frames_chunk", 0]
        parts.append(tensors_of(comfy_server, comfy_server.run(prompt)))
    torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=1e-4)

    for count in (8, 1):  # Auto Queue: the same prompt, unchanged, re-queued; Next Frame advances each time
        http(comfy_server, "POST", f"/streamv2v/banks/{name}/clear")
        next_frames = {"frames": {"class_type": "StreamV2VNextFrame", "inputs": {
            "source": "video file", "file": clip, "skip_first": 0, "every_nth": 1, "width": 0, "height": 0,
            "resize_mode": "crop", "cursor": f"auto-{fixed_noise}-{count}", "reset": False, "at_end": "stop",
            "count": count}}}
        prompt = chunk_prompt(next_frames, name, "continue", fixed_noise, f"chunks/auto{count}")
        auto = [tensors_of(comfy_server, comfy_server.run(prompt)) for _ in range(CLIP_FRAMES // count)]
        torch.testing.assert_close(torch.cat(auto), whole, rtol=0, atol=1e-4)
        assert banks(comfy_server)[name]["frames_seen"] == CLIP_FRAMES


# --------------------------------------------------------------------------- comfystream-style API workflows

def tiny_api(prompt: dict) -> dict:
    """An API workflow with its model files swapped for the tiny test models and PreviewImage for a
    lossless tensor sink (what comfystream does with its SaveTensor)."""
    prompt = json.loads(json.dumps(prompt))
    remap = {}
    for node_id, node in list(prompt.items()):
        kind = node["class_type"]
        if kind == "CheckpointLoaderSimple":
            node.update(class_type="TinyCheckpointLoader", inputs={"kind": "sd15", "seed": 0, "vae": "taesd"})
        elif kind == "VAELoader":
            node.update(class_type="TinyCheckpointLoader", inputs={"kind": "sd15", "seed": 0, "vae": "taesd"})
            remap[(node_id, 0)] = [node_id, 2]
        elif kind == "LoraLoaderModelOnly":
            remap[(node_id, 0)] = node["inputs"]["model"]
            del prompt[node_id]
        elif kind == "PreviewImage":
            node.update(class_type="TinySaveTensor", inputs={**node["inputs"], "filename_prefix": "comfystream/f"})
    for node in prompt.values():
        for key, value in node["inputs"].items():
            while isinstance(value, list) and (value[0], value[1]) in remap:
                value = remap[(value[0], value[1])]
            node["inputs"][key] = value
    return prompt


def frame_pngs(server, n, prefix):
    """n frames of a sliding texture saved as PNGs in the server's input folder; returns their names."""
    g = np.random.default_rng(1)
    canvas = np.asarray(Image.fromarray(g.integers(0, 255, (16, 16 + n, 3), np.uint8)).resize(
        ((16 + n) * 4, 64), Image.BILINEAR))
    names = []
    for i in range(n):
        name = f"{prefix}_{i:03}.png"
        Image.fromarray(np.ascontiguousarray(canvas[:, 2 * i: 2 * i + 64])).save(server.input_dir / name)
        names.append(name)
    return names


def test_comfystream_ksampler_workflow_per_frame_equals_a_stream_of_ksampler_runs(comfy_server):
    """LoadImage -> VAEEncode -> KSampler (bank continuing) -> output, once per frame, as comfystream runs it."""
    import nodes as comfy_nodes
    from host import tiny_models
    from streamv2v.nodes.bank_nodes import ExtendedAttentionPatch, FeatureBankNode, FeatureFusionPatch
    from streamv2v.streamv2v_core import BANKS

    prompt = tiny_api(json.loads((API_DIR / "streamv2v_comfystream_ksampler_api.json").read_text()))
    names = frame_pngs(comfy_server, 8, "cs_k")
    served = []
    for name in names:
        prompt["10"]["inputs"]["image"] = name
        served.append(tensors_of(comfy_server, comfy_server.run(prompt)))

    # The same 8 frames as a stream of KSampler runs, in this process, with the same tiny weights.
    model, clip, vae = tiny_models.tiny_checkpoint("sd15", 0, "taesd")
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    BANKS.remove("comfystream-reference")
    handle = FeatureBankNode.execute("comfystream-reference", "dyme", 1, 4, 0).args[0]
    patched = ModelSamplingDiscrete().patch(model, "lcm", False)[0]
    patched = ExtendedAttentionPatch.execute(patched, handle, "all").args[0]
    patched = FeatureFusionPatch.execute(patched, handle, 0.75, 0.9, "low-res decoder").args[0]
    positive = tiny_models.encode_prompt(clip, prompt["7"]["inputs"]["text"])
    negative = tiny_models.encode_prompt(clip, "")
    reference = []
    with torch.inference_mode():
        for name in names:
            image = comfy_nodes.LoadImage().load_image(str(comfy_server.input_dir / name))[0]
            latent = {"samples": vae.encode(image)}
            out = comfy_nodes.common_ksampler(patched, 0, 4, 1.0, "lcm", "sgm_uniform", positive, negative, latent,
                                              denoise=0.4)[0]
            reference.append(vae.decode(out["samples"]))
    torch.testing.assert_close(torch.cat(served), torch.cat(reference), rtol=0, atol=1e-4)
    assert banks(comfy_server)["comfystream"]["frames_seen"] == 8


def test_comfystream_pipelined_workflow_per_frame_equals_one_stream_batch_run(comfy_server):
    """The recommended comfystream workflow keeps the stream batch in flight between per-frame runs."""
    prompt = tiny_api(json.loads((API_DIR / "streamv2v_comfystream_api.json").read_text()))
    prompt["4"]["inputs"]["name"] = "comfystream-pipelined"
    names = frame_pngs(comfy_server, 10, "cs_p")
    served = []
    for name in names:
        prompt["10"]["inputs"]["image"] = name
        served.append(tensors_of(comfy_server, comfy_server.run(prompt))[0])
    # One stream-batch run over the same 10 frames (a batch of the same PNGs).
    batch = dict(prompt)
    batch["10"] = {"class_type": "LoadImage", "inputs": {"image": names[0]}}
    for i, name in enumerate(names[1:], 1):
        batch[f"load{i}"] = {"class_type": "LoadImage", "inputs": {"image": name}}
    batch["stack"] = {"class_type": "ImageBatch", "inputs": {"image1": ["10", 0], "image2": ["load1", 0]}}
    previous = "stack"
    for i in range(2, len(names)):
        batch[f"stack{i}"] = {"class_type": "ImageBatch", "inputs": {"image1": [previous, 0], "image2": [f"load{i}", 0]}}
        previous = f"stack{i}"
    batch["11"] = json.loads(json.dumps(prompt["11"]))
    batch["11"]["inputs"].update(images=[previous, 0], bank_start="fresh")
    whole = tensors_of(comfy_server, comfy_server.run(batch))
    steps = prompt["11"]["inputs"]["steps"]
    torch.testing.assert_close(torch.stack(served[steps - 1:]), whole[:len(names) - (steps - 1)], rtol=0, atol=1e-4)


# --------------------------------------------------------------------------- memory

def test_free_memory_and_the_delete_route_release_banks(comfy_server):
    comfy_server.run(bank_prompt(bank_name="to-free", prefix="free"))
    before = sum(b["bytes"] for b in banks(comfy_server).values())
    assert banks(comfy_server)["to-free"]["bytes"] > 0
    comfy_server.free(unload_models=False, free_memory=True)  # ComfyUI's "Free memory"
    after = sum(b["bytes"] for b in banks(comfy_server).values())
    print(f"POST /free: banks held {before / 2**20:.2f} MiB before, {after / 2**20:.2f} MiB after")
    assert after == 0 and not banks(comfy_server)
    assert "released" in comfy_server.log_text()
    comfy_server.run(bank_prompt(bank_name="to-delete", prefix="delete"))
    held = banks(comfy_server)["to-delete"]["bytes"]
    reply = http(comfy_server, "DELETE", "/streamv2v/banks/to-delete")
    print(f"DELETE /streamv2v/banks/to-delete: {reply['bytes'] / 2**20:.2f} MiB released")
    assert reply == {"removed": True, "bytes": held} and "to-delete" not in banks(comfy_server)
