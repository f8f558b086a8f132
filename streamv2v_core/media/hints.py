"""ControlNet hints made from the stream itself, per frame, without model weights (numpy + OpenCV).

Every function takes frames as ``Tensor[H, W, 3]`` float in 0..1 (any device) and returns a hint
``Tensor[1, H, W, 3]`` float32 in 0..1 on the CPU: the layout of a ComfyUI IMAGE batch of one, the
form a ControlNet's hint has in a CONDITIONING.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch

from .frames import to_uint8

CANNY_LOW, CANNY_HIGH = 100, 200  # OpenCV's customary thresholds (on 0..255 grey levels)


def canny(frame: torch.Tensor, low: int = CANNY_LOW, high: int = CANNY_HIGH) -> torch.Tensor:
    """White edges on black (``cv2.Canny`` on the grey frame, hysteresis ``low``/``high``), as canny
    ControlNets were trained on: ``[H, W, 3]`` -> ``[1, H, W, 3]`` with values 0 or 1."""
    if not 0 <= low <= high <= 1000:
        raise ValueError(f"canny thresholds must satisfy 0 <= low <= high <= 1000, got {low}, {high}")
    grey = cv2.cvtColor(to_uint8(frame), cv2.COLOR_RGB2GRAY)
    edges = cv2.Canny(grey, int(low), int(high))
    return torch.from_numpy(np.repeat(edges[:, :, None], 3, axis=2).astype(np.float32) / np.float32(255))[None]


def as_hint(frame: torch.Tensor) -> torch.Tensor:
    """The frame itself as a hint (tile and recolour ControlNets): ``[H, W, 3]`` -> ``[1, H, W, 3]`` copy."""
    return frame.detach()[..., :3].to("cpu", torch.float32).clamp(0, 1)[None].clone()


class PreviousOutput:
    """The newest finished output frame as the hint of the frame entering now (TemporalNet-style).

    With the stream batch a frame enters S - 1 frames before the one ahead of it is finished, so the
    hint is the newest output *finished when the frame enters*: frame i gets output i - S (i - 1
    without the stream batch). Before any output exists a frame gets itself. Holds one frame.
    """

    def __init__(self):
        self.latest: torch.Tensor | None = None  # [1, H, W, 3] on the CPU

    def saw(self, image: torch.Tensor) -> None:
        """An output frame ``[H, W, 3]`` is finished."""
        self.latest = as_hint(image)

    def __call__(self, frame: torch.Tensor) -> torch.Tensor:
        """The hint for ``frame [H, W, 3]`` entering now: ``[1, H, W, 3]``."""
        if self.latest is None or self.latest.shape[1:3] != frame.shape[:2]:
            return as_hint(frame)
        return self.latest
