"""The feature bank: past frames' self-attention features, one entry per key and layer.

A *key* is ``(flag, step)``: ``flag`` 0 for the positive and 1 for the negative prompt,
``step`` the denoising step. Each key holds, for every patched self-attention layer and
every tensor name (``"n"``: the attention input, read by EA; ``"o"``: its output, read by
FF), up to ``size`` frames' worth of tokens, for ``B`` images sampled side by side
(``slot`` 0..B-1).

``FeatureBank`` is the bank's life: its settings, frame count, clearing (with a readable
reason) and status. The work is done by three parts, one job each: ``TokenStore``
(``storage.py``: the tensors and which slots hold a frame), ``WritePolicy`` (``writes.py``:
which frames write, append / ring / DyMe merge) and ``UnitNorms`` (``unit_norms.py``: FF's
norm cache). Reads and writes of one key happen in frame order, so a stream batch (many
frames in one call, each at its own step) sees what sequential sampling sees.
"""
from __future__ import annotations

import itertools
import logging
import threading
from dataclasses import dataclass

import torch

from .storage import TokenStore
from .unit_norms import UnitNorms
from .writes import KeyWrite, WritePolicy

log = logging.getLogger("streamv2v")
_GENERATIONS = itertools.count(1)

MODES = ("dyme", "queue")
UNIT = "#unit"  # suffix naming the unit-norm copy of a tensor in ``view`` (FF's cosine search reads it)


@dataclass(frozen=True)
class BankConfig:
    """How a bank keeps its past.

    mode: ``"dyme"`` (dynamic merging: at most ``size`` frames' worth of tokens, new
        frames merged in) or ``"queue"`` (FIFO of the last ``size`` frames).
    size: frames' worth of tokens kept per key (the paper's bank size).
    interval: update the bank every ``interval`` frames (frames 0, interval, 2*interval, ...).
    seed: seed of DyMe's random split (drawn from private generators, never the global RNG).
    """

    mode: str = "dyme"
    size: int = 1
    interval: int = 4
    seed: int = 0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"bank mode must be one of {MODES}, got {self.mode!r}")
        if int(self.size) < 1:
            raise ValueError(f"bank size must be at least 1 frame, got {self.size}")
        if int(self.interval) < 1:
            raise ValueError(f"bank update interval must be at least 1 frame, got {self.interval}")

    def describe_change(self, new: "BankConfig") -> str:
        """'bank settings changed: size 1 -> 2, interval 4 -> 1' (what differs, readable)."""
        diffs = [f"{name} {getattr(self, name)} -> {getattr(new, name)}"
                 for name in ("mode", "size", "interval", "seed") if getattr(self, name) != getattr(new, name)]
        return "bank settings changed: " + ", ".join(diffs)


class FeatureBank:
    """Features of past frames for every (flag, step) key of every patched layer. See module doc."""

    def __init__(self, config: BankConfig | None = None, name: str = "bank"):
        self.name = name
        self.lock = threading.RLock()
        self.frames_seen = 0
        self.last_reset_reason = "created"
        self.generation = next(_GENERATIONS)  # new at every clear, unique across banks: a stream on it ended
        self.users = 0  # streams running on it now: the registry keeps it registered meanwhile (see BankRegistry)
        self._signature: dict | None = None
        self._apply(config or BankConfig())

    def _apply(self, config: BankConfig) -> None:
        self.config = config
        self.store = TokenStore(config.size)
        self.units = UnitNorms(config.size)
        self.policy = WritePolicy(config.mode, config.size, config.interval, config.seed)

    # -- frames and keys --------------------------------------------------------------
    def updates_on(self, frame: int) -> bool:
        """Whether frame ``frame`` (0-based) writes its features into the bank."""
        return self.policy.updates_on(frame)

    def end_frame(self) -> None:
        """One more frame is done (drivers that number frames by ``frames_seen``: a plain sampler run)."""
        self.frames_seen += 1

    def count(self, name: str, flag: int, step: int) -> int:
        """Frames' worth of tokens key ``(flag, step)`` holds for tensor ``name`` (0 .. size)."""
        return self.policy.count(name, flag, step)

    def plans_write(self, name: str, flag: int, step: int, frame: int) -> bool:
        """Whether frame ``frame`` still has to write key ``(flag, step)`` of ``name`` (never a padding row's)."""
        return self.policy.plans_write(name, flag, step, frame)

    def geometry(self, name: str, layer) -> tuple[int, int, int] | None:
        """``(F, S, B)`` of the storage holding ``layer``'s ``name`` tensors, or None before any storage."""
        group = self.store.group(name, layer)
        return None if group is None else group.geometry

    def geometries(self, name: str) -> set[tuple[int, int, int]]:
        """The ``(F, S, B)`` of every storage group of tensor ``name``."""
        return {group.geometry for group in self.store.groups(name)}

    def token_shape(self, name: str, layer) -> tuple[int, int] | None:
        """``(T, C)``: tokens per frame and channels stored for ``layer``, or None before any storage."""
        return self.store.token_shape(name, layer)

    def view(self, name: str, layer, first: int, rows: int, stride: int, count: int | None = None) -> torch.Tensor:
        """Stored tokens of ``rows`` keys ``[rows, count * T, C]`` (a view, no copy; ``count`` None: the whole
        capacity, read with ``mask``). Keys are flat indices ``first, first + stride, ...`` with
        ``index = (flag * S + step) * B + slot``; ``name + UNIT`` reads FF's unit-norm copy of ``name``."""
        if name.endswith(UNIT):
            return self.units.view(name[:-len(UNIT)], layer, first, rows, stride, count)
        return self.store.view(name, layer, first, rows, stride, count)

    def mask(self, name: str, layer, first: int, rows: int, stride: int) -> torch.Tensor:
        """Additive attention mask of those keys ``[rows, T + capacity]``: 0 for a reader's own tokens and the
        filled frame slots, ``-inf`` for empty ones (a view)."""
        return self.store.mask(name, layer, first, rows, stride)

    # -- writing ----------------------------------------------------------------------
    def commit(self, name: str, staged: dict, rows: list[slice], writes: list[KeyWrite], geometry: tuple,
               matchings: dict | None = None) -> dict:
        """Store the rows ``rows`` of each staged layer's tokens under the keys ``writes`` (``WritePolicy.land``).

        staged: layer -> tokens ``[R, T, C]`` of one model call; geometry: ``(F, S, B)`` the call needs.
        Returns this call's DyMe matchings, for the other tensor name of the same call.
        """
        # Bank tensors are never part of autograd; keeping them inference tensors throughout lets them be
        # updated in place whether or not the caller samples under inference mode (ComfyUI's executor does).
        with self.lock, torch.inference_mode():
            computed = self.policy.land(self.store, name, staged, rows, writes, geometry, matchings or {})
            if name == "o":
                self._refresh_units(name, staged, writes)
        return computed

    def _refresh_units(self, name: str, staged: dict, writes: list[KeyWrite]) -> None:
        shapes = {self.store.token_shape(name, layer) for layer in staged}
        for shape in shapes:
            group = self.store.by_shape(name, shape)
            _, S, B = group.geometry
            self.units.refresh(name, group, shape, [(w.flag * S + w.step) * B + w.slot for w in writes])

    def reserve(self, name: str, staged: dict, geometry: tuple) -> None:
        """Allocate (empty, masked) storage for staged layers that have none, without writing a frame:
        after a bank's first model call every read has its final shape."""
        with self.lock, torch.inference_mode():
            by_shape: dict[tuple[int, int], list] = {}
            for layer, tokens in staged.items():
                if self.store.token_shape(name, layer) != (tokens.shape[1], tokens.shape[2]):
                    by_shape.setdefault((tokens.shape[1], tokens.shape[2]), []).append(layer)
            for shape, layers in by_shape.items():
                self.store.ensure(name, shape, layers, staged[layers[0]], geometry)

    def grow(self, geometry: tuple) -> None:
        """Make every storage (and FF's unit copy) hold at least ``geometry`` ``(F, S, B)`` keys: a masked call
        reads whole keys, so the keys its rows address must exist before its forward (``TokenStore.grow``)."""
        if all(all(a >= b for a, b in zip(g, geometry)) for name in ("n", "o") for g in self.geometries(name)):
            return  # the steady case: host integers only
        with self.lock, torch.inference_mode():
            self.store.grow(geometry)
            self.units.store.grow(geometry)

    # -- housekeeping -------------------------------------------------------------------
    def check_signature(self, signature: dict) -> str | None:
        """Clear the bank when what its features came from changed; returns the reason, or None.

        signature: named parts, each ``(comparable, shown)``; a part that differs from the last
        call's clears the bank with a readable reason ("strength changed 0.4 -> 0.5").
        """
        with self.lock:
            old, self._signature = self._signature, dict(signature)
            if old is None or (not self.policy.entries() and self.frames_seen == 0):
                return None
            reason = describe_changes(old, signature)
            if reason:
                self.reset(reason)
            return reason

    def reset(self, reason: str = "reset requested", config: BankConfig | None = None,
              keep_storage: bool = False) -> None:
        """Forget every stored feature and the frame count; a new generation starts (streams on it end).

        The tensors are dropped (made anew for ``config`` if given), or with ``keep_storage`` cleared in
        place: a new stream of the same settings then reads them at the same addresses, so its compiled
        graphs and CUDA graph recordings stay valid. A bank a stream runs on now (``users``: a live Clear, a
        non-finite frame, ``/free``) is always cleared in place, for the same reason.
        """
        with self.lock:
            had = bool(self.policy.entries()) or self.frames_seen > 0
            if keep_storage or (self.users and (config is None or config == self.config)):
                self.policy.clear()
                with torch.inference_mode():
                    self.store.clear()
                    self.units.store.clear()
            else:
                self._apply(config or self.config)
            self.generation = next(_GENERATIONS)
            self.frames_seen = 0
            self.last_reset_reason = reason
        if had:
            log.info("StreamV2V bank '%s' cleared: %s", self.name, reason)

    def nbytes(self) -> int:
        """Bytes held by the stored tensors (FF's unit-norm copy included)."""
        return self.store.nbytes() + self.units.store.nbytes()

    def num_entries(self) -> int:
        """Keys written so far (per tensor name)."""
        return self.policy.entries()

    def to(self, device: torch.device | str) -> "FeatureBank":
        """Move stored tensors to ``device``; a dtype is ignored (the bank keeps the compute dtype)."""
        if isinstance(device, torch.dtype):
            return self
        with self.lock:
            self.store.to(device)
            self.units.store.to(device)
        return self

    def status(self, running_frames: int = 0) -> dict:
        """A summary for logs and the UI; ``running_frames``: the frames a stream running on this bank has
        taken so far (ahead of ``frames_seen`` mid-run), so the count moves while it runs."""
        return {
            "name": self.name,
            "mode": self.config.mode,
            "size": self.config.size,
            "interval": self.config.interval,
            "frames_seen": max(self.frames_seen, int(running_frames)),
            "entries": self.num_entries(),
            "bytes": self.nbytes(),
            "last_reset": self.last_reset_reason,
        }


def describe_changes(old: dict, new: dict) -> str:
    """Readable list of the signature parts that differ: 'strength changed 0.4 -> 0.5; ...'.

    A part is ``(comparable, shown)`` or ``(comparable, shown, "detail")``; ``shown`` None
    reports the change without values. Detail parts (e.g. the whole noise schedule) are
    reported only when nothing more specific changed.
    """
    main, details = [], []
    for key, part in new.items():
        if key not in old or old[key][0] == part[0]:
            continue
        before, shown = old[key][1], part[1]
        text = f"{key} changed" if before is None or shown is None else f"{key} changed {before} -> {shown}"
        (details if len(part) > 2 and part[2] == "detail" else main).append(text)
    return "; ".join(main or details)
