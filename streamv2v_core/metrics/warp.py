"""Flow-based temporal-consistency metrics: warp error, optical-flow score (OFS) and MAWE.

Definitions
-----------
* **Warp error** — StreamV2V paper, Sec. 5.3.1 "Warp error" (after Lai et al., ECCV 2018,
  "Learning Blind Video Temporal Consistency"): optical flow is computed between consecutive
  frames of the *input* (source) video, each frame of the *transferred* (output) video is warped
  to the next frame with that flow, and the mean squared pixel error over the un-occluded pixels
  is averaged over all consecutive pairs.
* **OFS** (optical flow score) — StreamingT2V paper, Sec. 12 "MAWE Definition": "the mean of the
  squared magnitudes of all optical flow vectors between any two consecutive frames".
* **MAWE** (motion aware warp error) — StreamingT2V paper, Sec. 12, Eq. (13):
  ``MAWE(V) := W(V) / OFS(V)`` with ``W(V)`` the mean warp error of video ``V``.
* **Flow-magnitude std** — StreamingT2V appendix 9.3 (randomized blending ablation): "the standard
  deviation of the optical flow magnitudes between consecutive frames", lower is smoother. Read
  here as the std across consecutive pairs of each pair's mean flow magnitude (px), so a seam
  between chunks, a jump in the motion, raises it.

Implementation choices (differences from the papers)
----------------------------------------------------
* Flow estimator: the papers use RAFT (Teed & Deng 2020); here OpenCV's DIS optical flow
  (``cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)``) on grayscale uint8 frames
  is used, so absolute numbers are not directly comparable with the papers' tables.
* Resolution: StreamingT2V resizes all videos to 720x720 before computing flow metrics; pass
  ``size=(720, 720)`` to do the same. By default frames are used at their own size (OFS, being a
  squared pixel displacement, scales with the square of the resolution).
* Pixel scale: errors are on the 0..255 scale, computed in float64 (inputs are 0..1 floats and
  are multiplied by 255; nothing is subtracted in uint8).

Warping convention (one consecutive pair ``t -> t+1``)
------------------------------------------------------
``F_b = flow(S[t+1] -> S[t])`` and ``F_f = flow(S[t] -> S[t+1])`` are computed on the source video
``S`` (or on the output itself when no source is given); ``flow(A -> B)(p)`` is the displacement
such that ``A(p) ~ B(p + flow(p))``. The output frame ``O[t]`` is *backward warped* onto the pixel
grid of frame ``t+1`` with ``cv2.remap`` (bilinear):
``Ŵ[t](p) = O[t](p + F_b(p))``, and compared with ``O[t+1](p)``.
A pixel ``p`` of frame ``t+1`` is excluded (occluded / unreliable) when

* its flow leaves the frame: ``p + F_b(p)`` is outside ``[0, W-1] x [0, H-1]``; or
* it fails the forward-backward check of Lai et al. (2018), with ``F_f`` sampled at the matched
  location, ``F̂_f(p) = F_f(p + F_b(p))``:
  ``|F_b + F̂_f|^2 > 0.01 (|F_b|^2 + |F̂_f|^2) + 0.5``.

(Lai et al. additionally drop motion boundaries; that check is not part of the brief used here.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from ..media.frames import to_uint8
from ._inputs import as_video, check_same_shape

__all__ = [
    "WarpErrorResult",
    "MaweResult",
    "warp_error",
    "flow_score",
    "mawe",
    "flow_magnitude_std",
    "flow_magnitudes",
    "mawe_value",
    "compute_flows",
    "occlusion_mask",
    "backward_warp",
]

# Forward-backward consistency constants of Lai et al. 2018 (also used by Ruder et al. 2016).
_FB_ALPHA = 0.01
_FB_BETA = 0.5


def _cv2():
    try:
        import cv2  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "The flow metrics need OpenCV: pip install opencv-python-headless"
        ) from exc
    return cv2


@dataclass
class WarpErrorResult:
    """Result of :func:`warp_error`.

    Attributes:
        per_pair: ``T-1`` floats; entry ``t`` is the MSE (0..255 scale, so in ``0..65025``)
            between ``warp(O[t])`` and ``O[t+1]`` over un-occluded pixels; ``nan`` when a pair
            has no un-occluded pixel.
        mean: mean of ``per_pair`` ignoring NaN (``nan`` if all are NaN). This is the video's
            warp error ``W(V)``.
        valid_fraction: ``T-1`` floats in ``0..1``, the fraction of pixels of frame ``t+1`` that
            were used (not occluded, flow inside the frame).
        flow_from: ``"source"`` when the flow came from ``source_frames``, ``"output"`` when it was
            computed on the output video itself.
    """

    per_pair: List[float]
    mean: float
    valid_fraction: List[float] = field(default_factory=list)
    flow_from: str = "source"

    def __float__(self) -> float:
        return float(self.mean)


@dataclass
class MaweResult:
    """Result of :func:`mawe`.

    Attributes:
        mawe: ``warp_error / (c * flow_score)``; lower is better; ``inf`` when the video has no
            motion (``flow_score == 0``), i.e. a static video gets the worst score.
        warp_error: ``W(V)``, mean warp error on the 0..255 scale (see :func:`warp_error`).
        flow_score: ``OFS(V)``, mean squared flow magnitude in px^2 (see :func:`flow_score`).
        c: the scale constant used (1.0 = the published definition).
        warp: the full :class:`WarpErrorResult` behind ``warp_error`` (per-pair values), so a
            caller that wants both does not compute the flows twice.
        flow_per_pair: ``T-1`` floats, each pair's mean squared flow magnitude (px^2; their mean
            is ``flow_score``).
        magnitude_per_pair: ``T-1`` floats, each pair's mean flow magnitude (px).
    """

    mawe: float
    warp_error: float
    flow_score: float
    c: float = 1.0
    warp: Optional["WarpErrorResult"] = None
    flow_per_pair: List[float] = field(default_factory=list)
    magnitude_per_pair: List[float] = field(default_factory=list)

    def __float__(self) -> float:
        return float(self.mawe)


def _resize_video(frames: np.ndarray, size: Optional[Tuple[int, int]]) -> np.ndarray:
    if size is None:
        return frames
    cv2 = _cv2()
    h, w = int(size[0]), int(size[1])
    if h < 2 or w < 2:
        raise ValueError(f"size must be (height, width) with both >= 2, got {size!r}")
    if frames.shape[1:3] == (h, w):
        return frames
    shrink = h * w < frames.shape[1] * frames.shape[2]
    interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return np.stack([cv2.resize(f, (w, h), interpolation=interp) for f in frames]).astype(np.float32)


def _gray_u8(frames: np.ndarray) -> List[np.ndarray]:
    cv2 = _cv2()
    return [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in to_uint8(frames)]


def compute_flows(frames: Any, size: Optional[Tuple[int, int]] = None,
                  backward: bool = True) -> List[Tuple[np.ndarray, Optional[np.ndarray]]]:
    """DIS optical flow between consecutive frames (the papers use RAFT instead).

    Args:
        frames: video ``[T, H, W, 3]`` floats in 0..1 (numpy or torch), ``T >= 2``.
        size: optional ``(H, W)`` to resize the frames to first.
        backward: also compute the backward flows.

    Returns:
        ``T-1`` tuples ``(F_f, F_b)`` of ``float32 [H, W, 2]`` arrays (x, y displacement in
        pixels): ``F_f = flow(frame t -> t+1)``, ``F_b = flow(frame t+1 -> t)`` (``None`` when
        ``backward`` is False). Flow is computed on the rounded uint8 grayscale frames.
    """
    video = _resize_video(as_video(frames, "frames"), size)
    return _flows_of(video, backward)


MIN_FLOW_SIDE = 12  # OpenCV's DIS flow refuses smaller frames (a raw cv2.error)


def _flows_of(video: np.ndarray, backward: bool) -> List[Tuple[np.ndarray, Optional[np.ndarray]]]:
    """video: ``[T, H, W, C]``; flows as ``compute_flows``. ValueError for frames under 12 pixels a side."""
    if min(video.shape[1:3]) < MIN_FLOW_SIDE:
        raise ValueError(f"frames of {video.shape[2]}x{video.shape[1]} are too small for optical flow (at least "
                         f"{MIN_FLOW_SIDE} pixels a side): use flow_size 16 or more, or larger frames")
    cv2 = _cv2()
    gray = _gray_u8(video)
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    out = []
    for a, b in zip(gray[:-1], gray[1:]):
        fw = dis.calc(a, b, None)
        bw = dis.calc(b, a, None) if backward else None
        out.append((fw, bw))
    return out


def _sampling_grid(flow: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    h, w = flow.shape[:2]
    xs, ys = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return xs + flow[..., 0], ys + flow[..., 1]


def backward_warp(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Backward-warp ``image`` with ``flow``: ``out(p) = image(p + flow(p))`` (bilinear, cv2.remap).

    Args:
        image: ``[H, W, C]`` or ``[H, W]`` float array (any scale; float64 is kept as float64).
        flow: ``[H, W, 2]`` displacement in pixels defined on the *output* grid.

    Returns:
        Array shaped like ``image``; samples falling outside the image are 0.
    """
    cv2 = _cv2()
    map_x, map_y = _sampling_grid(flow)
    src = image if image.dtype in (np.float32, np.float64) else image.astype(np.float64)
    return cv2.remap(src, map_x, map_y, interpolation=cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def occlusion_mask(flow_b: np.ndarray, flow_f: np.ndarray) -> np.ndarray:
    """Pixels of frame ``t+1`` that must be excluded from the warp error.

    Args:
        flow_b: ``[H, W, 2]`` flow from frame ``t+1`` to frame ``t``.
        flow_f: ``[H, W, 2]`` flow from frame ``t`` to frame ``t+1``.

    Returns:
        ``bool [H, W]``, True where the pixel is occluded (forward-backward check of Lai et al.
        2018: ``|F_b + F̂_f|^2 > 0.01 (|F_b|^2 + |F̂_f|^2) + 0.5`` with ``F̂_f(p) = F_f(p + F_b(p))``)
        or where ``p + F_b(p)`` leaves the frame.
    """
    h, w = flow_b.shape[:2]
    map_x, map_y = _sampling_grid(flow_b)
    outside = (map_x < 0) | (map_x > w - 1) | (map_y < 0) | (map_y > h - 1)
    fb = flow_b.astype(np.float64)
    ff = backward_warp(flow_f.astype(np.float64), flow_b)
    lhs = np.sum((fb + ff) ** 2, axis=-1)
    rhs = _FB_ALPHA * (np.sum(fb ** 2, axis=-1) + np.sum(ff ** 2, axis=-1)) + _FB_BETA
    return outside | (lhs > rhs)


def _pair_error(prev_out: np.ndarray, next_out: np.ndarray, flow_f: np.ndarray,
                flow_b: np.ndarray) -> Tuple[float, float]:
    """MSE (0..255 scale) between backward-warped ``prev_out`` and ``next_out`` over valid pixels."""
    prev255 = prev_out.astype(np.float64) * 255.0
    next255 = next_out.astype(np.float64) * 255.0
    warped = backward_warp(prev255, flow_b)
    valid = ~occlusion_mask(flow_b, flow_f)
    n = int(valid.sum())
    frac = n / valid.size
    if n == 0:
        return float("nan"), frac
    sq = (warped - next255) ** 2  # float64, so no wrap-around
    return float(sq[valid].mean()), frac


def _prepare(output_frames: Any, source_frames: Any,
             size: Optional[Tuple[int, int]]) -> Tuple[np.ndarray, np.ndarray, str]:
    out = as_video(output_frames, "output_frames")
    if source_frames is None:
        src, flow_from = out, "output"
    else:
        src = as_video(source_frames, "source_frames")
        check_same_shape(out, src)
        flow_from = "source"
    out = _resize_video(out, size)
    src = out if flow_from == "output" else _resize_video(src, size)
    return out, src, flow_from


def _warp_error_from_flows(out: np.ndarray, flows: Sequence[Tuple[np.ndarray, np.ndarray]],
                           flow_from: str) -> WarpErrorResult:
    per_pair, fracs = [], []
    for t, (ff, fb) in enumerate(flows):
        err, frac = _pair_error(out[t], out[t + 1], ff, fb)
        per_pair.append(err)
        fracs.append(frac)
    arr = np.asarray(per_pair, dtype=np.float64)
    mean = float(np.nanmean(arr)) if np.any(np.isfinite(arr)) else float("nan")
    return WarpErrorResult(per_pair=per_pair, mean=mean, valid_fraction=fracs, flow_from=flow_from)


def warp_error(output_frames: Any, source_frames: Any = None,
               size: Optional[Tuple[int, int]] = None) -> WarpErrorResult:
    """Warp error of a (stylised) video, StreamV2V Sec. 5.3.1 / Lai et al. 2018.

    For every consecutive pair, flow is computed on ``source_frames`` (the input video, as in the
    paper) — or on ``output_frames`` itself when no source is given — and output frame ``t`` is
    backward-warped onto frame ``t+1`` with ``cv2.remap`` using the flow from ``t+1`` to ``t``.
    The error of the pair is the mean squared difference (0..255 scale, float64) to output frame
    ``t+1`` over the pixels that pass the occlusion check (see the module docstring). Flow is DIS
    (OpenCV); the paper used RAFT.

    Args:
        output_frames: ``[T, H, W, 3]`` floats in 0..1 (numpy or torch), ``T >= 2``.
        source_frames: optional input video of the same shape, frame-aligned with the output.
        size: optional ``(H, W)`` to resize both videos to before measuring (StreamingT2V used
            720x720).

    Returns:
        :class:`WarpErrorResult` with ``per_pair`` (length ``T-1``) and ``mean``. Range
        ``0..65025``; 0 for a perfectly consistent video; typical stylised videos ~100.

    Raises:
        ValueError: on fewer than 2 frames, a channel count other than 3, values outside 0..1,
            or output/source of different length or size.
    """
    out, src, flow_from = _prepare(output_frames, source_frames, size)
    flows = _flows_of(src, backward=True)
    return _warp_error_from_flows(out, flows, flow_from)


def _pair_flow_stats(flows: Sequence[Tuple[np.ndarray, Any]]) -> Tuple[List[float], List[float]]:
    """Per pair: mean squared forward-flow magnitude (px^2) and mean magnitude (px)."""
    squared = [np.sum(ff.astype(np.float64) ** 2, axis=-1) for ff, _ in flows]
    return [float(np.mean(sq)) for sq in squared], [float(np.mean(np.sqrt(sq))) for sq in squared]


def _ofs_from_flows(flows: Sequence[Tuple[np.ndarray, Any]]) -> float:
    return float(np.mean(_pair_flow_stats(flows)[0]))


def flow_magnitudes(flows: Sequence[Tuple[np.ndarray, Any]]) -> List[float]:
    """Each pair's mean forward-flow magnitude ``mean_p |F_f[t](p)|`` (px), from :func:`compute_flows`."""
    return _pair_flow_stats(flows)[1]


def flow_magnitude_std(frames: Any, size: Optional[Tuple[int, int]] = None) -> float:
    """Std of the optical-flow magnitude across frames (StreamingT2V appendix 9.3; lower is smoother).

    ``std_t m_t`` (population std) with ``m_t`` the mean DIS flow magnitude (px) from frame ``t``
    to ``t+1`` of ``frames`` (``[T, H, W, 3]`` in 0..1, ``T >= 2``); 0 for steady motion. The
    paper averages it over its test videos and reports 8.72 (chunks enhanced independently),
    6.01 (shared noise) and 3.32 (randomized blending), with RAFT flow.
    """
    video = _resize_video(as_video(frames, "frames"), size)
    return float(np.std(flow_magnitudes(_flows_of(video, backward=False))))


def flow_score(frames: Any, size: Optional[Tuple[int, int]] = None) -> float:
    """Optical flow score (OFS), StreamingT2V Sec. 12: mean squared flow magnitude.

    ``OFS = mean over pairs t and pixels p of |F_f[t](p)|^2`` with ``F_f[t]`` the (DIS; the paper
    used RAFT) flow from frame ``t`` to ``t+1``. Units are px^2 per frame pair: a video translating
    by ``d`` px per frame has ``OFS ~ d^2``. Depends on resolution (pass ``size`` to normalise;
    StreamingT2V used 720x720).

    Args:
        frames: ``[T, H, W, 3]`` floats in 0..1 (numpy or torch), ``T >= 2``.
        size: optional ``(H, W)`` to resize to first.

    Returns:
        ``float >= 0``.
    """
    video = _resize_video(as_video(frames, "frames"), size)
    return _ofs_from_flows(_flows_of(video, backward=False))


def mawe(output_frames: Any, source_frames: Any = None, c: float = 1.0,
         size: Optional[Tuple[int, int]] = None) -> MaweResult:
    """Motion aware warp error, StreamingT2V Sec. 12, Eq. (13): ``MAWE(V) = W(V) / OFS(V)``.

    ``W(V)`` is :func:`warp_error` ``.mean`` and ``OFS(V)`` is :func:`flow_score`, both computed
    from the *same* flow fields: those of ``source_frames`` when given (V2V setting, as in the
    StreamV2V warp error), else those of ``output_frames``. Low MAWE = consistent *and* moving;
    a static video (``OFS == 0``) gets ``inf``.

    ``c`` scales the denominator, ``W / (c * OFS)``. The definition in the paper version used here
    has no constant (``c = 1``, the default). The authors' released script divides by
    ``coeff * motion`` with ``coeff = 9.5`` by default (and, unlike the paper text, uses the mean
    un-squared flow magnitude and averages per-pair ratios); pass ``c=9.5`` only to mimic that
    scale factor.

    Returns:
        :class:`MaweResult` (``float(result)`` gives the MAWE value).
    """
    if not (isinstance(c, (int, float)) and np.isfinite(c) and c > 0):
        raise ValueError(f"c must be a positive finite number, got {c!r}")
    out, src, flow_from = _prepare(output_frames, source_frames, size)
    flows = _flows_of(src, backward=True)
    warp = _warp_error_from_flows(out, flows, flow_from)
    w = warp.mean
    squared, magnitudes = _pair_flow_stats(flows)
    ofs = float(np.mean(squared))
    return MaweResult(mawe=mawe_value(w, ofs, c), warp_error=float(w), flow_score=ofs, c=float(c), warp=warp,
                      flow_per_pair=squared, magnitude_per_pair=magnitudes)


def mawe_value(warp: float, ofs: float, c: float = 1.0) -> float:
    """``warp / (c * ofs)``: NaN without a warp error, inf without motion."""
    if not np.isfinite(warp):
        return float("nan")
    if ofs <= 0.0:
        return float("inf")
    return float(warp / (c * ofs))
