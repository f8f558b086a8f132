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

if os.environ.get("STREAMV2V_EMULATE_COMFY_038") == "1":  # a server emulating ComfyUI 0.38's clone()
    _spec = importlib.util.spec_from_file_location("streamv2v_test_host_comfy038", os.path.join(_HOST_DIR, "comfy038.py"))
    _comfy038 = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_comfy038)
    _comfy038.install()
    print("streamv2v test nodes: emulating ComfyUI 0.38's clone() (patch objects shared between clones)", flush=True)


class TinyCheckpointLoader:
    """MODEL, CLIP, VAE with tiny random weights (like CheckpointLoaderSimple).

    kind "sd15_micro": a smaller SD1.5-shaped UNet (two levels) for long parametrised runs.
    dtype: the UNet's dtype (float64 for exactness checks that float32 rounding would blur).
    """

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "kind": (["sd15", "sdxl", "sd15_micro"], {"default": "sd15"}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
            "vae": (["taesd", "full"], {"default": "taesd"}),
        }, "optional": {
            "dtype": (["float32", "float64"], {"default": "float32"}),
        }}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "testing/streamv2v"

    def load(self, kind, seed, vae, dtype="float32"):
        import torch
        if kind == "sd15_micro":
            model, clip, v = tiny_models.tiny_checkpoint("sd15", seed, vae)
            return tiny_models.micro_sd15_model(seed, dtype=getattr(torch, dtype)), clip, v
        if dtype != "float32":
            model = (tiny_models.tiny_sd15_model if kind == "sd15" else tiny_models.tiny_sdxl_model)(
                seed, dtype=getattr(torch, dtype))
            _, clip, v = tiny_models.tiny_checkpoint(kind, seed, vae)
            return model, clip, v
        return tiny_models.tiny_checkpoint(kind, seed, vae)


class TinyMaxDifference:
    """Output node: the largest absolute difference between two IMAGE batches (shown as ui output)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"a": ("IMAGE",), "b": ("IMAGE",),
                             "label": ("STRING", {"default": ""})}}

    RETURN_TYPES = ()
    FUNCTION = "compare"
    OUTPUT_NODE = True
    CATEGORY = "testing/streamv2v"

    def compare(self, a, b, label):
        diff = float((a.double() - b.double()).abs().max()) if a.shape == b.shape else float("inf")
        return {"ui": {"max_abs_diff": [diff], "label": [label], "frames": [int(a.shape[0])]}}


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


class TinySaveTensor:
    """Output node: saves an IMAGE batch losslessly (safetensors) in the output folder, as comfystream's
    SaveTensor hands frames on without PNG rounding; the history lists the file like a saved image."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "tensors/t"})}}

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "testing/streamv2v"

    def save(self, images, filename_prefix):
        import folder_paths
        import safetensors.torch
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, folder_paths.get_output_directory())
        os.makedirs(folder, exist_ok=True)
        file = f"{name}_{counter:05}_.safetensors"
        safetensors.torch.save_file({"images": images.contiguous().cpu()}, os.path.join(folder, file))
        return {"ui": {"tensors": [{"filename": file, "subfolder": subfolder, "type": "output"}]}}


NODE_CLASS_MAPPINGS = {
    "TinyCheckpointLoader": TinyCheckpointLoader,
    "TinyConditioning": TinyConditioning,
    "TinyTestImage": TinyTestImage,
    "TinyMaxDifference": TinyMaxDifference,
    "TinySaveTensor": TinySaveTensor,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "TinyCheckpointLoader": "Tiny Checkpoint Loader (test)",
    "TinyConditioning": "Tiny Conditioning (test)",
    "TinyTestImage": "Tiny Test Image (test)",
    "TinyMaxDifference": "Tiny Max Difference (test)",
    "TinySaveTensor": "Tiny Save Tensor (test)",
}

from .video_nodes import NODE_CLASS_MAPPINGS as _VIDEO_NODES, NODE_DISPLAY_NAME_MAPPINGS as _VIDEO_NAMES  # noqa: E402

NODE_CLASS_MAPPINGS.update(_VIDEO_NODES)
NODE_DISPLAY_NAME_MAPPINGS.update(_VIDEO_NAMES)

from .control_nodes import NODE_CLASS_MAPPINGS as _CONTROL_NODES, NODE_DISPLAY_NAME_MAPPINGS as _CONTROL_NAMES  # noqa: E402

NODE_CLASS_MAPPINGS.update(_CONTROL_NODES)
NODE_DISPLAY_NAME_MAPPINGS.update(_CONTROL_NAMES)

from .fault_nodes import NODE_CLASS_MAPPINGS as _FAULT_NODES, NODE_DISPLAY_NAME_MAPPINGS as _FAULT_NAMES  # noqa: E402

NODE_CLASS_MAPPINGS.update(_FAULT_NODES)
NODE_DISPLAY_NAME_MAPPINGS.update(_FAULT_NAMES)
