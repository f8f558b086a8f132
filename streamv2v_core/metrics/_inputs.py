"""Input normalisation shared by the metrics (no ComfyUI, no hard torch dependency).

Videos are accepted in ComfyUI's IMAGE layout: ``[T, H, W, 3]`` floats in ``0..1``, as a
``numpy.ndarray`` or a ``torch.Tensor`` (any device / float dtype). Internally a video is kept as
a C-contiguous ``numpy.float32`` array (lossless for ComfyUI's float32 IMAGE tensors, half the
memory of float64) and every per-frame computation is done in float64; nothing is ever subtracted
in uint8.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Values a little outside 0..1 (e.g. from an unclamped decode) are clipped; anything further
# out is treated as a mistake (most likely 0..255 data).
_RANGE_SLACK = 0.05


def to_numpy(x: Any) -> np.ndarray:
    """Return ``x`` (numpy array, torch tensor or nested sequence) as a numpy array."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor without importing torch
        t = x.detach().cpu()
        if str(t.dtype) != "torch.float64":
            t = t.float()  # bfloat16/float16/int tensors have no (exact) numpy equivalent
        return t.numpy()
    return np.asarray(x)


def as_video(x: Any, name: str = "frames", min_frames: int = 2) -> np.ndarray:
    """Validate a video and return it as ``float32 [T, H, W, 3]`` in ``0..1``.

    Raises ``ValueError`` (with a message saying what to pass) when the array is not 4-D with
    3 channels, has fewer than ``min_frames`` frames, contains NaN/inf, or lies clearly outside
    ``0..1`` (e.g. 0..255 data).
    """
    if x is None:
        raise ValueError(f"{name}: got None; pass a video as a [T, H, W, 3] float array/tensor in 0..1")
    arr = to_numpy(x)
    if arr.ndim != 4:
        raise ValueError(
            f"{name}: expected a video of shape [T, H, W, 3] (ComfyUI IMAGE batch, one entry per "
            f"frame), got an array of shape {tuple(arr.shape)}"
        )
    if arr.shape[-1] != 3:
        raise ValueError(
            f"{name}: expected 3 colour channels (RGB) in the last axis of [T, H, W, 3], got "
            f"{arr.shape[-1]} (shape {tuple(arr.shape)}); drop the alpha channel or convert "
            f"greyscale to RGB first"
        )
    if arr.shape[0] < min_frames:
        raise ValueError(
            f"{name}: need at least {min_frames} frames to measure temporal consistency, got "
            f"{arr.shape[0]}; pass the whole clip as one [T, H, W, 3] batch"
        )
    if arr.shape[1] < 2 or arr.shape[2] < 2:
        raise ValueError(f"{name}: frames of size {arr.shape[1]}x{arr.shape[2]} are too small")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: contains NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -_RANGE_SLACK or hi > 1.0 + _RANGE_SLACK:
        raise ValueError(
            f"{name}: values must be floats in 0..1 (ComfyUI IMAGE), got range [{lo:.3g}, {hi:.3g}]"
            + ("; if these are 0..255 pixel values divide by 255 first" if hi > 1.5 else "")
        )
    np.clip(arr, 0.0, 1.0, out=arr)
    return arr


def check_same_shape(output: np.ndarray, source: np.ndarray) -> None:
    """Raise ``ValueError`` unless output and source videos have the same T, H and W."""
    if output.shape[0] != source.shape[0]:
        raise ValueError(
            f"output_frames has {output.shape[0]} frames but source_frames has {source.shape[0]}; "
            f"pass the source clip frame-aligned with the output (same length)"
        )
    if output.shape[1:3] != source.shape[1:3]:
        raise ValueError(
            f"output_frames are {output.shape[1]}x{output.shape[2]} (HxW) but source_frames are "
            f"{source.shape[1]}x{source.shape[2]}; resize one of them so both have the same size"
        )
