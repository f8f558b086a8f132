"""The stream's only frame loop: frames -> (similarity filter) -> encode -> pipeline -> decode -> outputs.

Every path that runs frames (the sampler node, the loop node, scripts and benchmarks) goes
through the engine's ``run_stream`` (nodes/engine/run.py), which drives ``StreamRunner``: the
model call, the encoder and decoder are handed in, so this file holds no ComfyUI code. Each
input is a ``Frame`` (stream/frame.py) that carries its own stamp and conditioning; each
output names the frame whose pixels it holds. What the runner carries from one run to the
next lives in ``RunnerState`` (frame numbers, the similarity filter, frames in flight with
their inputs and their own per-frame data), so N runs of k frames give the frames of one run
of N*k.

No non-finite value leaves the runner unsaid: each decoded frame carries a device flag saying whether
it and its latent were finite, checked before an optional ``finish`` (the uint8 conversion) and copied
down with the image (no host sync); the host checks a float image it receives anyway, and a frame
that is not finite is handed out as ``Output.held`` with the last finite image.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch

from .frame import Frame, Output, as_frame
from .pipeline import InFlight, StreamPipeline
from .similarity import SimilarityFilter
from .transfer import Handoff

# encode(image [H, W, 3] on the host) -> latent [1, C, h, w]; decode(denoised [1, C, h, w]) -> image [H, W, 3]
Encode = Callable[[torch.Tensor], torch.Tensor]
Decode = Callable[[torch.Tensor], torch.Tensor]
# admit(frame, latent) -> the engine's data for the frame (its conditioning rows), kept until the frame leaves
Admit = Callable[[Frame, torch.Tensor], object]


@dataclass
class RunnerState:
    """What a stream carries from one run to the next."""

    next_frame: int = 0
    filter: SimilarityFilter | None = None
    in_flight: InFlight | None = None
    in_flight_inputs: collections.deque = field(default_factory=collections.deque)  # Frames, oldest first
    last_output: tuple[torch.Tensor, Frame] | None = None  # the last finished image and the frame it came from
    frame_data: dict[int, object] = field(default_factory=dict)  # frame in flight -> what ``admit`` gave it

    def drop_in_flight(self) -> None:
        """Forget the frames in flight (a run that stopped half way, or a run that does not keep them)."""
        self.in_flight, self.in_flight_inputs, self.frame_data = None, collections.deque(), {}


class StreamRunner:
    """One run over ``inputs`` through ``pipeline``; ``on_output(Output)`` in input order.

    keep_in_flight: leave the last ``S - 1`` frames in the pipeline for the next run (one
    model call per input, outputs ``S - 1`` inputs late; while the pipeline fills, the oldest
    input in flight is shown). Otherwise the pipeline drains: N inputs give N outputs.
    """

    def __init__(self, state: RunnerState, pipeline: StreamPipeline, stream_batch: bool, keep_in_flight: bool,
                 encode: Encode, decode: Decode, admit: Admit, on_output: Callable[[Output], None],
                 finish: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.state, self.pipeline = state, pipeline
        self.finish = finish  # applied on the device after the finiteness check, before the download (uint8)
        self.stream_batch, self.keep = stream_batch, keep_in_flight
        self.encode, self.decode, self.admit, self.on_output = encode, decode, admit, on_output
        self.inputs = self.outputs = self.reused = 0
        self.sources: dict[int, tuple[Frame, list[int]]] = {}  # frame in flight -> (its Frame, inputs it answers)
        self.last_finite: torch.Tensor | None = None  # the last finite image handed out (held for one that is not)
        self.last_flag: torch.Tensor | None = None  # whether ``state.last_output`` was finite (a device bool)

    def run(self, inputs: Iterable, size: tuple[int, int]) -> None:
        """Push every input (a ``Frame`` or an image ``[H, W, 3]``, all of ``size`` (H, W)) and hand out every
        finished frame."""
        state, handoff = self.state, Handoff(self._deliver)
        try:
            for index, item in enumerate(inputs):
                frame = as_frame(item, index)
                self.inputs += 1
                if tuple(frame.image.shape[:2]) != size:
                    raise ValueError(f"frame {index} is {frame.image.shape[1]}x{frame.image.shape[0]}, the stream "
                                     f"started at {size[1]}x{size[0]}: all frames must have one size")
                if state.filter is not None and state.filter.skip(frame.image):  # host-side: the frame is on the host
                    self._skipped(frame, handoff)
                    continue
                self._push(frame)
                self._advance(frame, handoff)
            while not self.keep and len(self.pipeline):
                self._finish(self.pipeline.step(), None, handoff)
            state.in_flight = self.pipeline.state if self.keep else None
        except BaseException:
            state.drop_in_flight()  # partly written: the next run starts its pipeline anew
            raise
        finally:
            handoff.flush()

    def _push(self, frame: Frame) -> None:
        state = self.state
        latent = self.encode(frame.image)
        number, state.next_frame = state.next_frame, state.next_frame + 1
        data = state.frame_data[number] = self.admit(frame, latent)
        self.pipeline.push(number, latent, getattr(data, "schedule", None))  # its own (a live strength or seed)
        if self.keep:
            state.in_flight_inputs.append(frame)
        else:
            self.sources[number] = (frame, [frame.index])

    def _advance(self, frame: Frame, handoff: Handoff) -> None:
        """One model call (stream batch), or every call of this frame (sequential)."""
        while True:
            finished = self.pipeline.step()
            if finished is not None:
                self._finish(finished, frame, handoff)
            elif self.keep:  # still filling: show the oldest frame in flight as it came in
                oldest = self.state.in_flight_inputs[0]
                handoff.put(([frame.index], oldest, False), oldest.image)
            if self.stream_batch or not len(self.pipeline):
                return

    def _finish(self, finished, entering: Frame | None, handoff: Handoff) -> None:
        """A frame left the pipeline: decode it and answer the inputs waiting for it."""
        if finished is None:
            return
        number, denoised = finished
        self.state.frame_data.pop(number, None)
        image = self.decode(denoised)
        finite = _finite_on_device(image, denoised)  # a device bool: travels down with the image, no sync
        if self.finish is not None:
            image = self.finish(image)
        if self.keep:  # the output answers the input entering now and shows the oldest frame in flight
            source = self.state.in_flight_inputs.popleft()
            indices = [entering.index]
        else:
            source, indices = self.sources.pop(number)
        self.state.last_output = (image, source)
        self.last_flag = finite
        handoff.put((indices, source, False), image, finite)

    def _skipped(self, frame: Frame, handoff: Handoff) -> None:
        """A frame the similarity filter skipped reuses the last processed frame's output."""
        self.reused += 1
        pending = [n for n in self.sources if self.sources[n][1]]
        if not self.keep and pending:
            self.sources[max(pending)][1].append(frame.index)
        elif self.state.last_output is not None:
            image, source = self.state.last_output
            handoff.put(([frame.index], source, True), image, self.last_flag)
        elif self.keep and self.state.in_flight_inputs:
            oldest = self.state.in_flight_inputs[0]
            handoff.put(([frame.index], oldest, True), oldest.image)

    def _deliver(self, payload, image: torch.Tensor, finite: torch.Tensor | None) -> None:
        indices, source, reused = payload
        held = not _finite(image) or (finite is not None and not bool(np.asarray(finite).all()))
        if held:
            grey = 128 if image.dtype == torch.uint8 else 0.5
            image = self.last_finite if self.last_finite is not None else torch.full_like(image, grey)
        else:
            self.last_finite = image
        for k, index in enumerate(indices):
            # Inputs that joined a frame still in the pipeline (skipped while it was denoised) reuse its output.
            self.on_output(Output(index, image, source, reused=reused or k > 0, held=held))
            self.outputs += 1


def _finite(image: torch.Tensor) -> bool:
    """Whether every value of a host image is finite. Read through NumPy: on a GPU this is the pinned copy the
    handoff already waited for, so the read costs no device sync (``counting.SyncCounter``, which cannot tell a
    host copy from a device tensor in a CPU run, would count a torch read as one)."""
    if image.device.type == "cpu" and image.dtype in (torch.float16, torch.float32, torch.float64):
        return bool(np.isfinite(np.asarray(image)).all())
    return bool(torch.isfinite(image).all())


def _finite_on_device(image: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """A 0-dim bool on the image's device: every value of ``image`` ``[H, W, 3]`` and of its ``latent`` is finite (a
    decoder may clamp an inf away; an fp16 VAE may make NaN of a finite latent). Read after the download."""
    return torch.isfinite(image).all() & torch.isfinite(latent).all().to(image.device)
