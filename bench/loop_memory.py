"""Constant memory of StreamV2VLoop: peak resident memory after 200 frames vs after a 2,000-frame run.

    .venv/bin/python -P bench/loop_memory.py [--frames 2000] [--check 200] [--steps 2]

Generates a 64x64 H.264 clip with a 440 Hz AAC tone, runs it file-to-file through the
StreamV2VLoop node (in-process ComfyUI on the CPU, tiny random SD1.5 model with a DyMe
feature bank, TAESD) and prints peak RSS (``ru_maxrss``) after ``--check`` frames and at
the end, and their ratio. Needs the test host (scripts/setup_host.sh).
"""
from __future__ import annotations

import argparse
import pathlib
import resource
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from _host import setup_host  # noqa: E402

setup_host("cpu")  # ComfyUI on the CPU and the pack as `streamv2v`

import av  # noqa: E402
import torch  # noqa: E402

import comfy.utils  # noqa: E402
import folder_paths  # noqa: E402
from host import tiny_models  # noqa: E402
from streamv2v.nodes import loop_nodes  # noqa: E402
from streamv2v.nodes.bank_nodes import ExtendedAttentionPatch, FeatureBankNode, FeatureFusionPatch  # noqa: E402


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make_clip(path: pathlib.Path, frames: int, fps: int = 24, size: int = 64) -> None:
    """A moving-bar clip with a tone, written frame by frame."""
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=fps)
        video.width = video.height = size
        video.pix_fmt = "yuv420p"
        audio = out.add_stream("aac", rate=16000)
        audio.layout = "mono"
        sample, per_frame = 0, 16000 // fps
        for i in range(frames):
            img = np.full((size, size, 3), 60, np.uint8)
            img[:, (i * 3) % size] = 220
            img[..., 1] = (i * 7) % 256
            out.mux(video.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
            wave = 0.4 * np.sin(2 * np.pi * 440 * np.arange(sample, sample + per_frame) / 16000)
            frame = av.AudioFrame.from_ndarray(wave.astype(np.float32)[None], format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, sample
            sample += per_frame
            out.mux(audio.encode(frame))
        out.mux(video.encode(None))
        out.mux(audio.encode(None))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--check", type=int, default=200)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()

    work = pathlib.Path(tempfile.mkdtemp(prefix="streamv2v_bench_"))
    (work / "input").mkdir()
    (work / "output").mkdir()
    folder_paths.set_input_directory(str(work / "input"))
    folder_paths.set_output_directory(str(work / "output"))
    make_clip(work / "input" / "clip.mp4", args.frames)

    handle = FeatureBankNode.execute("bench_loop", "dyme", 1, 4, 0).args[0]
    model = tiny_models.tiny_sd15_model(0, out_scale=0.1)
    model = ExtendedAttentionPatch.execute(model, handle, "all").args[0]
    model = FeatureFusionPatch.execute(model, handle, 0.75, 0.9, "low-res decoder").args[0]
    cond = tiny_models.random_conditioning("sd15", 0)
    vae = tiny_models.tiny_taesd_vae(0)

    marks: dict[str, float] = {}
    started = time.monotonic()

    def hook(value, total, preview, node_id=None):
        if value >= args.check and "check" not in marks:
            marks["check"] = peak_rss_mib()
            marks["check_time"] = time.monotonic() - started
            print(f"after {value} frames: peak RSS {marks['check']:.1f} MiB ({marks['check_time']:.0f} s)", flush=True)
        if value % 250 == 0:
            print(f"  {value}/{total} frames, peak RSS {peak_rss_mib():.1f} MiB", flush=True)

    loop_nodes.PREVIEW_INTERVAL_S = 0.0  # this script's own process: a progress call (and preview) per frame
    comfy.utils.set_progress_bar_global_hook(hook)
    with torch.inference_mode():
        path, _, count = loop_nodes.StreamV2VLoop.execute(
            model=model, positive=cond, negative=cond, vae=vae, source="video file", path="clip.mp4",
            seed=0, steps=args.steps, strength=0.5, cfg=1.0, stream_batch=True, fixed_noise=True,
            filename_prefix="bench/loop").args
    elapsed = time.monotonic() - started
    end = peak_rss_mib()
    with av.open(path) as c:
        written = sum(1 for _ in c.demux(video=0) if _.size)
    print(f"frames written: {count} (read back: {written}), {elapsed:.0f} s, {count / elapsed:.1f} fps")
    print(f"peak RSS after {args.check} frames: {marks['check']:.1f} MiB")
    print(f"peak RSS after {count} frames: {end:.1f} MiB")
    print(f"ratio: {end / marks['check']:.4f} ({(end / marks['check'] - 1) * 100:+.2f} %; limit +5 %)")
    sys.exit(0 if end <= marks["check"] * 1.05 else 1)


if __name__ == "__main__":
    main()
