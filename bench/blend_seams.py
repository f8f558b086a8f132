"""Chunk seams of a long clip refined chunk by chunk: independent chunks, core context windows, randomized blending.

    .venv/bin/python -P bench/blend_seams.py [--frames 97] [--size 64] [--seeds 3] [--threads 2]
                                             [--memory-size 256] [--out bench/results/blend_seams-cpu.md]

A synthetic clip (a smooth texture panning 3 px/frame, ``--frames`` frames; 97 = 1 + 4*24, the length the
Wan VAE keeps whole: 25 latent frames) is SDEdit-refined by the tiny random-weight Wan 2.1-shaped model
(``tests/host/tiny_video_models``: ``comfy.supported_models.WAN21_T2V``, its VAE) with ComfyUI's sampler
(``comfy.sample.sample``: euler, simple schedule, ``--steps``, denoise ``--denoise``, cfg 1), in chunks of
6 latent frames overlapping by 2 (StreamingT2V's 24 / 8 video frames at Wan's 4 video frames per latent
frame). Variants, all from the same latent, noise and model:

* whole clip: no chunks (the reference without seams);
* independent chunks: core ``ContextWindowsManual`` with the batched schedule (chunks side by side, no
  overlap, each denoised on its own; the last one is shorter);
* shared noise, core flat: core ``ContextWindowsManual`` (standard_static, flat fusion = averaging);
* core pyramid: the same with pyramid weights;
* randomized blending: the Long-Video Chunks node (StreamingT2V 4.3).

Per variant, averaged over ``--seeds`` seeds: the boundary jump, mean |frame t+1 - frame t| over the frame
pairs where that variant's chunks meet (``chunks.seam_pairs``: the overlaps and the pair on each side)
divided by the mean over all other pairs, on the sampled latents and on the decoded frames (1 = no seam);
the std of the decoded video's optical-flow magnitude across frames (StreamingT2V appendix 9.3), whole and
at the seams; MAWE and scene cuts of the decoded video; seconds per run. Then peak memory vs chunk length
for randomized blending, one fresh subprocess per length at ``--memory-size`` pixels: peak RSS growth during
sampling (the kernel's VmHWM, reset after the model is built) and ComfyUI's own estimate for one chunk
(``memory_required``, what its model loader budgets with the context-window wrapper).

Random weights cannot show the paper's ordering (its numbers need a trained video model): these tables
measure what the fusions do with an untrained network, nothing about quality.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bank_overhead import (command_line, device_name, mib, moving_texture, rss_peak, rss_reset,  # noqa: E402
                           table, write_report)

CHUNK, OVERLAP, FRAMES_PER_LATENT = 6, 2, 4
VARIANTS = ["whole clip (no chunks)", "independent chunks", "shared noise, core flat", "core pyramid",
            "randomized blending"]
MEMORY_CHUNKS = (3, 6, 12, 25)


def setup(args):
    from _host import setup_host

    setup_host("cpu", threads=args.threads or None)


def variant_model(model, variant: str, seed: int, frames: int):
    """(model for the variant, its chunks: where seams can be; the whole clip gets the overlapping layout)."""
    from comfy_extras.nodes_context_windows import ContextWindowsManualNode
    from streamv2v.nodes.blend_nodes import RandomizedBlendContext
    from streamv2v.streamv2v_core.blend.chunks import chunk_windows

    windows = chunk_windows(frames, CHUNK, OVERLAP)
    if variant == "whole clip (no chunks)":
        return model, windows
    if variant == "independent chunks":
        batched = [range(start, min(start + CHUNK, frames)) for start in range(0, frames, CHUNK)]
        return ContextWindowsManualNode.execute(model, CHUNK, 0, "batched", 1, False, "flat", 2).args[0], batched
    if variant == "randomized blending":
        return RandomizedBlendContext.execute(model, CHUNK, OVERLAP, "auto", seed).args[0], windows
    fuse = "flat" if "flat" in variant else "pyramid"
    return ContextWindowsManualNode.execute(model, CHUNK, OVERLAP, "standard_static", 1, False, fuse, 2).args[0], \
        windows


def sample(model, latent, seed: int, steps: int, denoise: float, cond):
    import comfy.sample

    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", cond, cond, latent, denoise=denoise,
                               seed=seed, disable_pbar=True)


def jump_ratio(video: np.ndarray, pairs: list[int]) -> float:
    """Mean |x[t+1] - x[t]| over ``pairs`` / over the other pairs; video ``[T, ...]``."""
    diffs = np.abs(np.diff(video.astype(np.float64), axis=0)).reshape(video.shape[0] - 1, -1).mean(axis=1)
    seam = np.zeros(len(diffs), dtype=bool)
    seam[pairs] = True
    return float(diffs[seam].mean() / diffs[~seam].mean())


def measure(args) -> tuple[dict, dict]:
    import torch
    from host import tiny_models, tiny_video_models
    from streamv2v.streamv2v_core.blend.chunks import seam_pairs
    from streamv2v.streamv2v_core.metrics import mawe, scene_cut_frames, seam_stats

    model = tiny_video_models.tiny_wan21_model(0)
    vae = tiny_video_models.tiny_wan21_vae(1)
    cond = tiny_models.random_conditioning("sd15", 0)
    clip = torch.stack(list(moving_texture(args.size, args.frames)))
    latent = vae.encode(clip)
    latent_frames = latent.shape[2]
    rows = {v: [] for v in VARIANTS}
    reference = {"source": clip.numpy()}
    with torch.inference_mode():
        reference["vae only"] = vae.decode(latent).reshape(-1, args.size, args.size, 3).float().numpy()
        for seed in range(args.seeds):
            for variant in VARIANTS:
                patched, windows = variant_model(model, variant, seed, latent_frames)
                started = time.perf_counter()
                out = sample(patched, latent, seed, args.steps, args.denoise, cond)
                seconds = time.perf_counter() - started
                frames = vae.decode(out).reshape(-1, args.size, args.size, 3).float().clamp(0, 1).numpy()
                latent_pairs = seam_pairs(windows)
                # latent pair t (frames t, t+1) decodes to video frames 4t and 4t + 1 (see metrics.seams)
                pixel_pairs = [FRAMES_PER_LATENT * t for t in latent_pairs]
                motion = mawe(frames)
                cuts = scene_cut_frames(frames)
                seams = seam_stats(motion, motion.magnitude_per_pair, cuts, pixel_pairs)
                rows[variant].append({
                    "pairs": len(latent_pairs),
                    "latent_jump": jump_ratio(out[0].movedim(1, 0).numpy(), latent_pairs),
                    "pixel_jump": jump_ratio(frames, pixel_pairs),
                    "flow_std": float(np.std(motion.magnitude_per_pair)), "seam_flow_std": seams.flow_std,
                    "mawe": motion.mawe, "cuts": len(cuts), "seconds": seconds})
                print(f"[seams] seed {seed} {variant}: {rows[variant][-1]}", flush=True)
    return rows, reference


def memory_child(args) -> dict:
    """Peak RSS growth while sampling ``--memory-size`` px with randomized blending in chunks of ``args.child``."""
    import torch
    from host import tiny_models, tiny_video_models
    from streamv2v.nodes.blend_nodes import RandomizedBlendContext

    chunk = int(args.child)
    model = tiny_video_models.tiny_wan21_model(0)
    patched = RandomizedBlendContext.execute(model, chunk, min(OVERLAP, chunk - 1), "auto", 0).args[0]
    cond = tiny_models.random_conditioning("sd15", 0)
    latent = torch.randn(1, 16, MEMORY_CHUNKS[-1], args.memory_size // 8, args.memory_size // 8,
                         generator=torch.Generator().manual_seed(0))
    estimate = model.model.memory_required([1, 16, min(chunk, latent.shape[2]), *latent.shape[3:]])
    with torch.inference_mode():
        sample(patched, latent, 0, 1, 1.0, cond)  # warm-up: one-time allocations are not the chunk's
        baseline = rss_reset()
        started = time.perf_counter()
        sample(patched, latent, 0, 2, 1.0, cond)
        seconds = time.perf_counter() - started
    return {"chunk": chunk, "growth": rss_peak() - baseline, "estimate": estimate, "seconds": seconds}


def memory_children(args) -> list[dict]:
    results = []
    for chunk in MEMORY_CHUNKS:
        cmd = [sys.executable, "-P", os.path.abspath(__file__), "--child", str(chunk), "--threads", str(args.threads),
               "--memory-size", str(args.memory_size)]
        print(f"[memory] chunk {chunk}: fresh subprocess", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode or not lines:
            raise RuntimeError(f"memory child for chunk {chunk} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        results.append(json.loads(lines[-1]))
    return results


def report(args, rows, reference, memory, total) -> str:
    from streamv2v.streamv2v_core.metrics import flow_magnitude_std

    header = ["variant", "seam pairs (latent)", "boundary jump, latents", "boundary jump, frames", "flow-magnitude std",
              "flow std at seams", "MAWE", "scene cuts", "s / run"]
    body = []
    for variant in VARIANTS:
        r = rows[variant]

        def mean(key, fmt="{:.3f}"):
            values = [x[key] for x in r]
            return fmt.format(np.mean(values)) + (f" ({fmt.format(min(values))}..{fmt.format(max(values))})"
                                                  if len(values) > 1 and key != "seconds" else "")

        body.append([variant, r[0]["pairs"], mean("latent_jump"), mean("pixel_jump"), mean("flow_std"),
                     mean("seam_flow_std"), mean("mawe", "{:.4g}"), mean("cuts", "{:.1f}"), mean("seconds", "{:.2f}")])
    mem_rows = [[m["chunk"], 4 * (m["chunk"] - 1) + 1, mib(m["growth"]), mib(m["estimate"]),
                 f"{m['growth'] / memory[-1]['growth']:.2f}x", f"{m['seconds']:.2f}"] for m in memory]
    lines = [
        f"### Chunk seams with the tiny Wan 2.1-shaped model (cpu, {args.size}x{args.size}, {args.frames} frames)", "",
        table(header, body), "",
        f"Means over {args.seeds} seed(s), min..max in brackets. Reference: the source clip's flow-magnitude std "
        f"{flow_magnitude_std(reference['source']):.3f}, the clip through the VAE alone "
        f"{flow_magnitude_std(np.clip(reference['vae only'], 0, 1)):.3f}.", "",
        f"### Peak memory vs chunk length (randomized blending, {args.memory_size}x{args.memory_size}, "
        f"{MEMORY_CHUNKS[-1]} latent frames)", "",
        table(["chunk (latent frames)", "video frames", "peak RSS growth while sampling",
               "ComfyUI's estimate per chunk", "growth vs whole clip", "s / 2 steps"], mem_rows), "",
        f"- Machine: {device_name('cpu')}; Python {platform.python_version()}, torch "
        f"{__import__('torch').__version__}",
        f"- Command: `{command_line()}`",
        f"- Model: tiny Wan 2.1-shaped DiT (2 blocks, width 64, random weights), tiny Wan VAE (width 8, random); "
        f"SDEdit euler, simple schedule, {args.steps} steps, denoise {args.denoise}, cfg 1; chunks of {CHUNK} latent "
        f"frames, overlap {OVERLAP} ({OVERLAP} x 4 = {OVERLAP * 4} video frames).",
        "- Boundary jump: mean |x[t+1] - x[t]| over the pairs where the variant's chunks meet / over the other pairs "
        "(whole clip: where chunks would meet). Flow: OpenCV DIS on the decoded frames (the paper used RAFT).",
        "- Memory: peak RSS (VmHWM) growth of a fresh subprocess per chunk length during 2 steps after a warm-up; "
        "the estimate is `model.memory_required` for one chunk.",
        f"- Total run time: {total:.0f} s.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=97)
    parser.add_argument("--size", type=int, default=64, help="frame size in pixels (multiple of 16)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--denoise", type=float, default=0.5)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: the host helper's default)")
    parser.add_argument("--memory-size", type=int, default=256, help="frame size for the memory table (0: skip)")
    parser.add_argument("--out", default="", help="also write the markdown tables to this file")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    setup(args)
    if args.child:
        print(json.dumps(memory_child(args)), flush=True)
        return
    started = time.perf_counter()
    memory = memory_children(args) if args.memory_size else []
    rows, reference = measure(args)
    write_report(report(args, rows, reference, memory, time.perf_counter() - started), args.out)


if __name__ == "__main__":
    main()
