"""ComfyUI's VIDEO type in and out of the loop node.

In: a VIDEO whose class streams from a file (core LoadVideo's ``VideoFromFile``, or any class
overriding ``get_stream_source``) is decoded frame by frame from that file or buffer, in the
trim window it carries (ComfyUI 0.38's LoadVideo edit), so memory stays flat for any length.
A VIDEO that only exists as frames in memory (``VideoFromComponents``, e.g. core CreateVideo),
or one cropped by 0.38's LoadVideo edit (its crop rectangle is private), is read through
``get_components()``. Frame rate and audio are kept either way.
Out: the MP4 the loop wrote, as a ``VideoFromFile`` (core SaveVideo, GetVideoComponents, preview).
"""
from __future__ import annotations

import logging
import os

from comfy_api.latest import Input, InputImpl

from ..streamv2v_core.media.mp4_writer import AudioSamples
from ..streamv2v_core.media.video_io import TensorSource, VideoFileSource

log = logging.getLogger("streamv2v")


def open_video(video):
    """A frame source (see ``streamv2v_core.media.video_io``) for a ComfyUI VIDEO."""
    if type(video).get_stream_source is not Input.Video.get_stream_source:  # the base re-encodes everything
        source = _stream(video)
        if source is not None:
            return source
    components = video.get_components()
    audio = components.audio
    samples = None
    if audio is not None and audio.get("waveform") is not None:
        samples = AudioSamples(audio["waveform"][0].float().cpu().numpy(), int(audio.get("sample_rate") or 0))
    return TensorSource(components.images, components.frame_rate, samples, name="connected video")


def _stream(video):
    """A VideoFileSource over the VIDEO's file or buffer, or None when its frames differ from the file's."""
    stream = video.get_stream_source()
    if isinstance(stream, (str, os.PathLike)):
        data, name = os.fspath(stream), os.path.basename(os.fspath(stream))
    else:
        data, name = stream.getvalue(), "connected video"
    start, duration = video.get_active_trim_window() if hasattr(video, "get_active_trim_window") else (0.0, 0.0)
    source = VideoFileSource(data, name, start, duration)
    if hasattr(video, "as_cropped"):
        width, height = video.get_dimensions()
        if (height, width) != source.size:
            source.close()
            log.info("StreamV2V: the connected video is cropped to %dx%d: its frames are read from ComfyUI in "
                     "memory (crop with the loop's width/height instead to stream it)", width, height)
            return None
    return source


def video_output(path: str):
    """The MP4 at ``path`` as a ComfyUI VIDEO."""
    return InputImpl.VideoFromFile(path)
