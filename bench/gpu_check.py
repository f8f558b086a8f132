"""The GPU check (issue 18): one command, one table of frames per second and latency for the day a GPU is lent.

Rows: bank (none / DyMe(1) interval 4 / DyMe(1) + a ControlNet) x compile mode (off / default / CUDA graphs) x
guidance (cfg 1 / full CFG at cfg 2, uncompiled only: the cost RCFG avoids / RCFG at cfg 2,
``guidance="residual self-negative"``). Full-size SD1.5 UNet architecture and a
ControlNet of the same layout (random weights), TAESD, 512x512, fp16, 4 steps, strength 0.4, EA on every
block + FF defaults, PyTorch (SDPA) attention, the live path: frames in flight, one UNet call per frame.

Per row: a warm-up run (the pipeline fills; a compiled mode compiles its steady-state graph on its second
full call, CUDA graphs record), then a timed run of ``--frames`` frames: fps = frames / wall time; latency =
from the moment a frame is pulled from the source to the moment its output is handed to the sink (mean ms,
and how many later frames had been pulled by then); then a counted run: syncs per frame (CUDA:
``torch.cuda.set_sync_debug_mode`` warnings; CPU: ``bench/counting.py``'s SyncCounter); peak GPU
memory (``max_memory_allocated`` over the row, weights included); warm-up seconds (compiling included) and
dynamo compiles. The table is rewritten after every row, so a run cut short keeps what it measured.

Usage:
  bash bench/gpu_check.sh                        # = python bench/gpu_check.py --device cuda (~6-8 min, H100/H200)
  python bench/gpu_check.py --device cpu --dry-run   # tiny model, 2 frames, seconds: the test that it runs
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import platform
import time

from bank_overhead import command_line, controlnet, cuda_sync_warnings, device_name, moving_texture, patched, setup, sync, table, write_report

STEPS = 4
BANKS = ("no bank", "DyMe(1) interval 4", "DyMe(1) + ControlNet")
MODES = ("off", "default", "CUDA graphs")
# (label, cfg, guidance, compile modes it runs with: None = all)
GUIDANCE = (("cfg 1", 1.0, "full CFG", None), ("full CFG, cfg 2", 2.0, "full CFG", ("off",)),
            ("RCFG, cfg 2", 2.0, "residual self-negative", None))
HEADER = ["bank", "compile", "guidance", "fps", "ms / frame", "latency ms", "latency frames", "syncs / frame",
          "peak GPU memory", "warm-up s", "compiles"]


def build(args, torch, dtype) -> dict:
    """Models, conditionings and bank handles of the three bank rows."""
    from nodes import ControlNetApplyAdvanced

    from host import tiny_models as tm

    unet = tm.tiny_sd15_model(0, dtype) if args.dry_run else tm.full_sd15_model(0, dtype)
    dim = 64 if args.dry_run else 768
    g = torch.Generator().manual_seed(0)
    pos = [[torch.randn(1, 77, dim, generator=g), {"pooled_output": torch.randn(1, dim, generator=g)}]]
    neg = [[torch.randn(1, 77, dim, generator=g), {"pooled_output": torch.randn(1, dim, generator=g)}]]
    banked, handle = patched(unet, "gpu-check", "dyme", 1, 4)
    hint = next(moving_texture(args.size, 1, seed=9)).unsqueeze(0)
    c_pos, c_neg = ControlNetApplyAdvanced().apply_controlnet(pos, neg, controlnet(unet, torch, dtype, args.device),
                                                              hint, 1.0, 0.0, 1.0)
    return {"no bank": (unet, pos, neg, None), "DyMe(1) interval 4": (banked, pos, neg, handle),
            "DyMe(1) + ControlNet": (banked, c_pos, c_neg, handle), "vae": tm.tiny_taesd_vae(1)}


def settings_for(mode: str, cfg: float, guidance: str):
    """StreamSettings of a row (frames in flight)."""
    from streamv2v.nodes.engine import IN_FLIGHT, StreamSettings

    return StreamSettings(steps=STEPS, cfg=cfg, bank_start=IN_FLIGHT, compile=mode, guidance=guidance)


class Clock:
    """Latency bookkeeping: when each frame of a run was pulled, and when its output reached the sink."""

    def __init__(self, frames):
        self.frames, self.pulled, self.latency = frames, [], []

    def source(self):
        for frame in self.frames:
            self.pulled.append(time.perf_counter())
            yield frame

    def sink(self, out) -> None:
        index = out.index
        frame = index - (STEPS - 1)  # with frames in flight, output i is frame i - (S - 1)
        if frame >= 0:
            self.latency.append((1000 * (time.perf_counter() - self.pulled[frame]), len(self.pulled) - 1 - frame))


@contextlib.contextmanager
def sync_count(torch, device: str, result: list):
    """Counts host-device syncs inside: CUDA's own sync debug mode, or the CPU counters of ``counting.py``."""
    if device == "cuda":
        caught = []
        with cuda_sync_warnings(torch, device, caught):
            yield
        result.append(len(caught))
        return
    from counting import SyncCounter

    counter = SyncCounter()
    with counter:
        yield
    result.append(counter.syncs())


def measure_row(args, torch, parts: dict, bank: str, mode: str, settings, counters) -> list:
    """One table row: warm-up, timed and counted runs of ``bank`` in compile ``mode`` with ``settings``."""
    from streamv2v.nodes.engine import compiled_unet
    from streamv2v.nodes.engine import run_stream

    model, pos, neg, handle = parts[bank]
    vae = parts["vae"]
    key = f"gpu-check {bank} {mode} {settings.cfg}"
    if handle is not None:
        handle.open().reset("gpu check: a new row")
    if args.dry_run:
        compiled_unet.forget_compiled()  # every row meets its layouts anew: nothing compiles in a dry run
    if args.device == "cuda":
        sync("cuda")
        torch.cuda.reset_peak_memory_stats()

    def run(frames, sink=lambda out: None):
        return run_stream(model, pos, neg, vae, frames, settings, sink, stream_key=key)

    compiles = counters["frames"]["total"]
    started = time.perf_counter()
    run(moving_texture(args.size, args.warmup, seed=1))
    sync(args.device)
    warmup = time.perf_counter() - started
    clock = Clock(list(moving_texture(args.size, args.frames, seed=2)))
    started = time.perf_counter()
    run(clock.source(), clock.sink)
    sync(args.device)
    wall = time.perf_counter() - started
    syncs = []
    counted = 1 if args.dry_run else min(4, args.frames)  # dry run: no layout comes back, nothing compiles
    with sync_count(torch, args.device, syncs):
        run(moving_texture(args.size, counted, seed=3))
    compiles = counters["frames"]["total"] - compiles
    peak = f"{torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB" if args.device == "cuda" else "-"
    latency = (f"{sum(ms for ms, _ in clock.latency) / len(clock.latency):.1f}" if clock.latency else "-",
               f"{sum(n for _, n in clock.latency) / len(clock.latency):.1f}" if clock.latency else "-")
    guidance = "cfg 1" if settings.cfg == 1.0 else f"{'RCFG' if settings.residual else 'full CFG'}, cfg {settings.cfg:g}"
    return [bank, mode, guidance, f"{args.frames / wall:.1f}", f"{1000 * wall / args.frames:.1f}", *latency,
            f"{syncs[0] / counted:.2f}", peak, f"{warmup:.1f}", compiles]


def notes(args, torch, started: float) -> list[str]:
    model = "tiny SD1.5-shaped test UNet (DRY RUN: checks that the script runs)" if args.dry_run else \
        "full-size SD1.5 UNet architecture and a ControlNet of its layout"
    lines = [
        f"Device: {device_name(args.device)}; {args.dtype}; torch {torch.__version__}; Python "
        f"{platform.python_version()}; PyTorch (SDPA) attention; compile backend "
        f"{'eager (dry run)' if args.dry_run else args.backend}",
        f"Command: `{command_line()}`",
        f"Model: {model}, random weights; TAESD; {args.size}x{args.size}, {STEPS} steps, strength 0.4; EA on every "
        f"block + FF defaults; frames in flight (one UNet call per frame, output {STEPS - 1} frames late).",
        f"Per row: warm-up {args.warmup} frames (compiling included: 'warm-up s', dynamo compiles: 'compiles'), "
        f"timed {args.frames} frames (fps, latency from pulling a frame to handing its output over, and how many "
        f"later frames had been pulled by then), syncs counted over {1 if args.dry_run else min(4, args.frames)} "
        f"more frames "
        f"({'torch.cuda.set_sync_debug_mode' if args.device == 'cuda' else 'CPU counters of counting.py'}).",
    ]
    if args.dry_run:
        lines.append("Dry run: compiled rows meet every call layout for the first time and run it eagerly "
                     "(nothing is compiled); CUDA graphs on a CPU device run 'default' mode.")
    lines.append(f"Total time: {time.perf_counter() - started:.0f} s.")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--dtype", choices=("auto", "fp32", "fp16", "bf16"), default="auto")
    parser.add_argument("--dry-run", action="store_true", help="tiny model, 64x64, 2 frames: checks the script runs")
    parser.add_argument("--size", type=int, default=0, help="frame size (default 512; 64 with --dry-run)")
    parser.add_argument("--frames", type=int, default=0, help="timed frames per row (default 48; 2 with --dry-run)")
    parser.add_argument("--warmup", type=int, default=0, help="warm-up frames per row (default 8; 1 with --dry-run)")
    parser.add_argument("--modes", default=";".join(MODES), help="compile modes, separated by ';'")
    parser.add_argument("--banks", default=";".join(BANKS), help="bank rows, separated by ';'")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (default inductor)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", default="", help="results file (default bench/results/gpu_check-<device>.md)")
    args = parser.parse_args()
    args.model = "tiny" if args.dry_run else "full"
    args.size = args.size or (64 if args.dry_run else 512)
    args.frames = args.frames or (2 if args.dry_run else 48)
    args.warmup = args.warmup or (1 if args.dry_run else 2 * STEPS)
    torch, dtype = setup(args)
    import torch._dynamo.utils

    from streamv2v.nodes.engine import compiled_unet

    logging.getLogger("torch.__trace").setLevel(logging.WARNING)
    compiled_unet.COMPILE_BACKEND = "eager" if args.dry_run else args.backend
    started = time.perf_counter()
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"gpu_check-{'dry-run-' if args.dry_run else ''}{args.device}.md")
    parts = build(args, torch, dtype)
    rows = []
    title = f"### GPU check ({device_name(args.device).split(',')[0]}, {args.size}x{args.size}, {args.dtype})"
    with torch.inference_mode():
        for bank in [b for b in BANKS if b in args.banks.split(";")]:
            for mode in [m for m in MODES if m in args.modes.split(";")]:
                for label, cfg, guidance, modes in GUIDANCE:
                    if modes is not None and mode not in modes:
                        continue
                    settings = settings_for(mode, cfg, guidance)
                    rows.append(measure_row(args, torch, parts, bank, mode, settings, torch._dynamo.utils.counters))
                    print(f"  measured {' / '.join(str(c) for c in rows[-1][:3])}: {rows[-1][3]} fps", flush=True)
                    text = "\n".join([title, "", table(HEADER, rows), "", *[f"- {n}" for n in
                                                                             notes(args, torch, started)]])
                    with open(out, "w") as f:  # after every row: a run cut short keeps what it measured
                        f.write(text + "\n")
    write_report(text + "\n", out)


if __name__ == "__main__":
    main()
