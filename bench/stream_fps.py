"""Stream throughput: frames per second and peak memory, stream batch vs sequential, bank off vs DyMe(1),
full VAE vs TAESD-shaped VAE (issue 3).

The full-size SD1.5 UNet architecture and the full-size SD KL VAE / TAESD architecture, all with
random weights (real shapes, so real costs). One frame = VAE encode, 4-step LCM-schedule img2img
at strength 0.4 (cfg 1, no uncond), VAE decode, through ``run_stream`` over a synthetic moving
texture. "DyMe(1)" = EA on all blocks + FF defaults, DyMe bank of one frame, interval 4, reset
before each run. fps = frames / wall time of the whole run (pipeline fill and drain included).

All eight variants run in this one process, interleaved (order rotated every round, reversed on
odd rounds), so they share the machine's conditions; ratios are to "sequential, bank off, full
VAE" of the same run.

Peak memory: CUDA: ``torch.cuda.max_memory_allocated`` during each run (reset per run; weights of
the UNet and both VAEs included). CPU: peak RSS (VmHWM) during each run, the kernel's mark reset
via ``/proc/self/clear_refs`` (after gc + malloc_trim) just before it; reported as growth over the
RSS at the start of the run (the resident UNet and VAEs are not in it).

Usage: ``python bench/stream_fps.py --device cpu --size 128 --frames 4 --threads 1``
(defaults: 64 frames; 512x512 on CUDA, 256x256 on CPU).
"""
from __future__ import annotations

import argparse
import itertools
import platform
import time

from bank_overhead import (build_unet, command_line, conditioning, device_name, mib, moving_texture, parse_common,
                           patched, rss_peak, rss_reset, run_frames, setup, sync, table, write_report)

STREAM = (("stream batch", True), ("sequential", False))
BANK = ("off", "DyMe(1)")
VAES = ("full", "TAESD")
VARIANTS = list(itertools.product(STREAM, BANK, VAES))
BASELINE = (("sequential", False), "off", "full")


def label(variant) -> str:
    (mode, _), bank, vae = variant
    return f"{mode} / bank {bank} / {vae} VAE"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parse_common(parser)
    parser.add_argument("--frames", type=int, default=64, help="frames per run (default 64)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds (each variant runs once per round)")
    parser.add_argument("--compile", nargs="?", const="default", default="off",
                        help="the nodes' `compile` mode: off, default (the bare flag) or 'CUDA graphs'")
    args = parser.parse_args()
    size_given = args.size
    torch, dtype = setup(args)
    cuda = args.device == "cuda"
    if not size_given:
        args.size = 512 if cuda else 256
    started = time.perf_counter()

    from host import tiny_models as tm

    unet = build_unet(args, dtype)
    vaes = {"full": tm.full_sd_vae(2), "TAESD": tm.tiny_taesd_vae(1)}
    cond = conditioning(args)
    banked, handle = patched(unet, "bench-stream-fps", "dyme", 1)
    models = {"off": unet, "DyMe(1)": banked}

    with torch.inference_mode():
        for name, vae in vaes.items():  # warm-up: first-call costs out of the timed runs
            print(f"[warm-up] {name} VAE", flush=True)
            run_frames(unet, cond, vae, moving_texture(args.size, 1), compile=args.compile)

        seconds = {v: 0.0 for v in VARIANTS}
        peak = {v: 0 for v in VARIANTS}
        for r in range(args.rounds):
            order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
            if r % 2:
                order = order[::-1]
            for v in order:
                (_, stream_batch), bank, vae = v
                handle.open().reset("benchmark: every run starts with an empty bank")
                if cuda:
                    sync("cuda")
                    torch.cuda.reset_peak_memory_stats()
                    start_mem = 0
                else:
                    start_mem = rss_reset()
                t0 = time.perf_counter()
                n = run_frames(models[bank], cond, vaes[vae], moving_texture(args.size, args.frames, seed=r),
                               stream_batch=stream_batch, compile=args.compile)
                sync(args.device)
                seconds[v] += time.perf_counter() - t0
                assert n == args.frames
                used = torch.cuda.max_memory_allocated() if cuda else rss_peak() - start_mem
                peak[v] = max(peak[v], used)
                print(f"[round {r}] {label(v)}: {args.frames / (time.perf_counter() - t0):.3f} fps", flush=True)
        handle.open().reset("benchmark done")

    fps = {v: args.frames * args.rounds / s for v, s in seconds.items()}
    header = ["stream", "bank", "VAE", "fps", "s / frame", "vs sequential/off/full", "stream batch vs sequential",
              "peak memory" if cuda else "peak RSS growth"]
    rows = []
    for v in VARIANTS:
        (mode, stream_batch), bank, vae = v
        twin = fps[(("sequential", False), bank, vae)]
        rows.append([mode, bank, vae, f"{fps[v]:.3f}", f"{1 / fps[v]:.2f}", f"{fps[v] / fps[BASELINE]:.2f}x",
                     f"{fps[v] / twin:.2f}x" if stream_batch else "-", mib(peak[v])])
    mem_method = ("torch.cuda.max_memory_allocated per run (UNet + both VAEs' weights included)" if cuda else
                  "peak RSS (VmHWM) during the run minus RSS at its start (mark reset via /proc/self/clear_refs "
                  "after gc + malloc_trim); the resident UNet and VAEs are not included")
    notes = [
        f"Device: {device_name(args.device)}; UNet dtype {args.dtype}"
        f"{', compile ' + args.compile if args.compile != 'off' else ''}; Python {platform.python_version()}, "
        f"torch {torch.__version__}",
        f"Command: `{command_line()}`",
        f"Model: {'full-size SD1.5 UNet architecture' if args.model == 'full' else 'TINY test UNet (smoke test)'}, "
        f"random weights; full = SD KL autoencoder (ch 128), TAESD = TAESD architecture, random weights.",
        f"Run: {args.frames} frames at {args.size}x{args.size} per variant per round, {args.rounds} round(s), "
        f"variants interleaved in one process; frame = encode + 4-step LCM img2img (strength 0.4, cfg 1) + "
        f"decode; DyMe(1) = EA all blocks + FF defaults, interval 4, bank reset before each run.",
        f"Peak memory: {mem_method}.",
        f"Total run time: {time.perf_counter() - started:.0f} s.",
    ]
    text = "\n".join([f"### Stream throughput ({device_name(args.device).split(',')[0]}, {args.size}x{args.size}, "
                      f"{args.frames} frames)", "", table(header, rows), "", *[f"- {n}" for n in notes]]) + "\n"
    write_report(text, args.out)


if __name__ == "__main__":
    main()
