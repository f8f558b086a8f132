"""The stream's only frame loop: inputs -> (similarity filter) -> encode -> pipeline -> decode -> outputs.

Every path that runs frames (the sampler node, the loop node, scripts and benchmarks) goes
through ``StreamLoop``: the model call, the encoder and decoder are handed in, so this file
holds no ComfyUI code. What the loop carries from one run to the next lives in
``LoopState`` (frame numbers, the similarity filter, frames in flight with their inputs and
their own per-frame data), so N runs of k frames give the frames of one run of N*k.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from .pipeline import InFlight, StreamPipeline
from .similarity import SimilarityFilter
from .transfer import Handoff

# encode(image [H, W, 3] on the host) -> latent [1, C, h, w]; decode(denoised [1, C, h, w]) -> image [H, W, 3]
Encode = Callable[[torch.Tensor], torch.Tensor]
Decode = Callable[[torch.Tensor], torch.Tensor]
# admit(input index, image, latent) -> the frame's own data (its conditioning), kept until the frame leaves
Admit = Callable[[int, torch.Tensor, torch.Tensor], object]


@dataclass
class LoopState:
    """What a stream carries from one run to the next."""

    next_frame: int = 0
    filter: SimilarityFilter | None = None
    in_flight: InFlight | None = None
    in_flight_inputs: collections.deque = field(default_factory=collections.deque)  # host images, oldest first
    last_image: torch.Tensor | None = None
    frame_data: dict[int, object] = field(default_factory=dict)  # frame in flight -> what ``admit`` gave it

    def drop_in_flight(self) -> None:
        """Forget the frames in flight (a run that stopped half way, or a run that does not keep them)."""
        self.in_flight, self.in_flight_inputs, self.frame_data = None, collections.deque(), {}


class StreamLoop:
    """One run over ``inputs`` through ``pipeline``; ``on_output(index, image)`` in input order.

    keep_in_flight: leave the last ``S - 1`` frames in the pipeline for the next run (one
    model call per input, outputs ``S - 1`` inputs late; while the pipeline fills, the oldest
    input in flight is shown). Otherwise the pipeline drains: N inputs give N outputs.
    """

    def __init__(self, state: LoopState, pipeline: StreamPipeline, stream_batch: bool, keep_in_flight: bool,
                 encode: Encode, decode: Decode, admit: Admit, on_output: Callable[[int, torch.Tensor], None]):
        self.state, self.pipeline = state, pipeline
        self.stream_batch, self.keep = stream_batch, keep_in_flight
        self.encode, self.decode, self.admit, self.on_output = encode, decode, admit, on_output
        self.outputs = 0
        self.sources: dict[int, list[int]] = {}  # frame in flight -> input indices it answers

    def run(self, inputs: Iterable[torch.Tensor], size: tuple[int, int]) -> None:
        """Push every input ``[H, W, 3]`` (all of ``size`` (H, W)) and hand out every finished frame."""
        state, handoff = self.state, Handoff(self._deliver)
        try:
            for index, image in enumerate(inputs):
                if tuple(image.shape[:2]) != size:
                    raise ValueError(f"frame {index} is {image.shape[1]}x{image.shape[0]}, the stream started at "
                                     f"{size[1]}x{size[0]}: all frames must have one size")
                if state.filter is not None and state.filter.skip(image):  # host-side: the frame is on the host
                    self._skipped(index, handoff)
                    continue
                self._push(index, image)
                self._advance(index, handoff)
            while not self.keep and len(self.pipeline):
                self._finish(self.pipeline.step(), None, handoff)
            state.in_flight = self.pipeline.state if self.keep else None
        except BaseException:
            state.drop_in_flight()  # partly written: the next run starts its pipeline anew
            raise
        finally:
            handoff.flush()

    def _push(self, index: int, image: torch.Tensor) -> None:
        state = self.state
        latent = self.encode(image)
        frame, state.next_frame = state.next_frame, state.next_frame + 1
        state.frame_data[frame] = self.admit(index, image, latent)
        self.pipeline.push(frame, latent)
        if self.keep:
            state.in_flight_inputs.append(image)
        else:
            self.sources[frame] = [index]

    def _advance(self, index: int, handoff: Handoff) -> None:
        """One model call (stream batch), or every call of this frame (sequential)."""
        while True:
            finished = self.pipeline.step()
            if finished is not None:
                self._finish(finished, index, handoff)
            elif self.keep:  # still filling: show the oldest frame in flight as it came in
                handoff.put([index], self.state.in_flight_inputs[0])
            if self.stream_batch or not len(self.pipeline):
                return

    def _finish(self, finished, index, handoff: Handoff) -> None:
        if finished is None:
            return
        frame, denoised = finished
        self.state.frame_data.pop(frame, None)
        image = self.decode(denoised)
        self.state.last_image = image
        if self.keep:
            self.state.in_flight_inputs.popleft()
            handoff.put([index], image)
        else:
            handoff.put(self.sources.pop(frame), image)

    def _skipped(self, index: int, handoff: Handoff) -> None:
        """A frame the similarity filter skipped reuses the last processed frame's output."""
        pending = [f for f in self.sources if self.sources[f]]
        if not self.keep and pending:
            self.sources[max(pending)].append(index)
        elif self.state.last_image is not None:
            handoff.put([index], self.state.last_image)
        elif self.keep and self.state.in_flight_inputs:
            handoff.put([index], self.state.in_flight_inputs[0])

    def _deliver(self, indices, image: torch.Tensor) -> None:
        for index in indices:
            self.on_output(index, image)
            self.outputs += 1
