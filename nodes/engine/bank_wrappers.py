"""Putting bank patches on a ComfyUI ModelPatcher clone; the wrappers that drive a bank per model call.

Two wrappers are installed once per bank (keyed ``streamv2v.bank.NAME``; wrapper objects are
shared between clones by every ComfyUI version, so they hold nothing but the bank handle):

* ``BankCallWrapper`` (APPLY_MODEL) makes the ``BankCall`` of every UNet call before it runs
  and writes the staged features into the bank after it. The rows' frames and steps come
  from the stream engine (``PLAN_KEY``, plain ints); for a plain sampler they are read from
  the call's sigmas (one small device-to-host read per call).
* ``FrameCounter`` (OUTER_SAMPLE) makes one plain sampling run one frame: before the run it
  clears the bank if what its features came from changed (with a readable reason); during it
  the calls stage their writes (``FrameWrites``: a two-call sampler such as heun evaluates step
  i's second call at step i+1's sigma, and must not read that back in its next call); after it
  (finished or cancelled) the writes land and the frame count advances. Runs of the stream engine number
  their frames themselves and pass through.
"""
from __future__ import annotations

import torch

import comfy.patcher_extension

from ...streamv2v_core.bank.storage import BankHandle, FeatureBank
from ...streamv2v_core.bank.calls import CALLS_KEY, PLAN_KEY, BankCall, FrameWrites, RowPlan
from ...streamv2v_core.bank.patches import STREAM_KEY, step_of
from .signatures import sampler_signature

RUN_BANKS_KEY = "streamv2v_banks"  # transformer_options: {bank name: FeatureBank} resolved once per run
FRAME_WRITES_KEY = "streamv2v_frame_writes"  # transformer_options: {bank name: FrameWrites} of a plain run
WRAPPER_KEY = "streamv2v.bank.{}"


def patched_clone(model, patch_type: str, patch):
    """A clone of ``model`` with ``patch`` added under ``patch_type`` (e.g. "attn1_patch").

    A patch of the same class for the same bank is replaced, so patching twice is the same
    as patching once. The incoming model is left untouched (clone() copies the option dicts
    and lists on every ComfyUI version; the patch objects themselves are immutable).
    """
    clone = model.clone()
    options = clone.model_options.setdefault("transformer_options", {})
    patches = options.setdefault("patches", {})
    kept = [p for p in patches.get(patch_type, [])
            if not (type(p) is type(patch) and p.handle.name == patch.handle.name)]
    patches[patch_type] = kept + [patch]
    key = WRAPPER_KEY.format(patch.handle.name)
    for kind, wrapper in ((comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, FrameCounter(patch.handle)),
                          (comfy.patcher_extension.WrappersMP.APPLY_MODEL, BankCallWrapper(patch.handle))):
        clone.remove_wrappers_with_key(kind, key)
        clone.add_wrapper_with_key(kind, key, wrapper)
    return clone


def run_bank(transformer_options: dict, handle: BankHandle) -> FeatureBank:
    """The bank object this run uses (resolved once per run by its driver), else the registry's."""
    return (transformer_options.get(RUN_BANKS_KEY) or {}).get(handle.name) or handle.bank


class BankCallWrapper:
    """APPLY_MODEL wrapper: a fresh ``BankCall`` for each UNet call, flushed after it."""

    def __init__(self, handle: BankHandle):
        self.handle = handle

    def __call__(self, executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        bank = run_bank(transformer_options, self.handle)
        plan = transformer_options.get(PLAN_KEY)
        frame = None
        if plan is None:  # a plain sampler: its frame's writes wait for the end of the run (FrameCounter)
            plan = sampler_plan(bank, transformer_options, t, x.shape[0])
            frame = (transformer_options.get(FRAME_WRITES_KEY) or {}).get(self.handle.name)
        call = BankCall(bank, plan, transformer_options.get("cond_or_uncond"), x.shape[0], frame, like=x)
        calls = {**(transformer_options.get(CALLS_KEY) or {}), self.handle.name: call}
        out = executor(x, t, c_concat, c_crossattn, control, {**transformer_options, CALLS_KEY: calls}, **kwargs)
        call.flush()
        return out


def sampler_plan(bank: FeatureBank, transformer_options: dict, timestep, rows: int) -> RowPlan:
    """The rows of a plain sampler's call: all one frame (``frames_seen``), steps from the sigmas.

    Reads the call's sigmas and the run's schedule in one device-to-host copy (the stream
    engine passes its plan instead and reads nothing).
    """
    flags = transformer_options.get("cond_or_uncond") or [0]
    per_chunk = rows // max(1, len(flags))
    sigmas = transformer_options.get("sigmas", timestep)
    schedule = transformer_options.get("sample_sigmas")
    values = (sigmas.flatten().tolist() if schedule is None else
              torch.cat([sigmas.flatten().float(), schedule.flatten().float().to(sigmas.device)]).tolist())
    row_sigmas, schedule_values = values[:sigmas.numel()], values[sigmas.numel():]
    row_sigmas = (row_sigmas * per_chunk)[:per_chunk] if len(row_sigmas) < per_chunk else row_sigmas[:per_chunk]
    steps = tuple(step_of(s, schedule_values) if schedule_values else 0 for s in row_sigmas)
    total = max(1, len(schedule_values) - 1) if schedule_values else 1
    return RowPlan((bank.frames_seen,) * per_chunk, steps, max(total, max(steps) + 1), tuple(range(per_chunk)))


class FrameCounter:
    """OUTER_SAMPLE wrapper: one run of a plain sampler is one frame of the bank. See module doc."""

    def __init__(self, handle: BankHandle):
        self.handle = handle

    def __call__(self, executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        guider = executor.class_obj
        options = guider.model_options.get("transformer_options", {})
        if options.get(STREAM_KEY):
            return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        bank = self.handle.open()  # this run applies its settings (a changed one clears the bank)
        bank.check_signature(sampler_signature(guider, latent_image, sigmas))
        # This run's bank object and its frame's staged writes, for the per-call wrapper (rebinds the
        # run's own options copy).
        frame = FrameWrites(bank)
        banks = {**(options.get(RUN_BANKS_KEY) or {}), self.handle.name: bank}
        frames = {**(options.get(FRAME_WRITES_KEY) or {}), self.handle.name: frame}
        guider.model_options = {**guider.model_options, "transformer_options": {
            **options, RUN_BANKS_KEY: banks, FRAME_WRITES_KEY: frames}}
        try:
            return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        finally:
            # After the frame's last model call (a cancelled run counts too: the steps it reached).
            frame.commit()
            bank.end_frame()
