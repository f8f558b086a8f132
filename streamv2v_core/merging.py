"""Dynamic merging (DyMe, paper section 4.3 and appendix A.5.2), vectorised.

The bank and the current frame's tokens are concatenated, split at random into a
source set and a destination set, and every source token is averaged into its most
cosine-similar destination token. ``scatter_reduce(..., "mean", include_self=True)``
makes each destination the mean of itself and all sources matched to it, in one call.

The matching is computed once and can be applied to several tensors of the same
layer (EA's attention input and FF's attention output), so the two stay aligned.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Matching:
    """A bipartite matching over ``M`` tokens per row.

    src_idx: ``[b, num_src]`` positions of the source tokens.
    dst_idx: ``[b, M - num_src]`` positions of the destination tokens.
    dst_of_src: ``[b, num_src]`` for each source, its destination's index into ``dst_idx``.
    """

    src_idx: torch.Tensor
    dst_idx: torch.Tensor
    dst_of_src: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.src_idx.shape[1] + self.dst_idx.shape[1]


def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x ``[b, M, C]``, idx ``[b, k]`` -> ``[b, k, C]``."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def random_bipartite_matching(x: torch.Tensor, num_src: int, generator: torch.Generator) -> Matching:
    """Random src/dst split of ``x`` ``[b, M, C]`` and cosine best match of each source.

    The split is drawn from ``generator`` (a CPU generator: the global RNG is never
    touched), one independent permutation per row.
    """
    b, m, _ = x.shape
    if not 0 < num_src < m:
        raise ValueError(f"num_src must be in 1..{m - 1}, got {num_src}")
    perm = torch.rand(b, m, generator=generator).argsort(dim=1).to(x.device)
    src_idx, dst_idx = perm[:, :num_src], perm[:, num_src:]
    unit = F.normalize(x.float(), dim=-1)
    similarity = _gather_rows(unit, src_idx) @ _gather_rows(unit, dst_idx).transpose(1, 2)
    return Matching(src_idx, dst_idx, similarity.argmax(dim=-1))


def apply_matching(x: torch.Tensor, matching: Matching) -> torch.Tensor:
    """Merge ``x`` ``[b, M, C]`` by ``matching`` -> ``[b, M - num_src, C]``.

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
