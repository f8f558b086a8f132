"""Named banks: the registry that keeps them beyond one prompt, the handles patches hold, the name rule.

A bank is reached in one of two ways: ``BankHandle.open()`` where a run starts (the bank made on
first use, the handle's settings applied, clearing it with the reason if they differ), and
``BANKS.find(name)`` where one only looks (status routes, a patch following model offloading:
nothing is made or changed).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..registry import Registry
from .feature_bank import BankConfig, FeatureBank

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

    def open(self, name: str, config: BankConfig) -> FeatureBank:
        """The bank called ``name``, made on first use; other settings than ``config`` reset it (with the reason)."""
        with self._banks.lock:
            bank = self._banks.get_or_create(name, lambda: FeatureBank(config, name=name))
            if config != bank.config:
                bank.reset(bank.config.describe_change(config), config)
            return bank

    def find(self, name: str) -> FeatureBank | None:
        """The bank called ``name`` if it exists (never makes or changes one)."""
        return self._banks.find(name)

    def remove(self, name: str) -> bool:
        """Forget the bank ``name`` (its memory is released once no running stream holds it)."""
        return self._banks.remove(name)

    def free(self, reason: str) -> int:
        """Clear every bank (logging ``reason``) and forget those no stream runs on (their tensors dropped; a
        running stream's bank is cleared in place); returns the bytes they held."""
        with self._banks.lock:
            banks = self._banks.values()
            self._banks.clear_all()
        held = sum(bank.nbytes() for bank in banks)
        for bank in banks:
            bank.reset(reason)
        return held

    def names(self) -> list[str]:
        return self._banks.names()

    def __len__(self) -> int:
        return len(self._banks)


BANKS = BankRegistry(register=True)


@dataclass(frozen=True)
class BankHandle:
    """A light reference to a registered bank (name and settings); safe to copy and to share."""

    name: str
    config: BankConfig

    def open(self) -> FeatureBank:
        """The bank, with this handle's settings applied (clearing it, with the reason, if they differ)."""
        return BANKS.open(self.name, self.config)
