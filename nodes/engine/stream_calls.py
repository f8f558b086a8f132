"""The model calls of a stream run: each pipeline step is one call, with its rows' own conditioning.

Rows. A stream-batch call holds the frames in flight, newest first, each at its own step. With
residual one-time negative guidance a frame's first step also needs its negative prompt's pass:
that row rides in the same call (conditioned on the frame's negative prompt, keyed as a negative
row in the bank) instead of a call of its own.

Fixed layout (compiled UNet). Compiled, every stream-batch call has the same rows: ``S`` rows at
steps ``0 .. S-1`` (plus the negative row). While the pipeline fills or drains, the rows no
frame occupies are *padding*: zeros at their step's sigma with a neighbour's conditioning,
computed, never written to the bank, never output. With the bank's masked reads
(``bank/calls.py``) every call of a stream has one shape and one set of host values, so
``torch.compile`` traces one graph per configuration and CUDA graphs record it once, from the
first call of the first stream. Uncompiled, calls keep their natural size (no padding to pay).

Row groups. A call is split only where ComfyUI applies something per call that differs between
its rows: a conditioning entry's timestep range, ControlNets of one chain on at different steps
(fixed by the steps: the same groups every call), or, with full CFG, the guidance scale right
after a live change (compiled, such a call keeps the layout: the other rows are padding in it).
A frame's ControlNet strength, fusion alpha and residual guidance are per-row data, not splits.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

import comfy.model_management
import comfy.samplers

from ...streamv2v_core.bank.calls import PADDING, RowPlan
from ...streamv2v_core.bank.state import with_state
from ...streamv2v_core.stream.conditioning import FrameRows, split_where_changed
from ...streamv2v_core.stream.guidance import FULL, ONE_TIME_NEGATIVE, residual_guidance
from .conditioning import RunConditioning
from .settings import StreamSettings, residual_applies


@dataclass
class _Layout:
    """One call's rows ``x`` ``[R, C, h, w]`` at ``sigma`` ``[R]``; ``real``: the rows of frames in flight."""

    x: torch.Tensor
    sigma: torch.Tensor
    frames: list[int]
    steps: list[int]
    rows: list[FrameRows]
    real: slice


class StreamCalls:
    """The pipeline's ``denoise`` for one run (see module doc).

    sigmas: the run's ``[S + 1]`` on the latents' device; frame_data: the stream's ``FrameRows`` by frame;
    pad: give every call the fixed layout (the UNet is compiled).
    """

    def __init__(self, settings: StreamSettings, model_k, guider, conds: RunConditioning, sigmas: torch.Tensor,
                 extra_args: dict, banks, frame_data: dict, pad: bool):
        self.settings, self.model_k, self.guider, self.conds = settings, model_k, guider, conds
        self.sigmas, self.steps, self.frame_data = sigmas, len(sigmas) - 1, frame_data
        self.pad = pad and settings.stream_batch
        self.options, self.seed = extra_args["model_options"], extra_args.get("seed")
        self.banks = {bank.name: bank for bank in banks}
        self.one_time = settings.guidance == ONE_TIME_NEGATIVE

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, frames: list[int], steps: list[int]) -> torch.Tensor:
        """The model's clean estimates ``[R, C, h, w]`` of the frames in flight (rows ``x`` at ``sigma``)."""
        comfy.model_management.throw_exception_if_processing_interrupted()
        layout = self._layout(x, sigma, frames, steps)
        outs = []
        for start, stop in self.conds.groups(layout.rows, layout.steps):
            scales = [self.guidance(row)[0] if self.settings.guidance == FULL else None
                      for row in layout.rows[start:stop]]
            for a, b in split_where_changed(scales):
                outs.append(self._call(layout, start, stop, (start + a, start + b)))
        out = (outs[0] if len(outs) == 1 else torch.cat(outs))[layout.real]
        if self.settings.guidance != FULL:
            out = self._residual(x, out, layout.rows[layout.real])
        return out

    def warm_up(self, like: torch.Tensor, calls: int) -> None:
        """``calls`` model calls of the fixed layout whose rows are all padding (``like``: one latent row):
        compiled and recorded before the first frame. Nothing without the fixed layout."""
        if not self.pad or calls <= 0:
            return
        rows = [self.conds.template_rows()] * self.steps
        layout = _Layout(like.new_zeros(self.steps, *like.shape[1:]), self.sigmas[:self.steps], [PADDING] * self.steps,
                         list(range(self.steps)), rows, slice(0, 0))
        for _ in range(calls):
            comfy.model_management.throw_exception_if_processing_interrupted()
            for start, stop in self.conds.groups(layout.rows, layout.steps):
                self._call(layout, start, stop, (start, stop))

    def guidance(self, row: FrameRows) -> tuple[float, float, bool]:
        """A row's cfg and delta (its frame's own after a live change, else the run's), and whether residual
        CFG applies to it (``settings.residual_applies``)."""
        cfg = float(self.settings.cfg if row.cfg is None else row.cfg)
        delta = float(self.settings.residual_delta if row.residual_delta is None else row.residual_delta)
        return cfg, delta, residual_applies(self.settings.guidance, cfg)

    def _layout(self, x, sigma, frames: list[int], steps: list[int]) -> _Layout:
        rows = [self.frame_data.get(f) or FrameRows() for f in frames]
        first, count = steps[0], len(steps)
        if not self.pad or count == self.steps or steps != list(range(first, first + count)):
            return _Layout(x, sigma, list(frames), list(steps), rows, slice(0, count))
        after = self.steps - first - count
        parts = [x.new_zeros(first, *x.shape[1:]), x, x.new_zeros(after, *x.shape[1:])]
        sigmas = [self.sigmas[:first], sigma, self.sigmas[first + count:self.steps]]
        # Padding rows carry a neighbour's conditioning (no extra stacking) but never its negative estimate.
        padding = [dataclasses.replace(rows[0], x0=None)] * first, [dataclasses.replace(rows[-1], x0=None)] * after
        return _Layout(torch.cat([p for p in parts if len(p)]), torch.cat([p for p in sigmas if len(p)]),
                       [PADDING] * first + list(frames) + [PADDING] * after, list(range(self.steps)),
                       padding[0] + rows + padding[1], slice(first, first + count))

    def _call(self, layout: _Layout, start: int, stop: int, part: tuple[int, int]) -> torch.Tensor:
        """One model call for the rows ``part`` of the group ``start .. stop-1`` of ``layout`` (their negatives
        riding along): compiled, on the whole group, the rest of it padding; else on ``part`` alone."""
        if not self.pad:
            start, stop = part
        rows, steps = layout.rows[start:stop], layout.steps[start:stop]
        frames = [f if part[0] <= start + i < part[1] else PADDING for i, f in enumerate(layout.frames[start:stop])]
        x, sigma = layout.x[start:stop], layout.sigma[start:stop]
        self.guider.cfg = self.guidance(rows[part[0] - start])[0] if self.settings.guidance == FULL else 1.0
        needs = [i for i, step in enumerate(steps) if self.one_time and step == 0 and (self.pad or (
            frames[i] != PADDING and rows[i].x0 is None and self.guidance(rows[i])[2]))]
        riders = needs if self.conds.can_carry_negative([rows[i] for i in needs]) else []
        if riders:
            x = torch.cat([x] + [x[i:i + 1] for i in riders])
            sigma = torch.cat([sigma] + [sigma[i:i + 1] for i in riders])
        every = rows + [rows[i] for i in riders]
        every_steps = steps + [steps[i] for i in riders]
        alphas = tuple(row.fusion_alpha for row in every)
        plan = RowPlan(tuple(frames + [frames[i] for i in riders]), tuple(every_steps), self.steps,
                       fusion_alphas=None if all(a is None for a in alphas) else alphas,
                       flags=(0,) * len(rows) + (1,) * len(riders) if riders else None,
                       control=self.conds.control_factors(every, every_steps))
        self.guider.conds = self.conds.conds_for(every, every_steps, negatives=len(riders))
        out = self.model_k(x, sigma, denoise_mask=None, model_options=self.options_for(plan), seed=self.seed)
        for j, i in enumerate(riders):  # the frame's only real negative pass: its x0_ref for every step
            if frames[i] != PADDING and rows[i].x0 is None:
                rows[i].x0 = out[len(rows) + j:len(rows) + j + 1]
        for i in needs if not riders else []:
            if frames[i] != PADDING and rows[i].x0 is None:
                rows[i].x0 = self._negative_pass(rows[i], frames[i], x[i:i + 1], sigma[i:i + 1])
        return out[part[0] - start:part[1] - start]

    def _negative_pass(self, row: FrameRows, frame: int, x_row, sigma_row) -> torch.Tensor:
        """A call of its own for a frame's negative prompt at its first step (its prompts differ in structure):
        ``cond_or_uncond`` [1], so the bank keeps negative features apart, as full CFG does."""
        plan = RowPlan((frame,), (0,), self.steps, fusion_alphas=(row.fusion_alpha,),
                       control=self.conds.control_factors([row], [0]))
        negative = self.conds.conds_for([row], [0])["negative"]
        return comfy.samplers.calc_cond_batch(self.guider.inner_model, [None, negative], x_row, sigma_row,
                                              self.options_for(plan))[1]

    def _residual(self, x, denoised, rows: list[FrameRows]) -> torch.Tensor:
        """Residual CFG for ``[R, C, h, w]`` rows, each guided by its own frame's negative reference and guidance."""
        refs, params = [row.x0 for row in rows], [self.guidance(row) for row in rows]
        if len(set(params)) == 1 and all(ref is not None for ref in refs):  # every call but a few after a change
            cfg, delta, residual = params[0]
            ref = refs[0] if len(refs) == 1 else torch.cat(refs)
            return residual_guidance(x, denoised, ref, cfg, delta) if residual else denoised
        # Rows guided apart: a live cfg or delta, or a frame that entered before it had a negative (unguided).
        return torch.cat([residual_guidance(r, d, ref, cfg, delta) if ref is not None and residual else d
                          for r, d, ref, (cfg, delta, residual) in zip(x.split(1), denoised.split(1), refs, params)])

    def options_for(self, plan: RowPlan) -> dict:
        """The run's model options with this call's plan (and the run's banks) in the pack's state.

        Per call only the state changes: a shallow copy with a new ``transformer_options`` (ComfyUI's
        ``create_model_options_clone`` would copy every nested dict on every call)."""
        return {**self.options, "transformer_options": with_state(self.options.get("transformer_options"),
                                                                  plan=plan, banks=self.banks)}
