"""What a frame carries from its source to the sink, and what a run reports.

A frame's data travels *with* the frame: its capture stamp, when it arrived, and the
conditioning it entered the stream with. An output names the frame whose pixels it holds,
so the sink never matches stamps by position (with frames in flight, output i shows input
i - (S - 1)): latency, the prompt in effect and the recording's timeline are read off the
output itself. Pure data: no ComfyUI import.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .conditioning import FrameConditioning


@dataclass
class Frame:
    """One input frame and what travels with it.

    image: ``[H, W, 3]`` float in 0..1, on the host.
    index: position among this run's inputs (set by the engine as the frame enters).
    stamp: the sender's own capture stamp (the browser's clock, in ms), echoed back with the output.
    received_at: ``time.monotonic()`` on the server when a live frame arrived (None for files).
    conditioning: what the run's steering gave the frame as it entered the stream (None: the run's own).
    """

    image: torch.Tensor
    index: int = 0
    stamp: float | None = None
    received_at: float | None = None
    conditioning: FrameConditioning | None = None


@dataclass(frozen=True)
class Output:
    """The answer to input ``index``: N inputs give N outputs, in input order.

    image: ``[H, W, 3]`` on the host. source: the frame whose pixels the image holds (itself,
    an earlier frame while frames in flight fill the pipeline, or the frame whose output a
    skipped input reuses). reused: the similarity filter skipped this input. held: the frame
    came out not finite (NaN or inf: a broken model, an fp16 overflow): ``image`` is the last
    finite output instead (mid-grey before the first one).
    """

    index: int
    image: torch.Tensor
    source: Frame
    reused: bool = False
    held: bool = False


@dataclass
class RunReport:
    """What one run of the engine did (returned by the engine; nothing to look up afterwards)."""

    frames_in: int = 0
    frames_out: int = 0
    reused: int = 0                       # inputs the similarity filter answered with an earlier output
    seconds: float = 0.0                  # wall time of the run
    first_output_s: float | None = None   # from the run's start to its first output (includes any warm-up)
    held: int = 0                         # outputs that came out not finite (each replaced by the last good one)
    held_inputs: list[int] = field(default_factory=list)  # the first few of their input indices

    def fps(self) -> float:
        """Outputs per second over the run (0 when it took no time)."""
        return self.frames_out / self.seconds if self.seconds > 0 else 0.0


def as_frame(item, index: int) -> Frame:
    """``item`` (a Frame or an image ``[H, W, 3]``) as the run's input ``index``."""
    if isinstance(item, Frame):
        return item if item.index == index else replace(item, index=index)
    return Frame(image=item, index=index)
