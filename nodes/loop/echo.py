"""StreamV2VWebcamEcho: the browser webcam link without a model, to see what the link itself costs."""
from __future__ import annotations

from comfy_api.latest import io

from ...streamv2v_core.live.session import SESSIONS, check_session_name
from ...streamv2v_core.stream.frame import Output
from .sink import LoopSink, drops_text
from .sources import BrowserSource, FramePick, FrameStream
from ..node_status import NodeStatus, node_id_of
from .._schema import VIDEO_CATEGORY


class StreamV2VWebcamEcho(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StreamV2VWebcamEcho",
            display_name="StreamV2V Webcam Echo",
            category=VIDEO_CATEGORY,
            description="Sends the browser webcam's frames straight back, through the same session, link and "
                        "preview as the loop node but without a model, so the node shows the link's own frame rate "
                        "and capture-to-display latency. Press ● Start on its panel (it queues the workflow) and "
                        "■ Stop to end. Use it to check a network or browser before loading a model.",
            inputs=[io.String.Input("session", default="webcam",
                                    tooltip="Name linking the node's webcam/Stop buttons to this run (letters, "
                                            "digits, '_', '-', '.'; up to 64)."),
                    io.Int.Input("width", default=512, min=0, max=4096, step=8,
                                 tooltip="Frames are captured and sent back at this width (0 = as the camera "
                                         "gives them, up to 512 on the longest side)."),
                    io.Int.Input("height", default=512, min=0, max=4096, step=8,
                                 tooltip="Frames are captured and sent back at this height (0 = keep the "
                                         "camera's aspect).")],
            outputs=[io.Int.Output(display_name="frames", tooltip="Frames sent back."),
                     io.String.Output(display_name="report", tooltip="Frames, size, frame rate, dropped frames.")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, session="webcam"):
        try:
            check_session_name(session)
        except ValueError as error:
            return str(error)
        return True

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return float("nan")  # a live source: new frames every run

    @classmethod
    def execute(cls, session="webcam", width=512, height=512) -> io.NodeOutput:
        link = SESSIONS.get(session)
        pick = FramePick(width=width, height=height)
        sizer = pick.sizer()
        status = NodeStatus(node_id_of(cls), None, preview=False)
        sink = LoopSink(None, None, None, status, link, live=True)
        link.start()
        try:
            stream = FrameStream(BrowserSource(link, sizer, status), pick, sizer, link)
            for index, frame in enumerate(stream):
                sink.put(Output(index, frame.image, frame))
        finally:
            try:
                sink.close()
            finally:
                link.finish()
        size = f" ({sink.size[1]}x{sink.size[0]})" if sink.size else ""
        report = "; ".join(t for t in (f"echoed {sink.frames} frames{size} at {sink.fps():.1f} fps",
                                       drops_text(link)) if t)
        status.say(report)
        return io.NodeOutput(sink.frames, report)


NODES = [StreamV2VWebcamEcho]
