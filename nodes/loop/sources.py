"""From the loop nodes' inputs to a stream of frames: which source, which frames, what size."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any, Iterable, Iterator

import comfy.model_management

from ...streamv2v_core.media.frames import FrameResizer, StreamSizer, select_frames
from ...streamv2v_core.live.session import BrowserSession, live_frames
from ...streamv2v_core.live.take import TakeSource
from ...streamv2v_core.media.video_io import CameraSource, ImageFolderSource, VideoFileSource
from ...streamv2v_core.stream.frame import Frame
from ..input_files import allowed_folder, resolve_input
from ..node_status import NodeStatus
from ..video_input import open_video
from .instrument import open_take

log = logging.getLogger("streamv2v")

VIDEO_FILE, IMAGE_FOLDER, CAMERA, BROWSER, TAKE = "video file", "image folder", "camera", "browser webcam", "take"
SOURCES = (VIDEO_FILE, IMAGE_FOLDER, CAMERA, BROWSER, TAKE)  # new choices go last (saved workflows keep theirs)
FILE_SOURCES = (VIDEO_FILE, IMAGE_FOLDER, TAKE)
LIVE_SOURCES = (CAMERA, BROWSER)
_END = object()  # a reader's end


@dataclass(frozen=True)
class FramePick:
    """Which frames of the source are used, and at what size."""

    skip_first: int = 0
    every_nth: int = 1
    max_frames: int = 0
    width: int = 0
    height: int = 0
    resize_mode: str = "crop"

    def sizer(self) -> StreamSizer:
        """Checks the size options (ValueError naming the fix) and returns a sizer for one stream."""
        return StreamSizer(FrameResizer(self.width, self.height, self.resize_mode))


@dataclass(frozen=True)
class SourceChoice:
    """Where frames come from."""

    source: str = VIDEO_FILE
    file: str = ""
    camera_index: int = 0
    fps: float = 0.0  # the MP4's rate for sources without their own (image folders) and for live recordings

    def open(self, video: Any = None, session: BrowserSession | None = None, sizer: StreamSizer | None = None,
             status: NodeStatus | None = None, record=None, idle_timeout: float = 0.0):
        """An open reader (``streamv2v_core.media.video_io`` protocol); errors before any work.

        A connected ``video`` is the source when ``source`` is "video file"; the browser
        source reads ``session``, needs the stream's ``sizer`` and the node's ``status`` (``record``: gets
        every frame it uses, as it came: a take), and ends after ``idle_timeout`` seconds without a frame
        (0: never); a take is read back with the stream's ``sizer``.
        """
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")
        if video is not None:
            if self.source != VIDEO_FILE:
                raise ValueError(f"a VIDEO is connected but source is {self.source!r}: set source to "
                                 f"'{VIDEO_FILE}' to restyle the connected video, or disconnect it")
            return open_video(video)
        if self.source == VIDEO_FILE:
            return VideoFileSource(resolve_input(self.file))
        if self.source == IMAGE_FOLDER:
            return ImageFolderSource(resolve_input(self.file), allowed=allowed_folder(self.file))
        if self.source == CAMERA:
            return CameraSource(self.camera_index)
        if self.source == TAKE:
            return TakeSource(open_take(self.file), sizer.hint)
        return BrowserSource(session, sizer, status, record, idle_timeout)

    @property
    def live(self) -> bool:
        return self.source in LIVE_SOURCES

    @property
    def timed(self) -> bool:
        """Whether frames carry the time they were captured (live sources, and a take re-rendered): the MP4 then
        places them at those times on a constant-rate grid."""
        return self.live or self.source == TAKE

    def rate(self, reader, every_nth: int, camera_fps: float | None = None) -> Fraction:
        """The MP4's frame rate: ``fps`` when set for an image folder or a timed source; else the source's (over
        ``every_nth``), a live camera's own (``camera_fps``: what the browser said), or 24 (image folder) / 30."""
        if self.fps and (self.timed or (self.source == IMAGE_FOLDER and reader.fps is None)):
            return Fraction(self.fps).limit_denominator(1001)
        if reader.fps:
            return Fraction(reader.fps).limit_denominator(1001) / (1 if self.timed else every_nth)
        if camera_fps:
            return Fraction(camera_fps).limit_denominator(1001)
        return Fraction(30 if self.timed else 24)


class _NoFrames(Exception):
    """The browser sent no frame for ``idle_timeout`` seconds."""


class BrowserSource:
    """The browser webcam of a session as a reader: yields ``Frame``s (with their stamps) until Stop, or until
    no frame came for ``idle_timeout`` seconds (0: wait for ever; ``ended_idle`` then says how long it waited):
    a page closed without Stop must not hold ComfyUI's queue.

    While no frame comes it says so on the node (``status``, the node's NodeStatus) instead of
    hanging silently, and honours Cancel.
    """

    fps = total = ended_early = None
    total_exact = False
    name = "browser webcam"

    def __init__(self, session: BrowserSession, sizer: StreamSizer, status: NodeStatus, record=None,
                 idle_timeout: float = 0.0):
        self.session, self.sizer, self.status, self.record = session, sizer, status, record
        self.idle_timeout = float(idle_timeout)
        self.said = 0
        self.ended_idle: float | None = None

    def audio(self, skip_seconds: float = 0.0) -> None:
        return None

    def __iter__(self) -> Iterator[Frame]:
        try:
            yield from live_frames(self.session, self.sizer.hint, self._idle, record=self.record)
        except _NoFrames:
            return

    def _idle(self, seconds: float) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        if self.idle_timeout and seconds >= self.idle_timeout:
            self.ended_idle = self.idle_timeout
            log.info("StreamV2V session %r: no frame for %g s: the loop ends (idle_timeout)", self.session.name,
                     self.idle_timeout)
            raise _NoFrames()
        if seconds >= 2.0 and int(seconds) != self.said:  # about once a second
            self.said = int(seconds)
            ends = f"; the loop ends at {self.idle_timeout:g} s" if self.idle_timeout else ""
            self.status.say(f"waiting for webcam frames: none for {seconds:.0f} s (press ● Start on the node's "
                            f"panel, or Stop{ends})")

    def close(self) -> None:
        pass


class FrameStream:
    """The frames a loop runs on: picked, sized, checked for cancel and Stop between frames.

    Iterate it once; it yields ``Frame``s of the stream's size (a live source's frames keep their
    stamps and arrival times; ``live``: frames without one are stamped with their arrival here, e.g. a
    server camera's). Afterwards ``read`` (frames given) and ``stopped`` (Stop pressed) say how it ended.
    """

    def __init__(self, reader: Iterable, pick: FramePick, sizer: StreamSizer, session: BrowserSession,
                 live: bool = False):
        self.reader, self.pick, self.sizer, self.session, self.live = reader, pick, sizer, session, live
        self.read = 0
        self.stopped = False

    def __iter__(self) -> Iterator[Frame]:
        p = self.pick
        for item in select_frames(self._until_stopped(), p.skip_first, p.every_nth, p.max_frames):
            frame = item if isinstance(item, Frame) else Frame(item)
            if self.live and frame.received_at is None:
                frame = replace(frame, received_at=time.monotonic())
            self.read += 1
            yield replace(frame, image=self.sizer(frame.image))

    def _until_stopped(self):
        # Stop is checked before each read, not after: a live frame the reader took from the session before
        # Stop was pressed (and was decoding meanwhile) is written, not lost between the session's counters.
        items = iter(self.reader)
        while not self.session.stopped:
            item = next(items, _END)
            if item is _END:
                break
            comfy.model_management.throw_exception_if_processing_interrupted()
            yield item
        if self.session.stopped:
            self.stopped = True
            log.info("StreamV2V loop: stop requested (session %r)", self.session.name)
