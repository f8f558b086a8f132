"""Streams: what a run carries over to the next run of the same bank (or node), and when it starts afresh.

A stream's state (frame numbers, noise sequence, similarity filter, frames in flight, the
schedule read from the model) lives in a bounded registry, keyed by its bank's name or,
without a bank, by the node that runs it. A bank remembers nothing of the engine: a bank
that is cleared counts a new *generation*, and a state made for an older generation is not
used again.
"""
from __future__ import annotations

import collections
import logging
import threading
import weakref
from dataclasses import dataclass, field

import torch

from ...streamv2v_core.bank.storage import FeatureBank, describe_changes
from ...streamv2v_core.stream.conditioning import FrameRows
from ...streamv2v_core.stream.pipeline import InFlight
from ...streamv2v_core.stream.similarity import SimilarityFilter
from .settings import FRESH, StreamSettings

log = logging.getLogger("streamv2v")

@dataclass
class StreamState:
    """What a stream carries from one run to the next (dropped when its bank is cleared)."""

    signature: dict
    next_frame: int = 0
    filter: SimilarityFilter | None = None
    in_flight: InFlight | None = None
    in_flight_inputs: collections.deque = field(default_factory=collections.deque)  # host images, oldest first
    last_image: torch.Tensor | None = None
    schedule: Schedule | None = None
    frame_rows: dict[int, FrameRows] = field(default_factory=dict)  # each frame in flight: its own conditioning
    bank_generation: int | None = None  # the bank's generation it belongs to (None: a node's stream)


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


class _Streams:
    """Stream states by key ("bank NAME", or the running node without a bank); the least recently used go first."""

    LIMIT = 64

    def __init__(self):
        self._states: collections.OrderedDict[str, StreamState] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> StreamState | None:
        with self._lock:
            state = self._states.get(key)
            if state is not None:
                self._states.move_to_end(key)
            return state

    def put(self, key: str, state: StreamState) -> None:
        with self._lock:
            self._states[key] = state
            self._states.move_to_end(key)
            while len(self._states) > self.LIMIT:
                self._states.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._states.clear()


STREAMS = _Streams()


def banks_of(model) -> list[FeatureBank]:
    """The feature banks the model's StreamV2V patches use, by name."""
    found = {}
    for patch_list in model.model_options.get("transformer_options", {}).get("patches", {}).values():
        for patch in patch_list:
            handle = getattr(patch, "handle", None)
            if handle is not None and hasattr(handle, "bank"):
                found[handle.name] = handle.bank
    return [found[name] for name in sorted(found)]


def open_stream(banks: list[FeatureBank], key: str | None, settings: StreamSettings, signature: dict,
                who: str) -> StreamState:
    """The state this run starts from: a new stream (fresh, or settings changed) or the previous one."""
    fresh = settings.bank_start == FRESH
    for bank in banks:
        changed = bank.check_signature(signature)  # clears the bank, with the reason, if settings changed
        if fresh and not changed:
            bank.reset(f"new stream ({who} with bank_start '{FRESH}')")
    if banks:
        key, generation = f"bank {banks[0].name}", banks[0].generation
        state = STREAMS.get(key)
        if state is None or state.bank_generation != generation:  # the bank was cleared: its stream ended
            state = StreamState(signature, next_frame=max(b.frames_seen for b in banks), bank_generation=generation)
            STREAMS.put(key, state)
        return state
    state = STREAMS.get(key) if key is not None else None
    if state is not None and not fresh:
        reason = describe_changes(state.signature, signature)
        if not reason:
            return state
        log.info("StreamV2V stream of %s restarts: %s", who, reason)
    state = StreamState(signature)
    if key is not None:
        STREAMS.put(key, state)
    return state
