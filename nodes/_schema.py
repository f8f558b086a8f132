"""Schema pieces shared by several node families: the stream engine's inputs, advanced inputs, settings from inputs."""
from __future__ import annotations

from dataclasses import fields

from comfy_api.latest import io

from ..streamv2v_core.stream.guidance import FULL, GUIDANCE_CHOICES, ONE_TIME_NEGATIVE, SELF_NEGATIVE
from .engine import BANK_START_CHOICES, COMPILE_MODES, CONTINUE, CUDA_GRAPHS, DEFAULT, FRESH, IN_FLIGHT, OFF

BANK_CATEGORY = "StreamV2V/Bank"
SAMPLING_CATEGORY = "StreamV2V/Sampling"
VIDEO_CATEGORY = "StreamV2V/Video"  # the loop, next-frame and webcam nodes
METRICS_CATEGORY = "StreamV2V/Metrics"
LOADER_CATEGORY = "StreamV2V/Loaders"  # the toy model


def advanced(field):
    """``field`` (a V3 ``io.*.Input``) marked advanced, as core V3 nodes do (the frontend folds it away).

    Newer ComfyUI takes ``advanced=True`` and serialises its ``advanced`` attribute; 0.3.75 has no such
    argument but serialises ``extra_dict`` into the node info, where the frontend reads the same key.
    """
    if hasattr(field, "advanced"):
        field.advanced = True
    else:
        field.extra_dict["advanced"] = True
    return field


def model_inputs() -> list:
    """model, positive, negative, vae: what every node that runs the stream engine restyles with."""
    return [
        io.Model.Input("model", tooltip="An SD1.5/SDXL model, usually with an LCM LoRA; patch it with the "
                                        "StreamV2V attention/fusion nodes to use a feature bank."),
        io.Conditioning.Input("positive", tooltip="The prompt that restyles the video."),
        io.Conditioning.Input("negative", tooltip="Only used when cfg is above 1."),
        io.Vae.Input("vae", tooltip="Encodes and decodes every frame; TAESD is much faster."),
    ]


def stream_inputs() -> list:
    """The stream engine's settings shared by the sampler and the loop (defaults from the paper); the names
    are ``nodes.engine.StreamSettings``' fields."""
    return [
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                     tooltip="Seed of the noise added to every frame."),
        io.Int.Input("steps", default=4, min=1, max=50, tooltip="Denoising steps per frame (4 for LCM)."),
        io.Float.Input("strength", default=0.4, min=0.01, max=1.0, step=0.01,
                       tooltip="How much of each frame is re-imagined (SDEdit strength, paper 0.4): low keeps the "
                               "video, high follows the prompt. The first step starts at timestep 1000 x strength "
                               "and the steps are evenly spaced down to the clean frame (StreamDiffusion's rule: "
                               "4 steps at 0.4 = timesteps 399/299/199/99); 1.0 starts from pure noise."),
        io.Float.Input("cfg", default=1.0, min=0.0, max=30.0, step=0.1,
                       tooltip="Guidance. 1.0 (paper) runs the positive prompt only; above 1 the negative prompt steers "
                               "away (full CFG costs twice as much; see 'guidance' for residual CFG at no cost)."),
        io.Boolean.Input("stream_batch", default=True,
                         tooltip="Run all denoising steps of consecutive frames in one model call "
                                 "(StreamDiffusion); same frames, faster on a GPU."),
        io.Boolean.Input("fixed_noise", default=True,
                         tooltip="Use the same noise for every frame: steadier video. Off: fresh noise per frame."),
        io.Boolean.Input("similarity_filter", default=False, optional=True,
                         tooltip="Reuse the previous output for frames that barely changed (saves work on "
                                 "static shots)."),
        advanced(io.Float.Input("similarity_threshold", default=0.98, min=0.0, max=0.999, step=0.001, optional=True,
                                tooltip="Cosine similarity above which frames may be skipped.")),
        advanced(io.Int.Input("max_skips", default=10, min=1, max=1000, optional=True,
                              tooltip="Once more than this many frames in a row reused an output, the next is "
                                      "processed (StreamDiffusion's rule: at most max_skips + 1 in a row).")),
        io.Combo.Input("bank_start", options=list(BANK_START_CHOICES), default=FRESH, optional=True,
                       tooltip=f"'{FRESH}': this run starts a new stream (the feature bank is cleared, frames "
                               f"count from 0). '{CONTINUE}': carry on from the previous run of the same bank "
                               f"(bank, frame numbers, noise and similarity filter continue), for videos queued "
                               f"in chunks (VideoHelperSuite meta-batches, Auto Queue): N runs of k frames give the "
                               f"frames of one run of N*k. '{IN_FLIGHT}': as continue, and the stream batch keeps "
                               f"its frames in flight between runs, for one frame per run (Auto Queue, "
                               f"comfystream): one model call per frame, output lags the input by steps-1 frames "
                               f"(the first input is shown while the pipeline fills). A change of model, LoRA, "
                               f"size, steps, strength or cfg always starts afresh, with the reason in the log and "
                               f"the bank's status line."),
        advanced(io.Combo.Input("compile", options=list(COMPILE_MODES), default=OFF, optional=True,
                                tooltip=f"Run the UNet (with the bank patches inside) through torch.compile. "
                                        f"'{OFF}': as usual. '{DEFAULT}': inductor's fused kernels. '{CUDA_GRAPHS}': "
                                        f"also replays each compiled graph as one CUDA graph, for the least launch "
                                        f"overhead (a CUDA device, ComfyUI started with --disable-cuda-malloc, the "
                                        f"whole model on the GPU; otherwise it runs '{DEFAULT}', with a note in the "
                                        f"log). The first frames of the first stream take long while it compiles "
                                        f"(Cancel works meanwhile); if compiling fails the stream runs uncompiled, "
                                        f"with a note in the log. Old workflows' true/false mean "
                                        f"'{DEFAULT}'/'{OFF}'.")),
    ]


def guidance_inputs() -> list:
    """How cfg uses the negative prompt (added in 0.3: after every older input, so saved workflows keep
    their widget values in place)."""
    return [
        io.Combo.Input("guidance", options=list(GUIDANCE_CHOICES), default=FULL, optional=True,
                       tooltip=f"How cfg above 1 uses the negative prompt. '{FULL}': the negative prompt runs through "
                               f"the model for every frame and step (twice the cost). '{SELF_NEGATIVE}' "
                               f"(StreamDiffusion's residual CFG): the input frame itself is the negative, no extra "
                               f"cost. '{ONE_TIME_NEGATIVE}': the negative prompt runs once per frame, at its first "
                               f"step, and is reused for the later steps (one extra row per frame)."),
        advanced(io.Float.Input("residual_delta", default=1.0, min=0.0, max=1.0, step=0.05, optional=True,
                                tooltip="How much of the residual negative is used (StreamDiffusion's delta; "
                                        "1 = all). Only with a residual guidance and cfg above 1.")),
    ]


class NodeInputs:
    """A node's keyword inputs handed out by name: each dataclass takes the inputs it has fields for, ``take``
    takes single ones, and ``check_all_taken`` refuses names nothing took (a renamed field or input that
    would otherwise fall back to its default without a word)."""

    def __init__(self, who: str, inputs: dict):
        self.who, self.left = who, dict(inputs)

    def build(self, cls):
        """A ``cls`` dataclass from the inputs named as its fields (missing or None ones keep their defaults)."""
        names = {f.name for f in fields(cls)}
        picked = {k: self.left.pop(k) for k in list(self.left) if k in names}
        return cls(**{k: v for k, v in picked.items() if v is not None})

    def take(self, name: str, default=None):
        """One input by name (``default`` when it was not given or is None)."""
        value = self.left.pop(name, None)
        return default if value is None else value

    def check_all_taken(self) -> None:
        if self.left:
            # ComfyUI passes only inputs the schema declares: one nothing took is the pack's own mistake.
            raise TypeError(f"{self.who} does not use its input(s) {', '.join(sorted(self.left))}: a bug in the "
                            f"StreamV2V pack, please report it")

