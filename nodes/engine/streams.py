"""Streams: what a run carries over to the next run of the same bank (or node), and when it starts afresh.

A stream's state (frame numbers, noise sequence, similarity filter, frames in flight, the
schedule read from the model) lives in a bounded registry, keyed by its bank's name or,
without a bank, by the node that runs it. A bank remembers nothing of the engine: a bank
that is cleared counts a new *generation*, and a state made for an older generation is not
used again.
"""
from __future__ import annotations

import contextlib
import logging
import weakref
from dataclasses import dataclass, field

import torch

from ...streamv2v_core.bank.feature_bank import FeatureBank, describe_changes
from ...streamv2v_core.bank.registry import BankHandle
from ...streamv2v_core.registry import Registry
from ...streamv2v_core.stream.runner import RunnerState
from .settings import FRESH, StreamSettings

log = logging.getLogger("streamv2v")

@dataclass
class StreamState(RunnerState):
    """A stream's runner state (``stream/runner.py``) plus what decides whether a run may continue it."""

    signature: dict = field(default_factory=dict)
    schedule: Schedule | None = None
    bank_generation: int | None = None  # the generation of the bank it belongs to (None: a node's stream)


@dataclass(frozen=True)
class Schedule:
    """The sigmas of a stream, read from the model once per stream rather than once per run."""

    sampling: weakref.ref  # the model_sampling object they were read from (identity, without keeping it alive)
    steps: int
    strength: float
    sigma_values: list[float]  # S + 1 values, the last 0
    sigmas: torch.Tensor  # the same on the model's device, for ComfyUI's sampler
    full_noise_first: bool  # the first step starts from pure noise

    def made_for(self, sampling, settings: StreamSettings) -> bool:
        return self.sampling() is sampling and (self.steps, self.strength) == (settings.steps, settings.strength)


# Stream states by key ("bank NAME", or the running node without a bank); least recently used go first.
STREAMS: Registry[StreamState] = Registry("stream state", 64, "lru")


def bank_handles(model) -> dict:
    """``{bank name: handle}`` of the model's StreamV2V patches (no bank is opened)."""
    found = {}
    for patch_list in model.model_options.get("transformer_options", {}).get("patches", {}).values():
        for patch in patch_list:
            handle = getattr(patch, "handle", None)
            if isinstance(handle, BankHandle):
                found[handle.name] = handle
    return found


def banks_of(model) -> list[FeatureBank]:
    """The feature banks the model's StreamV2V patches use, by name, each opened with its handle's settings."""
    handles = bank_handles(model)
    return [handles[name].open() for name in sorted(handles)]


@contextlib.contextmanager
def reading(banks: list[FeatureBank]):
    """While a run reads ``banks``: the registry keeps them under their names (``/free`` and the least
    recently used rule clear but never drop them, DELETE is refused), so a name keeps naming the bank the
    running stream reads."""
    for bank in banks:
        bank.users += 1
    try:
        yield
    finally:
        for bank in banks:
            bank.users -= 1


def stream_of(model, node_key: str | None) -> StreamState | None:
    """The stream state a run of ``model`` (by ``node_key`` when it has no bank) continues, if any."""
    names = sorted(bank_handles(model))
    key = f"bank {names[0]}" if names else node_key
    return STREAMS.find(key) if key is not None else None


def bank_status(bank: FeatureBank) -> dict:
    """``bank.status()`` with the frames of the stream running on it counted as they go."""
    state = STREAMS.find(f"bank {bank.name}")
    running = state.next_frame if state is not None and state.bank_generation == bank.generation else 0
    return bank.status(running)


def open_stream(banks: list[FeatureBank], key: str | None, settings: StreamSettings, signature: dict,
                who: str) -> StreamState:
    """The state this run starts from: a new stream (fresh, or settings changed) or the previous one."""
    fresh = settings.bank_start == FRESH
    for bank in banks:
        changed = bank.check_signature(signature)  # clears the bank, with the reason, if settings changed
        if fresh and not changed:
            bank.reset(f"new stream ({who} with bank_start '{FRESH}')", keep_storage=True)
    if banks:
        key, generation = f"bank {banks[0].name}", banks[0].generation
        state = STREAMS.get(key)
        if state is None or state.bank_generation != generation:  # the bank was cleared: its stream ended
            state = StreamState(next_frame=max(b.frames_seen for b in banks), signature=signature,
                                bank_generation=generation)
            STREAMS.put(key, state)
        return state
    state = STREAMS.get(key) if key is not None else None
    if state is not None and not fresh:
        reason = describe_changes(state.signature, signature)
        if not reason:
            return state
        log.info("StreamV2V stream of %s restarts: %s", who, reason)
    state = StreamState(signature=signature)
    if key is not None:
        STREAMS.put(key, state)
    return state
