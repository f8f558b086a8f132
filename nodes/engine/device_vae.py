"""Encoding and decoding stream frames with a ComfyUI VAE on its device, once per stream.

``comfy.sd.VAE.encode`` / ``decode`` are made for batches: every call asks model
management to load the VAE, measures free memory, and returns its result on the CPU.
Called once per frame that costs a dozen host-device round trips and a latent that
travels to the CPU and back. ``DeviceCodec`` does the same arithmetic (the VAE's own
``process_input``, ``first_stage_model`` and ``process_output``) on the device; the VAE is
loaded once for the whole stream, together with the UNet (``attach``). VAE types
without that plain structure (video VAEs, chunked-IO VAEs) go through ``vae.encode`` /
``vae.decode`` instead, with a log line saying so.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("streamv2v")
ADDITIONAL_MODELS_KEY = "streamv2v_vae"


def attach(model, vae) -> None:
    """Let ComfyUI load ``vae`` with the UNet when sampling starts (``model`` is our own clone)."""
    patcher = getattr(vae, "patcher", None)
    if patcher is not None and hasattr(model, "set_additional_models"):
        model.set_additional_models(ADDITIONAL_MODELS_KEY, [patcher])


def vae_downscale(vae) -> int:
    """Pixels per latent cell (8 for SD1.5/SDXL VAEs and TAESD).

    Only a VAE object without ``spacial_compression_encode`` (older ComfyUI) is taken to be SD's 8;
    an error inside it is not hidden, and a ratio that is no whole number is refused by name.
    """
    method = getattr(vae, "spacial_compression_encode", None)
    if method is None:
        return 8
    ratio = method()
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio < 1 or int(ratio) != ratio:
        raise ValueError(f"the VAE reports {ratio!r} pixels per latent cell; StreamV2V needs a whole number (an "
                         f"image VAE such as SD1.5's, SDXL's or TAESD): connect one of those")
    return int(ratio)


class DeviceCodec:
    """Frames ``[H, W, 3]`` in 0..1 <-> latents ``[1, C, h, w]``, computed on the VAE's device."""

    def __init__(self, vae):
        self.vae = vae
        model = getattr(vae, "first_stage_model", None)
        self.direct = (model is not None and all(hasattr(vae, a) for a in ("process_input", "process_output",
                                                                          "vae_dtype", "device"))
                       and getattr(vae, "latent_dim", 2) == 2 and getattr(vae, "extra_1d_channel", None) is None
                       and not getattr(model, "comfy_has_chunked_io", False))
        if not self.direct:
            log.info("StreamV2V: this VAE type has no plain encode/decode on its device; frames go through "
                     "ComfyUI's VAE wrapper (slower per frame)")
        self.device = torch.device(vae.device) if self.direct else torch.device("cpu")

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[H, W, 3]`` in 0..1 (on ``self.device`` for the direct path) -> latent ``[1, C, h, w]`` float32."""
        if not self.direct:
            return self.vae.encode(pixels[None, ..., :3].cpu()).float()
        x = self.vae.process_input(pixels[None, ..., :3].movedim(-1, 1)).to(self.device, self.vae.vae_dtype)
        return self.vae.first_stage_model.encode(x).float()

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Latent ``[1, C, h, w]`` -> image ``[H, W, 3]`` in 0..1, float32 (on the VAE's device)."""
        if not self.direct:
            return self.vae.decode(latent)[0].float()
        image = self.vae.first_stage_model.decode(latent.to(self.device, self.vae.vae_dtype))
        return self.vae.process_output(image.float())[0].movedim(0, -1)
