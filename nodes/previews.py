"""Previews for ComfyUI's progress bar, and how often to send them."""
from __future__ import annotations

import time

import numpy as np
import torch
from PIL import Image

from ..streamv2v_core.media.frames import to_uint8

PREVIEW_SIZE = 512
PREVIEW_INTERVAL_S = 0.25  # previews and status texts at most four times a second: each preview costs an encode


def preview_of(image: torch.Tensor | np.ndarray, max_size: int = PREVIEW_SIZE):
    """``[H, W, 3]`` in 0..1 (or uint8 pixels) -> the ``("JPEG", PIL image, max size)`` tuple ProgressBar shows."""
    pixels = image if isinstance(image, np.ndarray) else to_uint8(image)
    return "JPEG", Image.fromarray(pixels), max_size


class Throttle:
    """Says whether an update is due: at most one per ``interval_s`` seconds, the first and the final one always."""

    def __init__(self, interval_s: float):
        self.interval_s, self.last = interval_s, None

    def due(self, final: bool = False) -> bool:
        now = time.monotonic()
        if final or self.last is None or now - self.last >= self.interval_s:
            self.last = now
            return True
        return False
