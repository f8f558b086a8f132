"""The feature bank's tensors: per tensor name, one storage per activation shape, and which slots hold a frame.

All layers with ``T`` tokens per frame and ``C`` channels live in one tensor
``[L, F, S, B, cap, C]`` (layers, prompt flags, steps, image slots, capacity ``cap = size * T``
tokens, channels), so a read is a view and a DyMe merge runs once per shape group instead of
once per layer. Keys are addressed flat: ``index = (flag * S + step) * B + slot``.

Beside it, per key, an additive attention mask ``[F, S, B, T + cap]``: 0 for a reader's own
``T`` tokens and for every stored frame, ``-inf`` for the frame slots nothing filled yet. A
reader that takes the whole capacity with this mask attends exactly to what the key holds, in
one shape whatever the bank's fill level (one compiled graph for a whole stream).

Tensors keep their addresses: writes, merges and clears happen in place, so a CUDA graph that
reads them stays valid and needs no copy per replay (they are marked with
``torch._dynamo.mark_static_address``). Only a layer, flag, step or slot seen for the first
time, another capacity or a move to another device allocates anew (a re-recording, rarely).
"""
from __future__ import annotations

import torch

from .runs import arithmetic_runs


def _static(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, marked as living at one address for its whole life (CUDA graphs read it in place)."""
    import torch._dynamo

    torch._dynamo.mark_static_address(tensor)
    return tensor


class _Group:
    """One tensor name's storage for the layers of one activation shape ``(T, C)``.

    data: ``[L, F, S, B, cap, C]``; mask: ``[F, S, B, T + cap]``; ``layers[i]`` is the layer at position i.
    """

    def __init__(self, layers: list, data: torch.Tensor, mask: torch.Tensor):
        self.layers, self.data, self.mask = layers, _static(data), _static(mask)
        self.position = {layer: i for i, layer in enumerate(layers)}

    def flat(self) -> torch.Tensor:
        """``[L, F*S*B, cap, C]`` view: keys addressed by ``(flag * S + step) * B + slot``."""
        return self.data.flatten(1, 3)

    def flat_mask(self) -> torch.Tensor:
        """``[F*S*B, T + cap]`` view of the mask."""
        return self.mask.flatten(0, 2)

    @property
    def geometry(self) -> tuple[int, int, int]:
        return tuple(self.data.shape[1:4])


def _empty_mask(like: torch.Tensor, geometry, tokens: int, capacity: int) -> torch.Tensor:
    mask = like.new_full((*geometry, tokens + capacity), float("-inf"))
    mask[..., :tokens] = 0
    return mask


class TokenStore:
    """Stored tokens by tensor name and activation shape, ``frames`` frames per key. See module doc."""

    def __init__(self, frames: int):
        self.frames = int(frames)
        self._groups: dict[str, dict[tuple[int, int], _Group]] = {}  # name -> (T, C) -> group
        self._layer_shape: dict[str, dict] = {}  # name -> layer -> (T, C)

    # -- reading ------------------------------------------------------------------------
    def group(self, name: str, layer) -> _Group | None:
        shape = self._layer_shape.get(name, {}).get(layer)
        return None if shape is None else self._groups[name][shape]

    def by_shape(self, name: str, shape: tuple[int, int]) -> _Group | None:
        return self._groups.get(name, {}).get(shape)

    def groups(self, name: str) -> list[_Group]:
        return list(self._groups.get(name, {}).values())

    def token_shape(self, name: str, layer) -> tuple[int, int] | None:
        """``(T, C)``: tokens per frame and channels stored for ``layer``, or None before any storage."""
        return self._layer_shape.get(name, {}).get(layer)

    def view(self, name: str, layer, first: int, rows: int, stride: int, frames: int | None = None) -> torch.Tensor:
        """Stored tokens of ``rows`` keys ``first, first + stride, ...``: ``[rows, frames * T, C]`` (a view).

        frames: how many frame slots to read (None: the whole capacity, for a masked reader).
        """
        group = self.group(name, layer)
        tokens = group.data.shape[4] // self.frames
        end = group.data.shape[4] if frames is None else frames * tokens
        return group.flat()[group.position[layer], first: first + (rows - 1) * stride + 1: stride, :end]

    def mask(self, name: str, layer, first: int, rows: int, stride: int) -> torch.Tensor:
        """The additive mask of those keys, ``[rows, T + cap]`` (a view; see module doc)."""
        return self.group(name, layer).flat_mask()[first: first + (rows - 1) * stride + 1: stride]

    # -- allocating -----------------------------------------------------------------------
    def ensure(self, name: str, shape: tuple[int, int], layers: list, like: torch.Tensor, geometry) -> _Group:
        """The storage of ``layers`` (activation ``shape``) with room for ``geometry`` ``(F, S, B)``, zero-filled
        when new; ``like`` gives dtype and device."""
        groups = self._groups.setdefault(name, {})
        group = groups.get(shape)
        tokens, capacity = shape[0], self.frames * shape[0]
        if group is None or group.data.shape[4] != capacity or group.data.dtype != like.dtype:
            data = like.new_zeros(len(layers), *geometry, capacity, shape[1])
            group = groups[shape] = _Group(list(layers), data, _empty_mask(like, geometry, tokens, capacity))
        else:
            group = groups[shape] = self._grown(group, layers, geometry)
        placed = self._layer_shape.setdefault(name, {})
        for layer in layers:
            placed[layer] = shape
        self._drop_unused(name)
        return group

    def grow(self, geometry) -> None:
        """Room for at least ``geometry`` ``(F, S, B)`` in every group (new keys empty and masked): a call whose
        rows need more flags, steps or slots than the storage has (a live cfg above 1 adds the uncond flag)
        reads empty keys, never past the end. Existing keys keep their ``(flag, step, slot)``."""
        for groups in self._groups.values():
            for shape, group in groups.items():
                groups[shape] = self._grown(group, group.layers, geometry)

    @staticmethod
    def _grown(group: _Group, layers: list, geometry) -> _Group:
        """``group`` with room for more flags, steps or slots and for layers first seen now (rare)."""
        L, F, S, B, cap, C = group.data.shape
        size = tuple(max(a, b) for a, b in zip((F, S, B), geometry))
        missing = [layer for layer in layers if layer not in group.position]
        if size == (F, S, B) and not missing:
            return group
        data = group.data.new_zeros(L + len(missing), *size, cap, C)
        data[:L, :F, :S, :B] = group.data
        mask = _empty_mask(group.data, size, group.mask.shape[-1] - cap, cap)
        mask[:F, :S, :B] = group.mask
        return _Group(group.layers + missing, data, mask)

    def _drop_unused(self, name: str) -> None:
        """Forget the storage no layer maps to any more (the frame size changed)."""
        used = set(self._layer_shape.get(name, {}).values())
        for shape in [s for s in self._groups.get(name, {}) if s not in used]:
            del self._groups[name][shape]

    # -- bookkeeping ----------------------------------------------------------------------
    def fill_slot(self, name: str, keys: list[int], slot: int) -> None:
        """Frame slot ``slot`` of the flat ``keys`` holds a frame now: unmask it in every group of ``name``."""
        for group in self.groups(name):
            tokens = group.mask.shape[-1] - group.data.shape[4]
            mask = group.flat_mask()
            for first, count, stride in arithmetic_runs(keys):
                mask[first: first + (count - 1) * stride + 1: stride, tokens * (slot + 1): tokens * (slot + 2)] = 0

    def clear(self) -> None:
        """Forget every stored frame, in place (addresses kept; see module doc)."""
        for groups in self._groups.values():
            for group in groups.values():
                group.data.zero_()
                tokens = group.mask.shape[-1] - group.data.shape[4]
                group.mask[..., tokens:] = float("-inf")

    def release(self) -> None:
        """Drop every tensor (their memory is freed)."""
        self._groups.clear()
        self._layer_shape.clear()

    def nbytes(self) -> int:
        return sum(g.data.numel() * g.data.element_size() for groups in self._groups.values() for g in groups.values())

    def to(self, device) -> None:
        for groups in self._groups.values():
            for shape, group in groups.items():
                data = group.data.to(device)
                if data is not group.data:
                    groups[shape] = _Group(group.layers, data, group.mask.to(device))
