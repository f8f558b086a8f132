"""What each frame carries through the stream besides its pixels: its own conditioning.

In a stream-batch call the rows are different frames (the newest at step 0, older ones
further along), so every row must be guided by the conditioning of the frame it belongs
to: its text embedding, its ControlNet hints and their strengths, its fusion alpha. A
frame's conditioning is fixed when it enters the stream and travels with it until it
leaves, also across runs when frames stay in flight. Calls are split into *row groups*
only where neighbouring rows need different per-call settings (a ControlNet active at one
row's step and not at the next one's, a different strength or alpha), which happens only
with start/end percent below 1 or for a few calls after a live change.

Pure data and host-side bookkeeping: no ComfyUI import (the bridge is ``nodes``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable

import torch


@dataclass(frozen=True)
class FrameConditioning:
    """What one frame carries through the stream besides its pixels (None = the run's own).

    positive / negative: a ComfyUI CONDITIONING for this frame, with the same structure as
    the run's (same number of entries, same ControlNet chain), tensors of 1 row.
    hint: ``[1, H, W, 3]`` in 0..1, replaces the hint of every ControlNet / T2I-Adapter of
    the run's conditioning for this frame.
    control_scale: multiplies every ControlNet's own strength for this frame.
    fusion_alpha: replaces every FeatureFusionPatch's alpha for this frame.
    strength: the frame's own SDEdit strength (its own timesteps; the frames in flight keep theirs).
    seed: the frame's noise: a seed, or a ``noise.SeedBlend`` of two (a live seed change blended in).
    cfg, residual_delta: the frame's own guidance scale and residual delta.
    label: what the frame's prompt is, in words ("'oil painting'", "keyframe 120: 'oil painting'"), for the
    performer's panel when the frame is shown; the engine never reads it.
    """

    positive: list | None = None
    negative: list | None = None
    hint: torch.Tensor | None = None
    control_scale: float = 1.0
    fusion_alpha: float | None = None
    strength: float | None = None
    seed: object = None  # int | SeedBlend | None
    cfg: float | None = None
    residual_delta: float | None = None
    label: str | None = None


@dataclass(frozen=True)
class RowRef:
    """Row ``row`` of ``tensor`` (``[B, ...]``); a frame's row of a conditioning tensor, taken without a copy."""

    tensor: torch.Tensor
    row: int

    def same_as(self, other: "RowRef") -> bool:
        return self.tensor is other.tensor and self.row == other.row

    def get(self) -> torch.Tensor:
        """``[1, ...]``: a view of the row."""
        return self.tensor if self.tensor.shape[0] == 1 else self.tensor[self.row:self.row + 1]


@dataclass
class FrameRows:
    """One frame's conditioning as the engine keeps it while the frame is in flight.

    refs: per conditioning tensor (keyed by the bridge, e.g. ``("positive", 0, "c_crossattn")``)
    the frame's row. hints: per ControlNet (by its position in the run's chain list) the
    frame's hint ``[1, 3, H, W]``, already on the model's device. x0: the frame's clean
    latent ``[1, C, h, w]`` when residual guidance needs it (its "virtual negative"). schedule:
    the frame's own sigmas and noise (``frame_schedule.FrameSchedule``; None: the run's); cfg and
    residual_delta: its own guidance (None: the run's).
    """

    refs: dict[Hashable, RowRef] = field(default_factory=dict)
    hints: dict[int, RowRef] = field(default_factory=dict)
    control_scale: float = 1.0
    fusion_alpha: float | None = None
    x0: torch.Tensor | None = None
    schedule: object = None
    cfg: float | None = None
    residual_delta: float | None = None


def stacked(rows: list[RowRef]) -> tuple[torch.Tensor, bool]:
    """The rows ``[R, ...]`` in order, and whether they are all one shared row (returned as ``[1, ...]``).

    A shared row is returned as it is (ComfyUI repeats a 1-row conditioning to the batch),
    so an unchanging prompt adds no kernel to a call.
    """
    first = rows[0]
    if first.tensor.shape[0] == 1 and all(r.same_as(first) for r in rows[1:]):
        return first.tensor, True
    return torch.cat([r.get() for r in rows]), False


def split_where_changed(keys: list[Hashable]) -> list[tuple[int, int]]:
    """Contiguous ``(start, stop)`` runs of equal ``keys`` (rows that can share one call)."""
    runs: list[tuple[int, int]] = []
    for i, key in enumerate(keys):
        if runs and keys[runs[-1][0]] == key:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def intersect_runs(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The finest split of ``range(n)`` at every boundary of ``a`` and of ``b`` (both cover ``range(n)``)."""
    cuts = sorted({stop for _, stop in a} | {stop for _, stop in b})
    out, start = [], 0
    for stop in cuts:
        out.append((start, stop))
        start = stop
    return out
