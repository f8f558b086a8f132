"""The noise a stream adds to its frames: per (seed, frame, step), and blends of two seeds' noise.

A live seed change blends the new seed's noise in over a few frames by spherical
interpolation (StreamDiffusion's fork does the same), so the picture changes smoothly instead
of cutting. Everything here is drawn on the latents' device from private generators
(``seeds.py``): noise depends only on what it is for, never on call order.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..seeds import generator



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

    @property
    def key(self) -> tuple:
        """Equal for sources that give the same noise."""
        return ("seed", self.seed, self.fixed)

    def one(self, frame: int, step: int, like: torch.Tensor) -> torch.Tensor:
        """Noise ``like``-shaped ``[1, C, h, w]`` for ``frame`` at ``step``."""
        frame = 0 if self.fixed else frame
        key = (frame, step, tuple(like.shape), like.device, like.dtype)
        if key in self._kept:
            return self._kept[key]
        noise = self.draw(frame, step, like)
        if self.fixed:
            self._kept[key] = noise
        return noise

    def draw(self, frame: int, step: int, like: torch.Tensor) -> torch.Tensor:
        g = generator(like.device, self.seed, frame, step)
        return torch.randn(like.shape, generator=g, device=like.device, dtype=torch.float32).to(like.dtype)

    def rows(self, frames: list[int], steps: list[int], like: torch.Tensor) -> torch.Tensor:
        """Noise ``[R, C, h, w]`` for rows ``(frames[i], steps[i])``; ``like`` is one row ``[1, C, h, w]``."""
        if self.fixed and steps == list(range(steps[0], steps[0] + len(steps))):
            key = ("steps", steps[0], len(steps), tuple(like.shape), like.device, like.dtype)
            if key not in self._kept:
                self._kept[key] = torch.cat([self.one(0, s, like) for s in steps])
            return self._kept[key]
        parts = [self.one(f, s, like) for f, s in zip(frames, steps)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


MAX_BLEND_DEPTH = 3  # a seed changed again during its blend starts from a blend; deeper chains start from the nearer


def slerp(start: torch.Tensor, end: torch.Tensor, weight: float) -> torch.Tensor:
    """Spherical interpolation of two noises ``[1, ...]`` (whole tensors as vectors), ``weight`` in [0, 1].

    Keeps the norm of Gaussian noise (a linear blend would shrink it towards the middle, which
    the model sees as less noise: a grey dip). Computed on the device, no host read: nearly
    parallel noises fall back to the linear blend through ``torch.where``.
    """
    a, b = start.flatten(1), end.flatten(1)
    cos = (a * b).sum(1, keepdim=True) / (a.norm(dim=1, keepdim=True) * b.norm(dim=1, keepdim=True))
    theta = torch.acos(cos.clamp(-1.0, 1.0))
    sin = torch.sin(theta)
    parallel = sin.abs() < 1e-6
    safe = torch.where(parallel, torch.ones_like(sin), sin)
    c_start = torch.where(parallel, torch.full_like(sin, 1.0 - weight), torch.sin((1.0 - weight) * theta) / safe)
    c_end = torch.where(parallel, torch.full_like(sin, weight), torch.sin(weight * theta) / safe)
    return (c_start * a + c_end * b).view_as(start)


@dataclass(frozen=True)
class SeedBlend:
    """A frame's noise as plain values: seed ``to`` blended in over ``start`` (a seed or a blend), ``weight`` in (0, 1)."""

    start: int | SeedBlend
    to: int
    weight: float

    @property
    def depth(self) -> int:
        return 1 + (self.start.depth if isinstance(self.start, SeedBlend) else 0)

    def nearer(self) -> int | SeedBlend:
        """The end this blend is closer to (a chain too deep is cut there)."""
        return self.to if self.weight >= 0.5 else self.start


def seed_step(previous: int | SeedBlend, seed: int, weight: float) -> int | SeedBlend:
    """A frame's seed spec ``weight`` of the way from ``previous`` (what the frame before had) to ``seed``."""
    if weight >= 1.0 or previous == seed:
        return seed
    while isinstance(previous, SeedBlend) and previous.depth >= MAX_BLEND_DEPTH:
        previous = previous.nearer()
    return SeedBlend(previous, seed, float(weight))


class BlendedNoise(NoiseSource):
    """The noise of a ``SeedBlend``: ``slerp(start's noise, seed's noise, weight)`` per (frame, step)."""

    def __init__(self, start: NoiseSource, seed: int, weight: float, fixed: bool = True):
        super().__init__(seed, fixed)
        self.start, self.weight = start, weight

    @property
    def key(self) -> tuple:
        return ("blend", self.start.key, self.seed, self.fixed, self.weight)

    def draw(self, frame: int, step: int, like: torch.Tensor) -> torch.Tensor:
        return slerp(self.start.one(frame, step, like), super().draw(frame, step, like), self.weight)


def noise_of(spec: int | SeedBlend, fixed: bool, known: dict | None = None) -> NoiseSource:
    """The noise source of a seed spec; ``known`` (spec -> source) shares sources (and their kept noise)."""
    known = {} if known is None else known
    if spec not in known:
        if isinstance(spec, SeedBlend):
            known[spec] = BlendedNoise(noise_of(spec.start, fixed, known), spec.to, spec.weight, fixed)
        else:
            known[spec] = NoiseSource(int(spec), fixed)
    return known[spec]
