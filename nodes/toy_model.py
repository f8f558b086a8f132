"""The toy model the pack trains itself (``scripts/train_toy_model.py``): load it as ordinary MODEL, CLIP, VAE.

Three safetensors files in ``scripts/toy_model/``:

* ``streamv2v_toy_unet.safetensors``: a small SD1.5-shaped UNet, keys as ComfyUI's
  ``diffusion_model`` (the same names as in an SD1.5 checkpoint without the prefix).
* ``streamv2v_toy_clip.safetensors``: a small CLIP-L-shaped text encoder (real SD1 tokenizer),
  keys as a CLIP-L text-encoder file (``text_model.*``); its size is in the file's metadata.
* ``streamv2v_toy_taesd.safetensors``: a TAESD-shaped autoencoder with ``vae_scale``: core
  **Load VAE** (``VAELoader``) loads it as it is, from any ``vae`` model folder.

Why not core Load Checkpoint / Load Diffusion Model / Load CLIP for the UNet and the text encoder:
ComfyUI recognises an SD1.5 UNet by its width (``comfy.supported_models.SD15`` matches only
``model_channels`` 320 and ``context_dim`` 768), and core Load CLIP builds CLIP-L from a fixed
768-wide config. A model of a few MB cannot pass either test. So this module builds them with
ComfyUI's own classes, the way those loaders do after detection: the UNet layout is read from
the weights by ``comfy.model_detection.detect_unet_config`` and built as ``SD15`` (latent format,
noise schedule, EPS prediction); the text encoder is ``comfy.sd.CLIP`` with ``SD1ClipModel`` and
a size override. Nothing in ComfyUI is patched; what comes out is what the core loaders return.
"""
from __future__ import annotations

import json
import pathlib

import torch

import comfy.model_detection
import comfy.model_management as model_management
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models
import comfy.supported_models_base
import comfy.utils
from comfy_api.latest import io

from ._schema import LOADER_CATEGORY

TOY_DIR = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "toy_model"
UNET_FILE = "streamv2v_toy_unet.safetensors"
CLIP_FILE = "streamv2v_toy_clip.safetensors"
VAE_FILE = "streamv2v_toy_taesd.safetensors"
CLIP_CONFIG_KEY = "streamv2v_clip_l_config"  # safetensors metadata: the text encoder's size (JSON)


def toy_files(folder: pathlib.Path | str | None = None) -> dict[str, pathlib.Path]:
    """Paths of the three files in ``folder`` (default: the committed ``scripts/toy_model``)."""
    root = pathlib.Path(folder) if folder is not None else TOY_DIR
    return {"unet": root / UNET_FILE, "clip": root / CLIP_FILE, "vae": root / VAE_FILE}


def sd15_config_from_weights(sd: dict) -> comfy.supported_models.SD15:
    """The SD15 model config for a UNet state dict of any width (layout detected from the weights)."""
    unet_config = comfy.model_detection.detect_unet_config(sd, "")
    if unet_config is None or unet_config.get("adm_in_channels") is not None \
            or unet_config.get("use_linear_in_transformer"):
        raise ValueError("not an SD1.5-shaped UNet (no class embedding, conv projections in the transformers)")
    return comfy.supported_models.SD15(unet_config)


def unet_from_state_dict(sd: dict, device=None) -> comfy.model_patcher.ModelPatcher:
    """A ModelPatcher around the SD1.5-shaped UNet in ``sd`` (weights in ComfyUI's names), in fp32 on the CPU
    side; ``device`` is where it runs (default ComfyUI's torch device)."""
    config = sd15_config_from_weights(sd)
    config.set_inference_dtype(torch.float32, None)  # a few MB: fp16 storage, fp32 compute everywhere
    model = config.get_model(sd, "", device=torch.device("cpu"))
    model.load_model_weights(sd, "")
    load_device = device if device is not None else model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device,
                                            offload_device=model_management.unet_offload_device())


def load_toy_unet(path, device=None) -> comfy.model_patcher.ModelPatcher:
    """MODEL from a toy UNet file."""
    return unet_from_state_dict(comfy.utils.load_torch_file(str(path)), device)


def clip_from_config(config: dict, state_dict: dict | None = None) -> comfy.sd.CLIP:
    """comfy.sd.CLIP (SD1 tokenizer + CLIP-L-shaped text model of ``config``'s size), weights from ``state_dict``."""
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    clip = comfy.sd.CLIP(target=target, model_options={"clip_l_model_config": dict(config), "dtype": torch.float32})
    if state_dict is not None:
        missing, unexpected = clip.load_sd(state_dict)
        # ComfyUI leaves unloaded layers uninitialised: a missing weight would be garbage, so refuse it.
        missing = [k for k in missing if "position_ids" not in k and "text_projection" not in k]
        if missing or unexpected:
            raise ValueError(f"text encoder weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return clip


def load_toy_clip(path) -> comfy.sd.CLIP:
    """CLIP from a toy text-encoder file (size from its metadata)."""
    sd, metadata = comfy.utils.load_torch_file(str(path), return_metadata=True)
    if not metadata or CLIP_CONFIG_KEY not in metadata:
        raise ValueError(f"{path} has no '{CLIP_CONFIG_KEY}' metadata: not a StreamV2V toy text encoder")
    return clip_from_config(clip_config_of(metadata[CLIP_CONFIG_KEY], sd, path), sd)


def clip_config_of(text: str, sd: dict, path) -> dict:
    """The text encoder's size from a file's metadata ``text`` (JSON), checked against the weights ``sd`` it
    comes with: a file's metadata never makes the loader build (allocate) more than the file's own weights
    hold (a text encoder declared 100,000 wide would be tens of GB). ValueError naming the file otherwise."""
    try:
        config = json.loads(text)
    except (ValueError, RecursionError):
        config = None
    if not isinstance(config, dict) or sorted(config) != sorted(CLIP_SIZES) \
            or any(type(v) is not int or v < 1 for v in config.values()):
        raise ValueError(f"{path}: the '{CLIP_CONFIG_KEY}' metadata must be a JSON object of the whole numbers "
                         f"{', '.join(CLIP_SIZES)}")
    held = clip_sizes_of(sd, path)
    wrong = [f"{k} {config[k]} (the weights hold {v})" for k, v in held.items() if config[k] != v]
    if wrong or held["hidden_size"] % config["num_attention_heads"]:
        raise ValueError(f"{path}: the metadata does not describe the text encoder the file holds: "
                         f"{'; '.join(wrong) or 'num_attention_heads must divide hidden_size'}")
    return config


CLIP_SIZES = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "projection_dim")


def clip_sizes_of(sd: dict, path) -> dict:
    """The sizes a CLIP-L-shaped text encoder's weights ``sd`` (``text_model.*``) hold (all but the number of
    attention heads, which weights do not show)."""
    try:
        hidden = sd["text_model.embeddings.token_embedding.weight"].shape[1]
        intermediate = sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
    except (KeyError, IndexError):
        raise ValueError(f"{path}: no CLIP-L-shaped text encoder weights (text_model.*)") from None
    layers = {key.split(".")[3] for key in sd if key.startswith("text_model.encoder.layers.")}
    projection = sd.get("text_projection.weight")
    return {"hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": len(layers),
            "projection_dim": projection.shape[0] if projection is not None else hidden}


def load_toy_vae(path) -> comfy.sd.VAE:
    """VAE from the toy TAESD file, exactly as core Load VAE does it."""
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(path)))
    vae.throw_exception_if_invalid()
    return vae


def load_toy_model(folder=None, device=None):
    """(MODEL, CLIP, VAE) of the toy model in ``folder`` (default the committed one)."""
    files = toy_files(folder)
    absent = [str(p) for p in files.values() if not p.is_file()]
    if absent:
        raise FileNotFoundError(f"toy model files missing: {absent}; make them with "
                                f"`python scripts/train_toy_model.py` (see README)")
    return load_toy_unet(files["unet"], device), load_toy_clip(files["clip"]), load_toy_vae(files["vae"])


# --------------------------------------------------------------------------- single-file checkpoints

UNET_PREFIX, CLIP_PREFIX, VAE_PREFIX = "model.diffusion_model.", "cond_stage_model.transformer.", "first_stage_model."


def save_as_checkpoint(path, folder=None) -> None:
    """Write the toy model as one SD1.5-layout checkpoint file (``model.diffusion_model.*``,
    ``cond_stage_model.transformer.text_model.*``, ``first_stage_model.*``), text-encoder size in its metadata."""
    from safetensors.torch import save_file

    files = toy_files(folder)
    sd = {}
    for prefix, key in ((UNET_PREFIX, "unet"), (CLIP_PREFIX, "clip"), (VAE_PREFIX, "vae")):
        part, metadata = comfy.utils.load_torch_file(str(files[key]), return_metadata=True)
        sd.update({prefix + k: v for k, v in part.items()})
        if key == "clip":
            clip_metadata = {CLIP_CONFIG_KEY: metadata[CLIP_CONFIG_KEY]}
    save_file(sd, str(path), metadata=clip_metadata)


def load_checkpoint_file(path, device=None):
    """(MODEL, CLIP, VAE) from a single-file checkpoint: core ComfyUI's loader first (any real SD1.5/SDXL/...
    checkpoint), and for a small SD1.5-shaped one that core detection refuses (see the module docstring),
    the same split by prefix core does, built as above."""
    try:
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)
    except RuntimeError as core_error:
        sd, metadata = comfy.utils.load_torch_file(str(path), return_metadata=True)
        parts = {prefix: {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
                 for prefix in (UNET_PREFIX, CLIP_PREFIX, VAE_PREFIX)}
        if not parts[UNET_PREFIX] or not (metadata or {}).get(CLIP_CONFIG_KEY):
            raise core_error
        unet = unet_from_state_dict(parts[UNET_PREFIX], device)
        config = clip_config_of(metadata[CLIP_CONFIG_KEY], parts[CLIP_PREFIX], path)
        clip = clip_from_config(config, parts[CLIP_PREFIX])
        vae = comfy.sd.VAE(sd=parts[VAE_PREFIX])
        vae.throw_exception_if_invalid()
        return unet, clip, vae
    if clip is None:
        raise ValueError(f"{path} holds no text encoder: this demo needs a checkpoint with CLIP weights")
    return model, clip, vae


# --------------------------------------------------------------------------- the node

TOY_NAME = "streamv2v_toy (128 px, trained on the CPU)"


class StreamV2VToyModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StreamV2VToyModel",
            display_name="StreamV2V Toy Model",
            category=LOADER_CATEGORY,
            description="The small model this pack trains itself on real clips (scripts/train_toy_model.py): a "
                        "TAESD-shaped VAE, a small SD1.5-shaped UNet and a tiny CLIP text encoder. It knows two "
                        "prompts, 'a photo' (the frame as it is) and 'a watercolor painting' (an OpenCV style), "
                        "at 128x128. For trying workflows and measuring the bank where no real checkpoint is at "
                        "hand; a real SD1.5 checkpoint goes through core Load Checkpoint as usual.",
            inputs=[io.Combo.Input("model", options=[TOY_NAME], default=TOY_NAME,
                                   tooltip="The committed toy model (scripts/toy_model/). Its VAE also loads "
                                           "with core Load VAE.")],
            outputs=[io.Model.Output(display_name="MODEL"), io.Clip.Output(display_name="CLIP"),
                     io.Vae.Output(display_name="VAE")],
        )

    @classmethod
    def execute(cls, model=TOY_NAME) -> io.NodeOutput:
        unet, clip, vae = load_toy_model()
        return io.NodeOutput(unet, clip, vae)


NODES = [StreamV2VToyModel]
