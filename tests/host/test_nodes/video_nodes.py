"""Test-only nodes for the long-video tests: a tiny Wan 2.1 checkpoint, sliced noise, a model-call recorder.

* ``TinyVideoModelLoader``: (MODEL, CLIP, VAE) of ``tiny_video_models`` (random weights), the stand-in for
  UNETLoader / CLIPLoader / VAELoader in video workflows.
* ``TinySlicedNoise``: NOISE for a chunk of a longer latent, equal to that chunk's slice of the noise KSampler
  draws for the whole latent (to sample chunks on their own with the same noise).
* ``TinyRecordModelCalls`` + ``TinySaveRecording``: every model call's window, sigma, input and output and every
  step's fused (post-CFG) denoised latent, saved with ``torch.save`` to the output folder as ``<name>.pt``.
  ``cross_frame_mix`` adds that share of the call's mean input frame to every output frame: a stand-in for the
  cross-frame layers (AnimateDiff-style) that make an image model's frames depend on their chunk; without
  them an image model treats every frame alone, and all chunks give a frame the same output.
"""
import importlib
import importlib.util
import os
import sys

import torch

_HOST_DIR = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
_PACKAGE = "streamv2v_test_host"


def _host_module(name):
    """tests/host/<name>.py imported as part of a package (so its relative imports work in the server too)."""
    if _PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(_PACKAGE, os.path.join(_HOST_DIR, "__init__.py"),
                                                      submodule_search_locations=[_HOST_DIR])
        package = importlib.util.module_from_spec(spec)
        sys.modules[_PACKAGE] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"{_PACKAGE}.{name}")


tiny_video_models = _host_module("tiny_video_models")
RECORDINGS = {}  # name -> list of events, in call order


class TinyVideoModelLoader:
    """MODEL, CLIP, VAE of a tiny random Wan 2.1-shaped video model (like the three Wan loaders)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "kind": (["wan21"], {"default": "wan21"}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
            "out_scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}),
        }}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "testing/streamv2v"

    def load(self, kind, seed, out_scale):
        return tiny_video_models.tiny_wan21_checkpoint(seed, out_scale=out_scale)


class _SlicedNoise:
    def __init__(self, full, seed, axis, start):
        self.full, self.seed, self.axis, self.start = full, seed, axis, start

    def generate_noise(self, input_latent):
        import comfy.sample

        noise = comfy.sample.prepare_noise(self.full["samples"], self.seed, self.full.get("batch_index"))
        return noise.narrow(self.axis, self.start, input_latent["samples"].shape[self.axis])


class TinySlicedNoise:
    """NOISE for a chunk: the noise of ``full_latent`` for ``seed`` (as KSampler draws it), cut along ``axis``."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "full_latent": ("LATENT",),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
            "axis": ("INT", {"default": 2, "min": 0, "max": 4}),
            "start": ("INT", {"default": 0, "min": 0, "max": 4096}),
        }}

    RETURN_TYPES = ("NOISE",)
    FUNCTION = "make"
    CATEGORY = "testing/streamv2v"

    def make(self, full_latent, seed, axis, start):
        return (_SlicedNoise(full_latent, seed, axis, start),)


class _Recorder:
    """Unet wrapper and post-CFG hook appending to RECORDINGS[name] (holds only settings: deep-copyable)."""

    def __init__(self, name, cross_frame_mix=0.0):
        self.name, self.cross_frame_mix = name, cross_frame_mix

    def model_call(self, apply_model, args):
        out = apply_model(args["input"], args["timestep"], **args["c"])
        if self.cross_frame_mix:  # per cond/uncond part: [frames, C, H, W] on the batch axis
            parts = len(args["cond_or_uncond"])
            mean = torch.cat([p.mean(dim=0, keepdim=True).expand_as(p) for p in args["input"].chunk(parts)])
            out = out + self.cross_frame_mix * mean
        window = args["c"]["transformer_options"].get("context_window")
        RECORDINGS.setdefault(self.name, []).append({
            "kind": "call", "window": list(window.index_list) if window is not None else None,
            "sigma": float(args["timestep"].reshape(-1)[0]), "cond_or_uncond": list(args["cond_or_uncond"]),
            "input": args["input"].detach().cpu().clone(), "output": out.detach().cpu().clone()})
        return out

    def post_cfg(self, args):
        RECORDINGS.setdefault(self.name, []).append({
            "kind": "step", "sigma": float(args["sigma"].reshape(-1)[0]),
            "denoised": args["denoised"].detach().cpu().clone()})
        return args["denoised"]


class TinyRecordModelCalls:
    """MODEL -> MODEL that records every model call and every step's fused denoised latent under ``name``."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "name": ("STRING", {"default": "recording"}),
                             "cross_frame_mix": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "testing/streamv2v"

    def patch(self, model, name, cross_frame_mix):
        recorder = _Recorder(name, cross_frame_mix)
        RECORDINGS.pop(name, None)
        patched = model.clone()
        patched.set_model_unet_function_wrapper(recorder.model_call)
        patched.set_model_sampler_post_cfg_function(recorder.post_cfg)
        return (patched,)


class TinySaveRecording:
    """Writes RECORDINGS[name] to <output>/<name>.pt once ``samples`` (the sampler's result) exists."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "name": ("STRING", {"default": "recording"})}}

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "testing/streamv2v"

    def save(self, samples, name):
        import folder_paths

        filename = f"{name}.pt"
        torch.save(RECORDINGS.pop(name, []), os.path.join(folder_paths.get_output_directory(), filename))
        return {"ui": {"recordings": [{"filename": filename, "subfolder": "", "type": "output"}]}}


NODE_CLASS_MAPPINGS = {
    "TinyVideoModelLoader": TinyVideoModelLoader,
    "TinySlicedNoise": TinySlicedNoise,
    "TinyRecordModelCalls": TinyRecordModelCalls,
    "TinySaveRecording": TinySaveRecording,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "TinyVideoModelLoader": "Tiny Video Model Loader (test)",
    "TinySlicedNoise": "Tiny Sliced Noise (test)",
    "TinyRecordModelCalls": "Tiny Record Model Calls (test)",
    "TinySaveRecording": "Tiny Save Recording (test)",
}
