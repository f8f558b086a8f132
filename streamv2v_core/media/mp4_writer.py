"""The MP4 a stream is written to, frame by frame, with the source's audio (PyAV).

``Mp4Writer(path, width, height, fps, audio)`` encodes each frame as it comes (fragmented
MP4: what is written stays playable) and adds the audio for the time span written, from
``AudioFile`` (a track of a file, copied or re-encoded) or ``AudioSamples`` (a waveform in
memory, e.g. from a ComfyUI VIDEO built from components).
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
import torch

from .frames import to_uint8

log = logging.getLogger("streamv2v")

MP4_AUDIO_CODECS = {"aac", "mp3", "ac3", "eac3", "alac", "flac", "opus"}
MIN_AUDIO_RATE = 8000  # AAC's lowest common rate; ComfyUI marks a missing rate as 1


@dataclass(frozen=True)
class AudioFile:
    """The first audio track of ``source`` (a path, or a whole file's bytes) from ``start`` seconds on."""

    source: str | bytes
    start: float = 0.0

    def open(self):
        return av.open(io.BytesIO(self.source) if isinstance(self.source, bytes) else self.source)


@dataclass(frozen=True)
class AudioSamples:
    """A waveform ``[channels, samples]`` (float, -1..1) at ``rate`` Hz, used from ``start`` seconds on."""

    samples: np.ndarray
    rate: int
    start: float = 0.0


class Mp4Writer:
    """H.264 MP4 written frame by frame; ``close()`` (in a ``finally``) finishes it.

    The MP4 is fragmented at every key frame (one a second) and each frame is encoded as it
    arrives without look-ahead, so if the process dies, all but the last second stays
    playable; ``close()`` (also on cancel or error) keeps every frame. (A fragment per frame
    would lose less on a crash, but ffmpeg's MP4 muxer then shifts the audio packet that
    opens each fragment onto its successor's time, dropping audio.) ``fps``: the constant frame
    rate; frame i is shown at i / fps (a live recording places its frames on that grid first:
    ``frame_grid.FrameGrid``).
    ``audio``: an ``AudioFile`` (remuxed when MP4 can hold its codec, else re-encoded to AAC)
    or ``AudioSamples`` (encoded to AAC), as long as the video written so far.
    """

    def __init__(self, path: str, width: int, height: int, fps: Fraction | float,
                 audio: AudioFile | AudioSamples | None = None, crf: int = 18):
        if not fps or fps <= 0:
            raise ValueError(f"an MP4 needs a positive frame rate, got {fps!r}")
        self.path, self.width, self.height = path, width, height
        self.fps = Fraction(fps)
        self.frames = 0
        gop = max(1, round(float(self.fps)))
        self.container = av.open(path, mode="w", format="mp4",
                                 container_options={"movflags": "frag_keyframe+empty_moov+default_base_moof",
                                                    "flush_packets": "1"})
        try:
            self.video = self.container.add_stream("libx264", rate=self.fps)
            self.video.width, self.video.height, self.video.pix_fmt = width, height, "yuv420p"
            self._time_base = 1 / self.fps
            self.video.codec_context.time_base = self._time_base
            self.video.options = {"preset": "veryfast", "tune": "zerolatency", "crf": str(crf), "g": str(gop)}
            self._audio = _open_audio(self.container, audio)
        except BaseException:
            self.container.close()
            raise

    def write(self, image: torch.Tensor | np.ndarray) -> None:
        """Encode ``image [height, width, 3]`` (float in 0..1, or uint8 pixels) as the next frame and mux it (and
        the audio up to its end)."""
        if tuple(image.shape[:2]) != (self.height, self.width):
            raise ValueError(f"frame is {image.shape[1]}x{image.shape[0]}, the MP4 is {self.width}x{self.height}")
        pixels = image if isinstance(image, np.ndarray) else to_uint8(image)
        frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
        frame.pts = self.frames
        frame.time_base = self._time_base
        for packet in self.video.encode(frame):
            self.container.mux(packet)
        self.frames += 1
        if self._audio:
            self._audio.copy_until(self.duration())

    def duration(self) -> float:
        """Seconds of video written (end of the last frame)."""
        return self.frames / float(self.fps)

    def close(self) -> None:
        """Flush the encoder, write the rest of the audio span, close the file (safe to call twice)."""
        if self.container is None:
            return
        try:
            for packet in self.video.encode(None):
                self.container.mux(packet)
            if self._audio:
                self._audio.copy_until(self.duration(), final=True)
        finally:
            if self._audio:
                self._audio.close()
            self.container.close()
            self.container = None


def _open_audio(output, audio: AudioFile | AudioSamples | None):
    if isinstance(audio, AudioFile):
        return _AudioCopy(output, audio)
    if isinstance(audio, AudioSamples):
        if audio.rate < MIN_AUDIO_RATE or audio.samples.size == 0:
            log.warning("StreamV2V: the source's audio (%d Hz, %d samples) is left out: no usable sample rate",
                        audio.rate, audio.samples.shape[-1])
            return None
        return _AudioEncode(output, audio)
    return None


def _mux_encoded(output, packets) -> None:
    # AAC's first packet (encoder priming) has a negative time; it would shift the video
    # in the fragmented MP4, so it is left out.
    for out in packets:
        if out.pts is None or out.pts >= 0:
            output.mux(out)


def _aac_stream(output, rate: int, channels: int):
    stream = output.add_stream("aac", rate=rate)
    stream.layout = "mono" if channels == 1 else "stereo"
    return stream


class _AudioCopy:
    """Copies a span of a file's first audio track into an open output container."""

    def __init__(self, output, audio: AudioFile):
        self.input = audio.open()
        try:
            source = self.input.streams.audio[0]
            self.start = audio.start
            self.remux = source.codec_context.name in MP4_AUDIO_CODECS
            if self.remux:
                self.stream = output.add_stream_from_template(source)
            else:
                rate = source.codec_context.sample_rate or 48000
                channels = source.codec_context.layout.nb_channels if source.codec_context.layout else 2
                self.stream = _aac_stream(output, rate, channels)
                self.resampler = av.AudioResampler(format="fltp", layout=self.stream.layout, rate=rate)
                self.samples = 0
            self.output = output
            self.packets = self.input.demux(source)
            self.pending = None
        except BaseException:
            self.input.close()
            raise

    def copy_until(self, end: float, final: bool = False) -> None:
        """Copy what starts before ``start + end`` seconds of the source."""
        limit = self.start + end
        while True:
            packet = self.pending or next(self.packets, None)
            self.pending = None
            if packet is None:
                break
            if packet.pts is None or (self.remux and packet.dts is None):
                continue
            when = float(packet.pts * packet.time_base)
            if when >= limit:
                self.pending = packet
                break
            if when < self.start:
                continue
            self._write(packet)
        if final and not self.remux:
            _mux_encoded(self.output, self.stream.encode(None))

    def _write(self, packet) -> None:
        if self.remux:
            shift = round(self.start / packet.time_base)
            packet.pts -= shift
            packet.dts -= shift
            packet.stream = self.stream
            self.output.mux(packet)
            return
        for frame in packet.decode():
            for resampled in self.resampler.resample(frame):
                resampled.pts = self.samples
                self.samples += resampled.samples
                _mux_encoded(self.output, self.stream.encode(resampled))

    def close(self) -> None:
        self.input.close()


class _AudioEncode:
    """Encodes a span of an in-memory waveform to AAC (mono, or the first two channels)."""

    def __init__(self, output, audio: AudioSamples):
        samples = np.asarray(audio.samples, dtype=np.float32)
        self.samples = samples[:2] if samples.shape[0] > 2 else samples
        self.rate = int(audio.rate)
        self.stream = _aac_stream(output, self.rate, self.samples.shape[0])
        self.output = output
        self.first = max(0, round(audio.start * self.rate))
        self.written = 0

    def copy_until(self, end: float, final: bool = False) -> None:
        """Encode the samples up to ``end`` seconds after the start."""
        stop = min(self.samples.shape[1], self.first + round(end * self.rate))
        begin = self.first + self.written
        if stop > begin:
            chunk = np.ascontiguousarray(self.samples[:, begin:stop])
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=self.stream.layout.name)
            frame.sample_rate, frame.pts = self.rate, self.written
            self.written += chunk.shape[1]
            _mux_encoded(self.output, self.stream.encode(frame))
        if final:
            _mux_encoded(self.output, self.stream.encode(None))

    def close(self) -> None:
        pass
