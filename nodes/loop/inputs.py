"""Inputs shared by the loop nodes: where frames come from and how they are picked and sized."""
from __future__ import annotations

from comfy_api.latest import io

from ..input_files import input_choices
from .sources import CAMERA, SOURCES


def source_inputs(choices=SOURCES) -> list:
    """source, file, skip_first, every_nth, width, height, resize_mode."""
    live = CAMERA in choices
    return [
        io.Combo.Input("source", options=list(choices), default=choices[0],
                       tooltip="Where frames come from: a video file, a folder of images"
                               + (", a camera on the server (OpenCV index), or the browser's webcam (press "
                                  "● Start on the node's panel)." if live else ".")),
        io.Combo.Input("file", options=input_choices(), upload=io.UploadType.video,
                       tooltip="A video (or, for 'image folder', a folder of images, shown as 'name/') in ComfyUI's "
                               "input folder; upload one with the button. Files outside the input folder are never "
                               "read." + (" Leave it empty when a VIDEO is connected or the source is live."
                                          if live else "")),
        io.Int.Input("skip_first", default=0, min=0, max=10_000_000,
                     tooltip="Drop this many frames at the start of the source."),
        io.Int.Input("every_nth", default=1, min=1, max=1000,
                     tooltip="Then keep every n-th frame (2 halves the frame rate; the video keeps its length)."),
        io.Int.Input("width", default=0, min=0, max=8192, step=8,
                     tooltip="Resize frames to this width (0 = the first frame's width; with height 0 the aspect is "
                             "kept). Sizes are cropped to a multiple of 8; later frames of another size are scaled "
                             "to the stream's size."),
        io.Int.Input("height", default=0, min=0, max=8192, step=8,
                     tooltip="Resize frames to this height (0 = the first frame's height; with width 0 the aspect "
                             "is kept)."),
        io.Combo.Input("resize_mode", options=["crop", "stretch"], default="crop",
                       tooltip="crop: scale to cover the target and cut the centre. stretch: scale to it exactly."),
    ]
