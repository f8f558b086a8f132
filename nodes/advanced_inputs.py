"""Marking tuning inputs as advanced, as core V3 nodes do (``advanced=True``: the frontend folds them away)."""
from __future__ import annotations


def advanced(field):
    """``field`` (a V3 ``io.*.Input``) marked advanced, on every ComfyUI version.

    Newer ComfyUI takes ``advanced=True`` and serialises its ``advanced`` attribute; 0.3.75 has no such
    argument but serialises ``extra_dict`` into the node info, where the frontend reads the same key.
    """
    if hasattr(field, "advanced"):
        field.advanced = True
    else:
        field.extra_dict["advanced"] = True
    return field
