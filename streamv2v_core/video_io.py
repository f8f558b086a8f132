"""Frame sources and the MP4 sink of the loop nodes: pure I/O (numpy, PyAV, OpenCV, torch).

Every source yields frames ``Tensor[H, W, 3]`` float32 in 0..1, one at a time (O(1) memory),
and checks what it can when opened, so bad input fails before any model work:

- ``VideoFileSource(path)``   any file PyAV (or, failing that, OpenCV) decodes
- ``ImageFolderSource(path)`` the images of a folder in name order
- ``CameraSource(index)``     an OpenCV capture device on this machine
- ``BrowserSession``          frames the browser posts (``SESSIONS`` registry, see webcam routes)

``select_frames`` applies skip / every n-th / cap, ``FrameResizer`` the target size, and
``Mp4Writer`` encodes each frame as it comes (fragmented MP4: what is written stays playable)
and copies the source's audio for the time span written.
"""
from __future__ import annotations

import collections
import logging
import math
import os
import threading
import time
from fractions import Fraction
from typing import Callable, Iterable, Iterator

import av
import cv2
import numpy as np
import torch

log = logging.getLogger("streamv2v")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
MP4_AUDIO_CODECS = {"aac", "mp3", "ac3", "eac3", "alac", "flac", "opus"}


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """``uint8 [H, W, 3]`` RGB -> ``float32 [H, W, 3]`` in 0..1."""
    return torch.from_numpy(np.ascontiguousarray(rgb[..., :3])).float().div_(255.0)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """``[H, W, 3]`` in 0..1 -> ``uint8 [H, W, 3]`` (contiguous)."""
    return np.ascontiguousarray((image.detach()[..., :3].float().clamp(0, 1) * 255).round().byte().cpu().numpy())


# --------------------------------------------------------------------------- sources

class VideoFileSource:
    """Frames of a video file. ``fps`` (Fraction), ``total`` (int or None), ``has_audio``.

    Opening decodes the first frame: a missing file, a file that is no video and a video
    without frames raise ``FileNotFoundError`` / ``ValueError`` here, before any work.
    """

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"video file not found: {path!r} (put it in ComfyUI's input folder or give "
                                    f"an absolute path)")
        self.path = path
        self.has_audio = False
        try:
            self._open_pyav()
        except (av.error.FFmpegError, ValueError, IndexError, StopIteration) as pyav_error:
            if not self._open_opencv():
                raise ValueError(f"{os.path.basename(path)!r} is not a video PyAV or OpenCV can read "
                                 f"({pyav_error})") from None
        if self._first is None:
            self.close()
            raise ValueError(f"video {os.path.basename(path)!r} has no frames")

    def _open_pyav(self) -> None:
        container = av.open(self.path)
        try:
            if not container.streams.video:
                raise ValueError("no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = stream.average_rate or stream.guessed_rate or Fraction(30)
            self.fps = Fraction(rate)
            frames = stream.frames or 0
            if not frames and stream.duration and stream.time_base:
                frames = round(float(stream.duration * stream.time_base) * float(self.fps))
            self.total = frames or None
            self.has_audio = bool(container.streams.audio)
            self._frames = (to_tensor(f.to_ndarray(format="rgb24")) for f in container.decode(stream))
            self._first = next(self._frames, None)
        except BaseException:
            container.close()
            raise
        self._close = container.close

    def _open_opencv(self) -> bool:
        capture = cv2.VideoCapture(self.path)
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

    def __iter__(self) -> Iterator[torch.Tensor]:
        first, self._first = self._first, None
        if first is not None:
            yield first
        yield from self._frames

    def close(self) -> None:
        self._close()


def _opencv_frames(capture) -> Iterator[torch.Tensor]:
    while True:
        ok, bgr = capture.read()
        if not ok:
            return
        yield to_tensor(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


class ImageFolderSource:
    """The images of a folder, in name order (PNG, JPEG, WebP, BMP, TIFF); no fps, no audio."""

    fps = None
    has_audio = False

    def __init__(self, path: str):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"image folder not found: {path!r}")
        self.files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not self.files:
            raise ValueError(f"folder {path!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        self.total = len(self.files)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for file in self.files:
            bgr = cv2.imread(file, cv2.IMREAD_COLOR)
            if bgr is None:
                raise ValueError(f"cannot read image {file!r}")
            yield to_tensor(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))

    def close(self) -> None:
        pass


class CameraSource:
    """A camera attached to this machine (OpenCV device index); runs until stopped."""

    total = None
    has_audio = False

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

    def __iter__(self) -> Iterator[torch.Tensor]:
        first, self._first = self._first, None
        if first is not None:
            yield first
        yield from _opencv_frames(self.capture)

    def close(self) -> None:
        self.capture.release()


class BrowserSession:
    """Frames posted by the browser for one session, and the newest restyled frame to send back.

    The browser may post faster than the model runs: only the ``keep`` newest frames wait,
    older ones are dropped (live video wants the present, not a backlog).
    """

    def __init__(self, name: str, keep: int = 2):
        self.name = name
        self._frames: collections.deque = collections.deque(maxlen=keep)
        self._ready = threading.Condition()
        self.stopped = False
        self.running = False
        self.frames_in = 0
        self.frames_out = 0
        self.output_jpeg: bytes | None = None

    def push(self, encoded: bytes) -> None:
        """Queue an encoded image (JPEG/PNG/WebP bytes) from the browser."""
        with self._ready:
            self._frames.append(encoded)
            self.frames_in += 1
            self._ready.notify_all()

    def stop(self) -> None:
        """Ask the running loop to finish (it finalises its file and returns normally)."""
        with self._ready:
            self.stopped = True
            self._ready.notify_all()

    def start(self) -> None:
        """Called by the loop when it starts: forget old frames and an old stop request."""
        with self._ready:
            self._frames.clear()
            self.stopped = False
            self.running = True
            self.frames_out = 0

    def next_frame(self, timeout: float) -> torch.Tensor | None:
        """The oldest waiting frame ``[H, W, 3]``, or None after ``timeout`` seconds or a stop."""
        with self._ready:
            if not self._frames and not self.stopped:
                self._ready.wait(timeout)
            if self.stopped or not self._frames:
                return None
            encoded = self._frames.popleft()
        return decode_image(encoded)

    def frames(self, idle: Callable[[], None], first_timeout: float = 60.0) -> Iterator[torch.Tensor]:
        """Frames until a stop; ``idle()`` runs while waiting (raise there to cancel)."""
        started, got_any = time.monotonic(), False
        while not self.stopped:
            frame = self.next_frame(0.1)
            if frame is None:
                idle()
                if not got_any and time.monotonic() - started > first_timeout:
                    raise TimeoutError(f"no frames from the browser webcam (session {self.name!r}) in "
                                       f"{first_timeout:.0f} s: press 'Start webcam' on the node")
                continue
            got_any = True
            yield frame

    def publish(self, image: torch.Tensor, quality: int = 85) -> None:
        """Keep ``image [H, W, 3]`` as the newest restyled frame (JPEG) for the browser."""
        bgr = cv2.cvtColor(to_uint8(image), cv2.COLOR_RGB2BGR)
        ok, data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if ok:
            self.output_jpeg = data.tobytes()
            self.frames_out += 1


class SessionRegistry:
    """Browser sessions by name; ``reset()`` stops and forgets them."""

    def __init__(self):
        self._sessions: dict[str, BrowserSession] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> BrowserSession:
        with self._lock:
            if name not in self._sessions:
                self._sessions[name] = BrowserSession(name)
            return self._sessions[name]

    def reset(self, name: str | None = None) -> None:
        with self._lock:
            names = [name] if name is not None else list(self._sessions)
            for key in names:
                session = self._sessions.pop(key, None)
                if session is not None:
                    session.stop()


SESSIONS = SessionRegistry()


def decode_image(encoded: bytes) -> torch.Tensor:
    """Encoded image bytes -> ``[H, W, 3]`` in 0..1; ValueError if they are no image."""
    bgr = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError("the browser sent data that is not an image")
    return to_tensor(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


# --------------------------------------------------------------------------- frame options

def select_frames(frames: Iterable[torch.Tensor], skip_first: int = 0, every_nth: int = 1,
                  max_frames: int = 0) -> Iterator[torch.Tensor]:
    """Drop ``skip_first`` frames, then keep every ``every_nth``, at most ``max_frames`` (0 = all)."""
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


# --------------------------------------------------------------------------- MP4 sink

class Mp4Writer:
    """H.264 MP4 written frame by frame; ``close()`` (in a ``finally``) finishes it.

    The MP4 is fragmented at every key frame (one a second) and each frame is encoded as it
    arrives without look-ahead, so if the process dies, all but the last second stays
    playable; ``close()`` (also on cancel or error) keeps every frame. (A fragment per frame
    would lose less on a crash, but ffmpeg's MP4 muxer then shifts the audio packet that
    opens each fragment onto its successor's time, dropping audio.) ``fps``: a Fraction for a
    constant frame rate, or None to stamp frames with the wall clock (live sources).
    ``audio=(path, start_seconds)``: copy that file's first audio track from
    ``start_seconds`` on, as long as the video written so far (remuxed when MP4 can hold its
    codec, else re-encoded to AAC).
    """

    def __init__(self, path: str, width: int, height: int, fps: Fraction | None,
                 audio: tuple[str, float] | None = None, crf: int = 18):
        self.path, self.width, self.height = path, width, height
        self.fps = Fraction(fps) if fps else None
        self.frames = 0
        self._clock_start: float | None = None
        self._last_pts = -1
        gop = max(1, round(float(self.fps))) if self.fps else 30
        self.container = av.open(path, mode="w", format="mp4",
                                 container_options={"movflags": "frag_keyframe+empty_moov+default_base_moof",
                                                    "flush_packets": "1"})
        try:
            self.video = self.container.add_stream("libx264", rate=self.fps or 30)
            self.video.width, self.video.height, self.video.pix_fmt = width, height, "yuv420p"
            self._time_base = (1 / self.fps) if self.fps else Fraction(1, 1000)
            self.video.codec_context.time_base = self._time_base
            self.video.options = {"preset": "veryfast", "tune": "zerolatency", "crf": str(crf), "g": str(gop)}
            self._audio = _AudioCopy(self.container, *audio) if audio else None
        except BaseException:
            self.container.close()
            raise

    def write(self, image: torch.Tensor) -> None:
        """Encode ``image [height, width, 3]`` in 0..1 and mux it (and the audio up to its end)."""
        if tuple(image.shape[:2]) != (self.height, self.width):
            raise ValueError(f"frame is {image.shape[1]}x{image.shape[0]}, the MP4 is {self.width}x{self.height}")
        frame = av.VideoFrame.from_ndarray(to_uint8(image), format="rgb24")
        if self.fps:
            frame.pts = self.frames
            frame.time_base = self._time_base
        else:
            now = time.monotonic()
            self._clock_start = now if self._clock_start is None else self._clock_start
            frame.pts = max(self._last_pts + 1, round((now - self._clock_start) * 1000))
            frame.time_base = self._time_base
        self._last_pts = frame.pts
        for packet in self.video.encode(frame):
            self.container.mux(packet)
        self.frames += 1
        if self._audio:
            self._audio.copy_until(self.duration())

    def duration(self) -> float:
        """Seconds of video written (end of the last frame)."""
        if self.fps:
            return self.frames / float(self.fps)
        return (self._last_pts + 1) / 1000.0 if self.frames else 0.0

    def close(self) -> None:
        """Flush the encoder, write the rest of the audio span, close the file (safe to call twice)."""
        if self.container is None:
            return
        try:
            for packet in self.video.encode(None):
                self.container.mux(packet)
            if self._audio:
                self._audio.copy_until(self.duration(), final=True)
        finally:
            if self._audio:
                self._audio.close()
            self.container.close()
            self.container = None


class _AudioCopy:
    """Copies a span of a file's first audio track into an open output container."""

    def __init__(self, output, path: str, start: float):
        self.input = av.open(path)
        try:
            source = self.input.streams.audio[0]
            self.start = start
            self.remux = source.codec_context.name in MP4_AUDIO_CODECS
            if self.remux:
                self.stream = output.add_stream_from_template(source)
            else:
                rate = source.codec_context.sample_rate or 48000
                self.stream = output.add_stream("aac", rate=rate)
                channels = source.codec_context.layout.nb_channels if source.codec_context.layout else 2
                self.stream.layout = "mono" if channels == 1 else "stereo"
                self.resampler = av.AudioResampler(format="fltp", layout=self.stream.layout, rate=rate)
                self.samples = 0
            self.source, self.output = source, output
            self.packets = self.input.demux(source)
            self.pending = None
        except BaseException:
            self.input.close()
            raise

    def copy_until(self, end: float, final: bool = False) -> None:
        """Copy what starts before ``start + end`` seconds of the source."""
        limit = self.start + end
        while True:
            packet = self.pending or next(self.packets, None)
            self.pending = None
            if packet is None:
                break
            if packet.pts is None or (self.remux and packet.dts is None):
                continue
            when = float(packet.pts * packet.time_base)
            if when >= limit:
                self.pending = packet
                break
            if when < self.start:
                continue
            self._write(packet)
        if final and not self.remux:
            self._mux_encoded(self.stream.encode(None))

    def _write(self, packet) -> None:
        if self.remux:
            shift = round(self.start / packet.time_base)
            packet.pts -= shift
            packet.dts -= shift
            packet.stream = self.stream
            self.output.mux(packet)
            return
        for frame in packet.decode():
            for resampled in self.resampler.resample(frame):
                resampled.pts = self.samples
                self.samples += resampled.samples
                self._mux_encoded(self.stream.encode(resampled))

    def _mux_encoded(self, packets) -> None:
        # AAC's first packet (encoder priming) has a negative time; it would shift the video
        # in the fragmented MP4, so it is left out.
        for out in packets:
            if out.pts is None or out.pts >= 0:
                self.output.mux(out)

    def close(self) -> None:
        self.input.close()
