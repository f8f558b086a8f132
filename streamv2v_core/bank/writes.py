"""The bank's write policy: which frames write which keys, and how a write lands.

A frame with ``index % interval == 0`` updates the bank; every key is written at most once per
frame (``plans_write``), after the model call that produced it. A key fills frame by frame
(*append*); once it holds ``size`` frames a queue overwrites its oldest (*ring*) and DyMe merges
the new frame into the stored ones (*merge*: the same random split and matching for every tensor
name of a layer, so EA's inputs and FF's outputs stay aligned). How many frames a key holds is
bookkept here, on the host, so nothing in the hot path reads a tensor value.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from ..seeds import generator
from .merging import Matching, apply_matching, random_bipartite_matching
from .runs import arithmetic_runs
from .storage import TokenStore, _Group


@dataclass(frozen=True)
class KeyWrite:
    """One bank row written by a model call: key ``(flag, step)``, image ``slot``, ``frame`` index."""

    flag: int
    step: int
    slot: int
    frame: int


class WritePolicy:
    """Counts per key and the landing of staged rows into a ``TokenStore`` (see module doc).

    mode: ``"dyme"`` or ``"queue"``; size: frames per key; interval: frames between updates;
    seed: DyMe's random split (private generators).
    """

    def __init__(self, mode: str, size: int, interval: int, seed: int):
        self.mode, self.size, self.interval, self.seed = mode, int(size), int(interval), int(seed)
        self._counts: dict[tuple, int] = {}  # (name, flag, step) -> frames held
        self._writes: dict[tuple, int] = {}  # (name, flag, step) -> frames ever written (queue ring position)
        self._written: dict[tuple, int] = {}  # (name, flag, step) -> last frame written

    def updates_on(self, frame: int) -> bool:
        """Whether frame ``frame`` (0-based) writes its features into the bank."""
        return frame % self.interval == 0

    def count(self, name: str, flag: int, step: int) -> int:
        return self._counts.get((name, flag, step), 0)

    def plans_write(self, name: str, flag: int, step: int, frame: int) -> bool:
        """Whether frame ``frame`` (a real frame: 0 or more) still has to write key ``(flag, step)`` of ``name``."""
        return frame >= 0 and self.updates_on(frame) and self._written.get((name, flag, step), -1) < frame

    def entries(self) -> int:
        return len(self._counts)

    def clear(self) -> None:
        self._counts.clear()
        self._writes.clear()
        self._written.clear()

    # -- landing --------------------------------------------------------------------------
    def land(self, store: TokenStore, name: str, staged: dict, rows: list[slice], writes: list[KeyWrite],
             geometry: tuple, matchings: dict) -> dict:
        """Store rows ``rows`` of each staged layer's tokens ``[R, T, C]`` under the keys ``writes``.

        Returns this call's DyMe matchings ``{(shape, first, count, stride): (layers, Matching)}``;
        ``matchings``: those another tensor name computed in this call (reused: "n" and "o" merge alike).
        """
        computed: dict = {}
        by_shape: dict[tuple[int, int], list] = {}
        for layer, tokens in staged.items():
            by_shape.setdefault((tokens.shape[1], tokens.shape[2]), []).append(layer)
        for shape, layers in by_shape.items():
            group = store.ensure(name, shape, layers, staged[layers[0]], geometry)
            new = torch.cat([staged[layer][s] for layer in layers for s in rows])  # [L * rows written, T, C]
            new = new.view(len(layers), len(writes), shape[0], shape[1])
            self._store(store, name, group, layers, new, writes, shape, matchings, computed)
        for key, frame in {(name, w.flag, w.step): w.frame for w in writes}.items():  # once per key, not per image
            self._written[key] = frame
            self._writes[key] = self._writes.get(key, 0) + 1
            self._counts[key] = min(self.size, self._counts.get(key, 0) + 1)
        return computed

    def _store(self, store: TokenStore, name, group: _Group, layers, new, writes, shape, reuse: dict,
               computed: dict) -> None:
        """Write ``new`` ``[L, n, T, C]`` of ``layers`` into the keys ``writes``, by the key's action."""
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
                if action == "append":
                    store.fill_slot(name, list(range(first, first + count * stride, stride)), held)
                if every_layer:
                    continue  # target is a view: written in place
                merged = target
            if every_layer:
                target.copy_(merged)
            else:  # target was a gathered copy: put the result back
                flat[torch.tensor(positions, device=flat.device), keys] = merged

    def _action(self, name: str, w: KeyWrite) -> tuple[int, str, int]:
        """(frames held, "append" | "ring" | "merge", ring position) for writing ``w``."""
        key = (name, w.flag, w.step)
        held = self._counts.get(key, 0)
        if held < self.size:
            return held, "append", held
        if self.mode == "queue":
            return held, "ring", self._writes.get(key, 0) % self.size
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
            g = generator(like.device, self.seed, shape, w.flag, w.step, w.slot, w.frame)
            draws.append(torch.rand(layers, tokens, generator=g, device=like.device))
        keys = draws[0].unsqueeze(1) if len(draws) == 1 else torch.stack(draws, dim=1)
        return keys.reshape(layers * len(writes), tokens)


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
