"""StreamingT2V's randomized blending (section 4.3): chunk layout, one random cut per overlap, the join.

A long video of ``N`` frames is refined chunk by chunk: chunks of ``L`` frames, consecutive
chunks sharing ``O`` frames (the paper: ``L = 24``, ``O = 8``). At every denoising step each
chunk is denoised on its own, and in each overlap between chunk ``k-1`` and chunk ``k`` one
cut is drawn uniformly from the overlap's ``O + 1`` positions: frames before the cut keep
chunk ``k-1``'s result, frames from the cut on take chunk ``k``'s (eq. 8). Overlap frame
``j`` (0-based) therefore comes from the earlier chunk with probability ``1 - (j+1)/(O+1)``.

Frames are indices along the model's frame axis (latent frames for video models).
Everything here is plain Python/torch and deterministic: a cut depends only on
``(seed, step, overlap index)``, never on call order or a global random state.

Layout: the same windows as ComfyUI's ``standard_static`` context schedule (chunk ``k``
starts at ``k * (L - O)``; the last chunk is moved back to end on the last frame, so all
chunks are ``L`` long and the last overlap may be longer than ``O``). Windows are given as
``range`` objects of consecutive frame indices, sorted by start, covering ``0 .. N-1``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = ["chunk_windows", "draw_seams", "frame_owners", "join_chunks", "seam_pairs"]


def chunk_windows(num_frames: int, chunk_length: int, overlap: int) -> list[range]:
    """The chunks (frame ranges) for ``num_frames`` frames: ``[range(0, L), range(L-O, 2L-O), ...]``.

    One chunk when ``num_frames <= chunk_length``. Raises ValueError unless
    ``1 <= chunk_length`` and ``0 <= overlap < chunk_length``.
    """
    if chunk_length < 1 or not 0 <= overlap < chunk_length:
        raise ValueError(f"need chunk_length >= 1 and 0 <= overlap < chunk_length, got {chunk_length} and {overlap}")
    if num_frames <= chunk_length:
        return [range(num_frames)]
    windows = []
    for start in range(0, num_frames, chunk_length - overlap):
        if start + chunk_length >= num_frames:
            windows.append(range(num_frames - chunk_length, num_frames))
            break
        windows.append(range(start, start + chunk_length))
    return windows


def _check_windows(windows: Sequence[range]) -> None:
    for prev, cur in zip(windows, windows[1:]):
        if not prev.start <= cur.start <= prev.stop:
            raise ValueError(f"chunks must be sorted and leave no gap; got {prev} then {cur}")


def draw_seams(windows: Sequence[range], seed: int, step: int) -> list[int]:
    """One seam per pair of consecutive chunks for denoising step ``step``.

    Seam ``k-1`` (for chunks ``k-1`` and ``k``) is the first frame taken from chunk ``k``: uniform
    over ``windows[k].start .. windows[k-1].stop`` (the overlap's ``O + 1`` cut positions; with no
    overlap it is ``windows[k].start``). Drawn from ``numpy``'s generator seeded with
    ``(seed, step, k - 1)``, so the same inputs give the same seams.

    Returns ``len(windows) - 1`` absolute frame indices.
    """
    _check_windows(windows)
    seams = []
    for k in range(1, len(windows)):
        first, last = windows[k].start, windows[k - 1].stop
        cut = int(np.random.default_rng((int(seed), int(step), k - 1)).integers(0, last - first + 1))
        seams.append(first + cut)
    return seams


def frame_owners(windows: Sequence[range], seams: Sequence[int], num_frames: int) -> list[int]:
    """For every frame, the chunk whose result it takes: the last chunk ``k`` whose seam ``<= frame``.

    With ``O <= L/2`` seams are increasing and this is the paper's rule. When the last chunk was
    moved back (or ``O > L/2``) a later seam can fall before an earlier one; the later chunk then
    wins, and the owner still always contains the frame (a seam never leaves its overlap).
    """
    if len(seams) != len(windows) - 1:
        raise ValueError(f"{len(windows)} chunks need {len(windows) - 1} seams, got {len(seams)}")
    starts = [0, *seams]
    owners = []
    for frame in range(num_frames):
        owners.append(max(k for k, start in enumerate(starts) if start <= frame))
    return owners


def join_chunks(chunks: Sequence[torch.Tensor], windows: Sequence[range], owners: Sequence[int],
                dim: int) -> torch.Tensor:
    """Concatenate per-chunk results at the seams: frame ``f`` is ``chunks[owners[f]]`` at ``f``.

    chunks: one tensor per window, ``len(windows[k])`` long along ``dim``, equal elsewhere.
    Returns a tensor ``len(owners)`` long along ``dim`` (the reference join; the sampler uses
    ComfyUI's context windows with 0/1 weights instead).
    """
    frames = [chunks[k].select(dim, f - windows[k].start) for f, k in enumerate(owners)]
    return torch.stack(frames, dim=dim)


def seam_pairs(windows: Sequence[range]) -> list[int]:
    """Consecutive-frame pairs ``t`` (frames ``t, t+1``) where a seam can fall, sorted.

    A seam at frame ``s`` separates pair ``s - 1``; seam ``k-1`` lies in
    ``windows[k].start .. windows[k-1].stop``, so pairs ``windows[k].start - 1 .. windows[k-1].stop - 1``
    (the overlap plus the pair on each side; one pair with no overlap).
    """
    _check_windows(windows)
    last_pair = windows[-1].stop - 2
    pairs = set()
    for k in range(1, len(windows)):
        pairs.update(range(windows[k].start - 1, min(windows[k - 1].stop, last_pair + 1)))
    return sorted(pairs)
