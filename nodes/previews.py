"""Previews for ComfyUI's progress bar."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

PREVIEW_SIZE = 512
PREVIEW_INTERVAL_S = 0.25  # previews at most four times a second: each costs an encode


def preview_of(image: torch.Tensor, max_size: int = PREVIEW_SIZE):
    """``[H, W, 3]`` in 0..1 -> the ``("JPEG", PIL image, max size)`` tuple ProgressBar shows."""
    array = (image.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return "JPEG", Image.fromarray(array[..., :3]), max_size
