"""Per-frame conditioning through ComfyUI's sampler: every row of a call gets its own frame's conditioning.

ComfyUI repeats or cuts a conditioning to a call's batch (``repeat_to_batch_size``,
``broadcast_image_to``): a stream-batch call whose rows are frames i, i-1, ... would get
rows 0, 1, ... of a per-frame prompt or hint batch. Here the engine hands every call
exactly one row per batch row, in row order:

* The guider processes the run's conditioning once (areas, model conds, ControlNet
  ``pre_run``); that is the *template*. Its tensors are moved to the model's device once per
  run (ComfyUI would move them from pageable host memory on every call). Each frame entering
  the stream records its rows of every conditioning tensor and hint (``FrameRows``): row i of
  a per-frame batch, the shared row otherwise, or the rows of its own ``FrameConditioning``
  (live prompt, schedule, hint); hints go up through the run's pinned buffers.
* For each call the template's entries are copied with those rows stacked in row order
  (nothing is copied when every row shares one row: an unchanging prompt costs nothing).
  A row may carry its frame's *negative* rows instead (residual one-time negative: the
  negative pass rides in the stream-batch call) when both prompts have one structure.
* ControlNets run as this run's own copies (``controlnets.py``) with the hint rows of the call;
  each row's strength is a factor on their outputs (``RowPlan.control``).
"""
from __future__ import annotations

from typing import Callable

import torch

import comfy.sampler_helpers
import comfy.samplers

from ...streamv2v_core.registry import Registry
from ...streamv2v_core.stream.conditioning import (FrameConditioning, FrameRows, RowRef, split_where_changed,
                                                 stacked)
from ...streamv2v_core.stream.transfer import Upload
from .controlnets import ControlCopies, chain

SIDES = ("positive", "negative")


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
                      for c in chain(extras.get("control"))]
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
    like: a latent ``[1, C, h, w]`` on the model's device (a frame's own conditioning is processed for it).
    sigma_values: host floats per step (a ControlNet's start/end percent is decided from them).
    upload: moves host hints to the device (the run's pinned buffers).
    schedules: ``(strength, seed) -> FrameSchedule | None`` for a frame's own live strength or seed.
    """

    def __init__(self, guider, frame_count: int | None, provider: Callable | None, like: torch.Tensor,
                 sigma_values: list[float], base_model, upload: Upload, schedules: Callable | None = None):
        self.guider, self.template, self.schedules = guider, guider.conds, schedules
        self.frame_count, self.provider, self.like, self.upload = frame_count, provider, like, upload
        self.sigma_values, self.base_model = sigma_values, base_model
        found = {id(c): c for entries in self.template.values() for e in entries for c in chain(e.get("control"))}
        self.controls = list(found.values())
        self.copies = ControlCopies(self.controls)
        self.keys = {key: tensor.to(like.device) for key, tensor in self._template_tensors()}
        # One hint for every frame goes up once; a hint per frame goes up with its frame.
        self.hints = {k: c.cond_hint_original for k, c in enumerate(self.controls)
                      if isinstance(c.cond_hint_original, torch.Tensor)}
        self.hints = {k: hint if hint.shape[0] > 1 else upload(hint) for k, hint in self.hints.items()}
        # A chain whose ControlNets are on at different steps needs a call per set of active ones.
        self.mixed = any(0 < sum(self._active(sigma)[0]) < len(self.controls) for sigma in sigma_values[:-1])
        self.negative_rides = _same_structure(self.template.get("positive") or [], self.template.get("negative") or [])
        self._processed: Registry[tuple] = Registry("processed frame conditioning", 4, "lru", register=False)

    def _template_tensors(self):
        for side in SIDES:
            for j, entry in enumerate(self.template.get(side) or []):
                for name, model_cond in entry.get("model_conds", {}).items():
                    tensor = _batch_tensor(model_cond)
                    if tensor is not None:
                        yield (side, j, name), tensor

    # -- a frame entering the stream -----------------------------------------------------
    def rows_for(self, frame) -> FrameRows:
        """Input ``frame``'s (a ``stream.frame.Frame``) rows of every conditioning tensor and hint (views, on the
        model's device)."""
        index, rows = frame.index, FrameRows()
        per_frame = self.frame_count if self.frame_count and self.frame_count > 1 else None
        for key, tensor in self.keys.items():
            rows.refs[key] = RowRef(tensor, index if tensor.shape[0] == per_frame else 0)
        for k, hint in self.hints.items():
            rows.hints[k] = RowRef(self.upload(hint[index:index + 1]), 0) if hint.shape[0] > 1 else RowRef(hint, 0)
        own = self.provider(frame) if self.provider is not None else None
        frame.conditioning = own
        if own is not None:
            self._apply_own(rows, own)
        return rows

    def template_rows(self) -> FrameRows:
        """The run's own first rows (no frame's): the conditioning of calls whose rows are all padding."""
        rows = FrameRows()
        rows.refs = {key: RowRef(tensor, 0) for key, tensor in self.keys.items()}
        rows.hints = {k: RowRef(hint if hint.shape[0] == 1 else self.upload(hint[:1]), 0) for k, hint in self.hints.items()}
        return rows

    def _apply_own(self, rows: FrameRows, own: FrameConditioning) -> None:
        for side, conditioning in zip(SIDES, (own.positive, own.negative)):
            if conditioning is None:
                continue
            entries, tensors = self._process(conditioning, side)
            if entries != len(self.template.get(side) or []):
                raise ValueError(f"a frame's {side} conditioning has {entries} entries, the run's has "
                                 f"{len(self.template.get(side) or [])}: per-frame prompts must keep the structure")
            for key, tensor in tensors.items():
                if key in self.keys:
                    rows.refs[key] = RowRef(tensor, 0)
        if own.hint is not None:
            hint = RowRef(self.upload(own.hint[:1]).movedim(-1, 1), 0)
            rows.hints = {k: hint for k in range(len(self.controls))}
        rows.control_scale, rows.fusion_alpha = float(own.control_scale), own.fusion_alpha
        rows.cfg, rows.residual_delta = own.cfg, own.residual_delta
        if self.schedules is not None and (own.strength is not None or own.seed is not None):
            rows.schedule = self.schedules(own.strength, own.seed)

    def _process(self, conditioning: list, side: str) -> tuple[int, dict]:
        """A frame's own conditioning: its entry count and ``{(side, j, name): tensor on the device}`` (once per
        list object: a prompt change costs one)."""
        hit = self._processed.get(f"{side} {id(conditioning)}")
        if hit is not None and hit[0] is conditioning:
            return hit[1]
        conds = comfy.sampler_helpers.convert_cond(conditioning)
        conds = comfy.samplers.encode_model_conds(self.base_model.extra_conds, conds, self.like, self.like.device,
                                                  side)
        tensors = {(side, j, name): _batch_tensor(model_cond).to(self.like.device) for j, entry in enumerate(conds)
                   for name, model_cond in entry.get("model_conds", {}).items() if _batch_tensor(model_cond) is not None}
        self._processed.put(f"{side} {id(conditioning)}", (conditioning, (len(conds), tensors)))
        return len(conds), tensors

    # -- a call ---------------------------------------------------------------------------
    def groups(self, rows: list[FrameRows], steps: list[int]) -> list[tuple[int, int]]:
        """Row groups of a call: rows whose noise levels need other conditioning entries or ControlNets split it, and
        so do rows whose conditioning has other shapes (prompts of other token counts, e.g. 77 and 154 after a live
        change: ComfyUI runs conds it cannot concatenate apart too; host shapes only)."""
        active = [self._active(self._sigma(row, step)) for row, step in zip(rows, steps)]
        return split_where_changed([(a if self.mixed else a[1], self._shapes(row)) for a, row in zip(active, rows)])

    def _shapes(self, row: FrameRows) -> tuple:
        return tuple(tuple((row.refs.get(key) or RowRef(tensor, 0)).tensor.shape[1:])
                     for key, tensor in self.keys.items())

    def _sigma(self, row: FrameRows, step: int) -> float:
        """The row's sigma at ``step``: from its frame's own schedule (a live strength change) or the run's."""
        return (row.schedule.sigma_values if row.schedule is not None else self.sigma_values)[step]

    def _active(self, sigma: float) -> tuple:
        controls = tuple(c.timestep_range is None or not (sigma > c.timestep_range[0] or sigma < c.timestep_range[1])
                         for c in self.controls)
        entries = tuple(not (sigma > e.get("timestep_start", float("inf")) or sigma < e.get("timestep_end", -1.0))
                        for side in SIDES for e in self.template.get(side) or [])
        return controls, entries

    def control_factors(self, rows: list[FrameRows], steps: list[int]) -> tuple[float, ...] | None:
        """Per row, the factor on ControlNet outputs (its frame's strength, 0 where none is on); None: all 1."""
        if not self.controls:
            return None
        factors = tuple(row.control_scale * (1.0 if self.mixed or any(self._active(self._sigma(row, step))[0]) else 0.0)
                        for row, step in zip(rows, steps))
        return None if all(f == 1.0 for f in factors) else factors

    def can_carry_negative(self, rows: list[FrameRows]) -> bool:
        """Whether a row can take its frame's negative prompt inside a positive entry (same structure, shapes)."""
        return self.negative_rides and all(
            row.refs[(SIDES[1],) + key[1:]].get().shape[1:] == row.refs[key].get().shape[1:]
            for row in rows for key in row.refs if key[0] == SIDES[0] and (SIDES[1],) + key[1:] in row.refs)

    def conds_for(self, rows: list[FrameRows], steps: list[int], negatives: int = 0) -> dict:
        """The processed conds for a call whose rows (one row group) are ``rows``, in row order; the last
        ``negatives`` rows are conditioned on their frames' negative prompt (inside the positive entries)."""
        sides = [SIDES[0]] * (len(rows) - negatives) + [SIDES[1]] * negatives
        stacked_rows = {}
        for key in self.keys:
            if negatives and key[0] == SIDES[1]:
                continue  # unused: this call runs the positive entries only (cfg 1)
            keys = [key if key[0] == SIDES[1] else (side,) + key[1:] for side in sides]
            stacked_rows[key], _ = stacked([row.refs.get(k) or RowRef(self.keys[k], 0) for row, k in zip(rows, keys)])
        copies = self.copies.for_active(self._active(self._sigma(rows[0], steps[0]))[0] if self.mixed
                                        else (True,) * len(self.controls))
        for k, control in enumerate(self.controls):
            copy = copies.get(id(control))
            if copy is not None and k in rows[0].hints:
                _set_hint(copy, [row.hints.get(k) or rows[0].hints[k] for row in rows])
        return {side: [_entry(side, j, entry, stacked_rows, copies) for j, entry in enumerate(entries)]
                for side, entries in self.template.items()}

    def close(self) -> None:
        """Drop this run's ControlNet copies and their scaled hints."""
        self.copies.close()
        self._processed.clear_all()


def _set_hint(copy, refs: list[RowRef]) -> None:
    hint, _ = stacked(refs)
    if hint is not copy.cond_hint_original:  # a new hint: ComfyUI rescales it on the next call
        copy.cond_hint_original, copy.cond_hint = hint, None


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


_PER_PROMPT = {"model_conds", "uuid", "cross_attn", "pooled_output"}  # what a prompt's rows may change


def _same_structure(positive: list[dict], negative: list[dict]) -> bool:
    """Both prompts have the same entries but for their tensors (so a negative row can ride in a positive entry)."""
    if len(positive) != len(negative):
        return False
    for p, n in zip(positive, negative):
        if set(p) != set(n) or set(p.get("model_conds", {})) != set(n.get("model_conds", {})):
            return False
        for key in set(p) - _PER_PROMPT:
            a, b = p[key], n[key]
            if not (a is b or (not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor) and a == b)):
                return False
    return True
