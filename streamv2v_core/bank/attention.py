"""The two ways the bank is used: extended self-attention (eq. 1) and feature fusion (eq. 2).

EA is expressed on the self-attention *input* tokens: ComfyUI projects the context
with bias-free ``to_k`` / ``to_v``, so attending to ``cat([x_t, x_fb])`` is exactly
``softmax(Q [K_t, K_fb]^T / sqrt(d)) [V_t, V_fb]`` with ``K_fb = to_k(x_fb)``.

One attention call needs one key length for all its rows, while rows of a stream batch
can have seen different numbers of past frames. Attention over a multiset of key/value
pairs in which every pair appears ``k`` times equals attention over the set, so each
row's own set ``[x_t, x_fb]`` is repeated up to a common length: nothing is truncated and
nothing the paper would not attend to is added.
"""
from __future__ import annotations

import math

import torch


def extend_with_bank(tokens: torch.Tensor, banked: list[torch.Tensor | None]) -> torch.Tensor | None:
    """Each row's context followed by its banked tokens, repeated to one common length (EA, eq. 1).

    tokens: ``[B, T, C]`` the self-attention context of this call.
    banked: per row, ``[m_r, C]`` (that row's bank) or None (no bank yet).
    Returns ``[B, N, C]`` with ``N = lcm_r(T + m_r)``: row r holds ``[x_r, bank_r]`` repeated
    ``N / (T + m_r)`` times, which leaves softmax attention exactly as over ``[x_r, bank_r]``.
    Returns None when no row has a bank.
    """
    if all(b is None for b in banked):
        return None
    t = tokens.shape[1]
    sizes = [t + (0 if b is None else b.shape[0]) for b in banked]
    length = math.lcm(*sizes)
    rows = []
    for row, bank, size in zip(tokens, banked, sizes):
        own = row if bank is None else torch.cat([row, bank.to(tokens)], dim=0)
        rows.append(own.repeat(length // size, 1))
    return torch.stack(rows)


def unit(x: torch.Tensor) -> torch.Tensor:
    """``x / |x|`` over the last dimension (in ``x``'s dtype)."""
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12)


def decision_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision FF decides its threshold in: float32 at least, float64 for float64 features.
    (Host logic: ``torch.promote_types`` would be dispatched as an operator on every call.)"""
    return torch.float64 if dtype == torch.float64 else torch.float32


def feature_fusion(out: torch.Tensor, bank: torch.Tensor, alpha: "float | torch.Tensor", threshold: float,
                   bank_unit: torch.Tensor | None = None, empty: torch.Tensor | None = None) -> torch.Tensor:
    """Fuse each output token with its cosine nearest neighbour in the bank (eq. 2), in one pass.

    out: ``[b, T, C]`` attention output of the current frame.
    bank: ``[b, m, C]`` banked outputs of past frames; ``bank_unit`` the same, unit-norm, in float32 at
        least (stored with the bank so it is not normalised again every call).
    alpha: a number, or ``[b, 1, 1]`` (one per row) in ``out``'s dtype.
    empty: ``[b, m]`` additive mask, ``-inf`` at bank slots that hold no frame (never chosen).
    Returns ``[b, T, C]``: ``(1 - alpha) * O_t(p) + alpha * O_fb(q)`` with
    ``q = argmax cos(O_t(p), O_fb)``, except where that best similarity is below
    ``threshold``, where the token stays unchanged. The cosines are computed in float32 at least
    (float64 for float64 features), whatever the features' dtype.
    """
    if bank_unit is None:
        bank_unit = unit(bank.to(decision_dtype(bank.dtype)))
    similarity = torch.bmm(unit(out.to(bank_unit.dtype)), bank_unit.transpose(1, 2))
    if empty is not None:
        similarity = similarity + empty.to(similarity.dtype).unsqueeze(1)
    best, nearest = similarity.max(dim=-1)
    matched = torch.gather(bank, 1, nearest.unsqueeze(-1).expand(-1, -1, out.shape[-1])).to(out.dtype)
    fused = torch.lerp(out, matched, alpha)
    return torch.where((best >= threshold).unsqueeze(-1), fused, out)
