"""Per-row numbers on the model's device (a frame's fusion alpha, its ControlNet strength), made without a sync.

A number a frame chose live must reach the device as data (a compiled graph must not specialise on
it), but ``torch.tensor(values, device=cuda)`` copies from pageable memory and makes the host wait.
Here each distinct number goes up once, from pinned memory without blocking, and each distinct row
tuple is stacked from those on the device once; both are kept (bounded), so a steady stream reuses
one tensor call after call and a fader moving costs one small upload per new value.
"""
from __future__ import annotations

import torch

from ..registry import Registry


class DeviceValues:
    """``rows(values, like)``: ``values`` as a tensor ``[R, 1, ..., 1]`` of ``like``'s device and dtype."""

    def __init__(self, kind: str, limit: int = 64):
        self._numbers: Registry[torch.Tensor] = Registry(f"{kind} value", limit, "lru", quiet=True)
        self._rows: Registry[torch.Tensor] = Registry(f"{kind} rows", limit, "lru", quiet=True)

    def rows(self, values: tuple[float, ...], like: torch.Tensor, dims: int) -> torch.Tensor:
        """``[len(values)]`` reshaped to ``dims`` dimensions (``[R, 1, 1]`` for 3)."""
        where = (str(like.device), str(like.dtype))
        return self._rows.get_or_create(repr((values, where, dims)), lambda: torch.stack(
            [self._number(v, like) for v in values]).view(-1, *(1,) * (dims - 1)))

    def _number(self, value: float, like: torch.Tensor) -> torch.Tensor:
        def upload():
            number = torch.tensor(float(value), dtype=like.dtype)
            if like.device.type == "cuda":
                return number.pin_memory().to(like.device, non_blocking=True)
            return number.to(like.device)
        return self._numbers.get_or_create(repr((float(value), str(like.device), str(like.dtype))), upload)
