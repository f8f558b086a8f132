"""Constant memory of StreamV2VLoop: resident memory after 200 frames vs after a 2,000-frame run,
for a file in the input folder and for the same file as a ComfyUI VIDEO (core LoadVideo's VideoFromFile).

    .venv/bin/python -P bench/loop_memory.py [--frames 2000] [--check 200] [--steps 2] [--source both] [--threads 1]
                                             [--conditioning schedule+controlnet]

Generates a 64x64 H.264 clip with a 440 Hz AAC tone, runs it file-to-file through the
StreamV2VLoop node (in-process ComfyUI on the CPU, tiny random SD1.5 model with a DyMe
feature bank, TAESD) and prints peak RSS (``ru_maxrss``) after ``--check`` frames and at the
end, and their ratio. ``--source both`` runs each source in its own process (peak RSS is
per process) and prints a table. ``--conditioning schedule+controlnet`` adds a prompt schedule
(a keyframe every 150 frames, encoded with a tiny CLIP) and a tiny ControlNet whose hint is the
canny of each frame (the loop's per-frame conditioning). Needs the test host (scripts/setup_host.sh).
"""
from __future__ import annotations

import argparse
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
SOURCES = ("file", "video")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_one(args) -> None:
    """One loop run in this process; prints a machine-readable RESULT line last."""
    sys.path.insert(0, str(REPO / "bench"))
    from _host import setup_host

    setup_host("cpu", threads=args.threads)  # ComfyUI on the CPU and the pack as `streamv2v`
    import av
    import torch

    import comfy.utils
    import folder_paths
    from comfy_api.latest import InputImpl
    from host import tiny_models
    from host.clips import make_clip
    from streamv2v.nodes import node_status
    from streamv2v.nodes.bank_nodes import ExtendedAttentionPatch, FeatureBankNode, FeatureFusionPatch
    from streamv2v.nodes.loop.node import StreamV2VLoop

    work = pathlib.Path(tempfile.mkdtemp(prefix="streamv2v_bench_"))
    (work / "input").mkdir()
    (work / "output").mkdir()
    folder_paths.set_input_directory(str(work / "input"))
    folder_paths.set_output_directory(str(work / "output"))
    make_clip(work / "input" / "clip.mp4", frames=args.frames, fps=24)

    handle = FeatureBankNode.execute("bench_loop", "dyme", 1, 4, 0).args[0]
    model = tiny_models.tiny_sd15_model(0, out_scale=0.1)
    model = ExtendedAttentionPatch.execute(model, handle, "all").args[0]
    model = FeatureFusionPatch.execute(model, handle, 0.75, 0.9, "low-res decoder").args[0]
    cond = tiny_models.random_conditioning("sd15", 0)
    vae = tiny_models.tiny_taesd_vae(0)
    extra = {}
    if args.conditioning == "schedule+controlnet":
        cond, extra = per_frame_conditioning(args.frames)
    source = ({"file": "clip.mp4"} if args.source == "file"
              else {"video": InputImpl.VideoFromFile(str(work / "input" / "clip.mp4"))})

    marks: dict[str, float] = {}
    started = time.monotonic()

    def hook(value, total, preview, node_id=None):
        if value >= args.check and "check" not in marks:
            marks["check"] = peak_rss_mib()
            print(f"[{args.source}] after {value} frames: peak RSS {marks['check']:.1f} MiB "
                  f"({time.monotonic() - started:.0f} s)", flush=True)
        if value % 250 == 0:
            print(f"  [{args.source}] {value}/{total} frames, peak RSS {peak_rss_mib():.1f} MiB", flush=True)

    node_status.PREVIEW_INTERVAL_S = 0.0  # this script's own process: a progress call (and preview) per frame
    comfy.utils.set_progress_bar_global_hook(hook)
    with torch.inference_mode():
        path, _, count, _, report = StreamV2VLoop.execute(
            model=model, positive=cond, negative=cond, vae=vae, source="video file", **source,
            seed=0, steps=args.steps, strength=0.5, cfg=1.0, stream_batch=True, fixed_noise=True,
            filename_prefix="bench/loop", **extra).args
    elapsed = time.monotonic() - started
    end = peak_rss_mib()
    with av.open(path) as c:
        written = sum(1 for _ in c.demux(video=0) if _.size)
    print(f"[{args.source}] {report}; read back {written}; {elapsed:.0f} s, {count / elapsed:.1f} fps")
    print(f"RESULT {args.source} {count} {marks['check']:.1f} {end:.1f} {elapsed:.0f}")


def per_frame_conditioning(frames: int):
    """(positive with a tiny ControlNet applied, loop inputs: CLIP, a schedule with a keyframe every 150 frames,
    canny hints per frame)."""
    import torch

    import nodes as comfy_nodes
    from host import tiny_models

    clip = tiny_models.tiny_clip("sd15", 1)
    text = tiny_models.encode_prompt(clip, "a photo")
    positive, _ = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(
        text, text, tiny_models.tiny_controlnet(0), torch.zeros(1, 64, 64, 3), 1.0, 0.0, 1.0)
    styles = ("watercolor", "oil painting", "charcoal sketch", "pixel art")
    schedule = "\n".join(f"{k}: {styles[i % len(styles)]}" for i, k in enumerate(range(0, frames, 150)))
    return positive, {"clip": clip, "prompt_schedule": schedule, "control_hint": "canny (OpenCV)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--check", type=int, default=200)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--source", choices=[*SOURCES, "both"], default="both")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: a busy machine stalls torch's thread pool, and memory is the point)")
    parser.add_argument("--conditioning", choices=["none", "schedule+controlnet"], default="none",
                        help="per-frame conditioning: a prompt schedule and a canny ControlNet hint per frame")
    args = parser.parse_args()
    if args.source != "both":
        run_one(args)
        return
    rows = []
    for source in SOURCES:
        command = [sys.executable, "-P", __file__, "--frames", str(args.frames), "--check", str(args.check),
                   "--steps", str(args.steps), "--source", source, "--threads", str(args.threads),
                   "--conditioning", args.conditioning]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        print("\n".join(line for line in output.splitlines() if not line.startswith("RESULT")), flush=True)
        _, name, count, check, end, seconds = output.strip().splitlines()[-1].split()
        rows.append((name, int(count), float(check), float(end), int(seconds)))
    print(f"\n| source | frames | peak RSS after {args.check} | peak RSS at the end | growth | time |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, count, check, end, seconds in rows:
        label = "file in input/" if name == "file" else "VIDEO (core LoadVideo)"
        print(f"| {label} | {count} | {check:.1f} MiB | {end:.1f} MiB | {(end / check - 1) * 100:+.2f} % | {seconds} s |")
    sys.exit(0 if all(end <= check * 1.05 for _, _, check, end, _ in rows) else 1)


if __name__ == "__main__":
    main()
