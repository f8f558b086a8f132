"""Previews for ComfyUI's progress bar."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..streamv2v_core.frames import to_uint8

PREVIEW_SIZE = 512
PREVIEW_INTERVAL_S = 0.25  # previews at most four times a second: each costs an encode


def preview_of(image: torch.Tensor | np.ndarray, max_size: int = PREVIEW_SIZE):
    """``[H, W, 3]`` in 0..1 (or uint8 pixels) -> the ``("JPEG", PIL image, max size)`` tuple ProgressBar shows."""
    pixels = image if isinstance(image, np.ndarray) else to_uint8(image)
    return "JPEG", Image.fromarray(pixels), max_size
