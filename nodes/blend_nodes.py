"""RandomizedBlendContext: StreamingT2V's randomized blending on ComfyUI's own context windows.

The node installs a ``comfy.context_windows.IndexListContextHandler`` (ComfyUI's context windows:
the model is evaluated chunk by chunk along the frame axis, each chunk gets its slice of the latent,
timestep and conditioning, and the chunks' outputs are fused). Everything but the fusion is core's:
the ``standard_static`` window schedule, cond and timestep slicing, and the memory estimate
for one chunk (``create_prepare_sampling_wrapper``). The fusion is a fuse method whose weights are
0 or 1: for each frame, 1 for the one chunk that owns it at this step under StreamingT2V's rule
(``streamv2v_core.chunks``), so core's weighted average returns exactly that chunk's output.

The whole latent is sampled with one noise tensor, so overlapping frames share their noise (the
paper's "shared noise"). For a sampler whose step is per frame and first order with one model call
(euler, euler_ancestral, ddim, ddpm, lcm), joining the model outputs at the cut is joining the
chunks' next latents at the cut, which is the paper's eq. 8. Multistep (dpmpp_2m, uni_pc, ...) and
multi-call (heun, dpmpp_sde, ...) samplers work too, but then it is the model outputs of every call
that are joined, not exactly the paper's latents.
"""
from __future__ import annotations

import inspect
import logging

import torch
import comfy.context_windows as cw
from comfy_api.latest import io

from ..streamv2v_core.blend.chunks import draw_seams, frame_owners
from ._schema import SAMPLING_CATEGORY, advanced

LOG = logging.getLogger("streamv2v.blend")
FUSE_METHOD = "streamingt2v_randomized_blend"
FRAME_AXES = {"auto": None, "0 (image batch)": 0, "2 (video frames)": 2}


def _blend_weights(length, handler=None, full_length=None, idxs=None, **kwargs):
    """Core fuse-method hook (``get_context_weights``): this window's 0/1 weight per frame.

    Newer ComfyUI passes more keywords (``context_overlap``); they are not needed here.
    """
    return handler.window_weights(idxs, full_length)


def core_handler_options(init=cw.IndexListContextHandler.__init__) -> dict:
    """Keywords for core's handler beyond the shared ones, for the ComfyUI version at hand.

    Newer ComfyUI prepends the frame before a chunk to it by default (``causal_window_fix``); a
    StreamingT2V chunk is denoised on its own frames only, so it is switched off where it exists.
    """
    return {"causal_window_fix": False} if "causal_window_fix" in inspect.signature(init).parameters else {}


def settings_error(chunk_length, overlap) -> str | None:
    """What is wrong with a chunk length and overlap (None when they are fine)."""
    if not isinstance(chunk_length, int) or not isinstance(overlap, int):
        return None  # linked from another node: checked when the node runs
    if chunk_length < 1 or overlap < 0:
        return f"chunk_length must be at least 1 and overlap at least 0, got {chunk_length} and {overlap}."
    if overlap >= chunk_length:
        return (f"overlap ({overlap}) must be smaller than chunk_length ({chunk_length}); the paper uses 8 of 24, "
                f"0 samples the chunks independently.")
    return None


def check_frame_axis(x: torch.Tensor, dim: int) -> None:
    """Raise ValueError (with the fix) when ``dim`` is not a frame axis of latent ``x``."""
    if dim == 2 and x.ndim != 5:
        raise ValueError(f"StreamV2V Long-Video Chunks: frame axis 2 needs a video latent [B, C, T, H, W], but this "
                         f"latent is {x.ndim}-D {list(x.shape)}: image models keep frames on the batch axis, so set "
                         f"frame_axis to '0 (image batch)' or 'auto'.")
    if dim == 0 and x.ndim == 5:
        raise ValueError(f"StreamV2V Long-Video Chunks: frame axis 0 would cut the batch of a video latent "
                         f"{list(x.shape)} instead of its frames: set frame_axis to '2 (video frames)' or 'auto'.")


def _single_stream(conds) -> bool:
    """False when newer ComfyUI packs several streams (audio + video) into one latent."""
    for cond in conds:
        for item in cond or []:
            shapes = item.get("model_conds", {}).get("latent_shapes")
            if shapes is not None and len(shapes.cond) > 1:
                return False
    return True


class RandomizedBlendHandler(cw.IndexListContextHandler):
    """Core context windows with StreamingT2V's fusion. Per-frame tensors go through core unchanged.

    Holds its settings only (chunk length, overlap, axis, seed): safe to deep-copy (ComfyUI 0.3.x
    copies model_options on clone) and to share between clones (newer ComfyUI does). The step is
    core's ``_step``, set from the sigma at the start of every model call.
    """

    def __init__(self, chunk_length: int, overlap: int, dim: int, seed: int):
        super().__init__(context_schedule=cw.get_matching_context_schedule(cw.ContextSchedules.STATIC_STANDARD),
                         fuse_method=cw.ContextFuseMethod(FUSE_METHOD, _blend_weights),
                         context_length=chunk_length, context_overlap=overlap, dim=dim, **core_handler_options())
        self.seed = seed

    def should_use_context(self, model, conds, x_in, timestep, model_options) -> bool:
        check_frame_axis(x_in, self.dim)
        if not _single_stream(conds):
            raise ValueError("StreamV2V Long-Video Chunks joins one video stream; this model samples several in one "
                             "latent (audio + video): use core 'Context Windows (Manual)' for it instead.")
        return super().should_use_context(model, conds, x_in, timestep, model_options)

    def set_step(self, timestep: torch.Tensor, model_options: dict) -> None:
        # ComfyUI 0.3.75 compares every batch row's sigma with the schedule, which fails for image
        # batches, and raises on a sampler's intermediate sigmas. As newer ComfyUI does: the first
        # row decides, and an intermediate call keeps the step it belongs to.
        sigmas = model_options.get("transformer_options", {}).get("sample_sigmas")
        if sigmas is None:
            raise ValueError("StreamV2V Long-Video Chunks needs the sampler's sigma schedule to number its steps; "
                             "sample with a ComfyUI sampler node (KSampler, SamplerCustom...).")
        matches = torch.nonzero(torch.isclose(sigmas, timestep.reshape(-1)[0].to(sigmas), rtol=1e-4))
        if matches.numel():
            self._step = int(matches[0, 0])

    def window_weights(self, idxs: list[int], full_length: int) -> list[float]:
        """1.0 for the frames of window ``idxs`` that it owns at this step, 0.0 for the others."""
        windows = [range(w[0], w[-1] + 1) for w in self.context_schedule.func(full_length, self, {})]
        window = range(idxs[0], idxs[-1] + 1)
        if window not in windows or len(window) != len(idxs):
            raise ValueError(f"StreamV2V Long-Video Chunks: window {idxs[0]}..{idxs[-1]} of {full_length} frames is "
                             f"not one of its chunks; another node changed the context windows.")
        owners = frame_owners(windows, draw_seams(windows, self.seed, self._step), full_length)
        k = windows.index(window)
        return [1.0 if owners[f] == k else 0.0 for f in idxs]


def frame_axis_of(model, choice: str) -> int:
    """The axis to chunk: the user's, or from the model's latent format (video latents: 2, images: 0)."""
    if choice not in FRAME_AXES:
        raise ValueError(f"frame_axis must be one of {list(FRAME_AXES)}, got {choice!r}")
    if FRAME_AXES[choice] is not None:
        return FRAME_AXES[choice]
    dims = getattr(model.get_model_object("latent_format"), "latent_dimensions", 2)
    if dims == 3:
        return 2
    if dims == 2:
        return 0
    raise ValueError(f"StreamV2V Long-Video Chunks: this model's latents have {dims} spatial dimension(s) (audio or "
                     f"3D), so they have no video frames to chunk. Use it with an image or video model.")


class RandomizedBlendContext(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RandomizedBlendContext",
            display_name="StreamV2V Long-Video Chunks",
            category=SAMPLING_CATEGORY,
            description="Samples a long video chunk by chunk with StreamingT2V's randomized blending: overlapping "
                        "chunks share their noise, and at every step each overlap is cut at one random frame, "
                        "earlier frames from the earlier chunk, later ones from the later chunk, so the seams "
                        "move and fade. Use it before KSampler (denoise = SDEdit strength) to refine a long clip "
                        "with a video model (Wan, LTX-Video, HunyuanVideo) or an image model. Exact as in the "
                        "paper with euler, euler_ancestral, ddim, ddpm and lcm.",
            inputs=[
                io.Model.Input("model", tooltip="A video model (frames on axis 2) or an image model (frames are the "
                                                "batch). The input model is not changed."),
                io.Int.Input("chunk_length", default=24, min=1, max=16384,
                             tooltip="Frames per chunk along the frame axis (paper: 24). Video models count LATENT "
                                     "frames: Wan 2.1/2.2 and HunyuanVideo pack 4 video frames into one (the first "
                                     "alone), LTX-Video 8, so 21 latent frames = 81 Wan video frames, its training "
                                     "length; 6 = 21 video frames."),
                io.Int.Input("overlap", default=8, min=0, max=16383,
                             tooltip="Frames shared by consecutive chunks, counted like chunk_length (paper: 8; for "
                                     "Wan latents try 2 to 6). 0 samples the chunks independently. Must be smaller "
                                     "than chunk_length."),
                advanced(io.Combo.Input("frame_axis", options=list(FRAME_AXES), default="auto",
                                        tooltip="Where the frames are. auto reads it from the model: 2 for video "
                                                "latents [B, C, T, H, W], 0 (the batch) for image models.")),
                advanced(io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=False,
                                      tooltip="Seed of the random cut positions (one per overlap and step; the same "
                                              "seed gives the same cuts).")),
            ],
            outputs=[io.Model.Output(tooltip="The model, sampling long latents chunk by chunk with randomized "
                                             "blending. Connect it to KSampler.")],
        )

    @classmethod
    def validate_inputs(cls, chunk_length, overlap):
        # Only these two: ComfyUI skips its own range checks for the inputs named here.
        error = settings_error(chunk_length, overlap)
        return True if error is None else f"StreamV2V Long-Video Chunks: {error}"

    @classmethod
    def execute(cls, model, chunk_length=24, overlap=8, frame_axis="auto", seed=0) -> io.NodeOutput:
        error = settings_error(int(chunk_length), int(overlap))
        if error is not None:
            raise ValueError(f"StreamV2V Long-Video Chunks: {error}")
        dim = frame_axis_of(model, frame_axis)
        patched = model.clone()
        if patched.model_options.get("context_handler") is not None:
            LOG.warning("StreamV2V Long-Video Chunks replaces the context windows set on this model by an earlier "
                        "node (a model has one set of context windows).")
        patched.model_options["context_handler"] = RandomizedBlendHandler(chunk_length, overlap, dim, seed)
        cw.create_prepare_sampling_wrapper(patched)  # memory estimate for one chunk, not the whole video
        return io.NodeOutput(patched)


NODES = [RandomizedBlendContext]
