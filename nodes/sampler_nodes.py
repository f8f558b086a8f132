"""StreamV2VSampler: restyle an IMAGE batch frame by frame with the stream batch."""
from __future__ import annotations

import torch
from comfy_api.latest import io

import comfy.utils

from .node_status import node_id_of
from .previews import PREVIEW_INTERVAL_S, Throttle, preview_of
from ._schema import SAMPLING_CATEGORY, NodeInputs, guidance_inputs, model_inputs, stream_inputs
from ..streamv2v_core.stream.frame import Output
from .engine import OFF, StreamSettings, run_stream


class StreamV2VSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StreamV2VSampler",
            display_name="StreamV2V Sampler",
            category=SAMPLING_CATEGORY,
            description="Restyles frames in order with SDEdit + LCM and StreamDiffusion's stream batch. "
                        "Output frame i belongs to input frame i.",
            inputs=[*model_inputs(),
                    io.Image.Input("images", tooltip="The video frames, in order (an IMAGE batch)."),
                    *stream_inputs(),
                    *guidance_inputs()],
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
        inputs = NodeInputs("StreamV2V Sampler", kwargs)
        settings = inputs.build(StreamSettings)
        inputs.check_all_taken()
        settings.check()
        if images is None or images.shape[0] == 0:
            raise ValueError("StreamV2VSampler got an empty image batch: connect a video or image loader")
        total = images.shape[0]
        outputs: list[torch.Tensor | None] = [None] * total
        progress = comfy.utils.ProgressBar(total)
        previews = Throttle(PREVIEW_INTERVAL_S)  # a few previews a second: each costs an encode

        def on_output(out: Output) -> None:
            index = out.index
            outputs[index] = out.image
            preview = preview_of(out.image) if previews.due(final=index + 1 == total) else None
            progress.update_absolute(index + 1, total, preview)

        node_id = node_id_of(cls)
        report = run_stream(model, positive, negative, vae, iter(images), settings, on_output,
                            stream_key=f"StreamV2VSampler {node_id}" if node_id is not None else None,
                            who="StreamV2V Sampler", frame_count=total)
        if report.held:  # never pass NaN frames on (they would be black, and poison what uses them)
            shown = ", ".join(map(str, report.held_inputs)) + (", ..." if report.held > len(report.held_inputs) else "")
            raise ValueError(f"StreamV2V Sampler: {report.held} of {total} frames came out not finite (NaN or inf; "
                             f"frames {shown}), so none are passed on. Usual causes: a prompt weight like "
                             f"'(text:1e30)', a model or VAE that overflows in fp16 (try --fp32-vae or bf16), or a "
                             f"LoRA at a huge strength.")
        return io.NodeOutput(torch.stack(outputs))


NODES = [StreamV2VSampler]
