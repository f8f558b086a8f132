"""StreamV2VNextFrame: the next frame(s) of a video or image folder on every run, for Auto Queue."""
from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

from .cursors import CURSORS, FrameCursor
from ..input_files import check_input
from .inputs import source_inputs
from .sources import FILE_SOURCES, FramePick, SourceChoice
from .._schema import VIDEO_CATEGORY, NodeInputs
from ..wording import every_nth, plural

log = logging.getLogger("streamv2v")


class StreamV2VNextFrame(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StreamV2VNextFrame",
            display_name="StreamV2V Next Frame",
            category=VIDEO_CATEGORY,
            description="Gives the next frame (or the next `count` frames) of a video or image folder every time the "
                        "prompt runs: for Auto Queue, which then restyles a long video one chunk per run with our "
                        "nodes alone. The position is kept between prompts under the cursor name; a FeatureBank with "
                        "a fixed name keeps the bank too. (comfystream only accepts graphs whose frame input is "
                        "LoadImage/LoadTensor: use workflows/api/streamv2v_comfystream_api.json there.)",
            inputs=[*source_inputs(FILE_SOURCES),
                    io.String.Input("cursor", default="default",
                                    tooltip="Name of the position kept between prompts; nodes with the same "
                                            "name share it."),
                    io.Boolean.Input("reset", default=False,
                                     tooltip="Start again from the first frame on this run (turn it off again "
                                             "to advance). The bank restarts with the sampler's bank_start 'fresh' "
                                             "or the Clear button on the FeatureBank node."),
                    io.Combo.Input("at_end", options=["loop", "stop"], default="loop",
                                   tooltip="After the last frame: loop back to the first, or stop with an error "
                                           "(ends Auto Queue)."),
                    io.Int.Input("count", default=1, min=1, max=4096, optional=True,
                                 tooltip="Frames per run: an IMAGE batch of up to this many (fewer at the end of "
                                         "the source). Larger batches let StreamV2V Sampler use its stream batch."),
                    ],
            outputs=[io.Image.Output(display_name="image", tooltip="The frames [count, H, W, 3], in order."),
                     io.Int.Output(display_name="index", tooltip="Number of the first of them in the picked frames, "
                                                                 "from 0."),
                     io.Int.Output(display_name="total", tooltip="Picked frames in the source (0 if unknown).")],
        )

    @classmethod
    def validate_inputs(cls, file=""):
        return check_input(file) or True

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return float("nan")  # new frames on every run

    @classmethod
    def execute(cls, cursor="default", reset=False, at_end="loop", count=1, **inputs) -> io.NodeOutput:
        given = NodeInputs("StreamV2V Next Frame", inputs)
        pick, origin = given.build(FramePick), given.build(SourceChoice)
        given.check_all_taken()
        if origin.source not in FILE_SOURCES:
            raise ValueError(f"source must be one of {FILE_SOURCES}, got {origin.source!r}")
        key = (origin, pick)
        name = str(cursor)
        with CURSORS.lock:
            current = CURSORS.get(name)
            if current is None or current.key != key or reset:
                if current is not None:
                    log.info("StreamV2V cursor %r restarts: %s", name,
                             "reset requested" if reset else "source or options changed")
                current = _restart(name, key, origin, pick)
            first = current.index
            frames = _take(current, count)
            if not frames:
                if current.index == 0:
                    raise ValueError(f"StreamV2V cursor {name!r}: no frames left after skipping "
                                     f"{plural(pick.skip_first, 'frame')} ({every_nth(pick.every_nth)} kept): "
                                     f"lower skip_first")
                if at_end == "stop":
                    raise ValueError(f"StreamV2V cursor {name!r}: end of the source after "
                                     f"{plural(current.index, 'frame')} (set at_end to 'loop', or reset to start "
                                     f"again)")
                log.info("StreamV2V cursor %r: end of the source, looping to the first frame", name)
                current = _restart(name, key, origin, pick)
                first, frames = 0, _take(current, count)
            return io.NodeOutput(torch.stack(frames), first, current.total or 0)


def _restart(name: str, key: tuple, origin: SourceChoice, pick: FramePick) -> FrameCursor:
    cursor = FrameCursor(key, origin, pick)
    CURSORS.put(name, cursor)
    return cursor


def _take(cursor: FrameCursor, count: int) -> list[torch.Tensor]:
    frames = []
    while len(frames) < count and (frame := cursor.next()) is not None:
        frames.append(frame)
    return frames


NODES = [StreamV2VNextFrame]
