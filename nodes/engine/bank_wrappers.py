"""Putting bank patches on a ComfyUI ModelPatcher clone; the wrappers that drive a bank per model call.

Two wrappers are installed once per bank (keyed ``streamv2v.bank.NAME``; wrapper objects are
shared between clones by every ComfyUI version, so they hold nothing but the bank handle):

* ``BankCallWrapper`` (APPLY_MODEL) makes the ``BankCall`` of every UNet call before it runs
  and writes the staged features into the bank after it. The rows' frames and steps come
  from the stream engine (the state's ``plan``, plain ints); for a plain sampler they are read
  from the call's sigmas (one small device-to-host read per call). The stream engine's calls are
  *masked* (``calls.py``) where ComfyUI routes attention through ``optimized_attention_override``
  and no other pack replaces the self-attention: their shapes do not depend on how full the bank
  is, so no call is split while it fills and a compiled UNet needs one graph for a whole stream.
* ``FrameCounter`` (OUTER_SAMPLE) makes one plain sampling run one frame: before the run it
  clears the bank if what its features came from changed (with a readable reason); during it
  the calls stage their writes (``FrameWrites``: a two-call sampler such as heun evaluates step
  i's second call at step i+1's sigma, and must not read that back in its next call); after it
  (finished or cancelled) the writes land and the frame count advances. Runs of the stream engine number
  their frames themselves and pass through.

What they pass on lives in the one state object of ``transformer_options`` (``bank/state.py``).
"""
from __future__ import annotations

import torch

import comfy.model_patcher
import comfy.patcher_extension

from ...streamv2v_core.bank.calls import BankCall, FrameWrites, PendingMask, RowPlan
from ...streamv2v_core.bank.feature_bank import FeatureBank
from ...streamv2v_core.bank.patches import OVERRIDE_KEY, FeatureFusion, MaskedAttention, step_of
from ...streamv2v_core.bank.registry import BankHandle
from ...streamv2v_core.bank.state import model_state, with_state
from ...streamv2v_core.log_once import warn_once
from ...streamv2v_core.stream.device_values import DeviceValues
from .signatures import sampler_signature

WRAPPER_KEY = "streamv2v.bank.{}"
_ALPHAS = DeviceValues("fusion alpha")  # per-row alphas on the device, by value (no sync)


def patched_clone(model, patch_type: str, patch):
    """A clone of ``model`` with ``patch`` added under ``patch_type`` (e.g. "attn1_patch").

    A patch of the same class for the same bank is replaced, so patching twice is the same
    as patching once. The incoming model is left untouched (clone() copies the option dicts
    and lists on every ComfyUI version; the patch objects themselves are immutable).
    """
    clone = model.clone()
    patches = clone.model_options.setdefault("transformer_options", {}).setdefault("patches", {})
    patches[patch_type] = [p for p in patches.get(patch_type, [])
                           if not (type(p) is type(patch) and p.handle.name == patch.handle.name)]
    clone.set_model_patch(patch, patch_type)
    key = WRAPPER_KEY.format(patch.handle.name)
    for kind, wrapper in ((comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, FrameCounter(patch.handle)),
                          (comfy.patcher_extension.WrappersMP.APPLY_MODEL, BankCallWrapper(patch.handle))):
        clone.remove_wrappers_with_key(kind, key)
        clone.add_wrapper_with_key(kind, key, wrapper)
    return clone


def can_mask(transformer_options: dict) -> bool:
    """Whether an EA mask reaches the self-attention: ComfyUI has the attention override slot, and no
    other pack replaces a self-attention (a replacement computes attention its own way)."""
    import comfy.ldm.modules.attention as attention

    return hasattr(attention, "wrap_attn") and not (transformer_options.get("patches_replace") or {}).get("attn1")


class BankCallWrapper:
    """APPLY_MODEL wrapper: a fresh ``BankCall`` for each UNet call, flushed after it."""

    def __init__(self, handle: BankHandle):
        self.handle = handle

    def __call__(self, executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        state, name = model_state(transformer_options), self.handle.name
        bank = state.banks.get(name) or self.handle.open()
        plan, frame, masks = state.plan, None, state.masks
        if plan is None:  # a plain sampler: its frame's writes wait for the end of the run (FrameCounter)
            plan = sampler_plan(bank, transformer_options, t, x.shape[0])
            frame = state.frames.get(name)
        elif masks is None and can_mask(transformer_options):  # the stream engine: one shape, whatever the bank holds
            masks = PendingMask()
        flags = transformer_options.get("cond_or_uncond")
        alphas = fusion_alphas(transformer_options, name, plan, len(flags or [0]), masks is not None,
                               x.new_empty(0, dtype=compute_dtype(executor.class_obj)))
        call = BankCall(bank, plan, flags, x.shape[0], frame, masks, alphas)
        options = with_state(transformer_options, calls={**state.calls, name: call}, masks=masks)
        if masks is not None and not isinstance(options.get(OVERRIDE_KEY), MaskedAttention):
            options[OVERRIDE_KEY] = MaskedAttention(options.get(OVERRIDE_KEY))
        out = executor(x, t, c_concat, c_crossattn, control, options, **kwargs)
        call.flush()
        if masks is not None and masks is not state.masks and masks.lost():
            warn_once("StreamV2V Extended Attention: a self-attention did not take the bank's mask (another "
                      "pack's attention patch after StreamV2V's changed its keys); frames may differ from "
                      "sequential sampling. Apply StreamV2V's patches after that pack's, or report it.")
        return out


def compute_dtype(base_model) -> torch.dtype:
    """The dtype the UNet computes in (its manual-cast dtype when its weights are stored in another)."""
    return getattr(base_model, "manual_cast_dtype", None) or base_model.get_dtype()


def fusion_alphas(transformer_options: dict, name: str, plan: RowPlan, chunks: int, always: bool,
                  like: torch.Tensor) -> torch.Tensor | None:
    """Feature fusion's alpha per call row ``[chunks * rows, 1, 1]`` (``like``'s device and dtype), or None.

    Each row takes its frame's live alpha, else the bank's FeatureFusion patch's. Made for every call when
    ``always`` (a masked call: one graph whether or not a frame chose an alpha), else only for live alphas.
    """
    live = plan.fusion_alphas
    if not always and (live is None or all(a is None for a in live)):
        return None
    patches = (transformer_options.get("patches") or {}).get("attn1_output_patch", [])
    default = next((p.alpha for p in patches if isinstance(p, FeatureFusion) and p.handle.name == name), None)
    if default is None:
        return None
    values = tuple(default if a is None else float(a) for a in (live or (None,) * len(plan.frames))) * chunks
    return _ALPHAS.rows(values, like, 3)


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
        state = model_state(options)
        if state.engine:
            return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        bank = self.handle.open()  # this run applies its settings (a changed one clears the bank)
        bank.check_signature(sampler_signature(guider, latent_image, sigmas))
        # This run's bank object and its frame's staged writes, for the per-call wrapper (rebinds the
        # run's own options copy).
        frame = FrameWrites(bank)
        guider.model_options = comfy.model_patcher.create_model_options_clone(guider.model_options)
        guider.model_options["transformer_options"] = with_state(
            options, banks={**state.banks, self.handle.name: bank}, frames={**state.frames, self.handle.name: frame})
        try:
            return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        finally:
            # After the frame's last model call (a cancelled run counts too: the steps it reached).
            frame.commit()
            bank.end_frame()
