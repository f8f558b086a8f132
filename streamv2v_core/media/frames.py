"""Picking and sizing the frames of a stream (pure torch).

``select_frames`` applies skip / every n-th / cap to any iterable, ``FrameResizer`` brings a
frame to a target size, and ``StreamSizer`` holds a whole stream at one size (the target, or
the first frame's), so a frame of another size is scaled instead of restarting the stream.
Frames are ``Tensor[H, W, 3]`` float32 in 0..1.
"""
from __future__ import annotations

import logging
import math
from typing import Iterable, Iterator, TypeVar

import numpy as np
import torch

from ..file_rules import MAX_STREAM_PIXELS

log = logging.getLogger("streamv2v")
Item = TypeVar("Item")


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """``uint8 [H, W, 3]`` RGB -> ``float32 [H, W, 3]`` in 0..1.

    Converted with numpy in one pass: torch's elementwise ops on a busy CPU wait on their
    thread pool (30x slower measured on a loaded 2-core machine), and this runs per frame.
    """
    return torch.from_numpy(np.divide(rgb[..., :3], np.float32(255), dtype=np.float32))


def to_uint8(pixels: torch.Tensor | np.ndarray) -> np.ndarray:
    """``[..., C]`` in 0..1 -> ``uint8 [..., 3]`` (contiguous), clipped and rounded.

    A torch tensor (any device or float dtype) is converted in float32; a numpy array keeps its
    float dtype. For display, files and OpenCV input only, never for error arithmetic.
    """
    if isinstance(pixels, torch.Tensor):
        if pixels.dtype == torch.uint8:  # already converted (``quantize``, on its device)
            return np.ascontiguousarray(pixels.detach()[..., :3].cpu().numpy())
        pixels = pixels.detach()[..., :3].to("cpu", torch.float32).numpy()
    else:
        pixels = np.asarray(pixels)[..., :3]
    scale = pixels.dtype.type(255) if pixels.dtype.kind == "f" else np.float32(255)
    scaled = np.multiply(pixels, scale)
    np.clip(scaled, 0, 255, out=scaled)
    return np.rint(scaled, out=scaled).astype(np.uint8)


def quantize(pixels: torch.Tensor) -> torch.Tensor:
    """``to_uint8`` on the tensor's own device: ``[..., C]`` in 0..1 -> ``uint8 [..., 3]``, the same values
    (float32 times 255, clipped, rounded half to even), so a GPU frame is downloaded at a quarter of the bytes."""
    return (pixels.detach()[..., :3].float() * 255).clamp_(0, 255).round_().to(torch.uint8)


def select_frames(frames: Iterable[Item], skip_first: int = 0, every_nth: int = 1, max_frames: int = 0) -> Iterator[Item]:
    """Drop ``skip_first`` items, then keep every ``every_nth``, at most ``max_frames`` (0 = all)."""
    kept = 0
    for index, frame in enumerate(frames):
        if index < skip_first or (index - skip_first) % every_nth:
            continue
        yield frame
        kept += 1
        if max_frames and kept >= max_frames:
            return


def selected_count(total: int | None, skip_first: int = 0, every_nth: int = 1, max_frames: int = 0) -> int | None:
    """How many frames ``select_frames`` gives from ``total`` (None when unknown)."""
    if total is None:
        return max_frames or None
    count = max(0, math.ceil((total - skip_first) / every_nth))
    return min(count, max_frames) if max_frames else count


class FrameResizer:
    """Brings frames to one size that is a multiple of ``multiple``.

    width/height 0 keep the source's (one of them 0: keep the aspect ratio). ``mode``
    "crop" scales to cover the target and cuts the centre, "stretch" scales to it.
    The result is then centre-cropped down to a multiple of ``multiple`` (at most 7 pixels).
    """

    def __init__(self, width: int = 0, height: int = 0, mode: str = "crop", multiple: int = 8):
        if mode not in ("crop", "stretch"):
            raise ValueError(f"resize mode must be 'crop' or 'stretch', got {mode!r}")
        if width < 0 or height < 0:
            raise ValueError(f"width and height must be 0 (source size) or positive, got {width}x{height}")
        if (width and width < multiple) or (height and height < multiple):
            raise ValueError(f"target size {width}x{height} is too small: use at least {multiple} pixels")
        if width * height > MAX_STREAM_PIXELS:
            raise ValueError(f"width x height {width}x{height} is more than a stream runs at (at most "
                             f"{MAX_STREAM_PIXELS / 1e6:.1f} megapixels, e.g. 2048x2048): lower width or height")
        self.width, self.height, self.mode, self.multiple = int(width), int(height), mode, multiple

    def target(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) a ``height x width`` frame is scaled to, before the multiple-of crop."""
        if self.width and self.height:
            return self.height, self.width
        if self.width:
            return max(1, round(height * self.width / width)), self.width
        if self.height:
            return self.height, max(1, round(width * self.height / height))
        return height, width

    def __call__(self, frame: torch.Tensor) -> torch.Tensor:
        """``[h, w, 3]`` -> ``[H, W, 3]``."""
        h, w = frame.shape[:2]
        th, tw = self.target(h, w)
        if (th, tw) != (h, w):
            if self.mode == "crop":
                scale = max(th / h, tw / w)
                sh, sw = max(th, round(h * scale)), max(tw, round(w * scale))
            else:
                sh, sw = th, tw
            chw = frame.permute(2, 0, 1)[None]
            frame = torch.nn.functional.interpolate(chw, size=(sh, sw), mode="bilinear", antialias=True,
                                                    align_corners=False)[0].permute(1, 2, 0).clamp_(0, 1)
            frame = center_crop(frame, th, tw)
        m = self.multiple
        return center_crop(frame, max(m, th // m * m), max(m, tw // m * m))


class StreamSizer:
    """Holds a stream at one size: the resizer's target, or (width/height 0) the first frame's.

    The stream engine needs one size per stream, and restarting it at whatever size arrives
    resets the feature bank and can cost minutes a frame (one 2000x2000 webcam frame), so a
    frame of another size is scaled (cover + centre crop) to the stream's size instead.
    """

    def __init__(self, resizer: FrameResizer):
        self.resizer = resizer
        self.size: tuple[int, int] | None = None  # (height, width) once the first frame fixed it
        self.rescaled = 0

    def hint(self) -> tuple[int, int] | None:
        """(height, width) frames will end up at, when known: decoders may decode smaller."""
        if self.size is not None:
            return self.size
        if self.resizer.width and self.resizer.height:
            return self.resizer.height, self.resizer.width
        return None

    def __call__(self, frame: torch.Tensor) -> torch.Tensor:
        """``[h, w, 3]`` -> ``[H, W, 3]`` at the stream's size."""
        frame = self.resizer(frame)
        size = tuple(frame.shape[:2])
        if self.size is None:
            if size[0] * size[1] > MAX_STREAM_PIXELS:  # the source's own size (width/height 0), before any model work
                raise ValueError(f"frames of {size[1]}x{size[0]} at the source's size are more than a stream runs at "
                                 f"(at most {MAX_STREAM_PIXELS / 1e6:.1f} megapixels, e.g. 2048x2048): set width "
                                 f"and/or height (e.g. width 512) to scale them down")
            self.size = size
        elif size != self.size:
            if not self.rescaled:
                log.warning("StreamV2V: a frame of %dx%d in a %dx%d stream: scaled to the stream's size "
                            "(logged once per run)", size[1], size[0], self.size[1], self.size[0])
            self.rescaled += 1
            frame = fit_to(frame, *self.size)
        return frame


def center_crop(frame: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The centre ``[height, width, C]`` of ``frame [h, w, C]`` (contiguous)."""
    h, w = frame.shape[:2]
    top, left = max(0, (h - height) // 2), max(0, (w - width) // 2)
    return frame[top:top + height, left:left + width].contiguous()


def fit_to(frame: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Scale ``frame [h, w, 3]`` to ``[height, width, 3]`` (cover and centre-crop) if it differs."""
    if tuple(frame.shape[:2]) == (height, width):
        return frame
    return FrameResizer(width, height, "crop", multiple=1)(frame)
