"""StreamV2V Long-Video Chunks (RandomizedBlendContext) in the real ComfyUI server, with tiny random-weight models.

A Wan 2.1-shaped video model (``comfy.supported_models.WAN21_T2V``, frames on axis 2) and an SD1.5-shaped image
model (frames are the batch, axis 0), sampled by core nodes (KSampler, SamplerCustomAdvanced, CFGGuider, ...):

* N frames in, N frames out;
* overlap 0 gives exactly the chunks sampled one by one (same noise slices);
* one chunk covering all frames is exactly sampling without context windows;
* at every step every frame takes exactly one chunk's output, the one StreamingT2V's rule picks for the
  cut drawn from (seed, step, overlap); the cuts are uniform over each overlap (chi-square, fixed seed);
  and for Euler the result is the paper's join of the chunks' next latents (a float64 reference, eq. 8);
* the same server takes edited prompts in a row, reusing the cached node, and reproduces its results;
* bad settings give errors that say what to do.

In-process: the handler survives deep copies (ComfyUI 0.3.x clones) and sharing between clones (newer
ComfyUI), and accepts the newer ComfyUI's extra keywords.
"""
import copy
import uuid

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from host.server import PromptFailed, PromptRejected
from streamv2v.nodes.blend_nodes import (
    RandomizedBlendContext,
    RandomizedBlendHandler,
    _blend_weights,
    core_handler_options,
)
from streamv2v.streamv2v_core.blend.chunks import chunk_windows, draw_seams, frame_owners
from test_chunks import CHI2_999, chi_square

WAN, SD15 = "wan21", "sd15"


# --------------------------------------------------------------------------- prompt pieces

def model_nodes(kind: str, out_scale: float = 0.3) -> dict:
    """Nodes "m" (MODEL 0, CLIP 1, VAE 2), "pos"/"neg" (CLIPTextEncode) for a tiny model of ``kind``."""
    if kind == WAN:
        loader = {"class_type": "TinyVideoModelLoader", "inputs": {"kind": WAN, "seed": 0, "out_scale": out_scale}}
    else:
        loader = {"class_type": "TinyCheckpointLoader", "inputs": {"kind": SD15, "seed": 0, "vae": "taesd"}}
    return {
        "m": loader,
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["m", 1], "text": "a fox running on snow"}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["m", 1], "text": "blurry"}},
    }


def clip_nodes(frames: int) -> dict:
    """"img": a synthetic moving clip of ``frames`` 64x64 frames; "enc": its latent (VAEEncode)."""
    return {
        "img": {"class_type": "TinyTestImage", "inputs": {"width": 64, "height": 64, "frames": frames, "seed": 1}},
        "enc": {"class_type": "VAEEncode", "inputs": {"pixels": ["img", 0], "vae": ["m", 2]}},
    }


def blend(model, chunk_length, overlap, seed=0, frame_axis="auto") -> dict:
    return {"class_type": "RandomizedBlendContext", "inputs": {
        "model": model, "chunk_length": chunk_length, "overlap": overlap, "frame_axis": frame_axis, "seed": seed}}


def ksampler(model, latent, seed=0, steps=3, cfg=1.0, denoise=0.6) -> dict:
    return {"class_type": "KSampler", "inputs": {
        "model": model, "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": latent, "seed": seed,
        "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "simple", "denoise": denoise}}


def save_latent(samples) -> dict:
    return {"class_type": "SaveLatent", "inputs": {"samples": samples, "filename_prefix": f"blend/{uuid.uuid4().hex}"}}


def latents_of(server, entry, node_id):
    (path,) = [server.output_dir / item.get("subfolder", "") / item["filename"]
               for item in entry["outputs"][node_id]["latents"]]
    return load_file(str(path))["latent_tensor"]


def cached_nodes(entry) -> set:
    for kind, data in entry["status"]["messages"]:
        if kind == "execution_cached":
            return set(data["nodes"])
    return set()


# --------------------------------------------------------------------------- N in, N out

@pytest.mark.parametrize("kind, frames, chunk, overlap", [(WAN, 17, 3, 1), (SD15, 6, 4, 2)])
def test_n_frames_in_n_frames_out(comfy_server, kind, frames, chunk, overlap):
    prompt = {**model_nodes(kind), **clip_nodes(frames),
              "blend": blend(["m", 0], chunk, overlap),
              "ks": ksampler(["blend", 0], ["enc", 0]),
              "dec": {"class_type": "VAEDecode", "inputs": {"samples": ["ks", 0], "vae": ["m", 2]}},
              "save": {"class_type": "SaveImage", "inputs": {"images": ["dec", 0], "filename_prefix": f"n_{kind}"}}}
    if kind == WAN:  # a core model patch after ours, as Wan workflows have it
        prompt["shift"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": ["blend", 0], "shift": 5.0}}
        prompt["ks"]["inputs"]["model"] = ["shift", 0]
    entry = comfy_server.run(prompt, timeout=180)
    assert len(entry["outputs"]["save"]["images"]) == frames


# --------------------------------------------------------------------------- exact equalities

def test_overlap_zero_equals_the_chunks_sampled_alone(comfy_server):
    """Wan, 21 frames -> 6 latent frames, chunks of 3 with no overlap: two chunks, each denoised on its own."""
    sampler = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    prompt = {**model_nodes(WAN), **clip_nodes(21), "sampler": sampler,
              "sigmas": {"class_type": "BasicScheduler",
                         "inputs": {"model": ["m", 0], "scheduler": "simple", "steps": 4, "denoise": 0.6}},
              "blend": blend(["m", 0], 3, 0, seed=3),
              "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": 5}}}
    for name, model in (("g_blend", ["blend", 0]), ("g_plain", ["m", 0])):
        prompt[name] = {"class_type": "CFGGuider", "inputs": {
            "model": model, "positive": ["pos", 0], "negative": ["neg", 0], "cfg": 3.0}}
    prompt["whole"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
        "noise": ["noise", 0], "guider": ["g_blend", 0], "sampler": ["sampler", 0], "sigmas": ["sigmas", 0],
        "latent_image": ["enc", 0]}}
    for start in (0, 3):
        prompt[f"cut{start}"] = {"class_type": "LatentCut", "inputs": {
            "samples": ["enc", 0], "dim": "t", "index": start, "amount": 3}}
        prompt[f"noise{start}"] = {"class_type": "TinySlicedNoise", "inputs": {
            "full_latent": ["enc", 0], "seed": 5, "axis": 2, "start": start}}
        prompt[f"alone{start}"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": [f"noise{start}", 0], "guider": ["g_plain", 0], "sampler": ["sampler", 0],
            "sigmas": ["sigmas", 0], "latent_image": [f"cut{start}", 0]}}
    prompt["joined"] = {"class_type": "LatentConcat", "inputs": {
        "samples1": ["alone0", 0], "samples2": ["alone3", 0], "dim": "t"}}
    prompt["save_whole"] = save_latent(["whole", 0])
    prompt["save_joined"] = save_latent(["joined", 0])
    entry = comfy_server.run(prompt, timeout=180)
    whole, joined = latents_of(comfy_server, entry, "save_whole"), latents_of(comfy_server, entry, "save_joined")
    assert whole.shape == joined.shape == (1, 16, 6, 8, 8)
    torch.testing.assert_close(whole, joined, rtol=1e-5, atol=1e-5)
    assert (whole[:, :, :3] - whole[:, :, 3:]).abs().max() > 0.1  # the chunks really differ


@pytest.mark.parametrize("kind, frames", [(WAN, 17), (SD15, 6)])
def test_one_chunk_covering_all_frames_is_sampling_without_context_windows(comfy_server, kind, frames):
    latent_frames = 5 if kind == WAN else frames
    prompt = {**model_nodes(kind), **clip_nodes(frames),
              "blend": blend(["m", 0], latent_frames, 2, seed=9),
              "ks_blend": ksampler(["blend", 0], ["enc", 0], cfg=2.0),
              "ks_plain": ksampler(["m", 0], ["enc", 0], cfg=2.0)}
    prompt["s_blend"], prompt["s_plain"] = save_latent(["ks_blend", 0]), save_latent(["ks_plain", 0])
    entry = comfy_server.run(prompt, timeout=180)
    assert torch.equal(latents_of(comfy_server, entry, "s_blend"), latents_of(comfy_server, entry, "s_plain"))


# --------------------------------------------------------------------------- every step, every frame

def recorded_steps(server, entry):
    """[(sigma, fused denoised, [(window, {cond_or_uncond: output})])] per step, from TinySaveRecording."""
    (item,) = entry["outputs"]["rec_save"]["recordings"]
    events = torch.load(server.output_dir / item["filename"], weights_only=True)
    steps, calls = [], []
    for event in events:
        if event["kind"] == "call":
            parts = event["output"].chunk(len(event["cond_or_uncond"]), dim=0)
            inputs = event["input"].chunk(len(event["cond_or_uncond"]), dim=0)
            calls.append((range(event["window"][0], event["window"][-1] + 1),
                          dict(zip(event["cond_or_uncond"], parts)), dict(zip(event["cond_or_uncond"], inputs))))
        else:
            steps.append((event["sigma"], event["denoised"], calls))
            calls = []
    return steps


def record_prompt(kind, frames, chunk, overlap, steps, cfg, seed):
    prompt = {**model_nodes(kind)}
    if kind == WAN:
        prompt["lat"] = {"class_type": "EmptyHunyuanLatentVideo",
                         "inputs": {"width": 64, "height": 64, "length": 4 * (frames - 1) + 1, "batch_size": 1}}
    else:
        prompt["lat"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": frames}}
    name = f"rec_{uuid.uuid4().hex}"
    prompt.update({
        "blend": blend(["m", 0], chunk, overlap, seed=seed),
        # an image model's frames need cross-frame layers to depend on their chunk (see TinyRecordModelCalls)
        "rec": {"class_type": "TinyRecordModelCalls",
                "inputs": {"model": ["blend", 0], "name": name, "cross_frame_mix": 0.0 if kind == WAN else 0.5}},
        "ks": ksampler(["rec", 0], ["lat", 0], seed=4, steps=steps, cfg=cfg, denoise=1.0),
        "rec_save": {"class_type": "TinySaveRecording", "inputs": {"samples": ["ks", 0], "name": name}},
        "out": save_latent(["ks", 0]),
    })
    return prompt


@pytest.mark.parametrize("kind, frames, chunk, overlap, steps, cfg", [
    (WAN, 22, 6, 3, 16, 1.0),   # windows (0,6) (3,9) ... (15,21) (16,22): five 3-frame overlaps per step
    (SD15, 8, 4, 2, 3, 2.5),    # frames on the batch axis, with CFG (cond and uncond joined at the same cut)
])
def test_every_frame_takes_exactly_one_chunks_output_at_every_step(comfy_server, kind, frames, chunk, overlap,
                                                                    steps, cfg):
    axis, seed = (2 if kind == WAN else 0), 17
    entry = comfy_server.run(record_prompt(kind, frames, chunk, overlap, steps, cfg, seed), timeout=240)
    recorded = recorded_steps(comfy_server, entry)
    windows = chunk_windows(frames, chunk, overlap)
    assert len(recorded) == steps
    cut_counts = np.zeros(overlap + 1)
    for step, (sigma, fused, calls) in enumerate(recorded):
        assert [w for w, _, _ in calls] == windows  # one model call per chunk and step
        owners = []
        for f in range(frames):
            fused_f = fused.select(axis, f)
            matches = []
            for k, (window, outs, _) in enumerate(calls):
                if f not in window:
                    continue
                guided = outs[0] if cfg == 1.0 else outs[1] + (outs[0] - outs[1]) * cfg
                matches.append((float((guided.select(axis, f - window.start) - fused_f).abs().max()), k))
            matches.sort()
            if cfg == 1.0:
                assert matches[0][0] == 0.0, (step, f)  # bit for bit the owner's output
            assert matches[0][0] < 1e-5 and all(d > 1e-3 for d, _ in matches[1:]), (step, f, matches)
            owners.append(matches[0][1])
        assert owners == frame_owners(windows, draw_seams(windows, seed, step), frames), step
        for k in range(1, len(windows)):
            if windows[k - 1].stop - windows[k].start == overlap:  # the regular overlaps
                cut_counts[sum(owners[f] < k for f in range(windows[k].start, windows[k - 1].stop))] += 1
    if kind == WAN:
        assert cut_counts.sum() == 5 * steps
        assert chi_square(cut_counts) < CHI2_999[overlap - 1], cut_counts
        check_euler_joins_latents(comfy_server, entry, recorded, windows, seed)


def check_euler_joins_latents(server, entry, recorded, windows, seed):
    """Paper eq. 8, float64: each chunk takes its own Euler step from its slice of x; the chunks' next latents
    joined at the step's cut are the sampler's next latent (seen as the next step's model inputs)."""
    import comfy.latent_formats

    sigmas = [sigma for sigma, _, _ in recorded] + [0.0]
    frames = windows[-1].stop
    for step, (sigma, _, calls) in enumerate(recorded):
        nxt = []
        for window, outs, ins in calls:
            x, denoised = ins[0].double(), outs[0].double()
            nxt.append(x + (x - denoised) / sigma * (sigmas[step + 1] - sigma))
        joined = torch.cat([nxt[k].select(2, f - windows[k].start).unsqueeze(2) for f, k in
                            enumerate(frame_owners(windows, draw_seams(windows, seed, step), frames))], dim=2)
        if step + 1 < len(recorded):
            for window, _, ins in recorded[step + 1][2]:
                torch.testing.assert_close(ins[0].double(), joined[:, :, window.start:window.stop],
                                           rtol=1e-5, atol=1e-5)
        else:
            final = comfy.latent_formats.Wan21().process_out(joined)
            torch.testing.assert_close(latents_of(server, entry, "out").double(), final, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- what users do

def test_edited_prompts_in_a_row_reuse_the_node_and_reproduce(comfy_server):
    prompt = {**model_nodes(WAN), **clip_nodes(21), "blend": blend(["m", 0], 4, 2, seed=1),
              "ks": ksampler(["blend", 0], ["enc", 0], seed=1, steps=3), "out": save_latent(["ks", 0])}

    def run():
        prompt["out"] = save_latent(["ks", 0])
        entry = comfy_server.run(prompt, timeout=180)
        return entry, latents_of(comfy_server, entry, "out")

    _, first = run()
    prompt["ks"]["inputs"]["seed"] = 2  # the user re-rolls the sampler seed: the blend node is not re-run
    entry, other_noise = run()
    assert "blend" in cached_nodes(entry) and not torch.equal(first, other_noise)
    prompt["ks"]["inputs"]["seed"] = 1  # and back: the same video, nothing left over from the runs between
    _, again = run()
    assert torch.equal(first, again)
    prompt["blend"]["inputs"]["seed"] = 2  # other cuts: the same chunks, joined elsewhere
    _, other_cuts = run()
    assert not torch.equal(first, other_cuts)
    prompt["blend"]["inputs"]["chunk_length"] = 6  # one chunk for all 6 latent frames = no blending at all
    prompt["plain"] = ksampler(["m", 0], ["enc", 0], seed=1, steps=3)
    prompt["plain_out"] = save_latent(["plain", 0])
    entry, one_chunk = run()
    assert torch.equal(one_chunk, latents_of(comfy_server, entry, "plain_out"))


def test_replaces_core_context_windows_with_a_warning(comfy_server):
    prompt = {**model_nodes(WAN), **clip_nodes(9),
              "core": {"class_type": "WanContextWindowsManual", "inputs": {
                  "model": ["m", 0], "context_length": 5, "context_overlap": 4, "context_schedule": "standard_static",
                  "context_stride": 1, "closed_loop": False, "fuse_method": "pyramid"}},
              "blend": blend(["core", 0], 2, 1), "ks": ksampler(["blend", 0], ["enc", 0]),
              "out": save_latent(["ks", 0])}
    comfy_server.run(prompt, timeout=180)
    assert "replaces the context windows set on this model" in comfy_server.log_text()


def test_clear_errors(comfy_server):
    base = {**model_nodes(SD15), **clip_nodes(4), "ks": ksampler(["blend", 0], ["enc", 0]),
            "out": save_latent(["ks", 0])}
    with pytest.raises(PromptRejected, match=r"overlap \(8\) must be smaller than chunk_length \(8\)"):
        comfy_server.queue_prompt({**base, "blend": blend(["m", 0], 8, 8)})
    with pytest.raises(PromptFailed, match="frame axis 2 needs a video latent"):
        comfy_server.run({**base, "blend": blend(["m", 0], 2, 1, frame_axis="2 (video frames)")}, timeout=120)
    wan = {**model_nodes(WAN), **clip_nodes(9), "ks": ksampler(["blend", 0], ["enc", 0]), "out": save_latent(["ks", 0])}
    with pytest.raises(PromptFailed, match="would cut the batch of a video latent"):
        comfy_server.run({**wan, "blend": blend(["m", 0], 2, 1, frame_axis="0 (image batch)")}, timeout=120)


def test_schema_has_tooltips_and_the_papers_defaults(comfy_server):
    info = comfy_server.object_info("RandomizedBlendContext")["RandomizedBlendContext"]
    assert info["display_name"] == "StreamV2V Long-Video Chunks"
    inputs = info["input"]["required"]
    assert inputs["chunk_length"][1]["default"] == 24 and inputs["overlap"][1]["default"] == 8
    assert inputs["frame_axis"][1]["default"] == "auto"
    assert "4 video frames" in inputs["chunk_length"][1]["tooltip"]
    for name, spec in inputs.items():
        assert spec[1].get("tooltip"), name
    assert info["output"] == ["MODEL"]


# --------------------------------------------------------------------------- in-process: copies and versions

def test_the_handler_can_be_deep_copied_and_shared_between_clones(pack):
    """ComfyUI 0.3.x deep-copies model_options on clone(); newer ComfyUI shares the handler between clones."""
    import comfy.sample
    from host import tiny_video_models, tiny_models

    model = tiny_video_models.tiny_wan21_model(0, out_scale=0.3)
    blended = RandomizedBlendContext.execute(model, 3, 1, "auto", 4).args[0]
    handler = blended.model_options["context_handler"]
    assert isinstance(handler, RandomizedBlendHandler) and "context_handler" not in model.model_options
    clone = blended.clone()
    assert clone.model_options["context_handler"] is not handler  # deep-copied (0.3.x)
    shared = blended.clone()
    shared.model_options["context_handler"] = handler  # as newer ComfyUI's clone() leaves it
    cond = tiny_models.random_conditioning("sd15", 0)

    def sample(m, frames, seed):
        latent = torch.randn(1, 16, frames, 8, 8, generator=torch.Generator().manual_seed(seed))
        noise = comfy.sample.prepare_noise(latent, seed)
        return comfy.sample.sample(m, noise, 2, 1.0, "euler", "simple", cond, cond, latent, denoise=0.6, seed=seed)

    expected_a, expected_b = sample(clone, 5, 0), sample(clone, 4, 1)
    # two different videos through clones sharing one handler, interleaved: nothing carries over
    assert torch.equal(sample(blended, 5, 0), expected_a)
    assert torch.equal(sample(shared, 4, 1), expected_b)
    assert torch.equal(sample(blended, 5, 0), expected_a)


def test_weights_accept_newer_comfyuis_keywords_and_signature(pack):
    handler = RandomizedBlendHandler(4, 2, 0, seed=3)
    handler._step = 5
    windows = chunk_windows(10, 4, 2)
    owners = frame_owners(windows, draw_seams(windows, 3, 5), 10)
    for k, window in enumerate(windows):
        weights = _blend_weights(4, sigma=None, handler=handler, full_length=10, idxs=list(window),
                                 context_overlap=2)  # newer ComfyUI passes context_overlap too
        assert weights == [1.0 if owners[f] == k else 0.0 for f in window]
    assert copy.deepcopy(handler).window_weights(list(windows[1]), 10) == handler.window_weights(list(windows[1]), 10)

    def newer_init(self, context_schedule, fuse_method, context_length=1, context_overlap=0, context_stride=1,
                   closed_loop=False, dim=0, freenoise=False, cond_retain_index_list=[],
                   split_conds_to_windows=False, latent_retain_index_list=[], causal_window_fix=True):
        pass

    assert core_handler_options(newer_init) == {"causal_window_fix": False}
    assert core_handler_options() == {}  # ComfyUI 0.3.75
