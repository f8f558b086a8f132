"""FF's norm cache: a unit-norm copy of the stored attention outputs, in FF's decision precision.

Feature fusion searches the bank by cosine similarity on every call; normalising the stored
outputs once per write instead of once per call saves that work. The copy is kept in float32
at least (float64 for a float64 bank): FF decides its threshold in that precision (an fp16 copy
would round cosines near the threshold).
"""
from __future__ import annotations

import torch

from .attention import decision_dtype
from .runs import arithmetic_runs
from .storage import TokenStore, _Group


class UnitNorms:
    """Unit-norm copies of one tensor name's storage groups, refreshed for the keys a write touched."""

    def __init__(self, frames: int):
        self.store = TokenStore(frames)

    def refresh(self, name: str, source: _Group, shape: tuple[int, int], keys: list[int]) -> None:
        """Renormalise the flat ``keys`` of ``source`` (all keys when the copy was (re)allocated)."""
        old = self.store.by_shape(name, shape)
        like = source.data.new_empty(0, dtype=decision_dtype(source.data.dtype))
        unit = self.store.ensure(name, shape, source.layers, like, source.geometry)
        if unit.layers != source.layers:  # positions no longer mirror the source's: start over
            self.store.release()
            old, unit = None, self.store.ensure(name, shape, source.layers, like, source.geometry)
        if unit is not old:
            keys = list(range(source.flat().shape[1]))
        source_flat, target = source.flat(), unit.flat()
        for first, count, stride in arithmetic_runs(keys):
            part = slice(first, first + (count - 1) * stride + 1, stride)
            target[:, part] = torch.nn.functional.normalize(source_flat[:, part].to(like.dtype), dim=-1)

    def view(self, name: str, layer, first: int, rows: int, stride: int, frames: int | None = None) -> torch.Tensor:
        return self.store.view(name, layer, first, rows, stride, frames)
