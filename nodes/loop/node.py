"""StreamV2VLoop: a source streamed frame by frame through the stream engine into an MP4, with a live preview."""
from __future__ import annotations

import itertools
import logging
import os

from comfy_api.latest import io, ui
from comfy_execution.graph_utils import ExecutionBlocker
from comfy_execution.utils import get_executing_context

import comfy.model_management

from ...streamv2v_core.live.session import SESSIONS
from ...streamv2v_core.media.frame_grid import MAX_HOLD_S
from ...streamv2v_core.media.frames import selected_count
from ...streamv2v_core.media.video_io import shortfall
from ...streamv2v_core.registry import Registry
from ..input_files import check_input, modified_time
from ...streamv2v_core.stream.frame import RunReport
from .steering import FrameSteering, SteeringChoice, steering_inputs
from .inputs import source_inputs
from .instrument import InstrumentChoice, LoopInstrument, instrument_inputs
from .sink import LoopSink, drops_text
from .sources import BROWSER, LIVE_SOURCES, VIDEO_FILE, FramePick, FrameStream, SourceChoice
from ..node_status import NodeStatus, node_id_of
from ..output_files import check_prefix
from .._schema import VIDEO_CATEGORY, NodeInputs, advanced, guidance_inputs, model_inputs, stream_inputs
from ..engine import OFF, StreamSettings, compile_mode, run_stream
from ..video_input import video_output
from ..wording import every_nth, plural

log = logging.getLogger("streamv2v")

DEFAULT_PREFIX = "StreamV2V/loop"
OUTPUTS = 5
IDLE_TIMEOUT_S = 30.0  # a page closed without Stop frees ComfyUI's queue within a minute
# Runs cut short (stopped or cancelled), by the node and the inputs that name its output: part of that node's
# fingerprint, so queueing it again re-runs it (its cached MP4 is incomplete) and no other loop node.
_CUT_SHORT: Registry[int] = Registry("cut-short loop run", 256, "lru", register=False)


class StreamV2VLoop(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StreamV2VLoop",
            display_name="StreamV2V Loop",
            category=VIDEO_CATEGORY,
            description="Pulls frames one by one from a video (a file in ComfyUI's input folder or a connected VIDEO), "
                        "an image folder, a camera or the browser's webcam, restyles each with the StreamV2V stream "
                        "engine (as StreamV2V Sampler) and writes it to an MP4 in the output folder as soon as it is "
                        "ready (with the source's audio and frame rate), with a live preview. Memory stays constant "
                        "for any length. Live sources run until you press Cancel or the node's Stop button; either "
                        "way the MP4 keeps every frame and is shown.",
            inputs=[*model_inputs(),
                    io.Video.Input("video", optional=True,
                                   tooltip="A VIDEO to restyle (core Load Video, or any node that gives one), with "
                                           "source 'video file'; read frame by frame from its file when it has one. "
                                           "Replaces 'file'."),
                    *source_inputs(),
                    io.Int.Input("max_frames", default=0, min=0, max=100_000_000,
                                 tooltip="Stop after this many frames (0 = the whole source; live sources run "
                                         "until stopped)."),
                    io.Int.Input("camera_index", default=0, min=0, max=64,
                                 tooltip="camera source: OpenCV device index on the server (0 = /dev/video0)."),
                    io.String.Input("session", default="webcam",
                                    tooltip="Name linking the node's webcam/Stop buttons in the browser to this "
                                            "run (letters, digits, '_', '-', '.'; up to 64); use different names "
                                            "for several loop nodes."),
                    io.Float.Input("fps", default=0.0, min=0.0, max=240.0, step=0.5,
                                   tooltip="Frame rate of the MP4 for an image folder (0 = 24) and for a live "
                                           "recording (camera, browser webcam; 0 = the camera's own, else 30): "
                                           "each restyled frame is placed at its capture time on this constant "
                                           "rate, the last one held through gaps, so the MP4 lasts as long as "
                                           "the take. Videos keep their own rate."),
                    io.String.Input("filename_prefix", default=DEFAULT_PREFIX,
                                    tooltip="MP4 name in the output folder ('folder/name'); a new file each run, "
                                            "an existing one is never replaced."),
                    *stream_inputs(),
                    *steering_inputs(),
                    *guidance_inputs(),
                    *instrument_inputs(),
                    advanced(io.Float.Input("idle_timeout", default=IDLE_TIMEOUT_S, min=0.0, max=86400.0, step=1.0,
                                            optional=True,
                                            tooltip="Browser webcam: when no frame has come for this many "
                                                    "seconds (the page was closed without Stop, the camera went "
                                                    "away), the take ends by itself, keeps every frame in its MP4 "
                                                    "and says so in its report, and ComfyUI's queue goes on. "
                                                    "0 = wait for ever."))],
            outputs=[io.String.Output(display_name="video_path", tooltip="Absolute path of the MP4 written."),
                     io.Image.Output(display_name="last_frame", tooltip="The last restyled frame [1, H, W, 3]."),
                     io.Int.Output(display_name="frames", tooltip="Number of frames written."),
                     io.Video.Output(display_name="video",
                                     tooltip="The MP4 written, as a VIDEO (core Save Video, Get Video Components)."),
                     io.String.Output(display_name="report",
                                      tooltip="What happened: frames written, dropped live frames, a source that "
                                              "ended early, a stop.")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, source=VIDEO_FILE, file="", compile=OFF):
        # ComfyUI reports a message on every input this function takes, so it takes only what it checks:
        # `file` (for the sources that read it: a live source never does, so a workflow switched to the webcam
        # is not refused for its old file), `compile` (named so that an old workflow's boolean passes
        # ComfyUI's list check) and `source` (a bad file is then reported on `source` and `file`: whether the
        # file is read at all depends on the source). One take a session is checked in front of POST /prompt
        # (one_take.py), on `session` alone. filename_prefix and prompt_schedule are checked first
        # thing in execute, each naming itself.
        try:
            compile_mode(compile)
        except ValueError as error:
            return str(error)
        if source in LIVE_SOURCES:
            return True
        return check_input(file) or True

    @classmethod
    def fingerprint_inputs(cls, source=VIDEO_FILE, file="", **kwargs):
        # Live sources give new frames every run; files re-run when they or the inputs change.
        if source in LIVE_SOURCES:
            return float("nan")
        context = get_executing_context()
        cut = _CUT_SHORT.find(_cut_key(context.node_id if context else None, source, file))
        return f"{file}|{modified_time(file) if str(file).strip() else ''}|{cut or 0}"

    @classmethod
    def execute(cls, model, positive, negative, vae, video=None, clip=None, hint_video=None,
                **inputs) -> io.NodeOutput:
        given = NodeInputs("StreamV2V Loop", inputs)
        prefix = check_prefix(given.take("filename_prefix", DEFAULT_PREFIX))
        session = SESSIONS.get(given.take("session", "webcam"))
        idle_timeout = float(given.take("idle_timeout", IDLE_TIMEOUT_S))
        settings = given.build(StreamSettings)
        settings.check()
        take_settings = dict(inputs)  # what a recorded take's header keeps
        pick, origin, choice = given.build(FramePick), given.build(SourceChoice), given.build(SteeringChoice)
        playing = given.build(InstrumentChoice)
        given.check_all_taken()
        node_id = node_id_of(cls)
        sizer = pick.sizer()
        browser = origin.source == BROWSER and video is None
        live = origin.live and video is None
        status = NodeStatus(node_id, None, preview=not browser)
        steering = FrameSteering(model, positive, clip, choice, session, hint_video, pick.skip_first, pick.every_nth,
                                 negative, settings)
        instrument = LoopInstrument(playing, session, steering)
        try:
            reader = origin.open(video, session, sizer, status, record=instrument.recording(browser, take_settings),
                                 idle_timeout=idle_timeout)
            instrument.replaying(reader)
            instrument.listen()
        except BaseException:
            instrument.close()
            steering.close()  # its hint video, and the session's live params
            raise
        context = get_executing_context()
        session.start(idle_timeout if browser else 0.0, context.prompt_id if context else None)
        try:
            status.total = selected_count(reader.total, pick.skip_first, pick.every_nth, pick.max_frames)
            rate = origin.rate(reader, pick.every_nth, session.camera_fps if browser else None)
            audio = reader.audio(pick.skip_first / float(reader.fps)) if reader.fps else None
            sink = LoopSink(prefix, rate, audio, status, session, live, origin.timed and video is None,
                            max(MAX_HOLD_S, idle_timeout), instrument.recorder)
            stream = FrameStream(reader, pick, sizer, session, live)
            key = f"StreamV2VLoop {node_id}" if node_id is not None else None
            report, interrupted = _run(model, positive, negative, vae, stream, settings, sink, origin, key, steering)
        finally:
            session.finish()
            reader.close()
            instrument.close()
            steering.close()
        if interrupted or stream.stopped:
            cut = _cut_key(node_id, origin.source, origin.file)
            _CUT_SHORT.put(cut, (_CUT_SHORT.find(cut) or 0) + 1)
        return _outputs(sink, stream, reader, pick, interrupted, steering.report() + instrument.report(), report)


def _run(model, positive, negative, vae, stream, settings, sink, origin, stream_key,
         steering) -> tuple[RunReport | None, bool]:
    """Run the engine over ``stream`` into ``sink``: (its report, True if cancelled after frames were written).

    ``stream_key`` names the stream when the model has no bank (``bank_start`` continue carries the
    frame numbers, noise and filter on from this node's previous run)."""
    frames = iter(stream)
    try:
        try:
            first = next(frames, None)
            if first is None:
                if stream.stopped or getattr(stream.reader, "ended_idle", None):
                    return None, False
                raise ValueError(f"no frames left from the {origin.source} after skipping "
                                 f"{plural(stream.pick.skip_first, 'frame')} ({every_nth(stream.pick.every_nth)} "
                                 f"kept): lower skip_first")
            report = run_stream(model, positive, negative, vae, itertools.chain([first], frames), settings,
                                steering.watch(sink.put), stream_key=stream_key, who="StreamV2V Loop",
                                conditioning=steering)
        finally:
            sink.close()
    except comfy.model_management.InterruptProcessingException:
        if not sink.frames:
            raise
        return None, True
    return report, False


def _cut_key(node_id, source, file) -> str:
    """Names one loop node's run: its id and the widget values that choose its source (what its
    fingerprint sees; other inputs are in ComfyUI's own cache key)."""
    return repr((node_id, source, file))


def _outputs(sink: LoopSink, stream: FrameStream, reader, pick: FramePick, interrupted: bool,
             steering_notes: list[str], report: RunReport | None) -> io.NodeOutput:
    notes = []
    if interrupted:
        notes.append("cancelled: the MP4 keeps every frame written")
    elif stream.stopped:
        notes.append("stopped with the Stop button" + ("" if sink.frames else " before the first frame: nothing "
                                                        "written"))
    elif getattr(reader, "ended_idle", None):
        notes.append(f"no frame for {reader.ended_idle:g} s: ended by idle_timeout (the page was closed without "
                     f"Stop, or the camera stopped)")
    elif not (pick.max_frames and stream.read >= pick.max_frames):
        short = shortfall(reader, stream.read, pick.skip_first, pick.every_nth)
        if short:
            log.warning("StreamV2V loop: %s", short)
            notes.append(f"WARNING: {short}")
    if report is not None and report.reused:
        notes.append(f"the similarity filter reused the previous output for {plural(report.reused, 'frame')}")
    notes += [t for t in (drops_text(sink.session), _skipped_text(reader), _rescaled_text(stream),
                          sink.recording_text()) if t]
    notes += steering_notes
    if sink.frames:
        h, w = sink.size
        written = os.path.join(sink.output.subfolder, sink.output.filename)
        head = f"wrote {plural(sink.frames, 'frame')} ({w}x{h}) to {written}"
    else:
        head = "no frames written"
    text = "; ".join([head, *notes])
    log.info("StreamV2V loop: %s", text)
    sink.status.say(text)
    if not sink.frames:
        blocked = ExecutionBlocker(None)  # nothing to pass on: what follows does not run
        return io.NodeOutput(blocked, blocked, 0, blocked, text)
    saved = ui.PreviewVideo([ui.SavedResult(sink.output.filename, sink.output.subfolder, io.FolderType.output)])
    if interrupted:
        # The preview and the history entry keep the MP4, nothing downstream runs, and the cancel
        # goes on to the rest of the prompt (this node consumed ComfyUI's interrupt flag).
        comfy.model_management.interrupt_current_processing(True)
        return io.NodeOutput(*_blocked(OUTPUTS), ui=saved)
    path = sink.output.path
    return io.NodeOutput(path, sink.last[None], sink.frames, video_output(path), text, ui=saved)


def _blocked(count: int) -> list:
    return [ExecutionBlocker(None) for _ in range(count)]


def _skipped_text(reader) -> str:
    skipped = getattr(reader, "skipped", None)
    if not skipped:
        return ""
    names = "; ".join(skipped[:5]) + ("; ..." if len(skipped) > 5 else "")
    return f"skipped {plural(len(skipped), 'image')} that could not be used: {names}"


def _rescaled_text(stream: FrameStream) -> str:
    sizer = stream.sizer
    if not sizer.rescaled:
        return ""
    return f"{plural(sizer.rescaled, 'frame')} of another size scaled to {sizer.size[1]}x{sizer.size[0]}"


NODES = [StreamV2VLoop]
