"""Random-weight video models built with ComfyUI's own classes: a Wan 2.1-shaped DiT and VAE.

Like ``tiny_models`` (whose ``init_params_`` initialises every parameter from a seeded generator),
for tests and benchmarks of the long-video nodes; nothing is downloaded.

* ``tiny_wan21_model``: ``comfy.supported_models.WAN21_T2V`` with a small config ->
  ``comfy.model_base.WAN21`` (``comfy.ldm.wan.model.WanModel``): flow matching (shift 8), 16-channel
  latents ``[B, 16, T, H/8, W/8]``, text_dim 64 so ``tiny_models.tiny_clip("sd15")`` (context 64)
  stands in for the umT5 text encoder.
* ``tiny_wan21_vae``: ``comfy.ldm.wan.vae.WanVAE`` with a small base width, detected by
  ``comfy.sd.VAE`` from its state dict like the real ``wan_2.1_vae.safetensors``: 8x spatial and 4x
  temporal compression, causal (video frames ``1 + 4k`` <-> latent frames ``1 + k``).

Public API
----------
tiny_wan21_model(seed=0, dtype=torch.float32, device=None, out_scale=1.0) -> ModelPatcher
tiny_wan21_vae(seed=0, dim=8) -> comfy.sd.VAE
tiny_wan21_checkpoint(seed=0) -> (MODEL, CLIP, VAE)
WAN_TEXT_DIM: the tiny model's text width (= tiny_models.CONTEXT_DIM["sd15"])
"""
from __future__ import annotations

import torch

import comfy.ldm.wan.vae
import comfy.model_management as model_management
import comfy.model_patcher
import comfy.sd
import comfy.supported_models

from . import tiny_models

WAN_TEXT_DIM = tiny_models.CONTEXT_DIM["sd15"]


def _wan21_unet_config() -> dict:
    """What comfy.model_detection reports for a Wan 2.1 T2V checkpoint, at toy size (2 blocks, width 64)."""
    return {
        "image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2), "in_dim": 16, "out_dim": 16,
        "dim": 64, "ffn_dim": 128, "freq_dim": 32, "text_dim": WAN_TEXT_DIM, "num_heads": 4, "num_layers": 2,
        "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6,
    }


def tiny_wan21_model(seed: int = 0, dtype: torch.dtype = torch.float32, device=None, out_scale: float = 1.0):
    """Wan 2.1-shaped T2V DiT (2 blocks, width 64, 4 heads), random weights; ``out_scale`` scales its head.

    The head's output is the flow velocity; with out_scale < 1 sampled latents stay near the input
    (a random network cannot denoise), which keeps SDEdit outputs image-like for metrics.
    """
    config = comfy.supported_models.WAN21_T2V(_wan21_unet_config())
    config.set_inference_dtype(dtype, None)
    model = config.get_model({}, "", device=torch.device("cpu"))
    tiny_models.init_params_(model.diffusion_model, seed)
    if out_scale != 1.0:
        with torch.no_grad():
            for p in model.diffusion_model.head.head.parameters():
                p.mul_(out_scale)
    model.diffusion_model.to(dtype)
    load_device = device if device is not None else model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device,
                                            offload_device=model_management.unet_offload_device())


def tiny_wan21_vae(seed: int = 0, dim: int = 8):
    """The Wan 2.1 causal video VAE (``WanVAE``, z_dim 16) with base width ``dim``, random weights.

    ``comfy.sd.VAE`` recognises it by its keys and reads the width from ``decoder.head.0.gamma``, as
    for the real file. RMS-norm scales (``gamma``, stored 4-D) are set to 1 like a fresh norm.
    """
    vae = comfy.ldm.wan.vae.WanVAE(dim=dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                   temperal_downsample=[False, True, True], dropout=0.0)
    tiny_models.init_params_(vae, seed)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.fill_(1.0)
    return comfy.sd.VAE(sd=vae.state_dict())


def tiny_wan21_checkpoint(seed: int = 0, out_scale: float = 1.0):
    """(MODEL, CLIP, VAE) for Wan 2.1 workflows: the tiny DiT, a tiny CLIP (context 64) for the text, the tiny VAE."""
    return (tiny_wan21_model(seed, out_scale=out_scale), tiny_models.tiny_clip("sd15", seed + 1),
            tiny_wan21_vae(seed + 2))
