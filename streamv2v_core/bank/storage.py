"""The feature bank: past frames' self-attention features, one entry per key and layer.

A *key* is ``(flag, step)``: ``flag`` 0 for the positive and 1 for the negative prompt,
``step`` the denoising step. Each key holds, for every patched self-attention layer and
every tensor name (``"n"``: the attention input, read by EA; ``"o"``: its output, read by
FF), up to ``size`` frames' worth of tokens, for ``B`` images sampled side by side
(``slot`` 0..B-1).

Storage is grouped by activation shape: all layers with ``T`` tokens per frame and ``C``
channels live in one tensor ``[L, F, S, B, size * T, C]`` (layers, flags, steps, slots,
tokens, channels), so a read is a view and a DyMe merge runs once per shape group
instead of once per layer. How many frames a key holds is bookkept on the host
(``count``), so nothing in the hot path reads a tensor value.

Frames are counted by whoever drives the model (a sampling run, or the stream engine).
A frame with ``index % interval == 0`` updates the bank; every key is written at most
once per frame (``plans_write``), after the model call that produced it (``commit``).
Reads and writes of one key happen in frame order, so a stream batch (many frames in one
call, each at its own step) sees what sequential sampling sees.
"""
from __future__ import annotations

import itertools
import logging
import threading
from dataclasses import dataclass

import torch

from ..registry import Registry
from ..seeds import generator
from .attention import decision_dtype
from .merging import Matching, apply_matching, random_bipartite_matching
from .runs import arithmetic_runs

log = logging.getLogger("streamv2v")
_GENERATIONS = itertools.count(1)

MODES = ("dyme", "queue")
UNIT = "#unit"  # suffix of the stored unit-norm copy of a tensor (FF's cosine search reads it)


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


@dataclass(frozen=True)
class KeyWrite:
    """One bank row written by a model call: key ``(flag, step)``, image ``slot``, ``frame`` index."""

    flag: int
    step: int
    slot: int
    frame: int


class _Group:
    """One tensor name's storage for the layers of one activation shape.

    data: ``[L, F, S, B, cap, C]``; ``layers[i]`` is the layer at position i.
    """

    def __init__(self, layers: list, data: torch.Tensor):
        self.layers = layers
        self.data = data
        self.position = {layer: i for i, layer in enumerate(layers)}

    def flat(self) -> torch.Tensor:
        """``[L, F*S*B, cap, C]`` view: keys addressed by ``(flag * S + step) * B + slot``."""
        return self.data.flatten(1, 3)

    def grow(self, flags: int, steps: int, slots: int) -> None:
        """Make room for more flags, steps or slots (rare: e.g. cond and uncond in separate calls)."""
        L, F, S, B, cap, C = self.data.shape
        if flags <= F and steps <= S and slots <= B:
            return
        bigger = self.data.new_zeros(L, max(F, flags), max(S, steps), max(B, slots), cap, C)
        bigger[:, :F, :S, :B] = self.data
        self.data = bigger


class FeatureBank:
    """Features of past frames for every (flag, step) key of every patched layer. See module doc."""

    def __init__(self, config: BankConfig | None = None, name: str = "bank"):
        self.name = name
        self.config = config or BankConfig()
        self.lock = threading.RLock()
        self.frames_seen = 0
        self.last_reset_reason = "created"
        self.generation = next(_GENERATIONS)  # new at every clear, unique across banks: a stream on it ended
        self.users = 0  # streams running on it now: the registry keeps it registered meanwhile (see BankRegistry)
        self._groups: dict[str, dict[tuple[int, int], _Group]] = {}  # name -> (T, C) -> group
        self._layer_group: dict[str, dict] = {}  # name -> layer -> (T, C)
        self._counts: dict[tuple, int] = {}  # (name, flag, step) -> frames held
        self._writes: dict[tuple, int] = {}  # (name, flag, step) -> frames ever written (queue ring position)
        self._written: dict[tuple, int] = {}  # (name, flag, step) -> last frame written
        self._signature: dict | None = None

    # -- frames and keys --------------------------------------------------------------
    def updates_on(self, frame: int) -> bool:
        """Whether frame ``frame`` (0-based) writes its features into the bank."""
        return frame % self.config.interval == 0

    def end_frame(self, count: int = 1) -> None:
        """Mark ``count`` frames as done (drivers that number frames by ``frames_seen``)."""
        self.frames_seen += count

    def count(self, name: str, flag: int, step: int) -> int:
        """Frames' worth of tokens key ``(flag, step)`` holds for tensor ``name`` (0 .. size)."""
        return self._counts.get((name, flag, step), 0)

    def plans_write(self, name: str, flag: int, step: int, frame: int) -> bool:
        """Whether frame ``frame`` still has to write key ``(flag, step)`` of ``name``."""
        return self.updates_on(frame) and self._written.get((name, flag, step), -1) < frame

    def geometry(self, name: str, layer) -> tuple[int, int, int] | None:
        """``(F, S, B)`` of the storage holding ``layer``'s ``name`` tensors, or None before any write."""
        group = self._group_of(name, layer)
        return None if group is None else tuple(group.data.shape[1:4])

    def geometries(self, name: str) -> set[tuple[int, int, int]]:
        """The ``(F, S, B)`` of every storage group of tensor ``name``."""
        return {tuple(g.data.shape[1:4]) for g in self._groups.get(name, {}).values()}

    def token_shape(self, name: str, layer) -> tuple[int, int] | None:
        """``(T, C)``: tokens per frame and channels stored for ``layer``, or None before any write."""
        return self._layer_group.get(name, {}).get(layer)

    def view(self, name: str, layer, first: int, rows: int, stride: int, count: int) -> torch.Tensor:
        """Stored tokens of ``rows`` keys ``[rows, count * T, C]`` (a view, no copy).

        Keys are flat indices ``first, first + stride, ...`` with ``index = (flag * S + step) * B + slot``.
        """
        group = self._group_of(name, layer)
        tokens = group.data.shape[4] // self.config.size
        return group.flat()[group.position[layer], first: first + (rows - 1) * stride + 1: stride, : count * tokens]

    def _group_of(self, name: str, layer) -> _Group | None:
        shape = self._layer_group.get(name, {}).get(layer)
        return None if shape is None else self._groups[name][shape]

    # -- writing ----------------------------------------------------------------------
    def commit(self, name: str, staged: dict, rows: list[slice], writes: list[KeyWrite], geometry: tuple,
               matchings: dict | None = None) -> dict:
        """Store the rows ``rows`` of each staged layer's tokens under the keys ``writes``.

        staged: layer -> tokens ``[R, T, C]`` of one model call (R rows).
        rows: slices of R whose rows, concatenated in order, are the ``len(writes)`` rows written.
        geometry: ``(F, S, B)`` the call needs (flags, steps, slots) when storage is created.
        matchings: DyMe matchings another tensor name computed in this call, from the return
            value of its ``commit``; reused so that "n" and "o" of a layer merge alike.
        Returns this call's matchings: ``{(T, C, batch): (layers, Matching)}``.
        """
        computed = {}
        by_shape: dict[tuple[int, int], list] = {}
        for layer, tokens in staged.items():
            by_shape.setdefault((tokens.shape[1], tokens.shape[2]), []).append(layer)
        # Bank tensors are never part of autograd; keeping them inference tensors throughout lets them be
        # updated in place whether or not the caller samples under inference mode (ComfyUI's executor does).
        with self.lock, torch.inference_mode():
            for shape, layers in by_shape.items():
                group = self._ensure_group(name, shape, layers, staged[layers[0]], geometry)
                new = torch.stack([staged[layer][s] for layer in layers for s in rows])  # [L * parts, rows, T, C]
                new = new.view(len(layers), len(writes), shape[0], shape[1])
                self._store(name, group, layers, new, writes, shape, matchings or {}, computed)
            for key, frame in {(name, w.flag, w.step): w.frame for w in writes}.items():  # once per key, not per image
                self._written[key] = frame
                self._writes[key] = self._writes.get(key, 0) + 1
                self._counts[key] = min(self.config.size, self._counts.get(key, 0) + 1)
        return computed

    def _ensure_group(self, name, shape, layers, like: torch.Tensor, geometry) -> _Group:
        groups = self._groups.setdefault(name, {})
        group = groups.get(shape)
        F, S, B = geometry
        if group is None:
            data = like.new_zeros(len(layers), F, S, B, self.config.size * shape[0], shape[1])
            group = groups[shape] = _Group(list(layers), data)
        else:
            group.grow(F, S, B)
            missing = [layer for layer in layers if layer not in group.position]
            if missing:  # a layer first seen now (rare): append its storage
                extra = group.data.new_zeros(len(missing), *group.data.shape[1:])
                group = groups[shape] = _Group(group.layers + missing, torch.cat([group.data, extra]))
        placed = self._layer_group.setdefault(name, {})
        for layer in layers:
            placed[layer] = shape
        return group

    def _store(self, name, group, layers, new, writes, shape, reuse: dict, computed: dict) -> None:
        """Write ``new`` ``[L, n, T, C]`` of ``layers`` into the keys ``writes`` by the bank's policy."""
        _, _, S, B, cap, C = group.data.shape
        tokens = shape[0]
        positions = [group.position[layer] for layer in layers]
        every_layer = positions == list(range(len(group.layers)))
        flat = group.flat()
        for first, count, stride, part in _runs(writes, lambda w: self._action(name, w), S, B):
            keys = slice(first, first + (count - 1) * stride + 1, stride)
            target = flat[:, keys] if every_layer else flat[positions][:, keys]  # [L, n, cap, C]
            chunk = new[:, part]
            held, action, position = self._action(name, writes[part.start])
            if action == "merge":  # DyMe on a full key: merge the new frame into the stored ones
                joined = torch.cat([target, chunk], dim=2)  # [L, n, cap + T, C]
                rows = len(layers) * count
                run = (shape, first, count, stride)
                matching = _reused(reuse.get(run), layers, count) or random_bipartite_matching(
                    joined.reshape(rows, cap + tokens, C), tokens, self._split_keys(len(layers), writes[part], joined))
                computed[run] = (list(layers), matching)
                merged = apply_matching(joined.reshape(rows, cap + tokens, C), matching).view(len(layers), count, cap, C)
            else:  # "append" while the key fills up, "ring" for a full queue: one frame's slot
                slot = held if action == "append" else position
                target[:, :, slot * tokens:(slot + 1) * tokens] = chunk
                if every_layer:
                    continue  # target is a view: written in place
                merged = target
            if every_layer:
                target.copy_(merged)
            else:  # target was a gathered copy: put the result back
                index = torch.tensor(positions, device=flat.device)
                flat[index, keys] = merged
        if name == "o":
            self._store_unit(name, group, writes, S, B)

    def _store_unit(self, name, group, writes, S, B) -> None:
        """Keep a unit-norm copy of the written keys (FF's cosine search reads it every call)."""
        unit_groups = self._groups.setdefault(name + UNIT, {})
        shape = (group.data.shape[4] // self.config.size, group.data.shape[5])
        unit = unit_groups.get(shape)
        if unit is None or unit.data.shape != group.data.shape:
            unit = unit_groups[shape] = _Group(list(group.layers), torch.zeros_like(group.data))
            keys = list(range(group.data.shape[1] * S * B))
        else:
            keys = [(w.flag * S + w.step) * B + w.slot for w in writes]
        self._layer_group.setdefault(name + UNIT, {}).update({layer: shape for layer in group.layers})
        source, target = group.flat(), unit.flat()
        for first, count, stride in arithmetic_runs(keys):
            sl = slice(first, first + (count - 1) * stride + 1, stride)
            # In float32 at least, in float64 for a float64 bank (FF's threshold is decided in this precision).
            part = source[:, sl]
            part = part.to(decision_dtype(part.dtype))
            target[:, sl] = torch.nn.functional.normalize(part, dim=-1).to(target.dtype)

    def _action(self, name: str, w: KeyWrite) -> tuple[int, str, int]:
        """(frames held, "append" | "ring" | "merge", ring position) for writing ``w``."""
        key = (name, w.flag, w.step)
        held = self._counts.get(key, 0)
        if held < self.config.size:
            return held, "append", held
        if self.config.mode == "queue":
            return held, "ring", self._writes.get(key, 0) % self.config.size
        return held, "merge", 0

    def _split_keys(self, layers: int, writes, like) -> torch.Tensor:
        """Random keys ``[layers * len(writes), tokens]`` for DyMe's split, a private generator per key.

        Seeded by (bank seed, shape, key, frame): the same split whatever else shares the
        call, so a stream batch merges exactly as sequential sampling does.
        """
        tokens = like.shape[2]
        shape = tuple(like.shape[2:])
        draws = []
        for w in writes:
            g = generator(like.device, self.config.seed, shape, w.flag, w.step, w.slot, w.frame)
            draws.append(torch.rand(layers, tokens, generator=g, device=like.device))
        keys = draws[0].unsqueeze(1) if len(draws) == 1 else torch.stack(draws, dim=1)
        return keys.reshape(layers * len(writes), tokens)

    # -- housekeeping -------------------------------------------------------------------
    def check_signature(self, signature: dict) -> str | None:
        """Clear the bank when what its features came from changed; returns the reason, or None.

        signature: named parts, each ``(comparable, shown)``; a part that differs from the last
        call's clears the bank with a readable reason ("strength changed 0.4 -> 0.5").
        """
        with self.lock:
            old, self._signature = self._signature, dict(signature)
            if old is None or (not self._counts and self.frames_seen == 0):
                return None
            reason = describe_changes(old, signature)
            if reason:
                self.reset(reason)
            return reason

    def reset(self, reason: str = "reset requested") -> None:
        """Forget every stored feature and the frame count; a new generation starts (streams on it end)."""
        with self.lock:
            had = bool(self._counts) or self.frames_seen > 0
            self._groups.clear()
            self._layer_group.clear()
            self._counts.clear()
            self._writes.clear()
            self._written.clear()
            self.generation = next(_GENERATIONS)
            self.frames_seen = 0
            self.last_reset_reason = reason
        if had:
            log.info("StreamV2V bank '%s' cleared: %s", self.name, reason)

    def nbytes(self) -> int:
        """Bytes held by the stored tensors."""
        return sum(g.data.numel() * g.data.element_size() for groups in self._groups.values() for g in groups.values())

    def num_entries(self) -> int:
        """Keys written so far (per tensor name)."""
        return len(self._counts)

    def to(self, device: torch.device | str) -> "FeatureBank":
        """Move stored tensors to ``device``; a dtype is ignored (the bank keeps the compute dtype)."""
        if isinstance(device, torch.dtype):
            return self
        with self.lock:
            for groups in self._groups.values():
                for group in groups.values():
                    group.data = group.data.to(device)
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


def _runs(writes: list[KeyWrite], action, S: int, B: int):
    """Batches of consecutive writes with one action whose flat key indices form an arithmetic run.

    Yields ``(first key, count, stride, slice of writes)``.
    """
    start = 0
    for _, group in itertools.groupby(writes, key=action):
        keys = [(w.flag * S + w.step) * B + w.slot for w in group]
        for first, count, stride in arithmetic_runs(keys):
            yield first, count, stride, slice(start, start + count)
            start += count


def _reused(reuse, layers, rows: int) -> Matching | None:
    """The matching another tensor name computed for these layers and rows in this call, if any."""
    if reuse is None:
        return None
    their_layers, matching = reuse
    if list(their_layers) == list(layers):
        return matching
    if set(layers) <= set(their_layers):
        return matching.select_groups([their_layers.index(layer) for layer in layers], rows)
    return None


MAX_BANKS = 64  # least recently used banks beyond this are dropped (their memory released)
MAX_NAME = 200  # characters; the bank routes take the same names
NAME_RULE = f"1 to {MAX_NAME} printable characters, no line breaks or other control characters"


def check_bank_name(name: str) -> str:
    """``name`` stripped, if it can name a bank; ValueError saying what is allowed otherwise.

    Control characters are refused because names go into log lines (a newline would forge one)
    and into URLs of the Clear / DELETE routes, which take at most ``MAX_NAME`` characters.
    """
    name = str(name).strip()
    if not name or len(name) > MAX_NAME or any(not ch.isprintable() for ch in name):
        shown = name if len(name) <= 40 else name[:40] + f"... ({len(name)} characters)"
        raise ValueError(f"bank name {shown!r} is not allowed: use {NAME_RULE} (e.g. 'default')")
    return name


class BankRegistry:
    """Named banks that outlive one prompt execution, at most ``limit`` (least recently used dropped).

    Built on ``registry.Registry``; ``free()`` resets every bank and forgets those no stream runs on. A bank
    a running stream reads (``users``) is never dropped or forgotten, so its name keeps naming the bank that
    stream reads: clearing it by name (route, panel) clears what the running loop sees.
    """

    def __init__(self, limit: int = MAX_BANKS, register: bool = False):
        self._banks: Registry[FeatureBank] = Registry("feature bank", limit, "lru", busy=lambda bank: bank.users > 0,
                                                      hint="Stop a running loop first.", register=register)

    def get(self, name: str, config: BankConfig | None = None) -> FeatureBank:
        """The bank called ``name``, created on first use; a new ``config`` resets it (with the reason)."""
        with self._banks.lock:
            bank = self._banks.get_or_create(name, lambda: FeatureBank(config or BankConfig(), name=name))
            if config is not None and config != bank.config:
                old, bank.config = bank.config, config
                bank.reset(old.describe_change(config))
            return bank

    def lookup(self, name: str, config: BankConfig) -> FeatureBank:
        """The bank called ``name`` as it is, or a new one with ``config`` (never resets one)."""
        return self._banks.get_or_create(name, lambda: FeatureBank(config, name=name))

    def find(self, name: str) -> FeatureBank | None:
        """The bank called ``name`` if it exists (never creates one)."""
        return self._banks.find(name)

    def remove(self, name: str) -> bool:
        """Forget the bank ``name`` (its memory is released once no running stream holds it)."""
        return self._banks.remove(name)

    def free(self, reason: str) -> int:
        """Clear every bank (logging ``reason``) and forget those no stream runs on; returns the bytes they held."""
        with self._banks.lock:
            banks = self._banks.values()
            self._banks.clear_all()
        held = sum(b.nbytes() for b in banks)
        for bank in banks:
            bank.reset(reason)
        return held

    def clear(self) -> None:
        self._banks.clear_all()

    def names(self) -> list[str]:
        return self._banks.names()

    def __len__(self) -> int:
        return len(self._banks)


BANKS = BankRegistry(register=True)


@dataclass(frozen=True)
class BankHandle:
    """A light reference to a registered bank (name and settings); safe to copy and to share.

    Reading ``bank`` never changes the bank (two handles of one name with other settings do not
    reset each other on access); ``open()``, called where a run starts, applies this handle's
    settings (clearing the bank, with the reason, if they differ).
    """

    name: str
    config: BankConfig

    @property
    def bank(self) -> FeatureBank:
        return BANKS.lookup(self.name, self.config)

    def open(self) -> FeatureBank:
        """The bank, with this handle's settings applied (for the node that starts a run)."""
        return BANKS.get(self.name, self.config)
