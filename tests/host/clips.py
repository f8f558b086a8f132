"""Test clips written with PyAV, and reading MP4s back.

    make_clip(path, frames=12, size=(64, 64), fps=12, tone=True)   # moving bar (+ 440 Hz AAC tone)
    frames, rate, samples, audio_rate = read_back(path)
"""
from __future__ import annotations

from fractions import Fraction

import av
import numpy as np

TONE_HZ, AUDIO_RATE = 440.0, 16000


def make_clip(path, frames=12, size=(64, 64), fps=12, tone=True, faststart=False):
    """An H.264 MP4 (or other container by suffix) of ``frames`` frames [H, W] with an AAC 440 Hz tone.

    ``fps`` may be a Fraction (30000/1001); ``faststart`` puts the index first (so a cut file still
    declares every frame).
    """
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as out:
        video = out.add_stream("libx264", rate=Fraction(fps))
        video.width, video.height, video.pix_fmt = size[1], size[0], "yuv420p"
        audio = out.add_stream("aac", rate=AUDIO_RATE) if tone else None
        if audio is not None:
            audio.layout = "mono"
        sample = 0
        for i in range(frames):
            img = np.full((size[0], size[1], 3), 40, np.uint8)
            img[:, (i * 5) % size[1]] = 230
            img[..., 2] = (i * 15) % 256
            out.mux(video.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
            if audio is not None:
                n = round(AUDIO_RATE * (i + 1) / float(fps)) - sample
                wave = 0.5 * np.sin(2 * np.pi * TONE_HZ * np.arange(sample, sample + n) / AUDIO_RATE)
                frame = av.AudioFrame.from_ndarray(wave.astype(np.float32)[None], format="fltp", layout="mono")
                frame.sample_rate, frame.pts = AUDIO_RATE, sample
                sample += n
                out.mux(audio.encode(frame))
        out.mux(video.encode(None))
        if audio is not None:
            out.mux(audio.encode(None))
    return path


def read_back(path):
    """(frames [N, H, W, 3] uint8, average fps, audio samples mono float or None, audio rate)."""
    with av.open(str(path)) as c:
        rate = c.streams.video[0].average_rate
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    samples, audio_rate = None, None
    with av.open(str(path)) as c:
        if c.streams.audio:
            audio_rate = c.streams.audio[0].sample_rate
            samples = np.concatenate([f.to_ndarray()[0] for f in c.decode(audio=0)])
    return frames, rate, samples, audio_rate

