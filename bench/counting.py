"""Counting what a GPU would pay for, on any device: kernels, view ops, and host-device syncs.

On the CPU the arithmetic hides the cost of launching many small kernels and of making
the host wait for the device, but both are deterministic and predict GPU behaviour:

* ``OpCounter`` (a ``TorchDispatchMode``) counts every ATen op: *kernels* (ops that compute
  or copy data, one launch each on a GPU), *views* (aliasing ops: only host work) and
  *allocations* (``empty``: no launch).
* ``SyncCounter`` (a ``TorchFunctionMode``) counts the Python-level calls that make the host
  wait for a GPU, whatever device the tensors are on: scalar reads (``.item()``,
  ``float(t)``, ``int(t)``, ``bool(t)``, index by a tensor), ``.tolist()``, ``.numpy()``,
  ``.cpu()`` (explicit requests for host data), copies between devices (``.to(d)`` /
  ``copy_`` whose target device differs from the tensor's), indexing with a Python list (its
  index tensor is built on the host and copied up), data-dependent shapes (``nonzero``,
  ``unique``, ``masked_select``, one-argument ``where``) and tensors built from Python data
  (``torch.tensor([...])``: copied up when used with device tensors).

Both record per *region* (``with counter.region("forward")``), so a benchmark can tell
what happens inside the UNet forward from what happens between model calls.
"""
from __future__ import annotations

import collections
import contextlib

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_ALLOCATIONS = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided"}
_SCALAR_READS = {"item", "__bool__", "__int__", "__float__", "__index__", "__complex__"}
_HOST_COPIES = {"cpu", "numpy", "tolist"}  # explicit requests for host data
_DATA_DEPENDENT = {"nonzero", "unique", "unique_consecutive", "masked_select", "argwhere"}
_FROM_PYTHON = {"tensor", "as_tensor", "asarray"}


class _Regions:
    def __init__(self):
        self.counts = collections.defaultdict(collections.Counter)
        self.current = "outside"

    @contextlib.contextmanager
    def region(self, name: str):
        previous, self.current = self.current, name
        try:
            yield
        finally:
            self.current = previous

    def add(self, what: str, n: int = 1) -> None:
        self.counts[self.current][what] += n

    def total(self, what: str, region: str | None = None) -> int:
        regions = [region] if region else list(self.counts)
        return sum(self.counts[r][what] for r in regions)


class OpCounter(TorchDispatchMode, _Regions):
    """Counts ATen ops as ``kernels``, ``views`` and ``allocations`` (see module doc)."""

    def __init__(self):
        TorchDispatchMode.__init__(self)
        _Regions.__init__(self)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name == "_local_scalar_dense":
            self.add("scalar reads")
        elif func.is_view:
            self.add("views")
        elif name in _ALLOCATIONS:
            self.add("allocations")
        else:
            self.add("kernels")
        return func(*args, **(kwargs or {}))


class SyncCounter(TorchFunctionMode, _Regions):
    """Counts calls that would make the host wait for a GPU (see module doc), by category."""

    def __init__(self):
        TorchFunctionMode.__init__(self)
        _Regions.__init__(self)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _SCALAR_READS:
            self.add("scalar reads")
        elif name in _HOST_COPIES:
            self.add("to host" if name != "tolist" else "tolist")
        elif name in _DATA_DEPENDENT or (name == "where" and len(args) + len(kwargs) == 1):
            self.add("data-dependent shapes")
        elif name == "__getitem__" and len(args) > 1 and _has_list(args[1]):
            self.add("Python-list indexing")
        elif name in ("to", "copy_") and _moves(args, kwargs):
            self.add("cross-device copies")
        elif name in _FROM_PYTHON and args and not isinstance(args[0], torch.Tensor):
            self.add("built from Python data")
        return func(*args, **kwargs)

    def syncs(self, region: str | None = None) -> int:
        """All counted calls (every category), in ``region`` or everywhere."""
        regions = [region] if region else list(self.counts)
        return sum(sum(self.counts[r].values()) for r in regions)


def _has_list(index) -> bool:
    if isinstance(index, list):
        return True
    return isinstance(index, tuple) and any(isinstance(i, list) for i in index)


def _moves(args, kwargs) -> bool:
    """Whether ``t.to(...)`` / ``t.copy_(src)`` copies between devices (a no-op move is not counted)."""
    source = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if source is None:
        return False
    targets = [v for v in list(args[1:]) + [kwargs.get("device")] if isinstance(v, (str, torch.device))]
    targets += [v.device for v in args[1:] if isinstance(v, torch.Tensor)]
    return any(torch.device(t).type != source.device.type for t in targets)


@contextlib.contextmanager
def counting():
    """``with counting() as (ops, syncs): ...`` counts everything run inside."""
    ops, syncs = OpCounter(), SyncCounter()
    with syncs, ops:
        yield ops, syncs
