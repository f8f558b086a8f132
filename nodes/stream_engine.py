"""Runs frames through a ComfyUI model with the stream batch: the engine behind the sampler and loop nodes.

The whole stream is one ComfyUI sampling run (``CFGGuider.sample`` with a custom
sampler function), so the model's wrappers, ControlNets, LoRAs, model-sampling
overrides and cond/uncond batching all apply as in a KSampler. Inside it, every
model call carries the frame offset of each row so the bank keys each frame apart.
"""
from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

import comfy.model_management
import comfy.samplers

from ..streamv2v_core.bank import FeatureBank
from ..streamv2v_core.patches import FRAMES_KEY, STREAM_KEY
from ..streamv2v_core.similarity import SimilarityFilter
from ..streamv2v_core.stream import NoiseSource, stream_denoise
from .model_patching import model_signature

log = logging.getLogger("streamv2v")


@dataclass(frozen=True)
class StreamSettings:
    """What the user chose for a stream; ``check()`` explains what is wrong before any work."""

    seed: int = 0
    steps: int = 4
    strength: float = 0.4
    cfg: float = 1.0
    stream_batch: bool = True
    fixed_noise: bool = True
    scheduler: str = "sgm_uniform"
    similarity_filter: bool = False
    similarity_threshold: float = 0.98
    max_skips: int = 10

    def check(self) -> None:
        if not 1 <= int(self.steps) <= 50:
            raise ValueError(f"steps must be between 1 and 50 (LCM uses 4), got {self.steps}")
        if not 0.0 < float(self.strength) <= 1.0:
            raise ValueError(f"strength must be in (0, 1]: how much of each frame is re-noised "
                             f"(the paper uses 0.4), got {self.strength}")
        if float(self.cfg) < 0:
            raise ValueError(f"cfg must be 0 or more (1.0 = no guidance, the paper's setting), got {self.cfg}")
        if self.scheduler not in comfy.samplers.SCHEDULER_NAMES:
            raise ValueError(f"scheduler must be one of {comfy.samplers.SCHEDULER_NAMES}, got {self.scheduler!r}")


def check_frame_size(height: int, width: int, multiple: int = 8) -> None:
    """Refuse frame sizes the VAE cannot map to whole latents, naming the fix."""
    if height % multiple or width % multiple:
        fit_h, fit_w = max(multiple, height // multiple * multiple), max(multiple, width // multiple * multiple)
        raise ValueError(f"frame size {width}x{height} is not divisible by {multiple}: resize or crop the frames "
                         f"to e.g. {fit_w}x{fit_h} first (core 'Upscale Image' or 'ImageCrop' node, or the loop "
                         f"node's resize option)")


def banks_of(model) -> list[FeatureBank]:
    """The feature banks the model's StreamV2V patches use."""
    found = {}
    for patch_list in model.model_options.get("transformer_options", {}).get("patches", {}).values():
        for patch in patch_list:
            handle = getattr(patch, "handle", None)
            if handle is not None and hasattr(handle, "bank"):
                found[handle.name] = handle.bank
    return list(found.values())


def sdedit_sigmas(model, steps: int, strength: float, scheduler: str) -> torch.Tensor:
    """The last ``steps + 1`` sigmas of a ``steps / strength`` schedule, as KSampler's denoise does."""
    sampling = model.get_model_object("model_sampling")
    total = max(steps, int(steps / strength))
    return comfy.samplers.calculate_sigmas(sampling, scheduler, total).cpu()[-(steps + 1):]


def run_stream(model, positive, negative, vae, frames: Iterable[torch.Tensor], settings: StreamSettings,
               on_output: Callable[[int, torch.Tensor], None]) -> int:
    """Restyle ``frames`` (each ``[H, W, 3]`` in 0..1) one by one; ``on_output(i, image [H, W, 3])`` per input i.

    Outputs arrive in input order as soon as each is finished. The first frame fixes the
    size; every later frame must match it. Returns the number of frames output. If
    interrupted, every frame already output stays output and the banks count the
    frames that went through them.
    """
    settings.check()
    source = iter(frames)
    first = next(source, None)
    if first is None:
        raise ValueError("no input frames: connect at least one image")
    height, width = first.shape[0], first.shape[1]
    check_frame_size(height, width)

    model = model.clone()
    model.model_options.setdefault("transformer_options", {})[STREAM_KEY] = True
    banks = banks_of(model)
    latent_channels = model.get_model_object("latent_format").latent_channels
    shape = (1, latent_channels, height // 8, width // 8)
    for bank in banks:
        bank.check_signature(model_signature(model, torch.empty(shape, device="meta")))

    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(settings.cfg)
    sigmas = sdedit_sigmas(model, settings.steps, settings.strength, settings.scheduler)
    counters = {"entered": 0, "out": 0}

    def sampler_function(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        base = model_k.inner_model.inner_model  # comfy BaseModel: latent scaling and model sampling
        sampling = base.model_sampling
        options = extra_args["model_options"]
        similarity = SimilarityFilter(settings.similarity_threshold, settings.max_skips, settings.seed) \
            if settings.similarity_filter else None
        sources: list[list[int]] = []  # processed frame -> input indices it answers (skipped ones reuse it)

        def latents() -> Iterator[torch.Tensor]:
            for index, image in enumerate(itertools.chain([first], source)):
                if tuple(image.shape[:2]) != (height, width):
                    raise ValueError(f"frame {index} is {image.shape[1]}x{image.shape[0]}, the stream started at "
                                     f"{width}x{height}: all frames must have one size")
                if similarity is not None and similarity.skip(image):  # never the first frame
                    sources[-1].append(index)
                    continue
                sources.append([index])
                counters["entered"] += 1
                pixels = image[None, ..., :3]
                yield base.process_latent_in(vae.encode(pixels)).to(x.device, x.dtype)

        def denoise(rows: torch.Tensor, sigma: torch.Tensor, offsets: list[int]) -> torch.Tensor:
            comfy.model_management.throw_exception_if_processing_interrupted()
            call_options = dict(options)
            call_options["transformer_options"] = {**options.get("transformer_options", {}), FRAMES_KEY: offsets}
            return model_k(rows, sigma, denoise_mask=None, model_options=call_options, seed=extra_args.get("seed"))

        sigma_max = float(sampling.sigma_max)

        def noise_scaling(sigma, noise, latent):
            full = math.isclose(float(sigma), sigma_max, rel_tol=1e-5) or float(sigma) > sigma_max
            return sampling.noise_scaling(sigma.to(latent), noise, latent, max_denoise=full)

        noise = NoiseSource(settings.seed, settings.fixed_noise)
        for processed, denoised in stream_denoise(latents(), sigmas.to(x.device), denoise, noise_scaling, noise,
                                                  settings.stream_batch):
            image = vae.decode(base.process_latent_out(denoised.float()))[0]
            for index in sources[processed]:
                on_output(index, image)
                counters["out"] += 1
        return x

    zeros = torch.zeros(shape)
    try:
        guider.sample(zeros, zeros, comfy.samplers.KSAMPLER(sampler_function), sigmas, seed=settings.seed,
                      disable_pbar=True)
    finally:
        for bank in banks:
            bank.end_frame(counters["entered"])
    return counters["out"]
