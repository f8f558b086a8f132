"""Runs frames through a ComfyUI model with the stream batch: the engine behind the sampler and loop nodes.

The whole run is one ComfyUI sampling run (``CFGGuider.sample`` with a custom sampler
function), so the model's wrappers, ControlNets, LoRAs, model-sampling overrides and
cond/uncond batching all apply as in a KSampler. Inside it, every model call carries a
``RowPlan`` (frame and step of each row, plain ints) so the bank keys each frame apart
without reading a tensor value.

A run belongs to a *stream*: ``bank_start`` decides whether it starts a new one (the
bank cleared, frames numbered from 0) or continues the previous run's (bank, frame
numbers, noise sequence and similarity filter carried on, so N runs of k frames give the
frames of one run of N*k), optionally with the stream batch's in-flight latents kept
across runs (one image in, one out, one model call each, ``S - 1`` frames late). The
stream's state lives with its bank; without a bank, with the node that runs it.

Hot path: frames are uploaded without a blocking copy, encoded and decoded on the
device (the VAE is loaded once, with the UNet), noise is drawn on the device, and each
finished frame crosses back to the host once, one frame late.
"""
from __future__ import annotations

import collections
import itertools
import logging
import weakref
from typing import Callable, Iterable

import torch

import comfy.model_management
import comfy.samplers

from ...streamv2v_core.bank.calls import NAMES, PLAN_KEY, RowPlan
from ...streamv2v_core.stream.conditioning import FrameRows, intersect_runs
from ...streamv2v_core.stream.pipeline import NoiseSource, StreamPipeline
from ...streamv2v_core.stream.similarity import SimilarityFilter
from ...streamv2v_core.stream.transfer import Handoff, Upload
from .bank_wrappers import RUN_BANKS_KEY
from .conditioning import RunConditioning, check_frame_rows
from .device_vae import DeviceCodec, vae_downscale
from .model import stream_model, strength_sigmas
from .settings import IN_FLIGHT, StreamSettings, check_stream_inputs
from .signatures import stream_signature
from .streams import Schedule, StreamState, banks_of, open_stream

log = logging.getLogger("streamv2v")

# --------------------------------------------------------------------------- the run

def run_stream(model, positive, negative, vae, frames: Iterable[torch.Tensor], settings: StreamSettings,
               on_output: Callable[[int, torch.Tensor], None], stream_key: str | None = None,
               who: str = "StreamV2V", conditioning: Callable | None = None, frame_count: int | None = None) -> int:
    """Restyle ``frames`` (each ``[H, W, 3]`` in 0..1, on the host) one by one.

    ``on_output(i, image)`` is called for input i with a host image ``[H, W, 3]``, in input
    order, as soon as it is finished (with ``bank_start`` "continue, frames in flight" the
    image is the stream's frame ``S - 1`` inputs earlier, and the first input's image while
    the pipeline fills). The first frame fixes the size; every later frame must match it.
    Bad sizes and a model/VAE mismatch raise before any output. Returns the number of
    outputs. If interrupted, every output already made stays made and the bank counts the
    frames that went through it. ``stream_key`` names the stream when the model has no bank.

    Per-frame conditioning: with ``frame_count`` (the number of frames, when known) a
    conditioning tensor or ControlNet hint batch of ``frame_count`` rows gives frame i row i;
    1 row serves every frame; other counts are refused before any work. ``conditioning``
    ``(index, image) -> FrameConditioning | None`` gives a frame its own prompt, hint,
    ControlNet scale or fusion alpha as it enters the stream (``frame_conditioning.py``).
    """
    settings.check()
    check_frame_rows(positive, negative, frame_count, who)
    source = iter(frames)
    first = next(source, None)
    if first is None:
        raise ValueError("no input frames: connect at least one image")
    height, width = int(first.shape[0]), int(first.shape[1])
    latent_shape = check_stream_inputs(model, vae, height, width)

    model = stream_model(model, vae, settings.compile)
    banks = banks_of(model)
    state = open_stream(banks, stream_key, settings,
                        stream_signature(model, latent_shape, settings, vae_downscale(vae)), who)
    if settings.similarity_filter and state.filter is None:
        state.filter = SimilarityFilter(settings.similarity_threshold, settings.max_skips, settings.seed)
    elif not settings.similarity_filter:
        state.filter = None
    in_flight_mode = settings.bank_start == IN_FLIGHT and settings.stream_batch
    if not in_flight_mode:
        state.in_flight, state.in_flight_inputs = None, collections.deque()

    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(settings.cfg)
    sampling = model.get_model_object("model_sampling")
    schedule = state.schedule
    if schedule is None or not schedule.made_for(sampling, settings):  # read once per stream: host reads
        values = strength_sigmas(sampling, settings.steps, settings.strength)
        schedule = state.schedule = Schedule(weakref.ref(sampling), settings.steps, settings.strength, values,
                                             torch.tensor(values, device=model.load_device),
                                             values[0] >= float(sampling.sigma_max) * (1 - 1e-5))
    sigma_values, full_noise_first = schedule.sigma_values, schedule.full_noise_first
    steps = len(sigma_values) - 1
    run = _Run(state, banks, settings, on_output, in_flight_mode, steps)

    def sampler_function(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        guider_now = model_k.inner_model  # the guider, its conditioning processed for this run
        conds = RunConditioning(guider_now, frame_count, conditioning, x[:1], sigma_values, guider_now.inner_model)
        try:
            run.go(model_k, x, sigmas, extra_args, vae, itertools.chain([first], source), (height, width),
                   sigma_values, full_noise_first, conds)
        finally:
            guider_now.conds = conds.template
            conds.close()
        return x

    zeros = torch.zeros(latent_shape)
    try:
        with torch.inference_mode():  # as ComfyUI's executor runs nodes; also for scripts calling the engine
            guider.sample(zeros, zeros, comfy.samplers.KSAMPLER(sampler_function), schedule.sigmas,
                          seed=settings.seed, disable_pbar=True)
    finally:
        for bank in banks:
            bank.frames_seen = state.next_frame
    return run.outputs


class _Run:
    """One run's loop: inputs -> (filter) -> upload -> encode -> pipeline -> decode -> handoff."""

    def __init__(self, state: StreamState, banks, settings: StreamSettings, on_output, in_flight_mode: bool,
                 steps: int):
        self.state, self.banks, self.settings = state, banks, settings
        self.in_flight_mode, self.steps = in_flight_mode, steps
        self.on_output = on_output
        self.outputs = 0
        self.sources: dict[int, list[int]] = {}  # frame in flight -> input indices it answers

    def deliver(self, indices, image: torch.Tensor) -> None:
        for index in indices:
            self.on_output(index, image)
            self.outputs += 1

    def go(self, model_k, x, sigmas, extra_args, vae, inputs, size, sigma_values, full_noise_first,
           conds: RunConditioning) -> None:
        base = model_k.inner_model.inner_model  # comfy BaseModel: latent scaling and model sampling
        sampling = base.model_sampling
        state, settings = self.state, self.settings
        codec = DeviceCodec(vae)
        upload = Upload(codec.device)
        handoff = Handoff(self.deliver)
        options = extra_args["model_options"]
        call_options = self._call_options(options)

        guider = model_k.inner_model

        def denoise(rows, sigma, frames, steps):
            comfy.model_management.throw_exception_if_processing_interrupted()
            frame_rows = [state.frame_rows.get(f) or FrameRows() for f in frames]
            outs = []
            for start, stop in intersect_runs(self._row_groups(steps), conds.groups(frame_rows, steps)):
                group = frame_rows[start:stop]
                plan = RowPlan(tuple(frames[start:stop]), tuple(steps[start:stop]), self.steps,
                               fusion_alpha=group[0].fusion_alpha)
                guider.conds = conds.conds_for(group, steps[start:stop])
                outs.append(model_k(rows[start:stop], sigma[start:stop], denoise_mask=None,
                                    model_options=call_options(plan), seed=extra_args.get("seed")))
            return outs[0] if len(outs) == 1 else torch.cat(outs)

        def noise_scaling(sigma, noise, latent, max_denoise):
            return sampling.noise_scaling(sigma.to(latent.dtype), noise, latent, max_denoise=max_denoise)

        if state.in_flight is not None and state.in_flight.x is not None:
            state.in_flight.x = state.in_flight.x.to(x.device, x.dtype)
        pipeline = StreamPipeline(sigmas.to(x.device, x.dtype), sigma_values, denoise, noise_scaling,
                                  NoiseSource(settings.seed, settings.fixed_noise), full_noise_first,
                                  state.in_flight if self.in_flight_mode else None)
        try:
            for index, image in enumerate(inputs):
                if tuple(image.shape[:2]) != size:
                    raise ValueError(f"frame {index} is {image.shape[1]}x{image.shape[0]}, the stream started at "
                                     f"{size[1]}x{size[0]}: all frames must have one size")
                if state.filter is not None and state.filter.skip(image):  # host-side: the frame is on the host
                    self._skipped(index, handoff)
                    continue
                latent = base.process_latent_in(codec.encode(upload(image[..., :3]))).to(x.device, x.dtype)
                frame, state.next_frame = state.next_frame, state.next_frame + 1
                state.frame_rows[frame] = conds.rows_for(index, image)
                pipeline.push(frame, latent)
                if self.in_flight_mode:
                    state.in_flight_inputs.append(image)
                else:
                    self.sources[frame] = [index]
                while True:
                    finished = pipeline.step()
                    if finished is not None:
                        self._finished(finished, index, codec, base, handoff)
                    elif self.in_flight_mode:  # still filling: show the oldest frame in flight as it came in
                        handoff.put([index], state.in_flight_inputs[0])
                    if settings.stream_batch or not len(pipeline):
                        break
            while not self.in_flight_mode and len(pipeline):
                finished = pipeline.step()
                if finished is not None:
                    self._finished(finished, None, codec, base, handoff)
            state.in_flight = pipeline.state if self.in_flight_mode else None
        except BaseException:
            state.in_flight, state.in_flight_inputs = None, collections.deque()  # partly written: start anew
            state.frame_rows = {}
            raise
        finally:
            handoff.flush()

    def _finished(self, finished, index, codec, base, handoff) -> None:
        frame, denoised = finished
        self.state.frame_rows.pop(frame, None)
        image = codec.decode(base.process_latent_out(denoised))
        self.state.last_image = image
        if self.in_flight_mode:
            self.state.in_flight_inputs.popleft()
            handoff.put([index], image)
        else:
            handoff.put(self.sources.pop(frame), image)

    def _skipped(self, index, handoff) -> None:
        """A frame the similarity filter skipped reuses the last processed frame's output."""
        pending = [f for f in self.sources if self.sources[f]]
        if not self.in_flight_mode and pending:
            self.sources[max(pending)].append(index)
        elif self.state.last_image is not None:
            handoff.put([index], self.state.last_image)
        elif self.in_flight_mode and self.state.in_flight_inputs:
            handoff.put([index], self.state.in_flight_inputs[0])

    def _call_options(self, options: dict) -> Callable[[RowPlan], dict]:
        base_to = options.get("transformer_options", {})
        banks = {bank.name: bank for bank in self.banks}

        def for_plan(plan: RowPlan) -> dict:
            return {**options, "transformer_options": {**base_to, PLAN_KEY: plan, RUN_BANKS_KEY: banks}}
        return for_plan

    def _row_groups(self, steps: list[int]) -> list[tuple[int, int]]:
        """Rows split where they hold different numbers of banked frames (only while a bank fills up).

        Rows with an empty bank join any group (padding them is exact); rows whose banks hold
        different numbers of frames get separate calls, so no row attends to more or fewer
        past frames than it would sequentially.
        """
        if not self.banks or len(steps) == 1:
            return [(0, len(steps))]
        groups: list[list] = []
        for i, step in enumerate(steps):
            held = tuple(bank.count(name, 0, step) for bank in self.banks for name in NAMES)
            if groups and (not any(held) or groups[-1][2] == held or not any(groups[-1][2])):
                groups[-1][1] = i + 1
                if any(held):
                    groups[-1][2] = held
            else:
                groups.append([i, i + 1, held])
        return [(start, stop) for start, stop, _ in groups]
