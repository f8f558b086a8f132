"""The two ways the bank is used: extended self-attention (eq. 1) and feature fusion (eq. 2).

EA is expressed on the self-attention *input* tokens: ComfyUI projects the context
with bias-free ``to_k`` / ``to_v``, so attending to ``cat([x_t, x_fb])`` is exactly
``softmax(Q [K_t, K_fb]^T / sqrt(d)) [V_t, V_fb]`` with ``K_fb = to_k(x_fb)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def extend_with_bank(tokens: torch.Tensor, banked: list[torch.Tensor | None]) -> torch.Tensor | None:
    """Append each row's banked tokens to its own tokens (EA, eq. 1).

    tokens: ``[B, T, C]`` the self-attention context of this call.
    banked: per row, ``[m_r, C]`` or None (no bank yet for that row).
    Returns ``[B, T + L, C]``, or None when no row has a bank.

    One call needs one key length for all rows. ``L`` is the shortest bank present;
    a longer bank (a queue or a DyMe bank of several frames still filling up, seen
    from a stream batch whose rows are different frames) contributes its newest ``L``
    tokens. A row without a bank is padded with copies of its own tokens:
    duplicating every key/value pair the same number of times leaves softmax
    attention exactly unchanged. Bank lengths are whole frames (multiples of ``T``),
    which makes that possible.
    """
    present = [b for b in banked if b is not None]
    if not present:
        return None
    t = tokens.shape[1]
    length = min(b.shape[0] for b in present)
    if length % t:
        raise ValueError(f"a bank of {length} tokens is not a whole number of frames of {t} tokens")
    rows = []
    for row, bank in zip(tokens, banked):
        extra = [row] * (length // t) if bank is None else [bank[bank.shape[0] - length:].to(tokens)]
        rows.append(torch.cat([row] + extra, dim=0))
    return torch.stack(rows)


def feature_fusion(out: torch.Tensor, bank: torch.Tensor, alpha: float, threshold: float) -> torch.Tensor:
    """Fuse each output token with its cosine nearest neighbour in the bank (eq. 2).

    out: ``[b, T, C]`` attention output of the current frame.
    bank: ``[b, m, C]`` banked outputs of past frames.
    Returns ``[b, T, C]``: ``(1 - alpha) * O_t(p) + alpha * O_fb(q)`` with
    ``q = argmax cos(O_t(p), O_fb)``, except where that best similarity is below
    ``threshold``, where the token stays unchanged.
    """
    similarity = F.normalize(out.float(), dim=-1) @ F.normalize(bank.float(), dim=-1).transpose(1, 2)
    best, nearest = similarity.max(dim=-1)
    matched = torch.gather(bank.to(out.dtype), 1, nearest.unsqueeze(-1).expand(-1, -1, out.shape[-1]))
    fused = torch.lerp(out, matched, alpha)
    return torch.where((best >= threshold).unsqueeze(-1), fused, out)
