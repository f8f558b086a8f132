"""What a frame is denoised with besides its conditioning: its noise levels and its noise, fixed as it enters.

A live strength change gives the frames entering after it new timesteps while the frames in
flight finish with theirs; a live seed change blends the new seed's noise in over a few frames
by spherical interpolation (a transition, not a cut). So each frame in the stream batch carries
its own ``FrameSchedule``, and one model call may hold rows of two schedules for the ``S - 1``
calls after a change. Rows that share one schedule (every call but those) take the pipeline's
fast path: a view of one sigma tensor and the noise kept per step.

The bank is keyed by step index, not by noise level: after a strength change a step's entries
were made at that step's old noise level until the bank turns them over (it is kept, not
cleared: clearing it would make the picture jump, which a strength fader must not do).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .noise import NoiseSource


@dataclass(frozen=True, eq=False)
class FrameSchedule:
    """One frame's denoising: ``sigmas`` ``[S + 1]`` on the device (host copy ``sigma_values``) and its noise."""

    sigmas: torch.Tensor
    sigma_values: tuple[float, ...]
    noise: NoiseSource
    full_noise_first: bool

    @property
    def key(self) -> tuple:
        """Equal for schedules that give the same rows (compared on the host, per call)."""
        return (self.sigma_values, self.noise.key, self.full_noise_first)

    def sigma_rows(self, steps: list[int]) -> torch.Tensor:
        """Sigmas ``[R]`` of rows at ``steps`` (a view when the steps are consecutive: no kernel)."""
        first = steps[0]
        if steps == list(range(first, first + len(steps))):
            return self.sigmas[first:first + len(steps)]
        return torch.stack([self.sigmas[t] for t in steps])


def shared(schedules: list[FrameSchedule]) -> FrameSchedule | None:
    """The one schedule every row has, or None when rows differ (the calls right after a live change)."""
    first = schedules[0]
    key = first.key
    return first if all(s is first or s.key == key for s in schedules[1:]) else None


def sigma_rows(schedules: list[FrameSchedule], steps: list[int]) -> torch.Tensor:
    """Each row's sigma ``[R]`` from its own frame's schedule."""
    one = shared(schedules)
    if one is not None:
        return one.sigma_rows(steps)
    return torch.stack([s.sigmas[t] for s, t in zip(schedules, steps)])


def noise_rows(schedules: list[FrameSchedule], frames: list[int], steps: list[int],
               like: torch.Tensor) -> torch.Tensor:
    """Each row's noise ``[R, C, h, w]`` from its own frame's noise source; ``like`` is one row."""
    one = shared(schedules)
    if one is not None:
        return one.noise.rows(frames, steps, like)
    parts = [s.noise.one(f, t, like) for s, f, t in zip(schedules, frames, steps)]
    return torch.cat(parts)
