"""What a stream's features depend on (model, LoRA, frame size, steps, ...), as named parts a person can read.

``FeatureBank.check_signature`` compares them with the previous run's and clears the bank
with a readable reason ("strength changed 0.4 -> 0.5") when one differs.
"""
from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .settings import StreamSettings


class SameObject:
    """Identity of an object for a signature, without keeping it alive and without ``id()``.

    Python reuses the id of a freed object, so a checkpoint loaded again could take its
    predecessor's id and look unchanged; a weak reference instead compares equal only while
    both sides refer to the same living object (a freed one never equals anything).
    """

    __slots__ = ("_ref", "_hash")

    def __init__(self, obj):
        try:
            self._ref = weakref.ref(obj)
        except TypeError:  # no weak references (e.g. a tuple): hold it (small; signatures are short-lived)
            self._ref = lambda obj=obj: obj
        self._hash = id(obj)

    def __eq__(self, other) -> bool:
        if not isinstance(other, SameObject):
            return NotImplemented
        mine = self._ref()
        return mine is not None and mine is other._ref()

    def __hash__(self) -> int:
        return self._hash


def model_parts(model_patcher) -> dict:
    """Signature parts of the model itself: ``{name: (comparable, shown)}`` (shown None = not shown)."""
    sources, strengths = set(), set()
    for key, entries in model_patcher.patches.items():
        for entry in entries:
            strength, patch = entry[0], entry[1]
            weights = getattr(patch, "weights", patch)
            first = weights[0] if isinstance(weights, (tuple, list)) and weights else weights
            sources.add((key, SameObject(first)))
            strengths.add(round(float(strength), 4))
    shown = ", ".join(f"{s:g}" for s in sorted(strengths)) if strengths else "none"
    return {
        "model (checkpoint or model loader)": ((SameObject(model_patcher.model), type(model_patcher.model).__name__),
                                               None),
        "LoRA or weight patches": (frozenset(sources), f"{len(sources)} patched weights" if sources else "none"),
        # Reported when it is the only LoRA change (a LoRA added or removed changes it too).
        "LoRA strength": (shown, shown, "detail"),
        "model dtype": (str(model_patcher.model_dtype()).replace("torch.", ""),
                        str(model_patcher.model_dtype()).replace("torch.", "")),
    }


def frame_size_part(latent_shape, downscale: int = 8) -> tuple:
    """Signature part for the frame size, shown in pixels: ``("64x64x4", "512x512")``."""
    h, w = latent_shape[-2], latent_shape[-1]
    return ("x".join(str(s) for s in latent_shape[1:]), f"{w * downscale}x{h * downscale}")


def sampler_signature(guider, latent_image, sigmas) -> dict:
    """What a plain sampler run's features depend on (see ``FeatureBank.check_signature``)."""
    schedule = [round(float(s), 4) for s in sigmas.flatten().tolist()]
    parts = model_parts(guider.model_patcher)
    parts.update({
        "frame size": frame_size_part(latent_image.shape),
        "batch size": (latent_image.shape[0], latent_image.shape[0]),
        "steps": (len(schedule) - 1, len(schedule) - 1),
        "noise schedule (denoise, scheduler or model sampling)": (tuple(schedule), None, "detail"),
        "cfg": (float(guider.cfg), f"{float(guider.cfg):g}"),
    })
    return parts


def stream_signature(model, latent_shape, settings: StreamSettings, downscale: int) -> dict:
    """What a stream's features depend on: model, LoRA, frame size, dtype, steps, strength, cfg."""
    parts = model_parts(model)
    parts.update({
        "frame size": frame_size_part(latent_shape, downscale),
        "steps": (int(settings.steps), int(settings.steps)),
        "strength": (float(settings.strength), f"{float(settings.strength):g}"),
        "cfg": (float(settings.cfg), f"{float(settings.cfg):g}"),
        "guidance": ((settings.guidance, float(settings.residual_delta)), settings.guidance),
    })
    return parts
