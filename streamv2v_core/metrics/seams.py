"""The temporal-consistency numbers restricted to chunk boundaries (where chunked sampling leaves seams).

A video sampled chunk by chunk (``streamv2v_core.chunks``: chunks of ``L`` frames overlapping by
``O``) can only break between chunks: at the consecutive-frame pairs around each overlap
(``chunks.seam_pairs``). Measuring MAWE, scene cuts and the flow-magnitude std on those pairs
alone shows the seams that the whole-video numbers average away.

Video models chunk latent frames; their VAE decodes latent frame 0 to one video frame and every
later latent frame to ``r`` video frames (``r`` = ``frames_per_latent``: 4 for Wan 2.1/2.2 and
HunyuanVideo, 8 for LTX-Video). The pair between latent frames ``t`` and ``t+1`` is then the video
pair ``r * t`` (the last frame of latent ``t`` and the first of ``t+1``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import numpy as np

from ..blend.chunks import chunk_windows, seam_pairs
from .warp import MaweResult, mawe_value

__all__ = ["SeamStats", "chunk_boundary_pairs", "seam_stats"]


def chunk_boundary_pairs(num_frames: int, chunk_length: int, overlap: int, frames_per_latent: int = 1) -> List[int]:
    """Pairs ``t`` (video frames ``t, t+1``) of a ``num_frames`` video where a chunk seam can fall.

    ``chunk_length`` and ``overlap`` count frames on the sampled axis (latent frames for video
    models, as on the Long-Video Chunks node); ``frames_per_latent`` maps them to video frames.
    Empty when the whole video fits in one chunk.
    """
    if frames_per_latent < 1:
        raise ValueError(f"frames_per_latent must be at least 1, got {frames_per_latent}")
    sampled = (num_frames - 1) // frames_per_latent + 1
    pairs = seam_pairs(chunk_windows(sampled, chunk_length, overlap))
    return [frames_per_latent * t for t in pairs if frames_per_latent * t < num_frames - 1]


@dataclass
class SeamStats:
    """Numbers over the seam pairs only.

    Attributes:
        pairs: the pair indices used.
        mawe: mean warp error over the pairs / mean squared flow over the pairs (NaN without pairs).
        scene_cuts: scene cuts that fall on a pair (a cut at frame ``f`` is on pair ``f - 1``).
        flow_std: std of the pairs' mean flow magnitudes (NaN without pairs).
    """

    pairs: List[int]
    mawe: float
    scene_cuts: int
    flow_std: float


def seam_stats(motion: MaweResult, magnitudes: Sequence[float], cut_frames: Sequence[int],
               pairs: Sequence[int]) -> SeamStats:
    """Restrict whole-video results to ``pairs``.

    motion: :func:`mawe`'s result (per-pair warp errors and squared flows).
    magnitudes: per-pair mean flow magnitudes of the video whose smoothness is measured.
    cut_frames: :func:`scene_cut_frames` of that video.
    """
    pairs = sorted(set(int(t) for t in pairs))
    if not pairs:
        return SeamStats([], float("nan"), 0, float("nan"))
    warp = np.asarray(motion.warp.per_pair, dtype=np.float64)[pairs]
    warp_mean = float(np.nanmean(warp)) if np.isfinite(warp).any() else float("nan")
    ofs = float(np.mean(np.asarray(motion.flow_per_pair, dtype=np.float64)[pairs]))
    cuts = sum(1 for f in cut_frames if f - 1 in set(pairs))
    std = float(np.std(np.asarray(magnitudes, dtype=np.float64)[pairs]))
    return SeamStats(pairs, mawe_value(warp_mean, ofs, motion.c), cuts, std)
