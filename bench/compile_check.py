"""The compiled UNet path, side by side with eager (issue 18): graph variants, recompiles, compile time, ms per frame.

One process, one model, one DyMe(1) bank (interval 4, EA on every block + FF defaults), PyTorch (SDPA)
attention as ComfyUI's ``--use-pytorch-cross-attention``. For every compile mode (``off``, ``default``,
and ``CUDA graphs`` on CUDA):

1. a fresh run of ``--frames`` frames (``bank_start`` fresh: the pipeline fills, runs full, drains),
2. a continued run with frames in flight (``--refill`` frames: the pipeline refills once, then stays full),
3. timed: ``--rounds`` rounds of ``--timed`` frames each with frames in flight (one UNet call per frame, the
   live path), modes interleaved in every round so they share the machine's conditions.

Counted with ``torch._dynamo.utils.counters``: *graph variants* (``stats.unique_graphs``), *compiles*
(``frames.total``: the first compile and every recompile) by phase (filling = the first S calls of the
fresh run, steady = its calls with a full pipeline and a full bank, draining = the calls after its last
input, refill = run 2, timed = run 3), graph breaks; *compile time* = the seconds of the calls that
compiled. Recompile reasons (dynamo's guard failures) are printed with ``--reasons``.

Usage: ``python bench/compile_check.py --device cpu --model tiny --size 64 --threads 1``
(defaults: 64 frames, 2 rounds of 16 timed frames; 512x512 fp16 with the full-size SD1.5 UNet on CUDA).
"""
from __future__ import annotations

import argparse
import logging
import time

from bank_overhead import (build_unet, command_line, conditioning, device_name, moving_texture, parse_common,
                           patched, setup, sync, table, write_report)

STEPS = 4


class CallProbe:
    """APPLY_MODEL wrapper: per UNet call, its rows, the compiles it caused and its seconds."""

    def __init__(self, device: str, counters):
        self.device, self.counters = device, counters
        self.calls: list[tuple[int, int, float]] = []  # (rows, compiles, seconds)
        self.timing = True

    def __call__(self, executor, x, *args, **kwargs):
        if not self.timing:
            return executor(x, *args, **kwargs)
        sync(self.device)
        before, started = self.counters["frames"]["total"], time.perf_counter()
        out = executor(x, *args, **kwargs)
        sync(self.device)
        self.calls.append((x.shape[0], self.counters["frames"]["total"] - before, time.perf_counter() - started))
        return out


class Reasons(logging.Handler):
    """Collects dynamo's recompile messages (``torch._logging.set_logs(recompiles=True)``)."""

    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        text = record.getMessage()
        if text.startswith("Recompiling function"):
            self.messages.append(" | ".join(line.strip() for line in text.splitlines()[1:4]))


def phases(calls: list, frames: int) -> dict:
    """Compiles of a fresh run's calls by phase: ``{filling, steady, draining}`` (calls: ``[(rows, compiles, s)]``)."""
    fill, last_input = STEPS + 1, frames  # DyMe(1) interval 4: the bank is full from call S + 1
    return {"filling": sum(c for _, c, _ in calls[:fill]), "steady": sum(c for _, c, _ in calls[fill:last_input]),
            "draining": sum(c for _, c, _ in calls[last_input:])}


def first_runs(args, torch, model, cond, vae, mode: str, counters) -> dict:
    """Runs 1 and 2 for ``mode`` (see module doc): compiles by phase, variants, compile seconds."""
    import comfy.patcher_extension
    import torch._dynamo

    from streamv2v.nodes.engine import compiled_unet
    from streamv2v.nodes.engine import FRESH, IN_FLIGHT, StreamSettings, run_stream

    torch._dynamo.reset()
    compiled_unet.forget_compiled()
    counters.clear()
    probe = CallProbe(args.device, counters)
    probed = model.clone()
    probed.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "bench.probe", probe)
    started = time.perf_counter()
    run_stream(probed, cond, cond, vae, moving_texture(args.size, args.frames),
               StreamSettings(steps=STEPS, bank_start=FRESH, compile=mode), lambda out: None, stream_key=mode)
    first_run = time.perf_counter() - started
    fresh = list(probe.calls)
    probe.calls.clear()
    run_stream(probed, cond, cond, vae, moving_texture(args.size, args.refill, seed=1),
               StreamSettings(steps=STEPS, bank_start=IN_FLIGHT, compile=mode), lambda out: None,
               stream_key=mode)
    refill = list(probe.calls)
    probe.timing = False
    return {"probed": probed, "phases": {**phases(fresh, args.frames), "refill": sum(c for _, c, _ in refill)},
            "variants": counters["stats"]["unique_graphs"], "breaks": sum(counters["graph_break"].values()),
            "compile s": sum(s for _, c, s in fresh + refill if c), "first run s": first_run}


def timed_rounds(args, torch, results: dict, cond, vae, counters) -> dict:
    """Run 3: ms per frame of each mode (frames in flight), interleaved; compiles during it (must be 0)."""
    from streamv2v.nodes.engine import IN_FLIGHT, StreamSettings, run_stream

    seconds = {mode: 0.0 for mode in results}
    compiles = {mode: 0 for mode in results}
    modes = list(results)
    for r in range(args.rounds):
        for mode in (modes if r % 2 == 0 else modes[::-1]):
            before = counters["frames"]["total"]
            sync(args.device)
            started = time.perf_counter()
            run_stream(results[mode]["probed"], cond, cond, vae, moving_texture(args.size, args.timed, seed=2 + r),
                       StreamSettings(steps=STEPS, bank_start=IN_FLIGHT, compile=mode), lambda out: None,
                       stream_key=mode)
            sync(args.device)
            seconds[mode] += time.perf_counter() - started
            compiles[mode] += counters["frames"]["total"] - before
            print(f"[round {r}] {mode}: {1000 * (time.perf_counter() - started) / args.timed:.1f} ms / frame",
                  flush=True)
    return {mode: (1000 * seconds[mode] / (args.rounds * args.timed), compiles[mode]) for mode in modes}


def report(args, torch, results: dict, timed: dict, reasons: list[str]) -> str:
    """The markdown table and notes."""
    header = ["compile", "graph variants", "compiles: filling / steady / draining / refill / timed",
              "graph breaks", "compile s", f"first run s / frame ({args.frames} frames)", "ms / frame, steady",
              "vs off"]
    base = timed["off"][0]
    rows = []
    for mode, r in results.items():
        p = r["phases"]
        rows.append([mode, r["variants"], f"{p['filling']} / {p['steady']} / {p['draining']} / {p['refill']} / "
                     f"{timed[mode][1]}", r["breaks"], f"{r['compile s']:.1f}",
                     f"{r['first run s'] / args.frames:.3f}", f"{timed[mode][0]:.1f}", f"{base / timed[mode][0]:.2f}x"])
    notes = [
        f"Device: {device_name(args.device)}; UNet dtype {args.dtype}; torch {torch.__version__}; "
        f"backend {args.backend}; PyTorch (SDPA) attention",
        f"Command: `{command_line()}`",
        f"Model: {'full-size SD1.5 UNet architecture' if args.model == 'full' else 'tiny SD1.5-shaped test UNet'}, "
        f"random weights, TAESD; {args.size}x{args.size}, {STEPS} steps, cfg 1, DyMe(1) interval 4, EA all blocks "
        f"+ FF defaults.",
        f"Runs per mode: fresh ({args.frames} frames), continued with frames in flight ({args.refill} frames), then "
        f"{args.rounds} timed rounds of {args.timed} frames with frames in flight (one UNet call per frame), modes "
        f"interleaved. 'vs off' = eager ms / mode's ms (above 1: faster).",
    ]
    if args.reasons and reasons:
        notes.append("Recompile reasons (first guard failure of each): " + "; ".join(reasons))
    return "\n".join([f"### Compiled vs eager ({device_name(args.device).split(',')[0]}, {args.model} model, "
                      f"{args.size}x{args.size})", "", table(header, rows), "", *[f"- {n}" for n in notes]]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parse_common(parser)
    parser.add_argument("--frames", type=int, default=64, help="frames of the fresh run (default 64)")
    parser.add_argument("--refill", type=int, default=8, help="frames of the continued run (default 8)")
    parser.add_argument("--timed", type=int, default=16, help="frames per timed run (default 16)")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds (default 2)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (eager: dynamo only)")
    parser.add_argument("--reasons", action="store_true", help="list dynamo's recompile reasons")
    args = parser.parse_args()
    size_given = args.size
    torch, dtype = setup(args)
    args.size = size_given or (512 if args.device == "cuda" else 64)
    import torch._dynamo.utils
    import torch._logging

    from host import tiny_models as tm
    from streamv2v.nodes.engine import compiled_unet

    logging.getLogger("torch.__trace").setLevel(logging.WARNING)
    compiled_unet.COMPILE_BACKEND = args.backend
    reasons = Reasons()
    torch._logging.set_logs(recompiles=True)
    logging.getLogger("torch._dynamo").addHandler(reasons)
    counters = torch._dynamo.utils.counters
    model, handle = patched(build_unet(args, dtype), "bench-compile", "dyme", 1, 4)
    vae, cond = tm.tiny_taesd_vae(1), conditioning(args)
    modes = ["off", "default"] + (["CUDA graphs"] if args.device == "cuda" else [])
    results = {}
    with torch.inference_mode():
        for mode in modes:
            results[mode] = first_runs(args, torch, model, cond, vae, mode, counters)
            print(f"[first runs] {mode}: {results[mode]['phases']}, {results[mode]['variants']} variants", flush=True)
        timed = timed_rounds(args, torch, results, cond, vae, counters)
    handle.open().reset("benchmark done")
    write_report(report(args, torch, results, timed, reasons.messages), args.out)


if __name__ == "__main__":
    main()
