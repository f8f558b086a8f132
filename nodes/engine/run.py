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

import dataclasses
import itertools
import logging
import time
import weakref
from typing import Callable, Iterable

import torch

import comfy.model_management
import comfy.samplers

from ...streamv2v_core.media.frames import quantize
from ...streamv2v_core.stream.conditioning import FrameRows
from ...streamv2v_core.stream.frame import Frame, Output, RunReport, as_frame
from ...streamv2v_core.stream.frame_schedule import FrameSchedule
from ...streamv2v_core.stream.guidance import FULL, SELF_NEGATIVE
from ...streamv2v_core.stream.runner import StreamRunner
from ...streamv2v_core.stream.pipeline import NoiseSource, StreamPipeline
from ...streamv2v_core.stream.similarity import SimilarityFilter
from ...streamv2v_core.stream.transfer import Upload
from .compiled_unet import OFF, compile_mode
from .conditioning import RunConditioning, check_frame_rows
from .device_vae import DeviceCodec, vae_downscale
from .frame_schedules import FrameSchedules
from .model import stream_model, strength_sigmas
from .settings import IN_FLIGHT, StreamSettings, check_stream_inputs
from .signatures import stream_signature
from .stream_calls import StreamCalls
from .streams import Schedule, StreamState, banks_of, open_stream, reading

log = logging.getLogger("streamv2v")

def run_stream(model, positive, negative, vae, frames: Iterable[Frame | torch.Tensor], settings: StreamSettings,
               on_output: Callable[[Output], None], stream_key: str | None = None,
               who: str = "StreamV2V", conditioning: Callable[[Frame], object] | None = None,
               frame_count: int | None = None, uint8_output: bool = False, warm_up: int = 0) -> RunReport:
    """Restyle ``frames`` (``Frame``s, or images ``[H, W, 3]`` in 0..1, on the host) one by one.

    ``on_output(Output)`` is called once per input, in input order, as soon as its answer is
    finished; the output names the frame whose pixels it holds (with ``bank_start``
    "continue, frames in flight" that is the frame ``S - 1`` inputs earlier, and the oldest
    input while the pipeline fills), so its stamp and conditioning come with it. The first
    frame fixes the size; every later frame must match it. Bad sizes and a model/VAE mismatch
    raise before any output. Returns a ``RunReport``. If interrupted, every output already
    made stays made and the bank counts the frames that went through it. ``stream_key`` names
    the stream when the model has no bank.

    Per-frame conditioning: with ``frame_count`` (the number of frames, when known) a
    conditioning tensor or ControlNet hint batch of ``frame_count`` rows gives frame i row i;
    1 row serves every frame; other counts are refused before any work. ``conditioning``
    ``(Frame) -> FrameConditioning | None`` gives a frame its own prompt, hint, ControlNet
    scale or fusion alpha as it enters the stream (``stream/conditioning.py``); the frame
    keeps it as ``frame.conditioning``.

    ``uint8_output``: images reach ``on_output`` as ``uint8`` ``[H, W, 3]`` (``media.frames.to_uint8``'s
    values), converted on the device before the download (a quarter of the bytes to copy).

    ``warm_up``: with the UNet compiled, this many model calls of the stream's one layout are made
    before the first frame enters, every row padding (nothing written to the bank, nothing output):
    the compile (its second call: a layout's first runs eagerly) and a CUDA graph recording (its
    third) then happen before the show, not in it. Counted in ``RunReport.first_output_s``.
    """
    started = time.monotonic()
    settings.check()
    check_frame_rows(positive, negative, frame_count, who)
    source = iter(frames)
    first = next(source, None)
    if first is None:
        raise ValueError("no input frames: connect at least one image")
    first = as_frame(first, 0)
    size = (int(first.image.shape[0]), int(first.image.shape[1]))
    latent_shape = check_stream_inputs(model, vae, *size)
    model = stream_model(model, vae, settings.compile)
    banks = banks_of(model)
    state = open_stream(banks, stream_key, settings,
                        stream_signature(model, latent_shape, settings, vae_downscale(vae)), who)
    _carry_over(state, settings)
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(settings.cfg if settings.guidance == FULL else 1.0)  # residual CFG guides after the model call
    run = _Run(state, banks, settings, _schedule(state, model, settings), vae, on_output, frame_count, conditioning,
               started, uint8_output, warm_up)
    # Latents in float32 as ComfyUI keeps them, or float64 for a float64 model (exactness checks).
    zeros = torch.zeros(latent_shape, dtype=torch.float64 if model.model_dtype() == torch.float64 else torch.float32)
    try:
        with torch.inference_mode(), reading(banks):  # inference mode as ComfyUI's executor runs nodes
            guider.sample(zeros, zeros, run.sampler(itertools.chain([first], source), size), run.schedule.sigmas,
                          seed=settings.seed, disable_pbar=True)
    finally:
        for bank in banks:
            bank.frames_seen = state.next_frame
        run.report.seconds = time.monotonic() - started
    return run.report


def _carry_over(state: StreamState, settings: StreamSettings) -> None:
    """What of the previous run this run keeps: the similarity filter if still on, frames in flight if asked."""
    if settings.similarity_filter and state.filter is None:
        state.filter = SimilarityFilter(settings.similarity_threshold, settings.max_skips, settings.seed)
    elif not settings.similarity_filter:
        state.filter = None
    if not _keeps_in_flight(settings):
        state.drop_in_flight()


def _keeps_in_flight(settings: StreamSettings) -> bool:
    return settings.bank_start == IN_FLIGHT and settings.stream_batch


def _schedule(state: StreamState, model, settings: StreamSettings) -> Schedule:
    """The stream's sigmas, read from the model once per stream (host reads), not once per run."""
    sampling = model.get_model_object("model_sampling")
    if state.schedule is None or not state.schedule.made_for(sampling, settings):
        values = strength_sigmas(sampling, settings.steps, settings.strength)
        state.schedule = Schedule(weakref.ref(sampling), settings.steps, settings.strength, values,
                                  torch.tensor(values, device=model.load_device),
                                  values[0] >= float(sampling.sigma_max) * (1 - 1e-5))
    return state.schedule


class _Run:
    """One ComfyUI sampling run whose sampler function is the stream loop (``stream/loop.py``).

    The run goes through ``CFGGuider.sample`` so that everything a KSampler run gets applies
    (model loading, OUTER_SAMPLE wrappers, conditioning processing, ControlNet set-up and
    clean-up, hooks); the sampler function then drives the model call by call and returns
    its input unchanged: the frames leave through ``on_output``, not as the sampler's latent.
    """

    def __init__(self, state: StreamState, banks, settings: StreamSettings, schedule: Schedule, vae, on_output,
                 frame_count: int | None, provider: Callable | None, started: float, uint8_output: bool = False,
                 warm_up: int = 0):
        self.state, self.banks, self.settings, self.schedule, self.vae = state, banks, settings, schedule, vae
        self.on_output, self.frame_count, self.provider = on_output, frame_count, provider
        self.uint8, self.warm_up = uint8_output, warm_up
        self.steps = len(schedule.sigma_values) - 1
        self.started = started
        self.report = RunReport()
        self.held_last = False  # the last output came out not finite

    def _output(self, out: Output) -> None:
        if self.report.first_output_s is None:
            self.report.first_output_s = time.monotonic() - self.started
        if out.held:
            self._not_finite(out.index)
        self.held_last = out.held
        if self.uint8 and out.image.dtype != torch.uint8:  # an input shown while frames are in flight
            out = dataclasses.replace(out, image=quantize(out.image))
        self.on_output(out)

    def _not_finite(self, index: int) -> None:
        """Input ``index`` came out not finite: the features its frame wrote (and that frames in flight read
        since) must not carry on, so the bank forgets them with its past (they cannot be unmerged)."""
        report = self.report
        report.held += 1
        if len(report.held_inputs) < 10:
            report.held_inputs.append(index)
        for bank in self.banks:
            bank.reset(f"input {index} came out not finite (NaN/inf): its features were dropped")
        if not self.held_last:  # once per run of such frames
            log.warning("StreamV2V: input %d came out not finite (NaN/inf): the last good frame is shown instead%s",
                        index, " and the bank cleared" if self.banks else "")

    def sampler(self, inputs, size):
        def sampler_function(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
            self.go(model_k, x, sigmas, extra_args, inputs, size)
            return x
        return comfy.samplers.KSAMPLER(sampler_function)

    def go(self, model_k, x, sigmas, extra_args, inputs, size) -> None:
        guider = model_k.inner_model  # its conditioning is processed for this run
        base = guider.inner_model  # comfy BaseModel: latent scaling and model sampling
        own = FrameSchedule(sigmas.to(x.device, x.dtype), tuple(self.schedule.sigma_values),
                            NoiseSource(self.settings.seed, self.settings.fixed_noise), self.schedule.full_noise_first)
        schedules = FrameSchedules(base.model_sampling, own, self.settings.strength, self.settings.seed)
        codec = DeviceCodec(self.vae)
        upload = Upload(codec.device)
        conds = RunConditioning(guider, self.frame_count, self.provider, x[:1], self.schedule.sigma_values, base,
                                Upload(x.device, upload.ring), schedules)
        calls = StreamCalls(self.settings, model_k, guider, conds, own.sigmas, extra_args, self.banks,
                            self.state.frame_data, pad=compile_mode(self.settings.compile) != OFF)
        runner = StreamRunner(
            self.state, self._pipeline(guider, calls, x, own), self.settings.stream_batch,
            _keeps_in_flight(self.settings),
            encode=lambda image: base.process_latent_in(codec.encode(upload(image[..., :3]))).to(x.device, x.dtype),
            decode=lambda denoised: codec.decode(base.process_latent_out(denoised)),
            admit=lambda frame, latent: self._admit(conds, frame, latent), on_output=self._output,
            finish=quantize if self.uint8 else None)
        try:
            calls.warm_up(x, self.warm_up)
            runner.run(inputs, size)
        finally:
            report = self.report
            report.frames_in, report.frames_out = report.frames_in + runner.inputs, report.frames_out + runner.outputs
            report.reused += runner.reused
            guider.conds = conds.template
            conds.close()

    def _admit(self, conds: RunConditioning, frame: Frame, latent) -> FrameRows:
        """A frame entering the stream: its own conditioning, and its latent when it is its own negative."""
        rows = conds.rows_for(frame)
        if self.settings.guidance == SELF_NEGATIVE:  # also at cfg 1: a live cfg may make it residual later
            rows.x0 = latent
        return rows

    def _pipeline(self, guider, calls: StreamCalls, x, own: FrameSchedule) -> StreamPipeline:
        """The stream batch over this run's schedule; its model calls are ``StreamCalls``."""
        state, sampling = self.state, guider.inner_model.model_sampling

        def noise_scaling(sigma, noise, latent, max_denoise):
            return sampling.noise_scaling(sigma.to(latent.dtype), noise, latent, max_denoise=max_denoise)

        if state.in_flight is not None and state.in_flight.x is not None:
            state.in_flight.x = state.in_flight.x.to(x.device, x.dtype)
        return StreamPipeline(own.sigmas, list(own.sigma_values), calls.denoise, noise_scaling, own.noise,
                              own.full_noise_first, state.in_flight if _keeps_in_flight(self.settings) else None)
