"""StreamV2V's one entry in ComfyUI's ``transformer_options``: what a run and each model call know.

Everything the pack passes through ComfyUI's model options lives in one frozen ``ModelState``
under ``STATE_KEY`` (as AnimateDiff-Evolved keeps one state object under one key). Each level
adds its part to a copy, never to the object it was given:

* the stream engine's model clone: ``engine`` (the engine numbers frames itself);
* a run (``FrameCounter`` for a plain sampler, the engine for a stream): ``banks``, the bank
  objects resolved once per run, and for a plain sampler ``frames``, its frame's staged writes;
* a model call: ``plan`` (the engine's rows), then ``calls`` (each bank's ``BankCall``) and
  ``masks`` (the extended self-attentions' masks), made by the bank's per-call wrapper.

Made of plain values only at the model level (``engine``), so ComfyUI 0.3.x's deep copy on
``clone()`` and 0.38.x's sharing between clones are both safe; the rest is added per run or call
to a dict that is never cloned.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .calls import BankCall, FrameWrites, PendingMask, RowPlan
    from .feature_bank import FeatureBank

STATE_KEY = "streamv2v"


@dataclass(frozen=True)
class ModelState:
    """See module doc. banks, frames, calls: ``{bank name: ...}``."""

    engine: bool = False
    banks: dict[str, "FeatureBank"] = field(default_factory=dict)
    frames: dict[str, "FrameWrites"] = field(default_factory=dict)
    plan: "RowPlan | None" = None
    calls: dict[str, "BankCall"] = field(default_factory=dict)
    masks: "PendingMask | None" = None

    def replace(self, **changes) -> "ModelState":
        return dataclasses.replace(self, **changes)


NO_STATE = ModelState()


def model_state(options: dict | None) -> ModelState:
    """The state in ``options`` (a ``transformer_options`` dict, or a patch's ``extra_options``)."""
    return (options or {}).get(STATE_KEY) or NO_STATE


def with_state(options: dict | None, **changes) -> dict:
    """A copy of ``options`` whose state has ``changes`` (``options`` itself is left as it is)."""
    return {**(options or {}), STATE_KEY: model_state(options).replace(**changes)}
