"""Each frame's own schedule for a live strength or seed: sigmas read from the model once per strength.

A live strength change costs one host read of ``S`` sigmas from the model (``strength_sigmas``) and
one upload of ``S + 1`` numbers, once per distinct strength (kept: a fader going back and forth
reads nothing again); a seed change draws the new seed's noise once per step (fixed noise) and a
slerp per step for each frame of its blend. Frames with equal settings share one ``FrameSchedule``
object, so calls whose rows all share one take the pipeline's fast path.
"""
from __future__ import annotations

import collections

import torch

from ...streamv2v_core.stream.frame_schedule import FrameSchedule
from ...streamv2v_core.stream.noise import NoiseSource, noise_of
from .model import strength_sigmas

KEPT = 64  # schedules and noise sources kept (a blend makes one per frame of it)


class FrameSchedules:
    """``(strength, seed) -> FrameSchedule`` for one run: ``own`` is the run's (its strength and seed)."""

    def __init__(self, sampling, own: FrameSchedule, strength: float, seed: int):
        self.sampling, self.own, self.strength, self.seed = sampling, own, float(strength), seed
        self._sigmas: collections.OrderedDict = collections.OrderedDict()
        self._schedules: collections.OrderedDict = collections.OrderedDict()
        self._noises: dict = {seed: own.noise}

    def __call__(self, strength: float | None, seed) -> FrameSchedule:
        key = (self.strength if strength is None else float(strength), self.seed if seed is None else seed)
        if key == (self.strength, self.seed):
            return self.own
        if key not in self._schedules:
            sigmas, values, full = self._sigmas_for(key[0])
            self._schedules[key] = FrameSchedule(sigmas, values, self._noise(key[1]), full)
            _bound(self._schedules)
        self._schedules.move_to_end(key)
        return self._schedules[key]

    def _sigmas_for(self, strength: float) -> tuple[torch.Tensor, tuple[float, ...], bool]:
        if strength == self.strength:
            return self.own.sigmas, self.own.sigma_values, self.own.full_noise_first
        if strength not in self._sigmas:
            steps = len(self.own.sigma_values) - 1
            values = tuple(strength_sigmas(self.sampling, steps, strength))
            sigmas = torch.tensor(values, dtype=self.own.sigmas.dtype).to(self.own.sigmas.device, non_blocking=True)
            self._sigmas[strength] = (sigmas, values, values[0] >= float(self.sampling.sigma_max) * (1 - 1e-5))
            _bound(self._sigmas)
        return self._sigmas[strength]

    def _noise(self, seed) -> NoiseSource:
        noise = noise_of(seed, self.own.noise.fixed, self._noises)
        while len(self._noises) > KEPT:  # the oldest blends first (frames in flight keep theirs alive)
            self._noises.pop(next(iter(self._noises)))
        return noise


def _bound(kept: collections.OrderedDict) -> None:
    while len(kept) > KEPT:
        kept.popitem(last=False)
