"""SCuts: number of scene cuts found by PySceneDetect's AdaptiveDetector (StreamingT2V Sec. 5.1).

StreamingT2V, Sec. 5.1: "SCuts ... counts the number of detected scene cuts in a video using the
AdaptiveDetector with default parameters". Lower is better for a single-shot generated clip.

The frames are fed to a ``scenedetect.SceneManager`` through a small in-memory
``scenedetect.VideoStream`` (no file is written), so the manager's defaults (including its
automatic downscaling of wide frames) apply exactly as for a video file. Works with
PySceneDetect 0.6.x and 0.7.x.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..media.frames import to_uint8
from ._inputs import as_video

__all__ = ["scene_cut_frames", "scene_cuts"]


try:  # optional at import: only scene_cuts needs it
    from scenedetect import FrameTimecode, VideoStream
except ImportError:  # pragma: no cover - depends on the environment
    FrameTimecode, VideoStream = None, object


def _stream_class():
    if FrameTimecode is None:  # pragma: no cover - depends on the environment
        raise ImportError("scene_cuts needs PySceneDetect: pip install scenedetect")
    return _ArrayVideoStream


class _ArrayVideoStream(VideoStream):
    """In-memory ``VideoStream`` over ``uint8 [T, H, W, 3]`` BGR frames."""

    BACKEND_NAME = "streamv2v_array"

    def __init__(self, frames_bgr: np.ndarray, fps: float = 30.0):
        super().__init__()
        self._frames = frames_bgr
        # float fps: required by 0.6.x FrameTimecode, accepted by 0.7.x
        self._fps = float(fps)
        self._pos = 0  # number of frames read so far

    # --- properties -------------------------------------------------------------
    @property
    def path(self) -> str:
        return "<memory>"

    @property
    def name(self) -> str:
        return "frames"

    @property
    def is_seekable(self) -> bool:
        return True

    @property
    def frame_rate(self):
        return self._fps

    @property
    def duration(self):
        return FrameTimecode(len(self._frames), self._fps)

    @property
    def frame_size(self):
        return (int(self._frames.shape[2]), int(self._frames.shape[1]))

    @property
    def aspect_ratio(self) -> float:
        return 1.0

    @property
    def position(self):
        return FrameTimecode(max(0, self._pos - 1), self._fps)

    @property
    def position_ms(self) -> float:
        return max(0, self._pos - 1) * 1000.0 / float(self._fps)

    @property
    def frame_number(self) -> int:
        return self._pos

    # --- methods ----------------------------------------------------------------
    def read(self, decode: bool = True, advance: bool = True):
        idx = self._pos if advance else self._pos - 1
        if idx < 0 or idx >= len(self._frames):
            return False
        if advance:
            self._pos += 1
        return self._frames[idx] if decode else True

    def reset(self) -> None:
        self._pos = 0

    def seek(self, target) -> None:
        if isinstance(target, FrameTimecode):
            frame = target.get_frames()
        elif isinstance(target, float):
            frame = int(round(target * float(self._fps)))
        else:
            frame = int(target)
        self._pos = max(0, min(frame, len(self._frames)))


def scene_cuts(frames: Any) -> int:
    """Number of scene cuts (SCuts) detected by PySceneDetect's ``AdaptiveDetector()``.

    Args:
        frames: video ``[T, H, W, 3]`` floats in 0..1 (numpy or torch), ``T >= 2``. Frames are
            rounded to uint8 RGB and handed to PySceneDetect as BGR (its native order).

    Returns:
        ``int >= 0``: number of detected cuts (= number of scenes - 1). With the default
        ``min_scene_len`` of 15 frames no cut is reported within 15 frames of the start or of the
        previous cut, and the detector's window (2 frames each side) means no cut can be found in
        the first or last 2 frames.
    """
    return len(scene_cut_frames(frames))


def scene_cut_frames(frames: Any) -> list[int]:
    """The frames where :func:`scene_cuts`' cuts fall: each is the first frame of a new scene
    (a cut at ``f`` lies between frames ``f - 1`` and ``f``), sorted."""
    try:
        from scenedetect import SceneManager  # noqa: PLC0415
        from scenedetect.detectors import AdaptiveDetector  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("scene_cuts needs PySceneDetect: pip install scenedetect") from exc

    video = as_video(frames, "frames")
    bgr = np.ascontiguousarray(to_uint8(video)[..., ::-1])
    stream = _stream_class()(bgr)
    manager = SceneManager()
    manager.add_detector(AdaptiveDetector())
    manager.detect_scenes(video=stream)
    scenes = manager.get_scene_list(start_in_scene=True)
    # PySceneDetect 0.7 names it frame_num (get_frames() is deprecated there); 0.6 has get_frames() only
    return [int(getattr(start, "frame_num", None) or start.get_frames()) for start, _ in scenes[1:]]
