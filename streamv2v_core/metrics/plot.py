"""Tiny PIL line plot for per-frame metric values, returned as an image array (no matplotlib)."""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np

from ._inputs import to_numpy

__all__ = ["plot_per_frame"]

_BG = (255, 255, 255)
_AXIS = (40, 40, 40)
_GRID = (225, 225, 225)
_LINE = (31, 119, 180)
_TEXT = (20, 20, 20)
_MARK = (255, 224, 178)


def _fmt(v: float) -> str:
    if v == 0 or (1e-3 <= abs(v) < 1e5):
        return f"{v:.4g}"
    return f"{v:.3e}"


def plot_per_frame(values: Any, title: str = "", width: int = 640, height: int = 320,
                   x_label: str = "frame pair", x_offset: int = 0,
                   y_range: Optional[Sequence[float]] = None, marks: Sequence[int] = ()) -> np.ndarray:
    """Draw ``values`` as a line plot with axes, a title and min/max labels.

    Args:
        values: 1-D sequence (list, numpy array or torch tensor) of ``N >= 1`` numbers; NaN/inf
            entries are left out (the line is broken there).
        title: text drawn at the top.
        width, height: image size in pixels (at least 160 x 120).
        x_label: caption of the x axis.
        x_offset: index shown for the first value (x axis runs ``x_offset .. x_offset+N-1``).
        y_range: optional ``(lo, hi)`` for the y axis; default is the finite data's min/max.
        marks: 0-based indices into ``values`` to shade behind the line (e.g. chunk seams).

    Returns:
        ``numpy.float32 [height, width, 3]`` in ``0..1`` (one ComfyUI IMAGE frame; add a leading
        batch axis, ``[None]``, to get a ComfyUI IMAGE batch).
    """
    from PIL import Image, ImageDraw, ImageFont  # noqa: PLC0415

    v = _checked_values(values, width, height)
    width, height = int(width), int(height)
    finite = np.isfinite(v)
    if y_range is not None:
        lo, hi = float(y_range[0]), float(y_range[1])
    elif finite.any():
        lo, hi = float(v[finite].min()), float(v[finite].max())
    else:
        lo, hi = 0.0, 1.0
    img = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    box = (70, 28, width - 16, height - 38)  # plot box x0, y0 (top), x1, y1
    if title:
        draw.text((box[0], 8), str(title), fill=_TEXT, font=font)
    _draw_axes(draw, font, box, v.size, lo, hi, x_label, x_offset, marks)
    _draw_line(draw, box, v, finite, (lo - 0.5, hi + 0.5) if hi <= lo else (lo, hi))
    x0, y0, x1, y1 = box
    if not finite.any():
        draw.text(((x0 + x1) // 2 - 30, (y0 + y1) // 2), "no finite values", fill=_TEXT, font=font)
    elif not math.isclose(lo, hi) and y_range is None:
        mean = float(v[finite].mean())
        draw.text((x1 - 120, 8), f"mean {_fmt(mean)}", fill=_TEXT, font=font)
    return np.asarray(img, dtype=np.float32) / 255.0


def _checked_values(values: Any, width, height) -> np.ndarray:
    """``values`` as a float64 ``[N]`` array; ValueError naming the fix for anything else."""
    v = to_numpy(values)
    v = np.asarray(v, dtype=np.float64).reshape(-1) if v.ndim <= 1 else None
    if v is None:
        raise ValueError("values: expected a 1-D sequence of numbers (one per frame or pair)")
    if v.size == 0:
        raise ValueError("values: empty; pass at least one number to plot")
    if int(width) < 160 or int(height) < 120:
        raise ValueError(f"plot size must be at least 160x120, got {int(width)}x{int(height)}")
    return v


def _draw_axes(draw, font, box, n: int, lo: float, hi: float, x_label: str, x_offset: int, marks) -> None:
    """Shaded marks, grid, axes and their labels."""
    x0, y0, x1, y1 = box
    step = (x1 - x0) / max(n - 1, 1)
    for i in marks:
        if 0 <= i < n:
            cx = x0 + (0.5 if n == 1 else i / (n - 1)) * (x1 - x0)
            draw.rectangle([max(x0, cx - step / 2), y0, min(x1, cx + step / 2), y1], fill=_MARK)
    for frac in (0.25, 0.5, 0.75):
        yy = y1 - frac * (y1 - y0)
        draw.line([(x0, yy), (x1, yy)], fill=_GRID, width=1)
    draw.line([(x0, y0), (x0, y1), (x1, y1)], fill=_AXIS, width=1)
    # y labels: max at top, min at bottom
    draw.text((4, y0 - 6), _fmt(hi), fill=_TEXT, font=font)
    draw.text((4, y1 - 6), _fmt(lo), fill=_TEXT, font=font)
    draw.line([(x0 - 4, y0), (x0, y0)], fill=_AXIS)
    draw.line([(x0 - 4, y1), (x0, y1)], fill=_AXIS)
    draw.text((x0, y1 + 6), str(x_offset), fill=_TEXT, font=font)
    last = str(x_offset + n - 1)
    draw.text((x1 - 7 * len(last), y1 + 6), last, fill=_TEXT, font=font)
    draw.text(((x0 + x1) // 2 - 3 * len(x_label), y1 + 20), x_label, fill=_TEXT, font=font)


def _draw_line(draw, box, v: np.ndarray, finite: np.ndarray, span: tuple[float, float]) -> None:
    """The values as a line, broken at non-finite entries; markers on isolated points (all points if few)."""
    x0, y0, x1, y1 = box
    n, (span_lo, span_hi) = v.size, span

    def to_xy(i: int, val: float):
        fx = 0.5 if n == 1 else i / (n - 1)
        fy = (min(max(val, span_lo), span_hi) - span_lo) / (span_hi - span_lo)
        return (x0 + fx * (x1 - x0), y1 - fy * (y1 - y0))

    segment = []
    for i in range(n + 1):
        if i < n and finite[i]:
            segment.append(to_xy(i, float(v[i])))
            continue
        if len(segment) >= 2:
            draw.line(segment, fill=_LINE, width=2)
        if len(segment) == 1 or n <= 64:
            for (px, py) in segment:
                draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=_LINE)
        segment = []
