"""One bounded, named, thread-safe registry for everything the pack keeps beyond a prompt.

Banks, browser sessions, frame cursors and stream states outlive one prompt, and their
names come from prompts and web routes, i.e. from anyone who reaches the server. So every
such store is a ``Registry``: at most ``limit`` entries, and when it is full either the least
recently used entry that is not busy is dropped (``"lru"``: sessions, cursors, banks) or
the new name is refused with an error that says what to do (``"refuse"``). Dropped and
removed values are handed to ``close`` (close a file, stop a session, release a bank).

Every registry made with ``register=True`` (the default) is also known to
``clear_all_registries()``, which ComfyUI's ``POST /free`` (Free memory) calls.
"""
from __future__ import annotations

import collections
import logging
import threading
import weakref
from typing import Callable, Generic, Iterator, TypeVar

log = logging.getLogger("streamv2v")

Value = TypeVar("Value")
POLICIES = ("lru", "refuse")
_ALL: "weakref.WeakSet[Registry]" = weakref.WeakSet()


class RegistryFull(RuntimeError):
    """A ``"refuse"`` registry is full (or every entry of an ``"lru"`` one is busy)."""


class Registry(Generic[Value]):
    """Named values, at most ``limit``; see the module docstring.

    kind: what the values are, for messages ("feature bank"). close(value): called for every
    value that is dropped, replaced or removed. busy(value): True for values that must not be
    dropped to make room (e.g. a session a loop is running). hint: the sentence a ``RegistryFull``
    error ends with (how to make room). quiet: a dropped entry is logged at debug level only (caches of small
    values that turn over in normal use).
    """

    def __init__(self, kind: str, limit: int, policy: str = "lru", close: Callable[[Value], None] | None = None,
                 busy: Callable[[Value], bool] | None = None, hint: str = "", register: bool = True,
                 quiet: bool = False):
        if policy not in POLICIES:
            raise ValueError(f"registry policy must be one of {POLICIES}, got {policy!r}")
        if int(limit) < 1:
            raise ValueError(f"a registry holds at least 1 entry, got limit {limit}")
        self.kind, self.limit, self.policy, self.hint = kind, int(limit), policy, hint
        self._close, self._busy, self._quiet = close, busy, quiet
        self._items: collections.OrderedDict[str, Value] = collections.OrderedDict()
        self.lock = threading.RLock()  # re-entrant: callers may hold it around get-then-put
        if register:
            _ALL.add(self)

    # -- reading ---------------------------------------------------------------------------
    def get(self, name: str) -> Value | None:
        """The value ``name`` (marked as just used), or None."""
        with self.lock:
            value = self._items.get(name)
            if value is not None:
                self._items.move_to_end(name)
            return value

    def find(self, name: str) -> Value | None:
        """The value ``name``, or None, without marking it used (for status routes)."""
        with self.lock:
            return self._items.get(name)

    def names(self) -> list[str]:
        with self.lock:
            return sorted(self._items)

    def values(self) -> list[Value]:
        with self.lock:
            return list(self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    # -- writing ---------------------------------------------------------------------------
    def get_or_create(self, name: str, make: Callable[[], Value]) -> Value:
        """The value ``name``, made with ``make()`` and stored (making room) if there is none."""
        with self.lock:
            value = self.get(name)
            if value is None:
                value = make()
                self.put(name, value)
            return value

    def put(self, name: str, value: Value) -> None:
        """Store ``value`` under ``name`` (a previous value there is closed); makes room or refuses."""
        with self.lock:
            if name in self._items:
                old = self._items.pop(name)
                if old is not value:
                    self._closing(old)
            else:
                self._make_room()
            self._items[name] = value

    def remove(self, name: str) -> bool:
        """Drop and close ``name``; whether it was there."""
        with self.lock:
            value = self._items.pop(name, None)
        if value is None:
            return False
        self._closing(value)
        return True

    def clear_all(self) -> int:
        """Drop and close every entry that is not busy (a running webcam loop keeps its session);
        returns how many were dropped."""
        with self.lock:
            # By name, never by value: values may define == (dataclasses holding tensors do).
            names = [n for n, v in self._items.items() if not (self._busy and self._busy(v))]
            values = [self._items.pop(n) for n in names]
        for value in values:
            self._closing(value)
        return len(values)

    def _make_room(self) -> None:
        """Called with the lock held, before adding one entry."""
        if len(self._items) < self.limit:
            return
        if self.policy == "lru":
            idle = [n for n, v in self._items.items() if not (self._busy and self._busy(v))]  # oldest first
            for name in idle[:len(self._items) - self.limit + 1]:
                log.log(logging.DEBUG if self._quiet else logging.INFO,
                        "StreamV2V: %s %r dropped (least recently used; at most %d are kept)", self.kind, name, self.limit)
                self._closing(self._items.pop(name))
            if len(self._items) < self.limit:
                return
        raise RegistryFull(f"too many {self.kind}s: at most {self.limit} are kept and all are in use. "
                           f"{self.hint or 'Reuse a name, or free them with ComfyUI Free memory.'}")

    def _closing(self, value: Value) -> None:
        if self._close is None:
            return
        try:
            self._close(value)
        except Exception:  # one value failing to close must not keep the others
            log.exception("StreamV2V: closing a %s failed", self.kind)


def clear_all_registries() -> dict[str, int]:
    """Empty every registered registry (ComfyUI's Free memory); ``{kind: entries dropped}``."""
    dropped: dict[str, int] = {}
    for registry in list(_ALL):
        dropped[registry.kind] = dropped.get(registry.kind, 0) + registry.clear_all()
    return dropped
