"""Dynamic merging (DyMe, paper section 4.3 and appendix A.5.2), vectorised and batched.

The bank and the current frame's tokens are concatenated, split at random into a
source set and a destination set, and every source token is averaged into its most
cosine-similar destination token. ``scatter_reduce(..., "mean", include_self=True)``
makes each destination the mean of itself and all sources matched to it, in one call.

Rows of the batch dimension are independent merges (one per layer and key), so a whole
shape group of layers merges in one go. The random split comes from random keys the
caller draws from private generators (the global RNG is never touched); sorting them
gives one independent permutation per row.

The matching is computed once and can be applied to several tensors of the same layer
(EA's attention input and FF's attention output), so the two stay aligned.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SIMILARITY_BLOCK = 1 << 24  # similarity values computed at once in a DyMe matching (64 MB in float32)


@dataclass(frozen=True)
class Matching:
    """A bipartite matching over ``M`` tokens for each of ``R`` rows.

    src_idx: ``[R, num_src]`` positions of the source tokens.
    dst_idx: ``[R, M - num_src]`` positions of the destination tokens.
    dst_of_src: ``[R, num_src]`` for each source, its destination's index into ``dst_idx``.
    """

    src_idx: torch.Tensor
    dst_idx: torch.Tensor
    dst_of_src: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.src_idx.shape[1] + self.dst_idx.shape[1]

    def select_groups(self, groups: list[int], rows_per_group: int) -> "Matching":
        """The matching of rows ``g * rows_per_group .. (g + 1) * rows_per_group`` for each g in ``groups``."""
        first, last = groups[0], groups[-1]
        if groups == list(range(first, last + 1)):  # contiguous: a view
            sl = slice(first * rows_per_group, (last + 1) * rows_per_group)
            return Matching(self.src_idx[sl], self.dst_idx[sl], self.dst_of_src[sl])
        rows = torch.tensor([g * rows_per_group + r for g in groups for r in range(rows_per_group)],
                            device=self.src_idx.device)
        return Matching(self.src_idx[rows], self.dst_idx[rows], self.dst_of_src[rows])


def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x ``[R, M, C]``, idx ``[R, k]`` -> ``[R, k, C]``."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def random_bipartite_matching(x: torch.Tensor, num_src: int, keys: torch.Tensor) -> Matching:
    """Random src/dst split of ``x`` ``[R, M, C]`` and the cosine best match of each source.

    keys: ``[R, M]`` random numbers (any distribution without ties); sorting them gives each
    row's permutation, whose first ``num_src`` positions are the sources.
    """
    rows, m, _ = x.shape
    if not 0 < num_src < m:
        raise ValueError(f"num_src must be in 1..{m - 1}, got {num_src}")
    if keys.shape != (rows, m):
        raise ValueError(f"random keys must have shape {(rows, m)}, got {tuple(keys.shape)}")
    perm = keys.argsort(dim=1)
    src_idx, dst_idx = perm[:, :num_src], perm[:, num_src:]
    xf = x.float()
    # argmax over destinations of cos(src, dst) does not depend on |src|: only dst is normalised.
    dst = _gather_rows(xf, dst_idx)
    dst = dst / torch.linalg.vector_norm(dst, dim=-1, keepdim=True).clamp_min(1e-12)
    src = _gather_rows(xf, src_idx)
    # The similarity [R, num_src, M - num_src] in blocks of sources (each source's best match is its own row):
    # at 512x512 the whole of it would be [5, 4096, 4096] floats (335 MB) at once.
    block = max(1, SIMILARITY_BLOCK // max(1, rows * dst.shape[1]))
    best = [torch.bmm(part, dst.transpose(1, 2)).argmax(dim=-1) for part in src.split(block, dim=1)]
    return Matching(src_idx, dst_idx, best[0] if len(best) == 1 else torch.cat(best, dim=1))


def apply_matching(x: torch.Tensor, matching: Matching) -> torch.Tensor:
    """Merge ``x`` ``[R, M, C]`` by ``matching`` -> ``[R, M - num_src, C]``.

    Each destination token becomes the mean of itself and the sources matched to it
    (computed in float32, returned in ``x.dtype``).
    """
    if x.shape[1] != matching.num_tokens:
        raise ValueError(f"matching is for {matching.num_tokens} tokens, tensor has {x.shape[1]}")
    xf = x.float()
    dst = _gather_rows(xf, matching.dst_idx)
    src = _gather_rows(xf, matching.src_idx)
    index = matching.dst_of_src.unsqueeze(-1).expand(-1, -1, x.shape[-1])
    return dst.scatter_reduce(1, index, src, reduce="mean", include_self=True).to(x.dtype)
