"""Frame sources of the loop nodes: pure I/O (numpy, PyAV, OpenCV, torch).

Every source yields frames ``Tensor[H, W, 3]`` float32 in 0..1, one at a time (O(1) memory),
and checks what it can when opened, so bad input fails before any model work. Each has
``fps`` (Fraction or None), ``total`` (declared frame count or None), ``total_exact``
(whether ``total`` is counted rather than estimated), ``audio(skip_seconds)`` (an audio
track for the MP4, or None) and ``close()``:

- ``VideoFileSource(source)``  a file PyAV (or, for paths, OpenCV) decodes; a path or the
                               file's bytes, optionally a trim window
- ``TensorSource(images)``     frames already in memory (a ComfyUI VIDEO built from components)
- ``ImageFolderSource(path)``  the images of a folder in name order; unreadable ones skipped
- ``CameraSource(index)``      an OpenCV capture device on this machine

A file that decodes fewer frames than it declares ends early with ``ended_early`` set.
"""
from __future__ import annotations

import io
import logging
import math
import os
from fractions import Fraction
from typing import Iterator

import av
import cv2
import numpy as np
import torch

from ..file_rules import FileRefused, check_pixels, read_image_bytes
from .frames import selected_count, to_tensor
from .mp4_writer import AudioFile, AudioSamples

log = logging.getLogger("streamv2v")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


class VideoFileSource:
    """Frames of a video file (a path, or the bytes of a whole file).

    ``start``/``duration`` (seconds; 0 = to the end) keep a window of the video, as ComfyUI's
    trimmed VIDEO does. Opening decodes the first frame: a missing file, a file that is no
    video and a video without frames raise ``FileNotFoundError`` / ``ValueError`` here,
    before any work. A decoding error later ends the stream (``ended_early`` says why).
    """

    def __init__(self, source: str | bytes, name: str | None = None, start: float = 0.0, duration: float = 0.0):
        self.source = source
        self.name = name or (os.path.basename(source) if isinstance(source, str) else "video")
        if isinstance(source, str) and not os.path.isfile(source):
            raise FileNotFoundError(f"video file not found: {self.name!r} (put it in ComfyUI's input folder)")
        self.start, self.duration = float(start), float(duration)
        self.has_audio = False
        self.total_exact = False
        self.ended_early: str | None = None
        try:
            self._open_pyav()
        except FileRefused:
            raise
        except (av.error.FFmpegError, ValueError, IndexError, StopIteration) as pyav_error:
            if not (isinstance(source, str) and not self.start and not self.duration and self._open_opencv()):
                raise ValueError(f"{self.name!r} is not a video PyAV or OpenCV can read ({pyav_error})") from None
        if self._first is None:
            self.close()
            why = f" ({self.ended_early})" if self.ended_early else " in its trim window" if self.start else ""
            raise ValueError(f"video {self.name!r} has no frames{why}")
        self.size = tuple(self._first.shape[:2])  # (height, width) of the frames as decoded
        if self.total and isinstance(source, (str, bytes)) and self.total > _byte_count(source):
            # A header can declare any count (1e9 frames in a 400 KB file); no frame takes less than a byte.
            self.total, self.total_exact = None, False

    def _open_pyav(self) -> None:
        container = av.open(io.BytesIO(self.source) if isinstance(self.source, bytes) else self.source)
        try:
            if not container.streams.video:
                raise ValueError("no video stream")
            stream = container.streams.video[0]
            # From the header, before any frame is decoded (an 8K frame is 100 MB as RGB, 400 MB as float).
            check_pixels(stream.codec_context.width or 0, stream.codec_context.height or 0, f"video {self.name!r}")
            stream.thread_type = "AUTO"
            rate = stream.average_rate or stream.guessed_rate or Fraction(30)
            self.fps = Fraction(rate)
            self.total, self.total_exact = _declared_frames(stream, self.fps, self.start, self.duration)
            self.has_audio = bool(container.streams.audio)
            self._frames = self._decode(container, stream)
            self._first = next(self._frames, None)
        except BaseException:
            container.close()
            raise
        self._close = container.close

    def _decode(self, container, stream) -> Iterator[torch.Tensor]:
        """Frames in the trim window; a decoding error ends them (recorded in ``ended_early``)."""
        base = stream.time_base or Fraction(1, 1_000_000)
        start_pts = int(self.start / base) if self.start else None
        end_pts = int((self.start + self.duration) / base) if self.duration else None
        if start_pts:
            container.seek(start_pts, stream=stream)
        count = 0
        try:
            for frame in container.decode(stream):
                if start_pts is not None and frame.pts is not None and frame.pts < start_pts:
                    continue
                if end_pts is not None and frame.pts is not None and frame.pts >= end_pts:
                    return
                count += 1
                yield to_tensor(frame.to_ndarray(format="rgb24"))
        except (av.error.FFmpegError, EOFError) as error:
            self.ended_early = f"decoding stopped after {count} frames: {error}"

    def _open_opencv(self) -> bool:
        capture = cv2.VideoCapture(self.source)
        if capture.isOpened():
            try:
                check_pixels(int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
                             f"video {self.name!r}")
            except FileRefused:
                capture.release()
                raise
        ok, bgr = capture.read() if capture.isOpened() else (False, None)
        if not ok:
            capture.release()
            return False
        self.fps = Fraction(capture.get(cv2.CAP_PROP_FPS) or 30).limit_denominator(1001)
        self.total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
        self._first = to_tensor(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
        self._frames = _opencv_frames(capture)
        self._close = capture.release
        return True

    def audio(self, skip_seconds: float = 0.0) -> AudioFile | None:
        """The audio for frames from ``skip_seconds`` after the window's start on, or None."""
        return AudioFile(self.source, self.start + skip_seconds) if self.has_audio else None

    def __iter__(self) -> Iterator[torch.Tensor]:
        first, self._first = self._first, None
        if first is not None:
            yield first
        yield from self._frames

    def close(self) -> None:
        self._close()


def _declared_frames(stream, fps: Fraction, start: float, duration: float) -> tuple[int | None, bool]:
    """(frames the stream declares in the window, whether that is the container's count)."""
    if stream.frames and not start and not duration:
        return int(stream.frames), True
    seconds = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else 0.0
    if seconds:
        seconds = max(0.0, seconds - start)
    if duration:
        seconds = min(seconds, duration) if seconds else duration
    return (round(seconds * float(fps)) or None), False


def _byte_count(source: str | bytes) -> int:
    return len(source) if isinstance(source, bytes) else os.path.getsize(source)


def _opencv_frames(capture) -> Iterator[torch.Tensor]:
    while True:
        ok, bgr = capture.read()
        if not ok:
            return
        yield to_tensor(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


class TensorSource:
    """Frames already in memory: ``images [N, H, W, C]`` in 0..1, yielded one by one (no copy)."""

    total_exact = True
    ended_early = None

    def __init__(self, images: torch.Tensor, fps: Fraction | float | None, audio: AudioSamples | None = None,
                 name: str = "video"):
        if images is None or images.ndim != 4 or images.shape[0] == 0:
            raise ValueError(f"the {name} holds no frames")
        self.images, self.name, self._audio = images, name, audio
        self.fps = Fraction(fps).limit_denominator(1001) if fps else None
        self.total = int(images.shape[0])

    def audio(self, skip_seconds: float = 0.0) -> AudioSamples | None:
        if self._audio is None:
            return None
        return AudioSamples(self._audio.samples, self._audio.rate, self._audio.start + skip_seconds)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for image in self.images:
            yield image[..., :3]

    def close(self) -> None:
        pass


class ImageFolderSource:
    """The images of a folder, in name order (PNG, JPEG, WebP, BMP, TIFF); no fps, no audio.

    Every file is read by ``file_rules.read_image_bytes``: a link leaving ``allowed`` (default:
    the folder itself), a header that declares more than ``MAX_SOURCE_PIXELS`` or a file that
    does not decode is skipped with a warning naming it (``skipped``: "name (why)"), so one bad
    file neither ends a long run nor is read; a folder with no readable image at all fails.
    """

    fps = None
    total_exact = True
    ended_early = None

    def __init__(self, path: str, allowed: str | None = None):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"image folder not found: {os.path.basename(path)!r}")
        self.name = os.path.basename(os.path.normpath(path))
        self.allowed = allowed or path
        self.files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not self.files:
            raise ValueError(f"folder {self.name!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        self.total = len(self.files)
        self.skipped: list[str] = []

    def audio(self, skip_seconds: float = 0.0) -> None:
        return None

    def __iter__(self) -> Iterator[torch.Tensor]:
        given = 0
        for file in self.files:
            try:
                rgb = self._read(file)
            except FileRefused as why:
                self.skipped.append(f"{os.path.basename(file)} ({why})")
                log.warning("StreamV2V: skipped image %r in folder %r: %s", os.path.basename(file), self.name, why)
                continue
            given += 1
            yield to_tensor(rgb)
        if not given:
            raise ValueError(f"folder {self.name!r}: none of its {len(self.files)} images could be read: "
                             f"{'; '.join(self.skipped[:3])}{'; ...' if len(self.skipped) > 3 else ''}")

    def _read(self, file: str) -> np.ndarray:
        """``uint8 [H, W, 3]`` RGB of one file, after the file rule; ``FileRefused`` if it cannot be used."""
        data = read_image_bytes(self.allowed, file)
        try:
            bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        except cv2.error as error:
            raise FileRefused(f"OpenCV cannot decode it ({str(error).strip().splitlines()[-1]})") from None
        if bgr is None:
            raise FileRefused("OpenCV cannot decode it")
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    def close(self) -> None:
        pass


class CameraSource:
    """A camera attached to this machine (OpenCV device index); runs until stopped."""

    total = None
    total_exact = False
    ended_early = None

    def __init__(self, index: int):
        self.capture = cv2.VideoCapture(int(index))
        ok, bgr = self.capture.read() if self.capture.isOpened() else (False, None)
        if not ok:
            self.capture.release()
            raise ValueError(f"camera {index} did not open (no such device, busy, or no permission): check the "
                             f"index; /dev/video{index} is the usual device on Linux")
        rate = self.capture.get(cv2.CAP_PROP_FPS)
        self.fps = Fraction(rate).limit_denominator(1001) if rate and rate > 0 else None
        self._first = to_tensor(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))

    def audio(self, skip_seconds: float = 0.0) -> None:
        return None

    def __iter__(self) -> Iterator[torch.Tensor]:
        first, self._first = self._first, None
        if first is not None:
            yield first
        yield from _opencv_frames(self.capture)

    def close(self) -> None:
        self.capture.release()


def shortfall(source, read: int, skip_first: int = 0, every_nth: int = 1) -> str | None:
    """Why a source that ran to its end gave fewer than the frames it declares, or None.

    ``read``: frames taken from it after skipping/picking. A counted total must be met
    exactly; an estimated one (from the duration) may be one frame or 2% short.
    """
    total = None if source.total is None else source.total - len(getattr(source, "skipped", ()))
    expected = selected_count(total, skip_first, every_nth)
    if source.ended_early:
        return f"{source.name!r}: {source.ended_early} (it declares {expected or 'an unknown number of'} frames)"
    if not expected:
        return None
    missing = expected - read
    slack = 0 if source.total_exact else max(1, math.ceil(0.02 * expected))
    if missing > slack:
        return f"{source.name!r} declares {expected} frames but only {read} could be read: it may be truncated"
    return None

