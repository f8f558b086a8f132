"""The live sampling settings of each frame entering a loop: seed (blended), strength, cfg, residual delta.

A change applies to the frame entering when it arrives and to every later one; the frames in flight
keep what they entered with (the engine gives each frame its own schedule). A new seed is blended in
over the blend frames as a prompt is: frame ``k + j`` of a change at ``k`` has weight
``(j + 1) / blend_frames`` (0 or 1 blend frames: at once), starting from what the frame before had.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..stream.noise import SeedBlend, seed_step
from .params import Change


@dataclass
class SamplingTrack:
    """Per-frame strength, seed spec, cfg and delta; None everywhere until a live change sets one."""

    strength: float | None = None
    cfg: float | None = None
    residual_delta: float | None = None
    _seed_from: int | SeedBlend | None = None
    _seed_to: int | None = None
    _seed_at: int = 0
    _blend_frames: int = 0
    _last_seed: int | SeedBlend | None = None

    def apply(self, change: Change, frame: int, blend_frames: int, run_seed: int) -> None:
        """``change`` arrives as ``frame`` enters (``run_seed``: the node's seed, what frames had before)."""
        if change.strength is not None:
            self.strength = change.strength
        if change.cfg is not None:
            self.cfg = change.cfg
        if change.residual_delta is not None:
            self.residual_delta = change.residual_delta
        if change.seed is not None:
            start = self._last_seed if self._last_seed is not None else run_seed
            self._seed_from, self._seed_to, self._seed_at = start, change.seed, frame
            self._blend_frames = blend_frames

    def seed_for(self, frame: int) -> int | SeedBlend | None:
        """Frame ``frame``'s seed spec (None: the run's own); call once per frame, in order."""
        if self._seed_to is None:
            return None
        blend = self._blend_frames
        weight = (frame - self._seed_at + 1) / blend if blend > 1 else 1.0
        self._last_seed = seed_step(self._seed_from, self._seed_to, weight)
        return self._last_seed

    @property
    def seed_to(self) -> int | None:
        """The seed the last seed change asked for (None: none yet)."""
        return self._seed_to

    @property
    def steered(self) -> bool:
        return any(v is not None for v in (self.strength, self.cfg, self.residual_delta, self._seed_to))
