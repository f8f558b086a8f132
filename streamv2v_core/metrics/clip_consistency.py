"""CLIP frame consistency ("CLIP score" of StreamV2V Sec. 5.3.1).

StreamV2V, Sec. 5.3.1: "we first get the CLIP image embeddings for all the video frames, then we
measure the mean cosine similarity across all sequential frame pairs" (reported x100, e.g. 96.58).
This module only does the arithmetic; producing the embeddings (a CLIP vision model) is the
caller's job.
"""

from __future__ import annotations

from typing import Any, List

import numpy as np

from ._inputs import to_numpy

__all__ = ["clip_frame_consistency", "consecutive_cosine_similarities"]


def _as_embeddings(embeddings: Any) -> np.ndarray:
    if embeddings is None:
        raise ValueError("embeddings: got None; pass image embeddings as a [T, D] array/tensor")
    e = to_numpy(embeddings)
    if e.ndim == 3 and e.shape[1] == 1:  # [T, 1, D] -> [T, D]
        e = e[:, 0, :]
    if e.ndim != 2:
        raise ValueError(
            f"embeddings: expected shape [T, D] (one image embedding per frame), got "
            f"{tuple(e.shape)}"
        )
    if e.shape[0] < 2:
        raise ValueError(
            f"embeddings: need embeddings of at least 2 frames to compare consecutive frames, "
            f"got {e.shape[0]}"
        )
    if e.shape[1] < 1:
        raise ValueError("embeddings: embedding dimension D is 0")
    e = e.astype(np.float64)
    if not np.all(np.isfinite(e)):
        raise ValueError("embeddings: contains NaN or infinite values")
    norms = np.linalg.norm(e, axis=1)
    if np.any(norms == 0):
        bad = np.flatnonzero(norms == 0).tolist()
        raise ValueError(f"embeddings: zero vector(s) at frame index {bad}; cosine is undefined")
    return e


def consecutive_cosine_similarities(embeddings: Any) -> List[float]:
    """Cosine similarity of each consecutive pair of embeddings.

    Args:
        embeddings: ``[T, D]`` (or ``[T, 1, D]``) numpy array or torch tensor, ``T >= 2``.

    Returns:
        ``T-1`` floats in ``-1..1``; entry ``t`` is ``cos(e[t], e[t+1])`` (computed in float64).
    """
    e = _as_embeddings(embeddings)
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    return np.sum(e[:-1] * e[1:], axis=1).tolist()


def clip_frame_consistency(embeddings: Any) -> float:
    """Mean cosine similarity of consecutive frames' embeddings, times 100.

    Args:
        embeddings: ``[T, D]`` (or ``[T, 1, D]``) image embeddings, numpy or torch, ``T >= 2``.

    Returns:
        ``float`` in ``-100..100`` (100 when all embeddings point the same way; CLIP embeddings of
        video frames typically give 90..98).

    Raises:
        ValueError: wrong shape, fewer than 2 frames, non-finite values or a zero embedding.
    """
    return float(np.mean(consecutive_cosine_similarities(embeddings)) * 100.0)
