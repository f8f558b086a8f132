"""Putting bank patches on a ComfyUI ModelPatcher clone, and counting frames for KSampler."""
from __future__ import annotations

import comfy.patcher_extension

from ..streamv2v_core.bank import BankHandle
from ..streamv2v_core.patches import STREAM_KEY


def patched_clone(model, patch_type: str, patch):
    """A clone of ``model`` with ``patch`` added under ``patch_type`` (e.g. "attn1_patch").

    A patch of the same class for the same bank is replaced, so patching twice is
    the same as patching once. The incoming model is left untouched. A frame counter
    for plain samplers is installed once per bank.
    """
    clone = model.clone()
    options = clone.model_options.setdefault("transformer_options", {})
    patches = options.setdefault("patches", {})
    kept = [p for p in patches.get(patch_type, [])
            if not (type(p) is type(patch) and p.handle.name == patch.handle.name)]
    patches[patch_type] = kept + [patch]
    key = f"streamv2v.bank.{patch.handle.name}"
    clone.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, key)
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, key, FrameCounter(patch.handle))
    return clone


class FrameCounter:
    """OUTER_SAMPLE wrapper: one sampling run of a plain sampler is one frame.

    Before the run the bank is cleared if the latent size, batch or model changed;
    after it (finished or cancelled) the frame count advances, which decides the next
    bank update. Runs
    driven by the stream sampler number their frames themselves and are not counted.
    """

    def __init__(self, handle: BankHandle):
        self.handle = handle

    def __call__(self, executor, noise, latent_image, *args, **kwargs):
        guider = executor.class_obj
        transformer_options = guider.model_options.get("transformer_options", {})
        if transformer_options.get(STREAM_KEY):
            return executor(noise, latent_image, *args, **kwargs)
        bank = self.handle.bank
        bank.check_signature(model_signature(guider.model_patcher, latent_image))
        try:
            return executor(noise, latent_image, *args, **kwargs)
        finally:
            bank.end_frame()  # a cancelled run counts too: the steps it reached are in the bank


def model_signature(model_patcher, latent) -> dict:
    """What the bank's features depend on, for ``FeatureBank.check_signature``."""
    shape = tuple(latent.shape)
    return {
        "latent size": "x".join(str(s) for s in shape[2:]) + f" ({shape[1]} channels)",
        "batch size": shape[0],
        "model": f"{type(model_patcher.model).__name__}@{id(model_patcher.model):x}/{model_patcher.patches_uuid}",
        "dtype": str(model_patcher.model_dtype()),
    }
