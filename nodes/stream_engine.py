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
import threading
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

import comfy.model_management
import comfy.patcher_extension
import comfy.samplers

from ..streamv2v_core.bank import FeatureBank, describe_changes
from ..streamv2v_core.calls import NAMES, PLAN_KEY, RowPlan
from ..streamv2v_core.patches import STREAM_KEY
from ..streamv2v_core.schedule import strength_timesteps
from ..streamv2v_core.similarity import SimilarityFilter
from ..streamv2v_core.stream import InFlight, NoiseSource, StreamPipeline
from ..streamv2v_core.transfer import Handoff, Upload
from .compiled_unet import COMPILE_KEY, OFF, compile_mode, compile_wrapper
from .device_vae import DeviceCodec, attach, vae_downscale
from .model_patching import RUN_BANKS_KEY, frame_size_part, model_parts

log = logging.getLogger("streamv2v")

FRESH, CONTINUE, IN_FLIGHT = "fresh", "continue", "continue, frames in flight"
GROUPS = 32  # GroupNorm groups in SD-family UNets
BANK_START_CHOICES = (FRESH, CONTINUE, IN_FLIGHT)


@dataclass(frozen=True)
class StreamSettings:
    """What the user chose for a stream; ``check()`` explains what is wrong before any work."""

    seed: int = 0
    steps: int = 4
    strength: float = 0.4
    cfg: float = 1.0
    stream_batch: bool = True
    fixed_noise: bool = True
    similarity_filter: bool = False
    similarity_threshold: float = 0.98
    max_skips: int = 10
    bank_start: str = FRESH
    compile: str | bool = OFF  # a mode of compiled_unet.COMPILE_MODES; a saved workflow's boolean maps onto them

    def check(self) -> None:
        if not 1 <= int(self.steps) <= 50:
            raise ValueError(f"steps must be between 1 and 50 (LCM uses 4), got {self.steps}")
        if not 0.0 < float(self.strength) <= 1.0:
            raise ValueError(f"strength must be in (0, 1]: how much of each frame is re-noised "
                             f"(the paper uses 0.4), got {self.strength}")
        if float(self.cfg) < 0:
            raise ValueError(f"cfg must be 0 or more (1.0 = no guidance, the paper's setting), got {self.cfg}")
        if self.bank_start not in BANK_START_CHOICES:
            raise ValueError(f"bank_start must be one of {BANK_START_CHOICES}, got {self.bank_start!r}")
        if not 0.0 <= float(self.similarity_threshold) < 1.0:
            raise ValueError(f"similarity_threshold must be in [0, 1), got {self.similarity_threshold}")
        compile_mode(self.compile)


# --------------------------------------------------------------------------- input checks

def check_frame_size(height: int, width: int, multiple: int = 8, smallest: int | None = None) -> None:
    """Refuse frame sizes the VAE cannot map to whole latents or the model cannot take, naming the fix."""
    if height % multiple or width % multiple:
        fit_h, fit_w = max(multiple, height // multiple * multiple), max(multiple, width // multiple * multiple)
        raise ValueError(f"frame size {width}x{height} is not divisible by {multiple}: resize or crop the frames "
                         f"to e.g. {fit_w}x{fit_h} first (core 'Upscale Image' or 'ImageCrop' node, or the loop "
                         f"node's resize option)")
    if smallest and (height < smallest or width < smallest):
        raise ValueError(f"frames of {width}x{height} are too small for this model: after its UNet halves the "
                         f"latent, a level would be left with less than 2x2 values to normalise, so "
                         f"{smallest}x{smallest} is the smallest frame it takes (resize the frames to at least "
                         f"that, e.g. with core 'Upscale Image' or the loop node's width/height)")


def smallest_frame(model, vae) -> int:
    """The smallest frame side the model takes, from the VAE's factor and the UNet's layout.

    The UNet halves the latent once per level (stride-2 convolutions: ``ceil(s / 2)``), and the
    first block of each level normalises the incoming activation in groups of 32 channels,
    which needs more than one value per group: with 32 channels or fewer that activation must
    be at least 2x2. (Real SD1.5/SDXL UNets have 320 channels and more: any whole latent works.)
    """
    factor = vae_downscale(vae)
    config = getattr(getattr(getattr(model, "model", None), "model_config", None), "unet_config", None) or {}
    mult = list(config.get("channel_mult") or [1])
    width = int(config.get("model_channels") or 320)
    incoming = [width] + [width * m for m in mult[:-1]]  # channels entering level 0, 1, ...
    latent = max([1] + [2 ** level + 1 for level, channels in enumerate(incoming) if channels <= GROUPS])
    return factor * latent


def check_stream_inputs(model, vae, height: int, width: int) -> tuple[int, int, int, int]:
    """Refuse a model/VAE mismatch or a frame size they cannot take; returns the latent shape ``(1, C, h, w)``."""
    channels = model.get_model_object("latent_format").latent_channels
    vae_channels = getattr(vae, "latent_channels", channels)
    if vae_channels != channels:
        raise ValueError(f"the VAE makes {vae_channels}-channel latents but the model ({type(model.model).__name__}) "
                         f"works on {channels}-channel latents: connect the VAE that belongs to this checkpoint "
                         f"(for SD1.5/SDXL a 4-channel VAE or TAESD)")
    factor = vae_downscale(vae)
    check_frame_size(height, width, factor, smallest_frame(model, vae))
    return (1, channels, height // factor, width // factor)


# --------------------------------------------------------------------------- stream state

@dataclass
class StreamState:
    """What a stream carries from one run to the next (dropped when its bank is cleared)."""

    signature: dict
    next_frame: int = 0
    filter: SimilarityFilter | None = None
    in_flight: InFlight | None = None
    in_flight_inputs: collections.deque = field(default_factory=collections.deque)  # host images, oldest first
    last_image: torch.Tensor | None = None
    schedule: Schedule | None = None


@dataclass(frozen=True)
class Schedule:
    """The sigmas of a stream, read from the model once per stream rather than once per run."""

    sampling: weakref.ref  # the model_sampling object they were read from (identity, without keeping it alive)
    steps: int
    strength: float
    sigma_values: list[float]  # S + 1 values, the last 0
    sigmas: torch.Tensor  # the same on the model's device, for ComfyUI's sampler
    full_noise_first: bool  # the first step starts from pure noise

    def made_for(self, sampling, settings: StreamSettings) -> bool:
        return self.sampling() is sampling and (self.steps, self.strength) == (settings.steps, settings.strength)


class _NodeStreams:
    """Stream states of runs without a bank, by the running node's id (bounded by the graph's size)."""

    def __init__(self):
        self._states: dict[str, StreamState] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> StreamState | None:
        return self._states.get(key)

    def put(self, key: str, state: StreamState) -> None:
        with self._lock:
            self._states[key] = state

    def clear(self) -> None:
        with self._lock:
            self._states.clear()


NODE_STREAMS = _NodeStreams()


def banks_of(model) -> list[FeatureBank]:
    """The feature banks the model's StreamV2V patches use, by name."""
    found = {}
    for patch_list in model.model_options.get("transformer_options", {}).get("patches", {}).values():
        for patch in patch_list:
            handle = getattr(patch, "handle", None)
            if handle is not None and hasattr(handle, "bank"):
                found[handle.name] = handle.bank
    return [found[name] for name in sorted(found)]


def stream_signature(model, latent_shape, settings: StreamSettings, downscale: int) -> dict:
    """What a stream's features depend on: model, LoRA, frame size, dtype, steps, strength, cfg."""
    parts = model_parts(model)
    parts.update({
        "frame size": frame_size_part(latent_shape, downscale),
        "steps": (int(settings.steps), int(settings.steps)),
        "strength": (float(settings.strength), f"{float(settings.strength):g}"),
        "cfg": (float(settings.cfg), f"{float(settings.cfg):g}"),
    })
    return parts


def open_stream(banks: list[FeatureBank], key: str | None, settings: StreamSettings, signature: dict,
                who: str) -> StreamState:
    """The state this run starts from: a new stream (fresh, or settings changed) or the previous one."""
    fresh = settings.bank_start == FRESH
    for bank in banks:
        changed = bank.check_signature(signature)  # clears the bank, with the reason, if settings changed
        if fresh and not changed:
            bank.reset(f"new stream ({who} with bank_start '{FRESH}')")
    if banks:
        state = banks[0].stream
        if state is None:
            state = banks[0].stream = StreamState(signature, next_frame=max(b.frames_seen for b in banks))
        return state
    state = NODE_STREAMS.get(key) if key is not None else None
    if state is not None and not fresh:
        reason = describe_changes(state.signature, signature)
        if not reason:
            return state
        log.info("StreamV2V stream of %s restarts: %s", who, reason)
    state = StreamState(signature)
    if key is not None:
        NODE_STREAMS.put(key, state)
    return state


# --------------------------------------------------------------------------- model preparation

def _row_args(args: dict, row: int, batch: int) -> dict:
    out = {}
    for k, v in args.items():
        if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == batch:
            v = v[row:row + 1]
        elif k == "conds_out":
            v = [t[row:row + 1] if isinstance(t, torch.Tensor) and t.shape[0] == batch else t for t in v]
        out[k] = v
    return out


def per_row(fn: Callable, returns_list: bool = False) -> Callable:
    """Call a guidance function row by row, as it is called when frames are sampled one at a time.

    Guidance functions (``sampler_cfg_function`` & co., e.g. core VideoLinearCFGGuidance)
    may treat the batch as one group; in a stream batch the rows are different frames at
    different steps, so each row gets its own call.
    """
    def row_by_row(args):
        batch = args["input"].shape[0]
        if batch == 1:
            return fn(args)
        results = [fn(_row_args(args, r, batch)) for r in range(batch)]
        if returns_list:
            return [torch.cat(parts) if isinstance(parts[0], torch.Tensor) else parts[0] for parts in zip(*results)]
        return torch.cat(results)
    row_by_row.streamv2v_per_row = fn
    return row_by_row


def stream_model(model, vae, compile_unet=OFF):
    """A clone of ``model`` for the stream engine: guidance functions per row, VAE loaded with the UNet,
    optionally the UNet compiled (``compile_unet``: a mode of ``compiled_unet``, or a saved boolean)."""
    model = model.clone()
    options = model.model_options
    options.setdefault("transformer_options", {})[STREAM_KEY] = True
    if "sampler_cfg_function" in options:
        options["sampler_cfg_function"] = per_row(options["sampler_cfg_function"])
    for key, returns_list in (("sampler_post_cfg_function", False), ("sampler_pre_cfg_function", True)):
        if options.get(key):
            options[key] = [per_row(fn, returns_list) for fn in options[key]]
    attach(model, vae)
    wrapper = compile_wrapper(compile_unet, model.load_device)
    if wrapper is not None:
        model.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, COMPILE_KEY)
        model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, COMPILE_KEY, wrapper)
    return model


def strength_sigmas(model_sampling, steps: int, strength: float) -> list[float]:
    """The run's ``steps + 1`` sigmas (host floats, last 0) from the strength rule (``schedule.py``)."""
    timesteps = torch.tensor(strength_timesteps(steps, strength), dtype=torch.float32)
    return [float(s) for s in model_sampling.sigma(timesteps).flatten().tolist()] + [0.0]


# --------------------------------------------------------------------------- the run

def run_stream(model, positive, negative, vae, frames: Iterable[torch.Tensor], settings: StreamSettings,
               on_output: Callable[[int, torch.Tensor], None], stream_key: str | None = None,
               who: str = "StreamV2V") -> int:
    """Restyle ``frames`` (each ``[H, W, 3]`` in 0..1, on the host) one by one.

    ``on_output(i, image)`` is called for input i with a host image ``[H, W, 3]``, in input
    order, as soon as it is finished (with ``bank_start`` "continue, frames in flight" the
    image is the stream's frame ``S - 1`` inputs earlier, and the first input's image while
    the pipeline fills). The first frame fixes the size; every later frame must match it.
    Bad sizes and a model/VAE mismatch raise before any output. Returns the number of
    outputs. If interrupted, every output already made stays made and the bank counts the
    frames that went through it. ``stream_key`` names the stream when the model has no bank.
    """
    settings.check()
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
        run.go(model_k, x, sigmas, extra_args, vae, itertools.chain([first], source), (height, width),
               sigma_values, full_noise_first)
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

    def go(self, model_k, x, sigmas, extra_args, vae, inputs, size, sigma_values, full_noise_first) -> None:
        base = model_k.inner_model.inner_model  # comfy BaseModel: latent scaling and model sampling
        sampling = base.model_sampling
        state, settings = self.state, self.settings
        codec = DeviceCodec(vae)
        upload = Upload(codec.device)
        handoff = Handoff(self.deliver)
        options = extra_args["model_options"]
        call_options = self._call_options(options)

        def denoise(rows, sigma, frames, steps):
            comfy.model_management.throw_exception_if_processing_interrupted()
            outs = []
            for start, stop in self._row_groups(steps):
                plan = RowPlan(tuple(frames[start:stop]), tuple(steps[start:stop]), self.steps)
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
            raise
        finally:
            handoff.flush()

    def _finished(self, finished, index, codec, base, handoff) -> None:
        frame, denoised = finished
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
