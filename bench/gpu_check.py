"""The GPU check (issues 18, 30): one command, one table, within a time budget, on a machine without network.

``bash bench/gpu_check.sh`` (which sets up ComfyUI and missing wheels from ``.gpu_bundle/``) runs this.
Rows, in the order of what matters (full-size SD1.5 UNet architecture with random weights, TAESD, 512x512,
fp16, 4 steps, strength 0.4, cfg 1, EA on every block + FF defaults, frames in flight: one UNet call a frame):

  1-3  DyMe(1) interval 4: compile off / default / CUDA graphs
  4-5  DyMe(1) + a ControlNet of the UNet's layout: off / CUDA graphs
  6-7  queue(4): off / CUDA graphs
  8    fp16 against fp32 (eager, DyMe(1)): NaN/Inf, drift
  9    pinned host memory over --long-frames frames (eager, DyMe(1), the real sink)

Rows 1-7 run under both CUDA allocators, one worker process each (``bench/gpu_rows.py``; both start at once and
load the models in parallel): cudaMallocAsync as ComfyUI's ``cuda_malloc.py`` sets it by default, and PyTorch's
native allocator (``--disable-cuda-malloc``); the rows alternate between them. A time budget (``--budget``,
seconds from the start) skips the rows that no longer fit and stops a row that runs past it; the table says
which. The table is rewritten after every row, so a run cut short keeps what it measured. Exit status 0
(rows skipped for time included), 1 if a worker crashed (its log is printed), 2 without a CUDA device.

Without a CUDA device (``--device cuda``, the default) it stops at once: exit status 2 and a line that starts
``no CUDA device found``. ``--device cpu --dry-run``: tiny model, 64x64, a few frames, one worker (the test).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from bank_overhead import command_line, table, write_report

ALLOCATORS = ("cudaMallocAsync", "native")
MARK = "@@gpu_check@@"
MIN_ROW_S = 10  # a row is not started with less time left than this


@dataclass(frozen=True)
class Row:
    bank: str
    mode: str = "off"
    kind: str = "stream"  # "stream", "drift" (fp16 vs fp32), "pinned" (host memory over many frames)
    both: bool = True  # under both allocators (else the native one only: the result does not depend on it)


ROWS = (Row("DyMe(1)", "off"), Row("DyMe(1)", "default"), Row("DyMe(1)", "CUDA graphs"),
        Row("DyMe(1) + ControlNet", "off"), Row("DyMe(1) + ControlNet", "CUDA graphs"),
        Row("queue(4)", "off"), Row("queue(4)", "CUDA graphs"),
        Row("DyMe(1)", "off", "drift", both=False), Row("DyMe(1)", "off", "pinned", both=False))


class WorkerProcess:
    """A ``gpu_rows.py`` worker: JSON lines (marked) from its stdout, its stderr forwarded with a prefix."""

    def __init__(self, allocator: str, argv: list[str]):
        self.allocator, self.lines, self.tail, self.info, self.failed = allocator, queue.Queue(), [], {}, None
        here = os.path.dirname(os.path.abspath(__file__))
        self.process = subprocess.Popen([sys.executable, "-c", _WORKER_MAIN, here, *argv, "--allocator", allocator],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, bufsize=1)
        threading.Thread(target=self._read, args=(self.process.stdout, True), daemon=True).start()
        threading.Thread(target=self._read, args=(self.process.stderr, False), daemon=True).start()

    def _read(self, stream, protocol: bool) -> None:
        for line in stream:
            if protocol and line.startswith(MARK):
                self.lines.put(json.loads(line[len(MARK):]))
                continue
            self.tail = (self.tail + [line.rstrip()])[-12:]
            print(f"  [{self.allocator}] {line.rstrip()}", file=sys.stderr, flush=True)
        if protocol:
            self.lines.put(None)  # the worker ended

    def send(self, spec: dict) -> None:
        self.process.stdin.write(json.dumps(spec) + "\n")
        self.process.stdin.flush()

    def receive(self, timeout: float) -> dict:
        """The next message; {"error": ...} if the worker ended or ``timeout`` passed (then it is stopped)."""
        try:
            message = self.lines.get(timeout=max(0.1, timeout))
        except queue.Empty:
            self.stop()
            return {"error": "stopped at the time budget", "budget": True}
        if message is None:
            return {"error": f"the worker ended (exit status {self.process.wait()}): "
                             f"{' / '.join(self.tail[-3:]) or 'no output'}", "dead": True}
        return message

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


# Run as ``python -c`` so that the worker's sys.path holds bench/ (and not the repository root).
_WORKER_MAIN = ("import sys; sys.path.insert(0, sys.argv[1]); del sys.argv[1]; import gpu_check; "
                "gpu_check.worker_main()")


def worker_main() -> None:
    import gpu_rows

    gpu_rows.serve(parse_args(sys.argv[1:]))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--dtype", choices=("auto", "fp32", "fp16", "bf16"), default="auto")
    parser.add_argument("--dry-run", action="store_true", help="tiny model, 64x64, few frames: checks it runs")
    parser.add_argument("--size", type=int, default=0, help="frame size (default 512; 64 with --dry-run)")
    parser.add_argument("--frames", type=int, default=0, help="timed frames a row (default 48; 4 with --dry-run)")
    parser.add_argument("--warmup", type=int, default=0, help="cold-run frames a row (default 8; 5 dry run)")
    parser.add_argument("--long-frames", type=int, default=0, help="frames of the pinned-memory row (500; 12)")
    parser.add_argument("--rows", default="", help="row numbers to run, e.g. '1,2,8' (default: all)")
    parser.add_argument("--allocators", default=",".join(ALLOCATORS), help="CUDA allocators, comma-separated")
    parser.add_argument("--budget", type=float, default=480, help="seconds for everything (default 480)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (default inductor)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--allocator", default="native", help=argparse.SUPPRESS)  # a worker's own
    parser.add_argument("--out", default="", help="results file (default bench/results/gpu_check-<device>.md)")
    args = parser.parse_args(argv)
    dry = args.dry_run
    args.dtype = args.dtype if args.dtype != "auto" else ("fp16" if args.device == "cuda" else "fp32")
    args.size = args.size or (64 if dry else 512)
    args.frames = args.frames or (4 if dry else 48)
    args.warmup = args.warmup or (5 if dry else 8)
    args.long_frames = args.long_frames or (12 if dry else 500)
    return args


def plan(args) -> list[tuple[int, Row, str]]:
    """(row number, row, allocator) in the order they run: a row under each allocator, then the next row."""
    chosen = {int(n) for n in args.rows.split(",") if n.strip()} or set(range(1, len(ROWS) + 1))
    allocators = [a for a in args.allocators.split(",") if a] if args.device == "cuda" else ["-"]
    steps = []
    for number, row in enumerate(ROWS, 1):
        if number in chosen:
            for allocator in allocators if row.both else allocators[-1:]:
                steps.append((number, row, allocator))
    return steps


def spec_of(index: int, row: Row, args) -> dict:
    frames = {"drift": 8, "pinned": args.long_frames}.get(row.kind, args.frames)
    return {"id": index, "kind": row.kind, "bank": row.bank, "mode": row.mode, "frames": frames}


def worker_argv(args) -> list[str]:
    argv = ["--device", args.device, "--dtype", args.dtype, "--size", str(args.size), "--frames", str(args.frames),
            "--warmup", str(args.warmup), "--long-frames", str(args.long_frames), "--backend", args.backend,
            "--threads", str(args.threads)]
    return argv + ["--dry-run"] * args.dry_run


def cuda_present() -> str | None:
    """None if torch sees a CUDA device, else why not."""
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return None
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return f"torch {torch.__version__} ({build}) sees no CUDA device"


def run_rows(args, steps, workers: dict, deadline: float, report) -> list:
    """Each step on its allocator's worker while the budget lasts; ``report(results)`` after each."""
    results = []
    for index, (number, row, allocator) in enumerate(steps):
        worker, left = workers[allocator], deadline - time.monotonic()
        if worker.failed:
            result = {"skipped": f"worker stopped: {worker.failed}"}
        elif left < MIN_ROW_S:
            result = {"skipped": "time budget"}
        else:
            worker.send(spec_of(index, row, args))
            result = worker.receive(left)
            if result.get("error") and (result.get("budget") or result.get("dead")):
                worker.failed = result["error"]
        results.append((number, row, allocator, result))
        print(f"  row {number} {row.bank} / {row.mode} / {row.kind} / {allocator}: {brief(result)}", flush=True)
        report(results)
    return results


def brief(result: dict) -> str:
    if "skipped" in result or "error" in result:
        return result.get("skipped") or result["error"]
    return f"{result.get('fps', '-')} fps, {result.get('seconds')} s"


def main() -> int:
    args = parse_args(sys.argv[1:])
    started = time.monotonic()
    deadline = started + args.budget
    if args.device == "cuda":
        missing = cuda_present()
        if missing is not None:
            print(f"no CUDA device found: {missing}. The GPU check needs one (on a CPU: "
                  f"bash bench/gpu_check.sh --device cpu --dry-run).", flush=True)
            return 2
    steps = plan(args)
    workers = {a: WorkerProcess(a, worker_argv(args)) for a in dict.fromkeys(a for _, _, a in steps)}
    for worker in workers.values():
        worker.info = worker.receive(deadline - time.monotonic())
        worker.failed = worker.info.get("error")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"gpu_check-{'dry-run-' if args.dry_run else ''}{args.device}.md")

    def report(results, final=False):
        text = render(args, workers, results, time.monotonic() - started, len(steps))
        if final:
            write_report(text, out)
        else:
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with open(out, "w") as f:  # after every row: a run cut short keeps what it measured
                f.write(text)
    try:
        results = run_rows(args, steps, workers, deadline, report)
    finally:
        for worker in workers.values():
            worker.stop()
    report(results, final=True)
    broken = [w for w in workers.values() if w.failed and "time budget" not in w.failed]
    return 1 if broken else 0  # a worker that crashed (its stderr is above); skipping for time is no failure


HEADER = ["#", "bank", "compile", "allocator", "ran as", "fps", "ms / frame", "latency p50 / p95 ms",
          "cold: first / worst frame ms", "UNet / ControlNet / VAE / bank ms a frame", "syncs / frame",
          "peak VRAM MiB (bank; graph pools)", "dynamo graphs", "CUDA graphs recorded / re-recorded / skipped",
          "UNet calls compiled / eager / fell back", "row s"]


def ran_as(row: Row, result: dict) -> str:
    """The mode that really ran: CUDA graphs may run 'default' (allocator, low VRAM), a compile may fail."""
    ran = result.get("ran", row.mode)
    if row.mode == "off":
        return "eager"
    if result.get("fallbacks"):
        return "eager (compile failed: see the log)"
    if not result.get("compiled_calls"):
        return "eager (no compiled call)"
    return ran if ran == row.mode else f"{ran} (fallback, see the log)"


def stream_cells(number: int, row: Row, allocator: str, r: dict) -> list:
    if "skipped" in r or "error" in r:
        return [number, row.bank, row.mode, allocator, r.get("skipped") or f"error: {r['error']}"] + \
            ["-"] * (len(HEADER) - 5)
    parts, trees = r["parts"], r.get("trees") or {}
    dash = lambda v: "-" if v is None else v  # noqa: E731
    memory = f"{dash(r.get('peak_mib'))} ({r['bank_mib']}; {dash(r.get('pool_mib'))})"
    return [number, row.bank, row.mode, allocator, ran_as(row, r), r["fps"], r["ms_frame"],
            f"{dash(r['p50'])} / {dash(r['p95'])}", f"{dash(r['cold_first'])} / {dash(r['cold_worst'])}",
            " / ".join(str(parts[p]) for p in ("UNet", "ControlNet", "VAE", "bank")), dash(r.get("syncs")), memory,
            r["graphs"], f"{trees.get('recorded', '-')} / {trees.get('rerecorded', '-')} / {r['cudagraph_skips']}",
            f"{r['compiled_calls']} / {r['eager_calls']} / {r['fallbacks']}", r["seconds"]]


def check_lines(args, results: list) -> list[str]:
    """The drift and pinned-memory rows, one line each."""
    lines = []
    for number, row, allocator, r in results:
        if row.kind == "stream":
            continue
        if "skipped" in r or "error" in r:
            lines.append(f"Row {number} ({row.kind}): {r.get('skipped') or 'error: ' + r['error']}")
        elif row.kind == "drift":
            lines.append(f"Row {number}, {args.dtype} against fp32 (eager DyMe(1), {r['frames']} frames, 0..1 pixels): "
                         f"{r['nonfinite']} NaN/Inf values, max |diff| {r['max_abs']}, mean |diff| {r['mean_abs']}")
        else:
            held = ", ".join(f"{mib} MiB at frame {n}" for n, mib in r["pinned_mib"]) if r["pinned_mib"] else "-"
            lines.append(f"Row {number}, pinned host memory (eager DyMe(1), {r['frames']} frames through the sink "
                         f"at {r['fps']} fps; torch.cuda.host_memory_stats allocated_bytes): {held}"
                         + (f"; {r['sink']}" if r.get("sink") else ""))
    return lines


def render(args, workers: dict, results: list, elapsed: float, planned: int) -> str:
    rows = [stream_cells(n, row, a, r) for n, row, a, r in results if row.kind == "stream"]
    infos = [w.info for w in workers.values() if w.info.get("ready")]
    device = infos[0]["device"].split(",")[0] if infos else args.device
    notes = [f"Device: {device}; {args.dtype}; torch {infos[0]['torch'] if infos else '-'}; Python "
             f"{platform.python_version()}; triton {infos[0].get('triton') if infos else '-'}; xformers "
             f"{infos[0].get('xformers') if infos else '-'}; compile backend {'eager (dry run)' if args.dry_run else args.backend}",
             f"Command: `{command_line()}`; {elapsed:.0f} s of a {args.budget:.0f} s budget; "
             f"{len(results)} of {planned} rows done or skipped"]
    for allocator, worker in workers.items():
        info = worker.info
        notes.append(f"Worker {allocator}: " + (f"allocator in use {info['allocator']}, set up in {info['setup_s']} s "
                                                f"(ComfyUI, models: weights {info['weights_mib']} MiB)"
                                                if info.get("ready") else f"not ready: {info.get('error')}"))
    notes += check_lines(args, results)
    sinks = {r.get("sink") for *_, r in results if r.get("sink")}
    notes += [f"Sink: {s}" for s in sinks]
    nonfinite = sum(r.get("nonfinite", 0) for *_, r in results if "fps" in r and "parts" in r)
    notes.append(f"NaN/Inf values in the rows' output frames: {nonfinite}")
    model = "tiny SD1.5-shaped test UNet (DRY RUN: checks that it runs)" if args.dry_run else \
        "full-size SD1.5 UNet architecture, a ControlNet of its layout, random weights"
    notes.append(f"Model: {model}; TAESD; {args.size}x{args.size}, 4 steps, strength 0.4, cfg 1; EA on every block + "
                 f"FF defaults; frames in flight. Per row: compiled graphs released first; cold run {args.warmup} "
                 f"frames, timed run {args.frames} frames with the real sink (MP4 + JPEG), syncs over 4 more (CUDA).")
    title = f"### GPU check ({device}, {args.size}x{args.size}, {args.dtype})"
    return "\n".join([title, "", table(HEADER, rows), "", *[f"- {n}" for n in notes]]) + "\n"


if __name__ == "__main__":
    sys.exit(main())
