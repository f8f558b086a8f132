"""StreamDiffusion's stream batch for SDEdit + LCM, frame by frame (paper section 3, appendix A.1).

With ``S`` denoising steps, the stream batch evaluates the model once per incoming
frame on up to ``S`` latents at once: the newest frame at step 0, the frame before at
step 1, and so on. Each call finishes the oldest frame. The pipeline starts with only
the first frame in it and grows (no warm-up copies that would be thrown away), and
drains at the end, so ``N`` frames in give ``N`` frames out. A pipeline that is not
drained can be resumed later (``StreamPipeline(..., in_flight=...)``): one model call per
frame across separate runs, with ``S - 1`` frames of latency.

Sequential mode runs each frame through its ``S`` steps before the next one; the
arithmetic per (frame, step) is the same, so both modes give the same frames.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Callable

import torch

# denoise(x [R, C, h, w], sigma [R], frames, steps) -> denoised [R, C, h, w]
Denoise = Callable[[torch.Tensor, torch.Tensor, list[int], list[int]], torch.Tensor]
# noise_scaling(sigma [R, 1, 1, 1], noise, latent, max_denoise) -> noisy latent (the model's forward process)
NoiseScaling = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor]


@dataclass
class NoiseSource:
    """Gaussian noise per (frame, step), drawn on the latents' device; ``fixed`` reuses one per step.

    Noise depends only on (seed, frame, step), never on call order, so the stream batch,
    sequential mode and runs continued across prompts see the same noise. Fixed noise is
    drawn once per step and kept.
    """

    seed: int
    fixed: bool = True
    _kept: dict = field(default_factory=dict, repr=False)

    def one(self, frame: int, step: int, like: torch.Tensor) -> torch.Tensor:
        """Noise ``like``-shaped ``[1, C, h, w]`` for ``frame`` at ``step``."""
        frame = 0 if self.fixed else frame
        key = (frame, step, tuple(like.shape), like.device, like.dtype)
        if key in self._kept:
            return self._kept[key]
        g = torch.Generator(device=like.device)
        g.manual_seed(zlib.crc32(repr((self.seed, frame, step)).encode()))
        noise = torch.randn(like.shape, generator=g, device=like.device, dtype=torch.float32).to(like.dtype)
        if self.fixed:
            self._kept[key] = noise
        return noise

    def rows(self, frames: list[int], steps: list[int], like: torch.Tensor) -> torch.Tensor:
        """Noise ``[R, C, h, w]`` for rows ``(frames[i], steps[i])``; ``like`` is one row ``[1, C, h, w]``."""
        if self.fixed and steps == list(range(steps[0], steps[0] + len(steps))):
            key = ("steps", steps[0], len(steps), tuple(like.shape), like.device, like.dtype)
            if key not in self._kept:
                self._kept[key] = torch.cat([self.one(0, s, like) for s in steps])
            return self._kept[key]
        parts = [self.one(f, s, like) for f, s in zip(frames, steps)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


@dataclass
class InFlight:
    """Latents between model calls: ``x`` ``[R, C, h, w]``, row i is ``frames[i]`` at ``steps[i]`` (newest first)."""

    frames: list[int]
    steps: list[int]
    x: torch.Tensor | None


class StreamPipeline:
    """The stream batch (or sequential sampling) over an SDEdit schedule of ``S`` steps.

    sigmas: ``[S + 1]`` on the latents' device, decreasing, last 0; ``sigma_values`` the same
    as host floats (read once, so the loop never reads a tensor value).
    """

    def __init__(self, sigmas: torch.Tensor, sigma_values: list[float], denoise: Denoise,
                 noise_scaling: NoiseScaling, noise: NoiseSource, full_noise_first: bool,
                 in_flight: InFlight | None = None):
        if len(sigma_values) < 2:
            raise ValueError("the schedule needs at least one step")
        self.steps = len(sigma_values) - 1
        self.sigmas, self.denoise, self.noise_scaling, self.noise = sigmas, denoise, noise_scaling, noise
        self.full_noise_first = full_noise_first
        self.state = in_flight or InFlight([], [], None)

    def __len__(self) -> int:
        return len(self.state.frames)

    def push(self, frame: int, latent: torch.Tensor) -> None:
        """Noise ``latent`` ``[1, C, h, w]`` to the first step and put it at the head of the pipeline."""
        sigma = self.sigmas[0:1].view(1, 1, 1, 1)
        x = self.noise_scaling(sigma, self.noise.one(frame, 0, latent), latent, self.full_noise_first)
        s = self.state
        self.state = InFlight([frame] + s.frames, [0] + s.steps, x if s.x is None else torch.cat([x, s.x]))

    def step(self) -> tuple[int, torch.Tensor] | None:
        """One model call on every latent in flight; returns ``(frame, denoised [1, C, h, w])`` if one finished."""
        s = self.state
        if s.x is None:
            return None
        denoised = self.denoise(s.x, self._sigma_rows(s.steps), s.frames, s.steps)
        done = s.steps[-1] + 1 == self.steps
        keep = len(s.frames) - 1 if done else len(s.frames)
        if keep:
            frames, steps = s.frames[:keep], [t + 1 for t in s.steps[:keep]]
            sigma = self._sigma_rows(steps).view(-1, 1, 1, 1)
            moved = denoised if keep == len(s.frames) else denoised[:keep]
            x = self.noise_scaling(sigma, self.noise.rows(frames, steps, moved[:1]), moved, False)
            self.state = InFlight(frames, steps, x)
        else:
            self.state = InFlight([], [], None)
        return (s.frames[-1], denoised[-1:]) if done else None

    def _sigma_rows(self, steps: list[int]) -> torch.Tensor:
        first = steps[0]
        if steps == list(range(first, first + len(steps))):
            return self.sigmas[first:first + len(steps)]  # a view: no kernel
        return torch.stack([self.sigmas[t] for t in steps])


def run_pipeline(pipeline: StreamPipeline, latents, first_frame: int, stream_batch: bool = True,
                 drain: bool = True):
    """Feed ``latents`` (iterable of ``[1, C, h, w]``) through ``pipeline``; yields ``(frame, denoised)``.

    Frames are numbered from ``first_frame``. Latents are pulled one at a time, when their
    frame enters the pipeline, so memory does not grow with the stream's length.
    ``drain=False`` (stream batch only) leaves the last ``S - 1`` frames in flight.
    """
    frame = first_frame
    for latent in latents:
        pipeline.push(frame, latent)
        frame += 1
        while True:
            finished = pipeline.step()
            if finished is not None:
                yield finished
            if stream_batch or not len(pipeline):
                break
    while drain and len(pipeline):
        finished = pipeline.step()
        if finished is not None:
            yield finished
