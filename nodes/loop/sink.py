"""Where a loop's restyled frames go: the MP4, the node's preview and status, the browser and the stage's viewers."""
from __future__ import annotations

import logging
import time
from fractions import Fraction

import numpy as np

from ...streamv2v_core.live.session import BrowserSession
from ...streamv2v_core.media.frame_grid import MAX_HOLD_S, FrameGrid
from ...streamv2v_core.media.frames import fit_to, to_uint8
from ...streamv2v_core.media.mp4_writer import AudioFile, AudioSamples, Mp4Writer
from ...streamv2v_core.media.writer_thread import WriterThread
from ...streamv2v_core.stream.frame import Output
from ..node_status import NodeStatus
from ..output_files import OutputFile, reserve_output
from ..wording import plural

log = logging.getLogger("streamv2v")
OWN_PROMPT = "the workflow's own prompt"


class LoopSink:
    """Takes restyled frames in order (``put``, the engine's ``on_output``) and sends each on at once.

    On the loop's thread only what must be there: the frame to uint8 once, and the node's status (ComfyUI's
    progress hook also checks for Cancel, which belongs to the loop's thread). The MP4 encoding and the JPEG
    for the browser and the stage's viewers run on a writer thread behind a bounded queue
    (``streamv2v_core/media/writer_thread.py``): the loop goes on with the next model call meanwhile, and no
    viewer can reach it. ``close()`` (in a ``finally``) waits until every frame handed over is written.

    The MP4 (``prefix`` given) is created on the first frame, so input the engine refuses before its first
    output leaves no file behind. Files and folders are written frame after frame at ``rate``; a ``timed``
    recording (a live source, a take re-rendered) places each frame at its source frame's arrival time on a
    ``rate`` grid (``FrameGrid``: the last frame held through gaps up to ``max_hold_s``), so the MP4 lasts as long
    as the take, and a take re-rendered gets the live MP4's timeline. Each frame is published to the ``session``
    with the stamp of the frame its pixels came from (``Output.source``) when the source is ``live`` or anyone
    watches; the prompt it was made with is the session's "in effect".
    """

    def __init__(self, prefix: str | None, rate: Fraction | None, audio: AudioFile | AudioSamples | None,
                 status: NodeStatus, session: BrowserSession | None = None, live: bool = False,
                 timed: bool = False, max_hold_s: float = MAX_HOLD_S, recorder=None):
        self.prefix, self.rate, self.audio = prefix, rate, audio
        self.status, self.session, self.live = status, session, live
        self.grid = FrameGrid(rate, max_hold_s) if timed and rate and prefix is not None else None
        self.recorder = recorder  # a take being recorded: it keeps each output's time on the MP4's timeline
        self.first_captured: float | None = None
        self.output: OutputFile | None = None
        self.writer: Mp4Writer | None = None
        self.size: tuple[int, int] | None = None
        self.frames, self.last = 0, None
        self.first_at = self.last_at = 0.0
        self.thread: WriterThread | None = None  # started with the first frame
        self.loop_s = 0.0  # time the loop's thread spent here (the writer thread's work is not in it)

    def put(self, out: Output) -> None:
        """Output ``out`` (image ``[H, W, 3]``) is finished: hand it to the writer thread, show it on the node."""
        started = time.perf_counter()
        image = out.image.detach().cpu()
        self.last_at = time.monotonic()
        if self.size is None:
            self.first_at = self.last_at
            self.size = tuple(image.shape[:2])
            self.thread = WriterThread(self._write)
            if self.prefix is not None:
                self.output = reserve_output(self.prefix)
                self.writer = Mp4Writer(self.output.path, self.size[1], self.size[0], self.rate, self.audio)
        image = fit_to(image, *self.size)
        pixels = to_uint8(image)  # once, for the MP4, the browser and the preview
        self.frames, self.last = self.frames + 1, image
        source = out.source
        captured_at = source.received_at if source.received_at is not None else self.last_at
        self.thread.put((pixels, captured_at, source.stamp))
        if self.recorder is not None:
            self.first_captured = captured_at if self.first_captured is None else self.first_captured
            self.recorder.output(self.frames - 1, round((captured_at - self.first_captured) * 1000))
        if self.session is not None:
            label = source.conditioning.label if source.conditioning is not None else None
            self.session.params.shown(source.index, label or OWN_PROMPT)
        self.status.frame(self.frames, pixels, self.progress_text())
        self.loop_s += time.perf_counter() - started
        if self.session is not None:  # for the status route: whether the writer keeps up
            self.session.writer = {"frames": self.frames, "loop_ms": round(self.loop_s * 1000, 1),
                                   "waited_ms": round(self.thread.waited_s * 1000, 1)}

    def _write(self, item: tuple[np.ndarray, float, float | None]) -> None:
        """On the writer thread: the MP4, then the browser and the stage's viewers."""
        pixels, captured_at, stamp = item
        if self.writer is not None:
            for picture in (self.grid.add(pixels, captured_at) if self.grid is not None else [pixels]):
                self.writer.write(picture)
        if self.session is not None and (self.live or self.session.watched()):
            self.session.publish(pixels, stamp)

    def fps(self) -> float:
        """Frames per second from the first frame to the last (0 before the second)."""
        return (self.frames - 1) / (self.last_at - self.first_at) if self.last_at > self.first_at else 0.0

    def progress_text(self) -> str:
        text = f"{self.frames}/{self.status.total or '?'} frames, {self.fps():.1f} fps"
        dropped = drops_text(self.session if self.live else None)
        return f"{text} · {dropped}" if dropped else text

    def recording_text(self) -> str:
        """What the live recording's grid did: 'the MP4 holds 12.3 s at 30 fps (...)', or ''."""
        if self.grid is None or self.writer is None:
            return ""
        notes = [f"{plural(self.grid.replaced, 'frame')} captured faster than the grid replaced"] \
            if self.grid.replaced else []
        if self.grid.cut_s:
            notes.append(f"gaps longer than {self.grid.max_hold / self.grid.fps:g} s shortened by "
                         f"{self.grid.cut_s:.1f} s")
        extra = f" ({'; '.join(notes)})" if notes else ""
        return (f"the MP4 holds {self.grid.duration():.1f} s at {float(self.rate):g} fps, each frame at its "
                f"capture time{extra}")

    def close(self) -> None:
        """Write every frame handed over (also on cancel or error), then finish the MP4."""
        try:
            if self.thread is not None:
                self.thread.close()
        finally:
            if self.writer is not None:
                try:
                    if self.grid is not None:
                        for picture in self.grid.close():
                            self.writer.write(picture)
                finally:
                    self.writer.close()


def drops_text(session: BrowserSession | None) -> str:
    """'dropped 3 live frames (2 undecodable, 1 too small)', or '' when none were."""
    if session is None or not session.dropped:
        return ""
    parts = ", ".join(f"{count} {reason}" for reason, count in sorted(session.dropped.items()))
    return f"dropped {sum(session.dropped.values())} live frames ({parts})"
