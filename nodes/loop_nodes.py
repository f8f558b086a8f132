"""StreamV2VLoop (source -> stream engine -> MP4 + live preview) and StreamV2VNextFrame (one frame per queue)."""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from fractions import Fraction
from typing import Iterator

import torch
from comfy_api.latest import io, ui

import comfy.model_management
import comfy.utils
import folder_paths

from ..streamv2v_core.video_io import (SESSIONS, CameraSource, FrameResizer, ImageFolderSource, Mp4Writer,
                                       VideoFileSource, fit_to, select_frames, selected_count)
from .previews import preview_of
from .sampler_nodes import CATEGORY, stream_inputs, stream_settings
from .stream_engine import run_stream

log = logging.getLogger("streamv2v")

VIDEO_FILE, IMAGE_FOLDER, CAMERA, BROWSER = "video file", "image folder", "camera", "browser webcam"
SOURCES = (VIDEO_FILE, IMAGE_FOLDER, CAMERA, BROWSER)
FILE_SOURCES = (VIDEO_FILE, IMAGE_FOLDER)
PREVIEW_INTERVAL_S = 0.1


# --------------------------------------------------------------------------- shared inputs

def source_inputs(choices=SOURCES) -> list:
    """Where frames come from and how they are picked and sized (shared by both nodes)."""
    return [
        io.Combo.Input("source", options=list(choices), default=choices[0],
                       tooltip="Where frames come from: a video file, a folder of images"
                               + (", a camera on the server (OpenCV index), or the browser's webcam (press "
                                  "'Start webcam' on the node)." if CAMERA in choices else ".")),
        io.String.Input("path", default="",
                        tooltip="Video file or image folder: a name in ComfyUI's input folder (as core Load Video "
                                "takes it, e.g. 'clip.mp4') or an absolute path."),
        io.Int.Input("skip_first", default=0, min=0, max=10_000_000,
                     tooltip="Drop this many frames at the start of the source."),
        io.Int.Input("every_nth", default=1, min=1, max=1000,
                     tooltip="Then keep every n-th frame (2 halves the frame rate; the video keeps its length)."),
        io.Int.Input("width", default=0, min=0, max=8192, step=8,
                     tooltip="Resize frames to this width (0 = source width; with height 0 the aspect is kept). "
                             "Sizes are cropped to a multiple of 8."),
        io.Int.Input("height", default=0, min=0, max=8192, step=8,
                     tooltip="Resize frames to this height (0 = source height; with width 0 the aspect is kept)."),
        io.Combo.Input("resize_mode", options=["crop", "stretch"], default="crop",
                       tooltip="crop: scale to cover the target and cut the centre. stretch: scale to it exactly."),
    ]


def resolve_path(path: str) -> str:
    """A name in ComfyUI's input folder (annotations like 'clip.mp4 [input]' allowed) or an absolute path."""
    path = str(path).strip()
    if not path:
        raise ValueError("no path given: name a video file or image folder in ComfyUI's input folder, "
                         "or give an absolute path")
    if os.path.isabs(path):
        return path
    return folder_paths.get_annotated_filepath(path)


def open_file_source(source: str, path: str):
    """A VideoFileSource or ImageFolderSource; raises a clear error for a bad path before any work."""
    if source == VIDEO_FILE:
        return VideoFileSource(resolve_path(path))
    if source == IMAGE_FOLDER:
        return ImageFolderSource(resolve_path(path))
    raise ValueError(f"source must be one of {FILE_SOURCES}, got {source!r}")


# --------------------------------------------------------------------------- the loop node

class StreamV2VLoop(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        shared = stream_inputs()
        return io.Schema(
            node_id="StreamV2VLoop",
            display_name="StreamV2V Loop (video / camera / webcam -> MP4)",
            category=CATEGORY,
            description="Pulls frames one by one from a video file, an image folder, a camera or the browser's "
                        "webcam, restyles each with the StreamV2V stream engine (as StreamV2V Sampler) and "
                        "writes it to an MP4 in the output folder as soon as it is ready (with the source's "
                        "audio and frame rate), with a live preview. Memory stays constant for any length. "
                        "Live sources run until you press Cancel or the node's Stop button.",
            inputs=[*shared[:4], *source_inputs(),
                    io.Int.Input("max_frames", default=0, min=0, max=100_000_000,
                                 tooltip="Stop after this many frames (0 = the whole source; live sources run "
                                         "until stopped)."),
                    io.Int.Input("camera_index", default=0, min=0, max=64,
                                 tooltip="camera source: OpenCV device index on the server (0 = /dev/video0)."),
                    io.String.Input("session", default="webcam",
                                    tooltip="Name linking the node's webcam/Stop buttons in the browser to this "
                                            "run; use different names for several loop nodes."),
                    io.Float.Input("fps", default=0.0, min=0.0, max=240.0, step=0.5,
                                   tooltip="Frame rate of the MP4 for sources without one (image folder; "
                                           "0 = 24). Video files keep theirs; camera and webcam use the clock."),
                    io.String.Input("filename_prefix", default="StreamV2V/loop",
                                    tooltip="MP4 name in the output folder (subfolders allowed)."),
                    *shared[4:]],
            outputs=[io.String.Output(display_name="video_path", tooltip="Absolute path of the MP4 written."),
                     io.Image.Output(display_name="last_frame", tooltip="The last restyled frame [1, H, W, 3]."),
                     io.Int.Output(display_name="frames", tooltip="Number of frames written.")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, source=VIDEO_FILE, **kwargs):
        # Live sources give new frames every run; files are re-read only when the inputs change.
        return float("nan") if source in (CAMERA, BROWSER) else ""

    @classmethod
    def execute(cls, model, positive, negative, vae, source, path="", skip_first=0, every_nth=1, width=0,
                height=0, resize_mode="crop", max_frames=0, camera_index=0, session="webcam", fps=0.0,
                filename_prefix="StreamV2V/loop", **kwargs) -> io.NodeOutput:
        settings = stream_settings(**kwargs)
        settings.check()
        resize = FrameResizer(width, height, resize_mode)
        live = SESSIONS.get(str(session))
        live.start()
        reader, frames, rate, audio = _open_loop_source(source, path, camera_index, live)
        try:
            total = selected_count(getattr(reader, "total", None), skip_first, every_nth, max_frames)
            picked = (resize(f) for f in select_frames(_until_stopped(frames, live), skip_first, every_nth,
                                                       max_frames))
            runs = _SizeRuns(picked)
            if runs.pending is None:
                raise ValueError(f"no frames left from the {source} after skipping {skip_first} "
                                 f"(every {every_nth}th kept)")
            if rate is not None:
                rate = rate / every_nth
            elif source == IMAGE_FOLDER:
                rate = Fraction(fps or 24).limit_denominator(1001)
            audio = (audio, skip_first / float(reader.fps)) if audio else None
            target = _output_file(filename_prefix)
            sink = _Sink(target, runs.pending.shape[0], runs.pending.shape[1], rate, audio, total,
                         live if source == BROWSER else None, getattr(getattr(cls, "hidden", None), "unique_id", None))
            try:
                while (run := runs.next_run()) is not None:
                    base = sink.frames
                    run_stream(model, positive, negative, vae, run, settings,
                               lambda i, image: sink.put(base + i, image))
            finally:
                sink.close()
        finally:
            live.running = False
            reader.close()
        log.info("StreamV2V loop wrote %d frames to %s", sink.frames, target[0])
        saved = ui.SavedResult(target[1], target[2], io.FolderType.output)
        return io.NodeOutput(target[0], sink.last[None], sink.frames, ui=ui.PreviewVideo([saved]))


def _open_loop_source(source, path, camera_index, live):
    """(reader with .close(), frame iterator, fps or None, audio file or None); errors before any work."""
    if source in FILE_SOURCES:
        reader = open_file_source(source, path)
        return reader, iter(reader), reader.fps, (reader.path if reader.has_audio else None)
    if source == CAMERA:
        reader = CameraSource(camera_index)
        return reader, iter(reader), None, None
    if source == BROWSER:
        return _Closer(), live.frames(comfy.model_management.throw_exception_if_processing_interrupted), None, None
    raise ValueError(f"source must be one of {SOURCES}, got {source!r}")


class _Closer:
    def close(self) -> None:
        pass


def _until_stopped(frames: Iterator[torch.Tensor], live) -> Iterator[torch.Tensor]:
    """Frames until the session's Stop button; checks ComfyUI's cancel between frames."""
    for frame in frames:
        comfy.model_management.throw_exception_if_processing_interrupted()
        if live.stopped:
            log.info("StreamV2V loop: stop requested (session %r)", live.name)
            return
        yield frame


class _SizeRuns:
    """Splits a frame stream into runs of one size; a size change starts a new run (the engine needs one size)."""

    def __init__(self, frames: Iterator[torch.Tensor]):
        self.frames = iter(frames)
        self.pending = next(self.frames, None)
        self.size = None
        self.index = 0

    def next_run(self) -> Iterator[torch.Tensor] | None:
        if self.pending is None:
            return None
        first, self.pending = self.pending, None
        size = tuple(first.shape[:2])
        if self.size is not None:
            log.warning("StreamV2V loop: frame size changed from %dx%d to %dx%d at frame %d: restarting the "
                        "stream; the feature bank is reset for the new size; the MP4 keeps %dx%d (frames are "
                        "scaled to it)", self.size[1], self.size[0], size[1], size[0], self.index,
                        self.first_size[1], self.first_size[0])
        else:
            self.first_size = size
        self.size = size
        return self._run(first, size)

    def _run(self, first, size):
        self.index += 1
        yield first
        for frame in self.frames:
            if tuple(frame.shape[:2]) != size:
                self.pending = frame
                return
            self.index += 1
            yield frame


def _output_file(prefix: str) -> tuple[str, str, str]:
    """(absolute path, file name, subfolder) of a new MP4 in ComfyUI's output folder."""
    folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, folder_paths.get_output_directory())
    os.makedirs(folder, exist_ok=True)
    file = f"{name}_{counter:05}_.mp4"
    return os.path.join(folder, file), file, subfolder


class _Sink:
    """Writes each restyled frame to the MP4 and shows progress (frames, total, fps) and the newest frame."""

    def __init__(self, target, height, width, rate, audio, total, browser, node_id):
        self.writer = Mp4Writer(target[0], width, height, rate, audio)
        self.height, self.width, self.total = height, width, total
        self.browser, self.node_id = browser, node_id
        self.progress = comfy.utils.ProgressBar(total or 1, node_id=node_id)
        self.frames, self.last, self.started, self.shown = 0, None, time.monotonic(), 0.0

    def put(self, index: int, image: torch.Tensor) -> None:
        """Frame ``index`` (``[H, W, 3]``) is finished: write it now."""
        image = fit_to(image.detach().cpu(), self.height, self.width)
        self.writer.write(image)
        self.frames, self.last = self.frames + 1, image
        if self.browser is not None:
            self.browser.publish(image)
        now = time.monotonic()
        if now - self.shown >= PREVIEW_INTERVAL_S or self.frames == self.total:
            self.shown = now
            fps = self.frames / max(now - self.started, 1e-6)
            self.progress.update_absolute(self.frames, self.total or self.frames, preview_of(image))
            _progress_text(f"{self.frames}/{self.total or '?'} frames, {fps:.1f} fps", self.node_id)

    def close(self) -> None:
        self.writer.close()


def _progress_text(text: str, node_id) -> None:
    """Show ``text`` on the node when a ComfyUI server runs (no-op in-process)."""
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is not None and node_id is not None and hasattr(instance, "send_progress_text"):
        instance.send_progress_text(text, node_id)


# --------------------------------------------------------------------------- per-queue source

class FrameCursor:
    """An open source and the index of the next frame it gives."""

    def __init__(self, key: tuple, source: str, path: str, skip_first: int, every_nth: int, resize: FrameResizer):
        self.key = key
        self.reader = open_file_source(source, path)
        self.total = selected_count(self.reader.total, skip_first, every_nth)
        self.frames = (resize(f) for f in select_frames(self.reader, skip_first, every_nth))
        self.index = 0

    def next(self) -> torch.Tensor | None:
        """The next frame ``[H, W, 3]``, or None at the end."""
        frame = next(self.frames, None)
        if frame is not None:
            self.index += 1
        return frame

    def close(self) -> None:
        self.reader.close()


class CursorRegistry:
    """Named frame cursors that outlive a prompt; ``reset()`` closes and forgets them."""

    def __init__(self):
        self._cursors: dict[str, FrameCursor] = {}
        self.lock = threading.RLock()

    def get(self, name: str) -> FrameCursor | None:
        return self._cursors.get(name)

    def put(self, name: str, cursor: FrameCursor) -> None:
        with self.lock:
            self.reset(name)
            self._cursors[name] = cursor

    def reset(self, name: str | None = None) -> None:
        with self.lock:
            for key in ([name] if name is not None else list(self._cursors)):
                cursor = self._cursors.pop(key, None)
                if cursor is not None:
                    cursor.close()


CURSORS = CursorRegistry()


class StreamV2VNextFrame(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StreamV2VNextFrame",
            display_name="StreamV2V Next Frame (per queue)",
            category=CATEGORY,
            description="Gives the next frame of a video or image folder every time the prompt runs (for Auto "
                        "Queue and per-frame executors such as comfystream). The position is kept between "
                        "prompts under the cursor name; a FeatureBank with a fixed name keeps the bank too.",
            inputs=[*source_inputs(FILE_SOURCES),
                    io.String.Input("cursor", default="default",
                                    tooltip="Name of the position kept between prompts; nodes with the same "
                                            "name share it."),
                    io.Boolean.Input("reset", default=False,
                                     tooltip="Start again from the first frame on this run (turn it off again "
                                             "to advance). Reset the bank with the FeatureBank node's reset."),
                    io.Combo.Input("at_end", options=["loop", "stop"], default="loop",
                                   tooltip="After the last frame: loop back to the first, or stop with an error "
                                           "(ends Auto Queue)."),
                    ],
            outputs=[io.Image.Output(display_name="image", tooltip="The frame [1, H, W, 3]."),
                     io.Int.Output(display_name="index", tooltip="Its number in the picked frames, from 0."),
                     io.Int.Output(display_name="total", tooltip="Picked frames in the source (0 if unknown).")],
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return float("nan")  # a new frame on every run

    @classmethod
    def execute(cls, source, path, skip_first=0, every_nth=1, width=0, height=0, resize_mode="crop",
                cursor="default", reset=False, at_end="loop") -> io.NodeOutput:
        resize = FrameResizer(width, height, resize_mode)
        key = (source, str(path).strip(), skip_first, every_nth, width, height, resize_mode)
        name = str(cursor)
        with CURSORS.lock:
            current = CURSORS.get(name)
            if current is None or current.key != key or reset:
                if current is not None:
                    log.info("StreamV2V cursor %r restarts: %s", name,
                             "reset requested" if reset else "source or options changed")
                current = FrameCursor(key, source, path, skip_first, every_nth, resize)
                CURSORS.put(name, current)
            frame = current.next()
            if frame is None:
                if at_end == "stop" or current.index == 0:
                    raise ValueError(f"StreamV2V cursor {name!r}: end of the source after {current.index} frames "
                                     f"(set at_end to 'loop' or reset to start again)")
                log.info("StreamV2V cursor %r: end of the source, looping to the first frame", name)
                current = FrameCursor(key, source, path, skip_first, every_nth, resize)
                CURSORS.put(name, current)
                frame = current.next()
            return io.NodeOutput(frame[None], current.index - 1, current.total or 0)


NODES = [StreamV2VLoop, StreamV2VNextFrame]
