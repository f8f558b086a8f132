"""StreamV2VSampler: restyle an IMAGE batch frame by frame with the stream batch."""
from __future__ import annotations

from dataclasses import fields

import torch
from comfy_api.latest import io

import comfy.utils

from .compiled_unet import COMPILE_MODES, CUDA_GRAPHS, DEFAULT, OFF
from .node_status import node_id_of
from .previews import PREVIEW_INTERVAL_S, Throttle, preview_of
from .stream_engine import BANK_START_CHOICES, CONTINUE, FRESH, IN_FLIGHT, StreamSettings, run_stream

CATEGORY = "StreamV2V"


def stream_inputs() -> list:
    """Inputs shared by every node that runs the stream engine (defaults from the paper)."""
    return [
        io.Model.Input("model", tooltip="An SD1.5/SDXL model, usually with an LCM LoRA; patch it with the "
                                        "StreamV2V attention/fusion nodes to use a feature bank."),
        io.Conditioning.Input("positive", tooltip="The prompt that restyles the video."),
        io.Conditioning.Input("negative", tooltip="Only used when cfg is above 1."),
        io.Vae.Input("vae", tooltip="Encodes and decodes every frame; TAESD is much faster."),
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                     tooltip="Seed of the noise added to every frame."),
        io.Int.Input("steps", default=4, min=1, max=50, tooltip="Denoising steps per frame (4 for LCM)."),
        io.Float.Input("strength", default=0.4, min=0.01, max=1.0, step=0.01,
                       tooltip="How much of each frame is re-imagined (SDEdit strength, paper 0.4): low keeps the "
                               "video, high follows the prompt. The first step starts at timestep 1000 x strength "
                               "and the steps are evenly spaced down to the clean frame (StreamDiffusion's rule: "
                               "4 steps at 0.4 = timesteps 399/299/199/99); 1.0 starts from pure noise."),
        io.Float.Input("cfg", default=1.0, min=0.0, max=30.0, step=0.1,
                       tooltip="Guidance. 1.0 (paper) runs the positive prompt only and is twice as fast."),
        io.Boolean.Input("stream_batch", default=True,
                         tooltip="Run all denoising steps of consecutive frames in one model call "
                                 "(StreamDiffusion); same frames, faster on a GPU."),
        io.Boolean.Input("fixed_noise", default=True,
                         tooltip="Use the same noise for every frame: steadier video. Off: fresh noise per frame."),
        io.Boolean.Input("similarity_filter", default=False, optional=True,
                         tooltip="Reuse the previous output for frames that barely changed (saves work on "
                                 "static shots)."),
        io.Float.Input("similarity_threshold", default=0.98, min=0.0, max=0.999, step=0.001, optional=True,
                       tooltip="Advanced: cosine similarity above which frames may be skipped."),
        io.Int.Input("max_skips", default=10, min=1, max=1000, optional=True,
                     tooltip="Advanced: at most this many frames in a row reuse an output."),
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
        io.Combo.Input("compile", options=list(COMPILE_MODES), default=OFF, optional=True,
                       tooltip=f"Advanced: run the UNet (with the bank patches inside) through torch.compile. "
                               f"'{OFF}': as usual. '{DEFAULT}': inductor's fused kernels. '{CUDA_GRAPHS}': also "
                               f"replays each compiled graph as one CUDA graph, for the least launch overhead "
                               f"(CUDA devices only; elsewhere it runs '{DEFAULT}', with a note in the log). The "
                               f"first frames of the first stream take long while it compiles; if compiling fails "
                               f"the stream runs uncompiled, with a note in the log. Old workflows' true/false "
                               f"mean '{DEFAULT}'/'{OFF}'."),
    ]


def from_inputs(cls, inputs: dict):
    """A ``cls`` dataclass from the node inputs it has fields for (missing ones keep their defaults)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in inputs.items() if k in names and v is not None})


class StreamV2VSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StreamV2VSampler",
            display_name="StreamV2V Sampler",
            category=CATEGORY,
            description="Restyles frames in order with SDEdit + LCM and StreamDiffusion's stream batch. "
                        "Output frame i belongs to input frame i.",
            inputs=[*stream_inputs()[:4],
                    io.Image.Input("images", tooltip="The video frames, in order (an IMAGE batch)."),
                    *stream_inputs()[4:]],
            outputs=[io.Image.Output(display_name="images", tooltip="The restyled frames, same count and order.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, steps=4, strength=0.4, compile=OFF):
        # Only the inputs named here skip ComfyUI's own min/max and list checks (a **kwargs would skip them
        # all); `compile` is named so that an old workflow's boolean is accepted (True -> default, False -> off).
        try:
            StreamSettings(steps=steps, strength=strength, compile=compile).check()
        except ValueError as error:
            return str(error)
        return True

    @classmethod
    def execute(cls, model, positive, negative, vae, images, **kwargs) -> io.NodeOutput:
        settings = from_inputs(StreamSettings, kwargs)
        settings.check()
        if images is None or images.shape[0] == 0:
            raise ValueError("StreamV2VSampler got an empty image batch: connect a video or image loader")
        total = images.shape[0]
        outputs: list[torch.Tensor | None] = [None] * total
        progress = comfy.utils.ProgressBar(total)
        previews = Throttle(PREVIEW_INTERVAL_S)  # a few previews a second: each costs an encode

        def on_output(index: int, image: torch.Tensor) -> None:
            outputs[index] = image
            preview = preview_of(image) if previews.due(final=index + 1 == total) else None
            progress.update_absolute(index + 1, total, preview)

        node_id = node_id_of(cls)
        run_stream(model, positive, negative, vae, iter(images), settings, on_output,
                   stream_key=f"StreamV2VSampler {node_id}" if node_id is not None else None,
                   who="StreamV2V Sampler")
        return io.NodeOutput(torch.stack(outputs))


NODES = [StreamV2VSampler]
