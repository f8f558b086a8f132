"""StreamDiffusion's stream batch for SDEdit + LCM, frame by frame (paper section 3, appendix A.1).

With ``S`` denoising steps, the stream batch evaluates the model once per incoming
frame on up to ``S`` latents at once: the newest frame at step 0, the frame before
at step 1, and so on. Each call finishes the oldest frame. The pipeline starts
with only the first frame in it and grows (no warm-up copies that would be thrown
away), and drains at the end, so ``N`` frames in give ``N`` frames out.

Sequential mode runs each frame through its ``S`` steps before the next one; the
arithmetic per (frame, step) is the same, so both modes give the same frames.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

# denoise(x [R, C, h, w], sigma [R], frame_offsets [R]) -> denoised [R, C, h, w]
Denoise = Callable[[torch.Tensor, torch.Tensor, list[int]], torch.Tensor]
# noise_scaling(sigma [R, 1, 1, 1], noise, latent) -> noisy latent (the model's forward process)
NoiseScaling = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class NoiseSource:
    """Per (frame, step) Gaussian noise; ``fixed`` reuses one sample per step slot for every frame.

    Noise depends only on (seed, frame, step), never on call order, so the stream
    batch and sequential modes see the same noise.
    """

    seed: int
    fixed: bool = True

    def __call__(self, frame: int, step: int, like: torch.Tensor) -> torch.Tensor:
        g = torch.Generator()
        g.manual_seed(zlib.crc32(repr((self.seed, 0 if self.fixed else frame, step)).encode()))
        return torch.randn(like.shape, generator=g, dtype=torch.float32).to(like)


def stream_denoise(
    latents: Iterable[torch.Tensor],
    sigmas: torch.Tensor,
    denoise: Denoise,
    noise_scaling: NoiseScaling,
    noise: NoiseSource,
    stream_batch: bool = True,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Denoise a stream of clean latents ``[1, C, h, w]`` with the LCM schedule ``sigmas``.

    sigmas: ``[S + 1]`` decreasing, last 0 (an SDEdit schedule starts below sigma_max).
    Yields ``(frame_offset, denoised [1, C, h, w])`` in frame order, each as soon as
    it is finished. Latents are pulled from ``latents`` one at a time, when their
    frame enters the pipeline, so memory does not grow with the stream's length.
    """
    steps = len(sigmas) - 1
    if steps < 1:
        raise ValueError("the schedule needs at least one step")
    source = iter(latents)
    # (frame, step, x), newest frame first; sequential mode keeps one frame in flight.
    pipeline: list[tuple[int, int, torch.Tensor]] = []
    next_frame = 0
    exhausted = False
    while True:
        if not exhausted and (stream_batch or not pipeline):
            latent = next(source, None)
            if latent is None:
                exhausted = True
            else:
                x = noise_scaling(sigmas[0].view(1, 1, 1, 1), noise(next_frame, 0, latent), latent)
                pipeline.insert(0, (next_frame, 0, x))
                next_frame += 1
        if not pipeline:
            return
        x = torch.cat([p[2] for p in pipeline])
        sigma = torch.stack([sigmas[p[1]] for p in pipeline]).to(x)
        denoised = denoise(x, sigma, [p[0] for p in pipeline])
        advanced, finished = [], None
        for (frame, step, _), d in zip(pipeline, denoised.split(1)):
            if step + 1 == steps:
                finished = (frame, d)
            else:
                fresh = noise(frame, step + 1, d)
                advanced.append((frame, step + 1, noise_scaling(sigmas[step + 1].view(1, 1, 1, 1), fresh, d)))
        pipeline = advanced
        if finished is not None:
            yield finished
