"""Test-only ComfyUI custom nodes: tiny random-weight checkpoints and conditioning.

Loaded by the test server (tests/host/server.py) from a symlink in its custom_nodes folder,
under a module name ComfyUI derives from that path, so tiny_models is loaded by file path
rather than through a package name.
"""
import importlib.util
import os
import sys

_HOST_DIR = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
_MOD_NAME = "streamv2v_test_host_tiny_models"


def _load_tiny_models():
    mod = sys.modules.get(_MOD_NAME)
    if mod is None:
        spec = importlib.util.spec_from_file_location(_MOD_NAME, os.path.join(_HOST_DIR, "tiny_models.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[_MOD_NAME] = mod
        spec.loader.exec_module(mod)
    return mod


tiny_models = _load_tiny_models()


class TinyCheckpointLoader:
    """MODEL, CLIP, VAE with tiny random weights (like CheckpointLoaderSimple)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "kind": (["sd15", "sdxl"], {"default": "sd15"}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
            "vae": (["taesd", "full"], {"default": "taesd"}),
        }}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "testing/streamv2v"

    def load(self, kind, seed, vae):
        return tiny_models.tiny_checkpoint(kind, seed, vae)


class TinyConditioning:
    """Random CONDITIONING of the right shape for a tiny model kind (no text encoder)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "kind": (["sd15", "sdxl"], {"default": "sd15"}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "testing/streamv2v"

    def make(self, kind, seed):
        return (tiny_models.random_conditioning(kind, seed),)


class TinyTestImage:
    """A deterministic synthetic IMAGE batch [B,H,W,3] in [0,1] (moving gradient texture)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "width": ("INT", {"default": 64, "min": 8, "max": 4096, "step": 8}),
            "height": ("INT", {"default": 64, "min": 8, "max": 4096, "step": 8}),
            "frames": ("INT", {"default": 4, "min": 1, "max": 4096}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "make"
    CATEGORY = "testing/streamv2v"

    def make(self, width, height, frames, seed):
        import torch
        g = torch.Generator().manual_seed(seed)
        phase = torch.rand(3, generator=g) * 6.283
        y = torch.linspace(0, 1, height).view(1, height, 1, 1)
        x = torch.linspace(0, 1, width).view(1, 1, width, 1)
        t = torch.arange(frames, dtype=torch.float32).view(frames, 1, 1, 1)
        img = 0.5 + 0.5 * torch.sin(6.283 * (2 * x + 3 * y) + 0.3 * t + phase.view(1, 1, 1, 3))
        return (img.clamp(0, 1),)


NODE_CLASS_MAPPINGS = {
    "TinyCheckpointLoader": TinyCheckpointLoader,
    "TinyConditioning": TinyConditioning,
    "TinyTestImage": TinyTestImage,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "TinyCheckpointLoader": "Tiny Checkpoint Loader (test)",
    "TinyConditioning": "Tiny Conditioning (test)",
    "TinyTestImage": "Tiny Test Image (test)",
}

from .video_nodes import NODE_CLASS_MAPPINGS as _VIDEO_NODES, NODE_DISPLAY_NAME_MAPPINGS as _VIDEO_NAMES  # noqa: E402

NODE_CLASS_MAPPINGS.update(_VIDEO_NODES)
NODE_DISPLAY_NAME_MAPPINGS.update(_VIDEO_NAMES)
