"""What the user chose for a stream, and the frame sizes a model and VAE can take (checked before any work)."""
from __future__ import annotations

from dataclasses import dataclass

from ...streamv2v_core.stream.guidance import FULL, GUIDANCE_CHOICES
from .compiled_unet import OFF, compile_mode
from .device_vae import vae_downscale

FRESH, CONTINUE, IN_FLIGHT = "fresh", "continue", "continue, frames in flight"
GROUPS = 32  # GroupNorm groups in SD-family UNets
BANK_START_CHOICES = (FRESH, CONTINUE, IN_FLIGHT)


@dataclass(frozen=True)
class StreamSettings:
    """What the user chose for a stream; ``check()`` explains what is wrong before any work."""

    seed: int = 0
    steps: int = 4
    strength: float = 0.4
    cfg: float = 1.0
    stream_batch: bool = True
    fixed_noise: bool = True
    similarity_filter: bool = False
    similarity_threshold: float = 0.98
    max_skips: int = 10
    bank_start: str = FRESH
    compile: str | bool = OFF  # a mode of compiled_unet.COMPILE_MODES; a saved workflow's boolean maps onto them
    guidance: str = FULL
    residual_delta: float = 1.0

    def check(self) -> None:
        if not 1 <= int(self.steps) <= 50:
            raise ValueError(f"steps must be between 1 and 50 (LCM uses 4), got {self.steps}")
        if not 0.0 < float(self.strength) <= 1.0:
            raise ValueError(f"strength must be in (0, 1]: how much of each frame is re-noised "
                             f"(the paper uses 0.4), got {self.strength}")
        if float(self.cfg) < 0:
            raise ValueError(f"cfg must be 0 or more (1.0 = no guidance, the paper's setting), got {self.cfg}")
        if self.bank_start not in BANK_START_CHOICES:
            raise ValueError(f"bank_start must be one of {BANK_START_CHOICES}, got {self.bank_start!r}")
        if not 0.0 <= float(self.similarity_threshold) < 1.0:
            raise ValueError(f"similarity_threshold must be in [0, 1), got {self.similarity_threshold}")
        compile_mode(self.compile)
        if self.guidance not in GUIDANCE_CHOICES:
            raise ValueError(f"guidance must be one of {GUIDANCE_CHOICES}, got {self.guidance!r}")
        if not 0.0 <= float(self.residual_delta) <= 1.0:
            raise ValueError(f"residual_delta must be in [0, 1] (StreamDiffusion's delta; 1 = the whole virtual "
                             f"negative), got {self.residual_delta}")


def residual_applies(guidance: str, cfg: float) -> bool:
    """Whether residual CFG guides a frame: a residual guidance and cfg above 1 (one UNet pass per row).

    At cfg 1 or below a residual guidance runs the positive prompt alone, as StreamDiffusion does (it
    guides only above 1): below 1 the virtual negative would pull each frame towards its own input
    (self-negative) or its negative estimate, which is what strength already sets, at no saving."""
    return guidance != FULL and float(cfg) > 1.0


# --------------------------------------------------------------------------- input checks

def check_frame_size(height: int, width: int, multiple: int = 8, smallest: int | None = None) -> None:
    """Refuse frame sizes the VAE cannot map to whole latents or the model cannot take, naming the fix."""
    if height % multiple or width % multiple:
        fit_h, fit_w = max(multiple, height // multiple * multiple), max(multiple, width // multiple * multiple)
        raise ValueError(f"frame size {width}x{height} is not divisible by {multiple}: resize or crop the frames "
                         f"to e.g. {fit_w}x{fit_h} first (core 'Upscale Image' or 'ImageCrop' node, or the loop "
                         f"node's resize option)")
    if smallest and (height < smallest or width < smallest):
        raise ValueError(f"frames of {width}x{height} are too small for this model: after its UNet halves the "
                         f"latent, a level would be left with less than 2x2 values to normalise, so "
                         f"{smallest}x{smallest} is the smallest frame it takes (resize the frames to at least "
                         f"that, e.g. with core 'Upscale Image' or the loop node's width/height)")


def smallest_frame(model, vae) -> int:
    """The smallest frame side the model takes, from the VAE's factor and the UNet's layout.

    The UNet halves the latent once per level (stride-2 convolutions: ``ceil(s / 2)``), and the
    first block of each level normalises the incoming activation in groups of 32 channels,
    which needs more than one value per group: with 32 channels or fewer that activation must
    be at least 2x2. (Real SD1.5/SDXL UNets have 320 channels and more: any whole latent works.)
    """
    factor = vae_downscale(vae)
    config = getattr(getattr(getattr(model, "model", None), "model_config", None), "unet_config", None) or {}
    mult = list(config.get("channel_mult") or [1])
    width = int(config.get("model_channels") or 320)
    incoming = [width] + [width * m for m in mult[:-1]]  # channels entering level 0, 1, ...
    latent = max([1] + [2 ** level + 1 for level, channels in enumerate(incoming) if channels <= GROUPS])
    return factor * latent


def check_stream_inputs(model, vae, height: int, width: int) -> tuple[int, int, int, int]:
    """Refuse a model/VAE mismatch or a frame size they cannot take; returns the latent shape ``(1, C, h, w)``."""
    channels = model.get_model_object("latent_format").latent_channels
    vae_channels = getattr(vae, "latent_channels", channels)
    if vae_channels != channels:
        raise ValueError(f"the VAE makes {vae_channels}-channel latents but the model ({type(model.model).__name__}) "
                         f"works on {channels}-channel latents: connect the VAE that belongs to this checkpoint "
                         f"(for SD1.5/SDXL a 4-channel VAE or TAESD)")
    factor = vae_downscale(vae)
    check_frame_size(height, width, factor, smallest_frame(model, vae))
    return (1, channels, height // factor, width // factor)
