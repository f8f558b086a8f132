"""Where a loop's restyled frames go: the MP4, the node's preview and status, the browser."""
from __future__ import annotations

import logging
import time
from fractions import Fraction

from ...streamv2v_core.media.frames import fit_to, to_uint8
from ...streamv2v_core.live.session import BrowserSession
from ...streamv2v_core.media.mp4_writer import AudioFile, AudioSamples, Mp4Writer
from ...streamv2v_core.stream.frame import Output
from ..node_status import NodeStatus
from ..output_files import OutputFile, reserve_output

log = logging.getLogger("streamv2v")


class LoopSink:
    """Takes restyled frames in order (``put``, the engine's ``on_output``) and sends each on at once.

    The MP4 (``prefix`` given) is created on the first frame, so input the engine refuses
    before its first output leaves no file behind. With a browser ``session`` each frame is
    published there with the stamp of the frame its pixels came from (``Output.source``).
    """

    def __init__(self, prefix: str | None, rate: Fraction | None, audio: AudioFile | AudioSamples | None,
                 status: NodeStatus, session: BrowserSession | None = None, times: list[int] | None = None,
                 recorder=None):
        self.prefix, self.rate, self.audio = prefix, rate, audio
        self.times, self.recorder = times, recorder  # a take's output times (re-rendered); a take being recorded
        self.status, self.session = status, session
        self.output: OutputFile | None = None
        self.writer: Mp4Writer | None = None
        self.size: tuple[int, int] | None = None
        self.frames, self.last = 0, None
        self.first_at = self.last_at = 0.0

    def put(self, out: Output) -> None:
        """Output ``out`` (image ``[H, W, 3]``) is finished: write, publish and show it now."""
        image = out.image.detach().cpu()
        self.last_at = time.monotonic()
        if self.size is None:
            self.first_at = self.last_at
            self.size = tuple(image.shape[:2])
            if self.prefix is not None:
                self.output = reserve_output(self.prefix)
                self.writer = Mp4Writer(self.output.path, self.size[1], self.size[0], self.rate, self.audio)
        image = fit_to(image, *self.size)
        pixels = to_uint8(image)  # once, for the MP4, the browser and the preview
        if self.writer is not None:
            at = self.times[self.frames] if self.times and self.frames < len(self.times) else None
            self.writer.write(pixels, at_ms=at)
            if self.recorder is not None:
                self.recorder.output(self.frames, self.writer.last_ms)
        self.frames, self.last = self.frames + 1, image
        if self.session is not None:
            self.session.publish(pixels, out.source.stamp)
        self.status.frame(self.frames, pixels, self.progress_text())

    def fps(self) -> float:
        """Frames per second from the first frame to the last (0 before the second)."""
        return (self.frames - 1) / (self.last_at - self.first_at) if self.last_at > self.first_at else 0.0

    def progress_text(self) -> str:
        text = f"{self.frames}/{self.status.total or '?'} frames, {self.fps():.1f} fps"
        dropped = drops_text(self.session)
        return f"{text} · {dropped}" if dropped else text

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def drops_text(session: BrowserSession | None) -> str:
    """'dropped 3 live frames (2 undecodable, 1 too small)', or '' when none were."""
    if session is None or not session.dropped:
        return ""
    parts = ", ".join(f"{count} {reason}" for reason, count in sorted(session.dropped.items()))
    return f"dropped {sum(session.dropped.values())} live frames ({parts})"
