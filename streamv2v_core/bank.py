"""The feature bank: past frames' self-attention features, one entry per key.

A key is ``(layer, step, cond_flag)``: ``layer`` names one self-attention,
``step`` the denoising step, ``cond_flag`` 0 for the positive and 1 for the negative
prompt. Each entry holds named tensors ``[b, m, C]`` (``"n"``: the self-attention
input used by EA, ``"o"``: its output used by FF), where ``b`` is the number of
images sampled side by side and ``m`` a whole number of frames' worth of tokens.

Frames are counted by whoever drives the model (a sampling run, or the stream
sampler). A frame with ``index % interval == 0`` updates the bank; every key is
written at most once per frame, as soon as that frame's features for that key are
known. Writes and reads of one key happen in frame order, so a stream batch (many
frames in one UNet call, each at its own step) sees the same bank as sequential
sampling does.
"""
from __future__ import annotations

import logging
import threading
import zlib
from dataclasses import dataclass

import torch

from .merging import Matching, apply_matching, random_bipartite_matching

log = logging.getLogger("streamv2v")

MODES = ("dyme", "queue")


@dataclass(frozen=True)
class BankConfig:
    """How a bank keeps its past.

    mode: ``"dyme"`` (dynamic merging: at most ``size`` frames' worth of tokens, new
        frames merged in) or ``"queue"`` (FIFO of the last ``size`` frames).
    size: frames' worth of tokens kept per key (the paper's bank size).
    interval: update the bank every ``interval`` frames (frames 0, interval, 2*interval, ...).
    seed: seed of the bank's private RNG for DyMe's random split.
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


class FeatureBank:
    """Features of past frames for every (layer, step, cond/uncond) key. See module doc."""

    def __init__(self, config: BankConfig | None = None, name: str = "bank"):
        self.name = name
        self.config = config or BankConfig()
        self._entries: dict[tuple, dict[str, torch.Tensor]] = {}
        self._written: dict[tuple, int] = {}  # (key, tensor name) -> last frame written
        self._matchings: dict[tuple, tuple[int, Matching]] = {}  # key -> (frame, matching)
        self._signature: dict | None = None
        self.frames_seen = 0
        self.last_reset_reason = "created"
        self.lock = threading.RLock()

    # -- frames -------------------------------------------------------------------------
    def updates_on(self, frame: int) -> bool:
        """Whether frame ``frame`` (0-based) writes its features into the bank."""
        return frame % self.config.interval == 0

    def end_frame(self, count: int = 1) -> None:
        """Mark ``count`` frames as done (drivers that number frames by ``frames_seen``)."""
        self.frames_seen += count

    def check_signature(self, signature: dict) -> bool:
        """Reset when what the bank's features came from changed.

        signature: named parts (e.g. ``{"latent size": (4, 64, 64), "model": ...}``);
        any part that differs from the last call's clears the bank, with a log line
        naming it. Returns True when the bank was cleared.
        """
        with self.lock:
            old, self._signature = self._signature, dict(signature)
            if old is None or not self._entries:
                return False
            changed = [k for k in signature if k in old and old[k] != signature[k]]
            if not changed:
                return False
            reason = ", ".join(f"{k} changed from {_short(old[k])} to {_short(signature[k])}" for k in changed)
            self.reset(reason)
            return True

    # -- entries ------------------------------------------------------------------------
    def read(self, key: tuple, name: str) -> torch.Tensor | None:
        """The banked tensor ``[b, m, C]`` for ``key`` and tensor ``name``, or None."""
        entry = self._entries.get(key)
        return None if entry is None else entry.get(name)

    def write(self, key: tuple, name: str, tokens: torch.Tensor, frame: int) -> None:
        """Store frame ``frame``'s ``tokens`` ``[b, T, C]`` under ``key``/``name`` by the bank's policy.

        Does nothing when the frame is not an update frame or this key/name was
        already written by this frame (e.g. a second model call at the same step).
        An entry whose rows or channels do not fit ``tokens`` is replaced.
        """
        if not self.updates_on(frame):
            return
        with self.lock:
            if self._written.get((key, name), -1) >= frame:
                return
            self._written[(key, name)] = frame
            tokens = tokens.detach()
            entry = self._entries.setdefault(key, {})
            old = entry.get(name)
            if old is None or old.shape[0] != tokens.shape[0] or old.shape[2] != tokens.shape[2]:
                entry[name] = tokens.clone()
                return
            entry[name] = self._update(key, old, tokens.to(old), frame)

    def _update(self, key: tuple, old: torch.Tensor, new: torch.Tensor, frame: int) -> torch.Tensor:
        frame_tokens = new.shape[1]
        capacity = self.config.size * frame_tokens
        joined = torch.cat([old, new], dim=1)
        if joined.shape[1] <= capacity:
            return joined
        if self.config.mode == "queue":
            return joined[:, -capacity:].clone()
        # DyMe: merge the surplus (one frame) into the rest; one matching per key and frame.
        cached = self._matchings.get(key)
        if cached is None or cached[0] != frame or cached[1].num_tokens != joined.shape[1]:
            cached = (frame, random_bipartite_matching(joined, joined.shape[1] - capacity, self._generator(key, frame)))
            self._matchings[key] = cached
        return apply_matching(joined, cached[1])

    def _generator(self, key: tuple, frame: int) -> torch.Generator:
        # Seeded per (key, frame) so results do not depend on the order keys are updated in.
        g = torch.Generator()
        g.manual_seed(zlib.crc32(repr((self.config.seed, key, frame)).encode()))
        return g

    # -- housekeeping -------------------------------------------------------------------
    def reset(self, reason: str = "reset requested") -> None:
        """Forget every stored feature and the frame count."""
        with self.lock:
            had = bool(self._entries)
            self._entries.clear()
            self._written.clear()
            self._matchings.clear()
            self.frames_seen = 0
            self.last_reset_reason = reason
        if had:
            log.info("StreamV2V bank '%s' cleared: %s", self.name, reason)

    def nbytes(self) -> int:
        """Bytes held by the stored tensors."""
        return sum(t.numel() * t.element_size() for e in self._entries.values() for t in e.values())

    def num_entries(self) -> int:
        return len(self._entries)

    def to(self, device: torch.device | str) -> "FeatureBank":
        """Move stored tensors to ``device`` (follows ComfyUI's model offloading)."""
        with self.lock:
            for entry in self._entries.values():
                for k, t in entry.items():
                    entry[k] = t.to(device)
        return self

    def status(self) -> dict:
        """A summary for logs and the UI."""
        return {
            "name": self.name,
            "mode": self.config.mode,
            "size": self.config.size,
            "interval": self.config.interval,
            "frames_seen": self.frames_seen,
            "entries": self.num_entries(),
            "bytes": self.nbytes(),
            "last_reset": self.last_reset_reason,
        }


def _short(value) -> str:
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."


class BankRegistry:
    """Named banks that outlive one prompt execution. ``clear()`` forgets them all."""

    def __init__(self):
        self._banks: dict[str, FeatureBank] = {}
        self._lock = threading.Lock()

    def get(self, name: str, config: BankConfig | None = None) -> FeatureBank:
        """The bank called ``name``, created on first use; a new ``config`` resets it."""
        with self._lock:
            bank = self._banks.get(name)
            if bank is None:
                bank = self._banks[name] = FeatureBank(config or BankConfig(), name=name)
            elif config is not None and config != bank.config:
                old = bank.config
                bank.config = config
                bank.reset(f"settings changed from {old} to {config}")
            return bank

    def remove(self, name: str) -> None:
        with self._lock:
            self._banks.pop(name, None)

    def clear(self) -> None:
        with self._lock:
            self._banks.clear()

    def names(self) -> list[str]:
        return sorted(self._banks)


BANKS = BankRegistry()


@dataclass(frozen=True)
class BankHandle:
    """A light reference to a registered bank; safe to deep-copy with ComfyUI's model options."""

    name: str
    config: BankConfig

    @property
    def bank(self) -> FeatureBank:
        return BANKS.get(self.name, self.config)
