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

from dataclasses import dataclass
from typing import Callable

import torch

from .frame_schedule import FrameSchedule, noise_rows, sigma_rows
from .noise import NoiseSource  # noqa: F401 (the pipeline's noise, imported from here by callers)

# denoise(x [R, C, h, w], sigma [R], frames, steps) -> denoised [R, C, h, w]
Denoise = Callable[[torch.Tensor, torch.Tensor, list[int], list[int]], torch.Tensor]
# noise_scaling(sigma [R, 1, 1, 1], noise, latent, max_denoise) -> noisy latent (the model's forward process)
NoiseScaling = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor]


@dataclass
class InFlight:
    """Latents between model calls: ``x`` ``[R, C, h, w]``, row i is ``frames[i]`` at ``steps[i]`` (newest first),
    denoised with ``schedules[i]`` (its frame's own sigmas and noise, ``frame_schedule.py``)."""

    frames: list[int]
    steps: list[int]
    x: torch.Tensor | None
    schedules: list[FrameSchedule] | None = None


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
        self.denoise, self.noise_scaling = denoise, noise_scaling
        self.own = FrameSchedule(sigmas, tuple(sigma_values), noise, full_noise_first)  # frames pushed without one
        self.state = in_flight or InFlight([], [], None)
        if self.state.schedules is None:  # frames kept in flight before schedules travelled with them
            self.state.schedules = [self.own] * len(self.state.frames)

    def __len__(self) -> int:
        return len(self.state.frames)

    def push(self, frame: int, latent: torch.Tensor, schedule: FrameSchedule | None = None) -> None:
        """Noise ``latent`` ``[1, C, h, w]`` to the first step and put it at the head of the pipeline.

        ``schedule``: the frame's own sigmas and noise (a live strength or seed change), kept until
        it leaves; None: the pipeline's own.
        """
        schedule = schedule or self.own
        if len(schedule.sigma_values) != self.steps + 1:
            raise ValueError(f"a frame's schedule has {len(schedule.sigma_values) - 1} steps, the stream {self.steps}")
        sigma = schedule.sigmas[0:1].view(1, 1, 1, 1)
        x = self.noise_scaling(sigma, schedule.noise.one(frame, 0, latent), latent, schedule.full_noise_first)
        s = self.state
        self.state = InFlight([frame] + s.frames, [0] + s.steps, x if s.x is None else torch.cat([x, s.x]),
                              [schedule] + s.schedules)

    def step(self) -> tuple[int, torch.Tensor] | None:
        """One model call on every latent in flight; returns ``(frame, denoised [1, C, h, w])`` if one finished."""
        s = self.state
        if s.x is None:
            return None
        denoised = self.denoise(s.x, sigma_rows(s.schedules, s.steps), s.frames, s.steps)
        done = s.steps[-1] + 1 == self.steps
        keep = len(s.frames) - 1 if done else len(s.frames)
        if keep:
            frames, steps, schedules = s.frames[:keep], [t + 1 for t in s.steps[:keep]], s.schedules[:keep]
            sigma = sigma_rows(schedules, steps).view(-1, 1, 1, 1)
            moved = denoised if keep == len(s.frames) else denoised[:keep]
            x = self.noise_scaling(sigma, noise_rows(schedules, frames, steps, moved[:1]), moved, False)
            self.state = InFlight(frames, steps, x, schedules)
        else:
            self.state = InFlight([], [], None, [])
        return (s.frames[-1], denoised[-1:]) if done else None
