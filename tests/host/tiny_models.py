"""Random-weight models built with ComfyUI's own classes, for tests and benchmarks.

No weights can be downloaded here, so every model is built from ComfyUI's architecture
classes and initialised from a seeded ``torch.Generator``. ComfyUI creates its layers
*uninitialised* (``comfy.ops.disable_weight_init``: the memory is whatever was there), so
``init_params_`` sets every parameter: matrices/kernels ~ N(0, 1/fan_in), biases 0,
1-D weights (norm scales) 1. Same seed -> bit-identical weights.

UNet builders take ``out_scale``: the final output conv is multiplied by it. A random UNet
cannot denoise, so with out_scale=1 sampled latents have a large magnitude (std ~100 after
4 euler steps from pure noise); out_scale=0 gives a model that predicts eps=0 (denoised == x,
like an untrained SD UNet whose output conv is zero-initialised).
device: ModelPatcher load device (default comfy.model_management.get_torch_device()).

Requires ComfyUI to be importable (``tests/conftest.py`` arranges that, with
``comfy.cli_args.args.cpu = True`` for in-process tests; the test server runs with ``--cpu``).

Public API
----------
tiny_sd15_model(seed=0, dtype=torch.float32, device=None, out_scale=1.0) -> ModelPatcher  (context 64)
tiny_sdxl_model(seed=0, dtype=torch.float32, device=None, out_scale=1.0) -> ModelPatcher  (context 96, pooled 64)
full_sd15_model(seed=0, dtype=torch.float32, device=None, out_scale=1.0) -> ModelPatcher  (real SD1.5 shapes)
tiny_taesd_vae(seed=0) -> comfy.sd.VAE
tiny_full_vae(seed=0, ch=32) -> comfy.sd.VAE     (SD KL autoencoder, small channel count)
full_sd_vae(seed=0) -> comfy.sd.VAE              (real SD KL autoencoder shapes)
tiny_clip(kind="sd15", seed=0) -> comfy.sd.CLIP  (real tokenizer, tiny random text model)
encode_prompt(clip, text) -> CONDITIONING        (what core CLIPTextEncode does)
random_conditioning(kind="sd15", seed=0, batch=1) -> CONDITIONING
tiny_checkpoint(kind="sd15", seed=0, vae="taesd") -> (MODEL, CLIP, VAE)
tiny_controlnet(seed=0) -> comfy.controlnet.ControlNet  (for tiny_sd15_model; hint [B, H, W, 3] images)
CONTEXT_DIM / POOLED_DIM: dicts keyed by kind ("sd15", "sdxl", "sd15_full")
"""
from __future__ import annotations

import math

import torch

import comfy.cldm.cldm
import comfy.controlnet
import comfy.model_management as model_management
import comfy.model_patcher
import comfy.ops
import comfy.sd
import comfy.sd1_clip
import comfy.sdxl_clip
import comfy.supported_models
import comfy.supported_models_base
import comfy.taesd.taesd
from comfy.ldm.models.autoencoder import AutoencoderKL

KINDS = ("sd15", "sdxl")

# Tiny text encoders (hidden sizes); the tiny UNets' context_dim follows from them.
_SD15_CLIP_L = 64
_SDXL_CLIP_L = 32
_SDXL_CLIP_G = 64

CONTEXT_DIM = {"sd15": _SD15_CLIP_L, "sdxl": _SDXL_CLIP_L + _SDXL_CLIP_G, "sd15_full": 768}
POOLED_DIM = {"sd15": _SD15_CLIP_L, "sdxl": _SDXL_CLIP_G, "sd15_full": 768}
# SDXL's ADM vector: pooled text embedding + 6 size/crop embeddings of 256 each.
_SDXL_ADM = POOLED_DIM["sdxl"] + 6 * 256


# --------------------------------------------------------------------------- initialisation

_NORM_TYPES = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)


@torch.no_grad()
def init_params_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Deterministically initialise every parameter of ``module`` in place.

    Weights with 2+ dims: normal(0, 1/sqrt(fan_in)); biases: 0; norm weights and other 1-D
    weights: 1; 0-D parameters (e.g. TAESD's vae_scale/vae_shift, CLIP's logit_scale) keep
    their constructor value. Draws happen on the CPU in float32 so the result does not depend
    on the device or dtype of the module.
    """
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    norm_param_ids = set()
    for m in module.modules():
        if isinstance(m, _NORM_TYPES) or type(m).__name__ in ("RMSNorm", "GroupNorm", "LayerNorm"):
            for p in m.parameters(recurse=False):
                norm_param_ids.add(id(p))
    for name, p in module.named_parameters():
        if p.ndim == 0:
            if not torch.isfinite(p).all():
                p.zero_()
            continue
        leaf = name.rsplit(".", 1)[-1]
        if id(p) in norm_param_ids:
            p.fill_(1.0 if leaf == "weight" else 0.0)
        elif leaf == "bias" or leaf.endswith("_bias"):
            p.zero_()
        elif p.ndim == 1:
            p.fill_(1.0)
        else:
            fan_in = math.prod(p.shape[1:])
            vals = torch.randn(p.shape, generator=g, dtype=torch.float32) / math.sqrt(fan_in)
            p.copy_(vals.to(dtype=p.dtype, device=p.device))
    for name, b in module.named_buffers():
        if b.is_floating_point() and not torch.isfinite(b).all():
            raise RuntimeError(f"buffer {name} is not finite after construction")
    return module


# --------------------------------------------------------------------------- UNets

def _unet_config(model_channels, channel_mult, num_res_blocks, depth_per_level, depth_middle,
                 context_dim, adm_in_channels, use_linear, extra=None):
    """A full unet_config in the format comfy.model_detection produces.

    depth_per_level: transformer depth per resolution level; expanded to the per-block
    lists ComfyUI uses (input: num_res_blocks per level; output: num_res_blocks + 1 per
    level, deepest first -- ComfyUI pops from the end).
    """
    levels = len(channel_mult)
    td = []
    tdo = []
    for lvl in range(levels):
        td += [depth_per_level[lvl]] * num_res_blocks
        tdo += [depth_per_level[lvl]] * (num_res_blocks + 1)
    cfg = {
        "use_checkpoint": False,
        "image_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": model_channels,
        "num_res_blocks": [num_res_blocks] * levels,
        "channel_mult": list(channel_mult),
        "transformer_depth": td,
        "transformer_depth_output": tdo,
        "transformer_depth_middle": depth_middle,
        "use_spatial_transformer": True,
        "legacy": False,
        "context_dim": context_dim,
        "adm_in_channels": adm_in_channels,
        "use_linear_in_transformer": use_linear,
        "use_temporal_attention": False,
        "use_temporal_resblock": False,
    }
    if adm_in_channels is not None:
        cfg["num_classes"] = "sequential"
    if extra:
        cfg.update(extra)
    return cfg


def _build_patcher(config_cls, unet_config, seed, dtype, device, out_scale=1.0, extra_unet=None,
                   compute_dtype=None):
    config = config_cls(unet_config)
    if extra_unet:
        config.unet_config.update(extra_unet)  # applied after the class's unet_extra_config
    # compute_dtype: weights stored in ``dtype`` (e.g. fp8, as UNETLoader's weight_dtype) and cast per layer.
    config.set_inference_dtype(dtype, compute_dtype)
    model = config.get_model({}, "", device=torch.device("cpu"))
    init_params_(model.diffusion_model, seed)
    if out_scale != 1.0:
        with torch.no_grad():
            for p in model.diffusion_model.out[-1].parameters():
                p.mul_(out_scale)
    model.diffusion_model.to(dtype)
    load_device = device if device is not None else model_management.get_torch_device()
    offload_device = model_management.unet_offload_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


def _tiny_sd15_config() -> dict:
    return _unet_config(32, [1, 2, 4, 4], 2, [1, 1, 1, 0], 1, CONTEXT_DIM["sd15"], None, False)


def tiny_sd15_model(seed: int = 0, dtype: torch.dtype = torch.float32, device=None, out_scale: float = 1.0,
                    compute_dtype: torch.dtype | None = None):
    """SD1.5-shaped UNet (comfy.supported_models.SD15 / model_base.BaseModel), 8.6M params.

    model_channels 32, channel_mult [1,2,4,4], attention at levels 0-2 and middle, 8 heads
    (SD15's own unet_extra_config), context_dim 64, EPS prediction, SD15 latent format.
    ``dtype=torch.float8_e4m3fn, compute_dtype=torch.float32`` stores the weights in fp8 and
    computes in fp32, as ComfyUI does for a UNet loaded with weight_dtype fp8.
    """
    return _build_patcher(comfy.supported_models.SD15, _tiny_sd15_config(), seed, dtype, device, out_scale,
                          compute_dtype=compute_dtype)


def micro_sd15_model(seed: int = 0, dtype: torch.dtype = torch.float32, device=None, out_scale: float = 1.0):
    """A smaller SD1.5-shaped UNet for long parametrised grids: two resolution levels (so frames
    from 16 px work), model_channels 32, attention at both levels and the middle, context_dim 64.
    """
    cfg = _unet_config(32, [1, 2], 1, [1, 1], 1, CONTEXT_DIM["sd15"], None, False)
    return _build_patcher(comfy.supported_models.SD15, cfg, seed, dtype, device, out_scale)


def tiny_sdxl_model(seed: int = 0, dtype: torch.dtype = torch.float32, device=None, out_scale: float = 1.0):
    """SDXL-shaped UNet (comfy.supported_models.SDXL / model_base.SDXL).

    model_channels 32, channel_mult [1,2,4], attention depth [0,1,2] per level (middle 2),
    linear proj in transformers, 16-channel heads, context_dim 96 (= tiny clip_l 32 + clip_g 64),
    adm_in_channels 64 + 6*256 (pooled clip_g output + size/crop embeddings). Conditioning
    needs ``pooled_output`` [B, 64] (``random_conditioning("sdxl")`` / ``tiny_clip("sdxl")``).
    """
    cfg = _unet_config(32, [1, 2, 4], 2, [0, 1, 2], 2, CONTEXT_DIM["sdxl"], _SDXL_ADM, True)
    return _build_patcher(comfy.supported_models.SDXL, cfg, seed, dtype, device, out_scale,
                          extra_unet={"num_head_channels": 16, "num_heads": -1})


def full_sd15_model(seed: int = 0, dtype: torch.dtype = torch.float32, device=None, out_scale: float = 1.0):
    """The full-size SD1.5 UNet architecture (860M params) with random weights (benchmarks).

    Takes ~10-20 s and 3.4 GB (fp32) to build on a CPU.
    """
    cfg = _unet_config(320, [1, 2, 4, 4], 2, [1, 1, 1, 0], 1, 768, None, False)
    return _build_patcher(comfy.supported_models.SD15, cfg, seed, dtype, device, out_scale)


# --------------------------------------------------------------------------- VAEs

def random_self_attention_lora(model, seed: int = 3, rank: int = 4) -> dict:
    """A LoRA state dict (kohya names) with random rank-``rank`` updates of every self-attention ``to_q``."""
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for name, weight in model.model.diffusion_model.named_parameters():
        if name.endswith("attn1.to_q.weight"):
            key = "lora_unet_" + name[: -len(".weight")].replace(".", "_")
            lora[f"{key}.lora_up.weight"] = torch.randn(weight.shape[0], rank, generator=g)
            lora[f"{key}.lora_down.weight"] = torch.randn(rank, weight.shape[1], generator=g)
    return lora


def tiny_taesd_vae(seed: int = 0):
    """comfy.sd.VAE around a randomly initialised TAESD (detected by its taesd_decoder.* keys)."""
    taesd = comfy.taesd.taesd.TAESD()
    init_params_(taesd, seed)
    return comfy.sd.VAE(sd=taesd.state_dict())


def _kl_vae(seed, ch, ch_mult=(1, 2, 4, 4)):
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                "ch": ch, "ch_mult": list(ch_mult), "num_res_blocks": 2, "attn_resolutions": [],
                "dropout": 0.0}
    params = {"ddconfig": ddconfig, "embed_dim": 4}
    ae = AutoencoderKL(**params)
    init_params_(ae, seed)
    return comfy.sd.VAE(sd=ae.state_dict(), config={"params": params})


def tiny_full_vae(seed: int = 0, ch: int = 32):
    """The SD KL autoencoder (AutoencoderKL, 8x down, 4 latent channels) with ``ch`` base channels."""
    return _kl_vae(seed, ch)


def full_sd_vae(seed: int = 0):
    """Full-size SD1.x/SDXL KL autoencoder architecture (ch 128, 84M params), random weights."""
    return _kl_vae(seed, 128)


# --------------------------------------------------------------------------- text encoders

def tiny_clip(kind: str = "sd15", seed: int = 0):
    """A comfy.sd.CLIP with the real SD1/SDXL tokenizers and a tiny random CLIP text model.

    sd15: CLIP-L-shaped, hidden 64, 2 layers (output [B,77,64], pooled [B,64]).
    sdxl: clip_l hidden 32 + clip_g hidden 64, 3 layers each (output [B,77,96], pooled [B,64]).
    Core ``CLIPTextEncode`` works with it.
    """
    def te(hidden, layers):
        return {"hidden_size": hidden, "intermediate_size": hidden * 4, "num_attention_heads": 4,
                "num_hidden_layers": layers, "projection_dim": hidden}

    if kind == "sd15":
        target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
        opts = {"clip_l_model_config": te(_SD15_CLIP_L, 2)}
    elif kind == "sdxl":
        target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
        # SDXL takes the penultimate layer (layer_idx -2), which needs at least 3 layers.
        opts = {"clip_l_model_config": te(_SDXL_CLIP_L, 3), "clip_g_model_config": te(_SDXL_CLIP_G, 3)}
    else:
        raise ValueError(f"unknown kind {kind!r}, expected one of {KINDS}")
    opts["dtype"] = torch.float32
    clip = comfy.sd.CLIP(target=target, model_options=opts)
    init_params_(clip.cond_stage_model, seed)
    return clip


def encode_prompt(clip, text: str):
    """CONDITIONING for ``text``, exactly as core CLIPTextEncode builds it."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def random_conditioning(kind: str = "sd15", seed: int = 0, batch: int = 1, tokens: int = 77):
    """CONDITIONING without a text encoder: [[cond [B,tokens,ctx], {"pooled_output": [B,pooled]}]]."""
    if kind not in CONTEXT_DIM:
        raise ValueError(f"unknown kind {kind!r}")
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    cond = torch.randn((batch, tokens, CONTEXT_DIM[kind]), generator=g)
    pooled = torch.randn((batch, POOLED_DIM[kind]), generator=g)
    return [[cond, {"pooled_output": pooled}]]


def tiny_checkpoint(kind: str = "sd15", seed: int = 0, vae: str = "taesd"):
    """(MODEL, CLIP, VAE) like CheckpointLoaderSimple returns, all tiny and random."""
    if kind == "sd15":
        model = tiny_sd15_model(seed)
    elif kind == "sdxl":
        model = tiny_sdxl_model(seed)
    else:
        raise ValueError(f"unknown kind {kind!r}, expected one of {KINDS}")
    clip = tiny_clip(kind, seed + 1)
    if vae == "taesd":
        v = tiny_taesd_vae(seed + 2)
    elif vae == "full":
        v = tiny_full_vae(seed + 2)
    else:
        raise ValueError(f"unknown vae {vae!r}, expected 'taesd' or 'full'")
    return model, clip, v


# --------------------------------------------------------------------------- ControlNet

def tiny_controlnet(seed: int = 0, zero_conv_std: float = 0.2, hint_gain: float = 20.0):
    """A ``comfy.controlnet.ControlNet`` (what core ControlNetLoader returns) for ``tiny_sd15_model``.

    ``comfy.cldm.cldm.ControlNet`` built from the tiny SD1.5 UNet's config (as ComfyUI's loader does:
    the UNet config without ``out_channels``, ``hint_channels=3``), every parameter initialised from
    ``seed``. A trained ControlNet's zero convolutions start at zero, so with zeros the hint would
    change nothing: they (and the middle block's) get N(0, zero_conv_std) weights instead, and the hint
    encoder's last convolution is multiplied by ``hint_gain`` so that different hints give clearly
    different outputs (with plain random weights the hint's share is ~0.1% of the output). Core
    ControlNetApply(Advanced) takes it with any IMAGE ``[B, H, W, 3]`` as hint.
    """
    config = comfy.supported_models.SD15(_tiny_sd15_config()).unet_config.copy()
    config.pop("out_channels")
    config.update(hint_channels=3, dtype=torch.float32, device=torch.device("cpu"),
                  operations=comfy.ops.disable_weight_init)
    control_model = comfy.cldm.cldm.ControlNet(**config)
    init_params_(control_model, seed)
    g = torch.Generator(device="cpu").manual_seed(int(seed) + 1)
    with torch.no_grad():
        for name, p in control_model.named_parameters():
            if name.startswith(("zero_convs.", "middle_block_out.")) and p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) * zero_conv_std)
        control_model.input_hint_block[-1].weight.mul_(hint_gain)
    return comfy.controlnet.ControlNet(control_model, load_device=model_management.get_torch_device())


def float64_stream_parts(vae_seed: int = 1):
    """(model, vae, positive, negative) for float64 exactness tests: a float64 tiny SD1.5 UNet, a TAESD, and
    two different one-row conditionings in float64."""
    model = tiny_sd15_model(0, dtype=torch.float64)
    positive = [[random_conditioning("sd15", 1)[0][0].to(torch.float64), {}]]
    negative = [[random_conditioning("sd15", 2)[0][0].to(torch.float64), {}]]
    return model, tiny_taesd_vae(vae_seed), positive, negative
