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

import itertools
import logging
import time
import weakref
from typing import Callable, Iterable

import torch

import comfy.model_management
import comfy.samplers

from ...streamv2v_core.bank.calls import NAMES, PLAN_KEY, RowPlan
from ...streamv2v_core.stream.conditioning import FrameRows, intersect_runs
from ...streamv2v_core.stream.frame import Frame, Output, RunReport, as_frame
from ...streamv2v_core.stream.frame_schedule import FrameSchedule
from ...streamv2v_core.stream.guidance import FULL, SELF_NEGATIVE, residual_guidance
from ...streamv2v_core.stream.runner import StreamRunner
from ...streamv2v_core.stream.pipeline import NoiseSource, StreamPipeline
from ...streamv2v_core.stream.similarity import SimilarityFilter
from ...streamv2v_core.stream.transfer import Upload
from .bank_wrappers import RUN_BANKS_KEY
from .conditioning import RunConditioning, check_frame_rows
from .device_vae import DeviceCodec, vae_downscale
from .frame_schedules import FrameSchedules
from .model import stream_model, strength_sigmas
from .settings import IN_FLIGHT, StreamSettings, check_stream_inputs
from .signatures import stream_signature
from .streams import Schedule, StreamState, banks_of, open_stream, reading

log = logging.getLogger("streamv2v")

def run_stream(model, positive, negative, vae, frames: Iterable[Frame | torch.Tensor], settings: StreamSettings,
               on_output: Callable[[Output], None], stream_key: str | None = None,
               who: str = "StreamV2V", conditioning: Callable[[Frame], object] | None = None,
               frame_count: int | None = None) -> RunReport:
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
    guider.set_cfg(1.0 if settings.residual else settings.cfg)  # residual CFG guides after the model call
    run = _Run(state, banks, settings, _schedule(state, model, settings), vae, on_output, frame_count, conditioning,
               started)
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
                 frame_count: int | None, provider: Callable | None, started: float):
        self.state, self.banks, self.settings, self.schedule, self.vae = state, banks, settings, schedule, vae
        self.on_output, self.frame_count, self.provider = on_output, frame_count, provider
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
        conds = RunConditioning(guider, self.frame_count, self.provider, x[:1], self.schedule.sigma_values, base,
                                schedules)
        codec = DeviceCodec(self.vae)
        upload = Upload(codec.device)
        runner = StreamRunner(
            self.state, self._pipeline(model_k, guider, conds, x, own, extra_args), self.settings.stream_batch,
            _keeps_in_flight(self.settings),
            encode=lambda image: base.process_latent_in(codec.encode(upload(image[..., :3]))).to(x.device, x.dtype),
            decode=lambda denoised: codec.decode(base.process_latent_out(denoised)),
            admit=lambda frame, latent: self._admit(conds, frame, latent), on_output=self._output)
        try:
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

    def _pipeline(self, model_k, guider, conds: RunConditioning, x, own: FrameSchedule, extra_args) -> StreamPipeline:
        """The stream batch over this run's schedule; each call split into row groups (see ``_row_groups``)."""
        state, sampling = self.state, guider.inner_model.model_sampling
        call_options = self._call_options(extra_args["model_options"])

        def denoise(rows, sigma, frames, steps):
            comfy.model_management.throw_exception_if_processing_interrupted()
            frame_rows = [state.frame_data.get(f) or FrameRows() for f in frames]
            outs = []
            for start, stop in intersect_runs(self._row_groups(steps), conds.groups(frame_rows, steps)):
                group = frame_rows[start:stop]
                plan = RowPlan(tuple(frames[start:stop]), tuple(steps[start:stop]), self.steps,
                               fusion_alpha=group[0].fusion_alpha)
                guider.conds = conds.conds_for(group, steps[start:stop])
                cfg, delta, residual = self._guidance(group[0])
                guider.cfg = 1.0 if residual else cfg  # residual CFG guides after the model call
                out = model_k(rows[start:stop], sigma[start:stop], denoise_mask=None,
                              model_options=call_options(plan), seed=extra_args.get("seed"))
                if residual:
                    negative = _Negative(guider, conds, call_options, plan, group)
                    out = self._residual(rows[start:stop], sigma[start:stop], out, negative, cfg, delta)
                outs.append(out)
            return outs[0] if len(outs) == 1 else torch.cat(outs)

        def noise_scaling(sigma, noise, latent, max_denoise):
            return sampling.noise_scaling(sigma.to(latent.dtype), noise, latent, max_denoise=max_denoise)

        if state.in_flight is not None and state.in_flight.x is not None:
            state.in_flight.x = state.in_flight.x.to(x.device, x.dtype)
        return StreamPipeline(own.sigmas, list(own.sigma_values), denoise, noise_scaling, own.noise,
                              own.full_noise_first, state.in_flight if _keeps_in_flight(self.settings) else None)

    def _guidance(self, row: FrameRows) -> tuple[float, float, bool]:
        """A row group's cfg and delta (its frames' own after a live change, else the run's), and whether
        residual CFG applies (a residual guidance with cfg other than 1)."""
        cfg = float(self.settings.cfg if row.cfg is None else row.cfg)
        delta = float(self.settings.residual_delta if row.residual_delta is None else row.residual_delta)
        return cfg, delta, self.settings.guidance != FULL and cfg != 1.0

    def _residual(self, x, sigma, denoised, negative: "_Negative", cfg: float, delta: float) -> torch.Tensor:
        """Residual CFG for one row group ``[R, C, h, w]``, each row guided by its own frame's negative."""
        for i, (row, step) in enumerate(zip(negative.group, negative.plan.steps)):
            if row.x0 is None and step == 0:  # one-time negative: the frame's only real negative pass
                row.x0 = negative.estimate(i, x[i:i + 1], sigma[i:i + 1])
        refs = [row.x0 for row in negative.group]
        if all(ref is not None for ref in refs):
            return residual_guidance(x, denoised, refs[0] if len(refs) == 1 else torch.cat(refs), cfg, delta)
        # A frame that entered before residual guidance was on (a stream restarts when it changes): unguided.
        return torch.cat([d if ref is None else residual_guidance(r, d, ref, cfg, delta)
                          for r, d, ref in zip(x.split(1), denoised.split(1), refs)])

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


class _Negative:
    """The real negative pass of residual one-time-negative guidance, for one row of a group.

    It runs the row's negative conditioning alone (``cond_or_uncond`` [1], so the bank keeps
    negative features apart, as full CFG does) through ComfyUI's own batching: one extra row
    per frame, at its first step.
    """

    def __init__(self, guider, conds: RunConditioning, call_options, plan: RowPlan, group: list[FrameRows]):
        self.guider, self.conds, self.call_options, self.plan, self.group = guider, conds, call_options, plan, group

    def estimate(self, i: int, x_row: torch.Tensor, sigma_row: torch.Tensor) -> torch.Tensor:
        """The negative's clean estimate ``[1, C, h, w]`` for row ``i`` (its frame's ``x0_ref``)."""
        plan = RowPlan((self.plan.frames[i],), (self.plan.steps[i],), self.plan.total_steps,
                       fusion_alpha=self.plan.fusion_alpha)
        negative = self.conds.conds_for([self.group[i]], [self.plan.steps[i]])["negative"]
        return comfy.samplers.calc_cond_batch(self.guider.inner_model, [None, negative], x_row, sigma_row,
                                              self.call_options(plan))[1]
