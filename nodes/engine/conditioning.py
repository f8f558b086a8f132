"""Per-frame conditioning through ComfyUI's sampler: every row of a call gets its own frame's conditioning.

ComfyUI repeats or cuts a conditioning to a call's batch (``repeat_to_batch_size``,
``broadcast_image_to``): a stream-batch call whose rows are frames i, i-1, ... would get
rows 0, 1, ... of a per-frame prompt or hint batch. Here the engine hands every call
exactly one row per batch row, in row order:

* The guider processes the run's conditioning once (areas, model conds, ControlNet
  ``pre_run``); that is the *template*. Each frame entering the stream records its rows of
  every conditioning tensor and hint (``FrameRows``): row i of a per-frame batch, the shared
  row otherwise, or the rows of its own ``FrameConditioning`` (live prompt, schedule, hint).
* For each call the template's entries are copied with those rows stacked in row order
  (nothing is copied when every row shares one row: an unchanging prompt costs nothing).
* ControlNets run as this run's own copies (the user's objects are never changed), with
  the hint rows of the call, the frame's strength, and ComfyUI's per-call timestep check
  replaced by row groups decided on the host from each row's step (no device read).
"""
from __future__ import annotations

import collections
from typing import Callable, Hashable

import torch

import comfy.sampler_helpers
import comfy.samplers

from ...streamv2v_core.stream.conditioning import (FrameConditioning, FrameRows, RowRef, split_where_changed,
                                                 stacked)

SIDES = ("positive", "negative")
# Set by a ControlNet's pre_run on the run's originals; a copy made afterwards needs them too.
_RUNTIME_ATTRS = ("control_model", "control_model_wrapped", "model_sampling_current", "t2i_model")
_COPIES_KEPT = 8  # distinct (active controls, strength) combinations kept per run


def _chain(control) -> list:
    """A ControlNet and every one it was applied on top of, head first."""
    out = []
    while control is not None:
        out.append(control)
        control = control.previous_controlnet
    return out


def _batch_tensor(model_cond) -> torch.Tensor | None:
    cond = getattr(model_cond, "cond", None)
    return cond if isinstance(cond, torch.Tensor) and cond.ndim > 0 else None


def check_frame_rows(positive, negative, frame_count: int | None, who: str) -> None:
    """Refuse conditioning whose row counts are neither 1 nor one per frame, before any work.

    ``frame_count`` None: the frames are not known ahead (the loop), so only 1 row fits.
    """
    allowed = {1} if frame_count is None else {1, frame_count}
    for side, conditioning in zip(SIDES, (positive, negative)):
        for j, (tensor, extras) in enumerate(conditioning or []):
            parts = [("text embedding", tensor), ("pooled output", extras.get("pooled_output"))]
            parts += [(f"ControlNet hint ({type(c).__name__})", c.cond_hint_original)
                      for c in _chain(extras.get("control"))]
            for what, value in parts:
                rows = value.shape[0] if isinstance(value, torch.Tensor) and value.ndim else 1
                if rows not in allowed:
                    raise ValueError(_rows_message(who, side, j, what, rows, frame_count))


def _rows_message(who, side, j, what, rows, frame_count) -> str:
    if frame_count is None:
        return (f"{who}: the {side} conditioning's {what} (entry {j}) has {rows} rows, but this node cannot know "
                f"how many frames will come: give it one row (one prompt, one hint image) and use the loop's "
                f"control_hint / prompt_schedule inputs for per-frame hints and prompts")
    return (f"{who}: the {side} conditioning's {what} (entry {j}) has {rows} rows for {frame_count} frames: give "
            f"one row (used for every frame) or exactly one per frame ({frame_count}). Fix the node that makes it "
            f"(e.g. the image batch given to 'Apply ControlNet', or a batch prompt schedule's frame count)")


class RunConditioning:
    """The run's template conditioning and how each call's rows get their frames' conditioning.

    guider: the run's ComfyUI guider, after it processed its conditioning (``guider.conds``).
    frame_count: number of input frames when known (rows of that count are per frame).
    provider: optional ``(Frame) -> FrameConditioning | None`` per input frame (kept as ``frame.conditioning``).
    like: a latent ``[1, C, h, w]`` (shape, device) for processing a frame's own conditioning.
    sigma_values: host floats per step (a ControlNet's start/end percent is decided from them).
    schedules: ``(strength, seed) -> FrameSchedule | None`` for a frame's own live strength or seed.
    """

    def __init__(self, guider, frame_count: int | None, provider: Callable | None, like: torch.Tensor,
                 sigma_values: list[float], base_model, schedules: Callable | None = None):
        self.guider, self.template, self.schedules = guider, guider.conds, schedules
        self.frame_count, self.provider, self.like = frame_count, provider, like
        self.sigma_values, self.base_model = sigma_values, base_model
        self.controls = self._controls()
        self.keys = {key: tensor for key, tensor in self._template_tensors()}
        self._processed: collections.OrderedDict = collections.OrderedDict()  # id(list) -> (list, conds)
        self._copies: collections.OrderedDict = collections.OrderedDict()  # group key -> {id: copy}

    # -- the template ------------------------------------------------------------------
    def _controls(self) -> list:
        found = {}
        for entries in self.template.values():
            for entry in entries:
                for control in _chain(entry.get("control")):
                    found.setdefault(id(control), control)
        return list(found.values())

    def _template_tensors(self):
        for side in SIDES:
            for j, entry in enumerate(self.template.get(side) or []):
                for name, model_cond in entry.get("model_conds", {}).items():
                    tensor = _batch_tensor(model_cond)
                    if tensor is not None:
                        yield (side, j, name), tensor

    # -- a frame entering the stream -----------------------------------------------------
    def rows_for(self, frame) -> FrameRows:
        """Input ``frame``'s (a ``stream.frame.Frame``) rows of every conditioning tensor and hint (views; hints
        moved to the device)."""
        index, rows = frame.index, FrameRows()
        per_frame = self.frame_count if self.frame_count and self.frame_count > 1 else None
        for key, tensor in self.keys.items():
            rows.refs[key] = RowRef(tensor, index if tensor.shape[0] == per_frame else 0)
        for k, control in enumerate(self.controls):
            hint = control.cond_hint_original
            if isinstance(hint, torch.Tensor) and hint.shape[0] == per_frame:
                rows.hints[k] = RowRef(hint[index:index + 1].to(self.like.device, non_blocking=True), 0)
            elif hint is not None:
                rows.hints[k] = RowRef(hint, 0)
        own = self.provider(frame) if self.provider is not None else None
        frame.conditioning = own
        if own is not None:
            self._apply_own(rows, own)
        return rows

    def _apply_own(self, rows: FrameRows, own: FrameConditioning) -> None:
        for side, conditioning in zip(SIDES, (own.positive, own.negative)):
            if conditioning is None:
                continue
            entries = self._process(conditioning, side)
            if len(entries) != len(self.template.get(side) or []):
                raise ValueError(f"a frame's {side} conditioning has {len(entries)} entries, the run's has "
                                 f"{len(self.template.get(side) or [])}: per-frame prompts must keep the structure")
            for j, entry in enumerate(entries):
                for name, model_cond in entry.get("model_conds", {}).items():
                    tensor = _batch_tensor(model_cond)
                    if tensor is not None and (side, j, name) in self.keys:
                        rows.refs[(side, j, name)] = RowRef(tensor, 0)
        if own.hint is not None:
            hint = RowRef(own.hint[:1].movedim(-1, 1).to(self.like.device, non_blocking=True), 0)
            rows.hints = {k: hint for k in range(len(self.controls))}
        rows.control_scale, rows.fusion_alpha = float(own.control_scale), own.fusion_alpha
        rows.cfg, rows.residual_delta = own.cfg, own.residual_delta
        if self.schedules is not None and (own.strength is not None or own.seed is not None):
            rows.schedule = self.schedules(own.strength, own.seed)

    def _process(self, conditioning: list, side: str) -> list[dict]:
        """A frame's own conditioning as ComfyUI's model conds (once per list object: a prompt change costs one)."""
        hit = self._processed.get(id(conditioning))
        if hit is not None and hit[0] is conditioning:
            return hit[1]
        conds = comfy.sampler_helpers.convert_cond(conditioning)
        conds = comfy.samplers.encode_model_conds(self.base_model.extra_conds, conds, self.like, self.like.device,
                                                  side)
        self._processed[id(conditioning)] = (conditioning, conds)
        while len(self._processed) > 4:
            self._processed.popitem(last=False)
        return conds

    # -- a call ---------------------------------------------------------------------------
    def group_keys(self, rows: list[FrameRows], steps: list[int]) -> list[Hashable]:
        """Per row what must be equal within one call: active ControlNets and cond ranges, strength, alpha, guidance,
        and the shape of each conditioning row (frames whose prompts have other token counts, e.g. 77 and 154
        after a live change, are called apart, as ComfyUI runs conds it cannot concatenate; host shapes only)."""
        return [(self._active(self._sigma(row, step)), row.control_scale, row.fusion_alpha, row.cfg, row.residual_delta,
                 self._shapes(row)) for row, step in zip(rows, steps)]

    def _shapes(self, row: FrameRows) -> tuple:
        return tuple(tuple((row.refs.get(key) or RowRef(tensor, 0)).tensor.shape[1:])
                     for key, tensor in self.keys.items())

    def groups(self, rows: list[FrameRows], steps: list[int]) -> list[tuple[int, int]]:
        return split_where_changed(self.group_keys(rows, steps))

    def _sigma(self, row: FrameRows, step: int) -> float:
        """The row's sigma at ``step``: from its frame's own schedule (a live strength change) or the run's."""
        return (row.schedule.sigma_values if row.schedule is not None else self.sigma_values)[step]

    def _active(self, sigma: float) -> tuple:
        controls = tuple(c.timestep_range is None or not (sigma > c.timestep_range[0] or sigma < c.timestep_range[1])
                         for c in self.controls)
        entries = tuple(not (sigma > e.get("timestep_start", float("inf")) or sigma < e.get("timestep_end", -1.0))
                        for side in SIDES for e in self.template.get(side) or [])
        return controls, entries

    def conds_for(self, rows: list[FrameRows], steps: list[int]) -> dict:
        """The processed conds for a call whose rows (one row group) are ``rows``, in row order."""
        stacked_rows = {}
        for key, tensor in self.keys.items():
            value, shared = stacked([row.refs.get(key) or RowRef(tensor, 0) for row in rows])
            if not (shared and value is tensor):
                stacked_rows[key] = value
        copies = self._control_copies(self._active(self._sigma(rows[0], steps[0]))[0], rows[0].control_scale)
        for k, control in enumerate(self.controls):
            copy = copies.get(id(control))
            if copy is not None and k in rows[0].hints:
                self._set_hint(copy, [row.hints.get(k) or rows[0].hints[k] for row in rows])
        return {side: [self._entry(side, j, entry, stacked_rows, copies)
                       for j, entry in enumerate(entries)] for side, entries in self.template.items()}

    @staticmethod
    def _set_hint(copy, refs: list[RowRef]) -> None:
        hint, _ = stacked(refs)
        if hint is not copy.cond_hint_original:  # a new hint: ComfyUI rescales it on the next call
            copy.cond_hint_original, copy.cond_hint = hint, None

    @staticmethod
    def _entry(side, j, entry: dict, stacked_rows: dict, copies: dict) -> dict:
        changes = {name: model_cond._copy_with(stacked_rows[(side, j, name)])
                   for name, model_cond in entry.get("model_conds", {}).items() if (side, j, name) in stacked_rows}
        control = entry.get("control")
        if not changes and control is None:
            return entry
        out = dict(entry)
        if changes:
            out["model_conds"] = {**entry["model_conds"], **changes}
        if control is not None:
            head = copies.get(id(control))
            if head is None:
                out.pop("control")
            else:
                out["control"] = head
        return out

    def _control_copies(self, active: tuple, scale: float) -> dict:
        """This run's copies of the ControlNets active for a row group (chains relinked past inactive ones)."""
        key = (active, scale)
        if key in self._copies:
            self._copies.move_to_end(key)
            return self._copies[key]
        on = {id(c) for c, is_on in zip(self.controls, active) if is_on}
        memo: dict[int, object] = {}
        for control in self.controls:
            self._copy_chain(control, on, scale, memo)
        self._copies[key] = memo
        while len(self._copies) > _COPIES_KEPT:
            self._release(self._copies.popitem(last=False)[1])
        return memo

    def _copy_chain(self, control, on: set, scale: float, memo: dict):
        if control is None:
            return None
        if id(control) in memo:
            return memo[id(control)]
        below = self._copy_chain(control.previous_controlnet, on, scale, memo)
        if id(control) not in on:
            memo[id(control)] = below
            return below
        copy = control.copy()
        for attr in _RUNTIME_ATTRS:
            if getattr(copy, attr, None) is None and getattr(control, attr, None) is not None:
                setattr(copy, attr, getattr(control, attr))
        copy.timestep_range = None  # decided per row group on the host: no device read per call
        copy.strength = control.strength * scale
        copy.previous_controlnet = below
        memo[id(control)] = copy
        return copy

    @staticmethod
    def _release(copies: dict) -> None:
        for copy in {id(c): c for c in copies.values() if c is not None}.values():
            copy.cond_hint = None

    def close(self) -> None:
        """Drop this run's ControlNet copies and their scaled hints."""
        for copies in self._copies.values():
            self._release(copies)
        self._copies.clear()
        self._processed.clear()
