"""Reproduce the rows of StreamV2V's Table 2 (bank variants) side by side in one process.

Rows: no bank, queue(1), queue(2), queue(4), DyMe(1). Every bank row is EA on all blocks +
FF with the paper's defaults (alpha 0.75, threshold 0.9, low-res decoder), bank interval 4,
through ``run_stream`` (4-step LCM-style SDEdit, strength 0.4, cfg 1, stream batch, fixed noise).

Model: the full-size SD1.5 UNet architecture with random weights (fp32 on CPU, fp16 on CUDA),
a TAESD-shaped VAE with random weights, random conditioning. Random weights say nothing about
image quality: the warp error column measures how temporally consistent these (meaningless)
outputs are along the real clip's motion, nothing more.

Clip: a real video from Debian's opencv-doc (default ``vtest.avi``, people walking), found or
installed by ``clips.find_clip``; centre-cropped square, resized to ``--size``, first
``--frames`` frames.

Per row:
* ms/frame: steady-state time per frame = mean interval between consecutive outputs while
  the stream batch is full (every call then holds S=4 latents and finishes one frame),
  skipping the first ``--warmup`` outputs. The fill before the first output (S-1 calls with
  1..S-1 rows) and the flush after the last input (S-1 calls with fewer rows) are left out;
  ``±`` is the standard deviation of the intervals. ``s total`` is the whole clip's wall time
  (fill and flush included; every frame costs S row-evaluations in any case).
* peak mem: CUDA ``torch.cuda.max_memory_allocated`` (reset per row) minus the allocation
  before the row; CPU: peak resident set size (Linux VmHWM, reset per row through
  ``/proc/self/clear_refs``; a 5 ms RSS sampler when that is refused) minus the RSS before the
  row, after ``malloc_trim``. Weights already resident are in the baseline, so the column is
  what the row adds.
* bank MB: ``FeatureBank.nbytes()`` at the end of the row.
* warp error: ``streamv2v_core.metrics.warp_error(outputs, source)`` (flow from the source clip,
  0..255 MSE scale; lower = more consistent).

Rows run in a rotated order on every repeat (``--repeats``), after one unmeasured warm-up
run, so no variant always runs first; the table gives the median over repeats.

Usage::

    .venv/bin/python bench/table2.py --frames 8 --size 128            # CPU
    python bench/table2.py --device cuda --size 512 --frames 32        # GPU
"""
from __future__ import annotations

import argparse
import ctypes
import os
import pathlib
import platform
import shlex
import statistics
import sys
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from _host import setup_host  # noqa: E402

STEPS = 4  # LCM steps = latents in one stream-batch call

ROWS = [  # (label, mode or None for no bank, size)
    ("no bank", None, 0),
    ("queue (1)", "queue", 1),
    ("queue (2)", "queue", 2),
    ("queue (4)", "queue", 4),
    ("DyMe (1)", "dyme", 1),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=8, help="frames of the clip to run per row (>= 3)")
    p.add_argument("--size", type=int, default=None, help="square frame size in px, multiple of 64 "
                   "(default 128 on CPU, 512 on CUDA)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--clip", default="vtest.avi", help="opencv-doc clip name, or a path to a video file")
    p.add_argument("--start", type=int, default=0, help="first frame of the clip to use")
    p.add_argument("--repeats", type=int, default=1, help="run every row this many times (rotated order)")
    p.add_argument("--warmup", type=int, default=0, help="steady-state outputs per row left out of the "
                   "ms/frame figure (the stream batch's fill is always left out)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-scale", type=float, default=1.0, help="scale of the random UNet's output conv")
    p.add_argument("--model", choices=("full", "tiny"), default="full",
                   help="full: the full-size SD1.5 UNet architecture; tiny: an 8.6M-parameter SD1.5-shaped "
                        "UNet (only to smoke-test this script quickly)")
    args = p.parse_args(argv)
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.size is None:
        args.size = 512 if args.device == "cuda" else 128
    if args.size % 64 or args.size < 64:
        p.error(f"--size must be a multiple of 64 (SD1.5 latents go down 3 times), got {args.size}")
    if args.frames < STEPS + 2:
        p.error(f"--frames must be at least {STEPS + 2}: the stream batch needs {STEPS} frames in flight and "
                f"ms/frame needs two outputs while it is full")
    if not 0 <= args.warmup <= args.frames - STEPS - 1:
        p.error(f"--warmup must be between 0 and frames - {STEPS + 1}")
    return args


# --------------------------------------------------------------------------- memory

class MemoryMeter:
    """Peak memory a block of work adds: CUDA allocator peak, or process RSS peak on CPU."""

    def __init__(self, device: str):
        self.device = device
        self.how = "torch.cuda.max_memory_allocated" if device == "cuda" else "VmHWM (peak RSS)"
        self._libc = None
        try:
            self._libc = ctypes.CDLL("libc.so.6")
        except OSError:
            pass

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"{key} missing from /proc/self/status")

    def __enter__(self):
        import gc

        import torch

        gc.collect()
        self.peak = 0
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        if self._libc is not None:
            self._libc.malloc_trim(0)
        self.base = self._status("VmRSS")
        self._sampler = None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        except OSError:
            self.how = "RSS sampled every 5 ms"
            self._stop = threading.Event()
            self._sampled = self.base
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self._sampled = max(self._sampled, self._status("VmRSS"))

    def __exit__(self, *exc):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        elif self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            self.peak = self._sampled - self.base
        else:
            self.peak = self._status("VmHWM") - self.base
        return False


# --------------------------------------------------------------------------- one row

def patched_model(model, label, mode, size, seed):
    """``model`` with EA (all blocks) + FF (paper defaults) on a fresh bank; (model, bank) or (model, None)."""
    from streamv2v.nodes.bank_nodes import ExtendedAttentionPatch, FeatureBankNode, FeatureFusionPatch

    if mode is None:
        return model, None
    handle = FeatureBankNode.execute(name=f"table2 {label}", mode=mode, size=size, interval=4, seed=seed).args[0]
    handle.open().reset("table2: new row")
    model = ExtendedAttentionPatch.execute(model, handle, "all").args[0]
    model = FeatureFusionPatch.execute(model, handle, 0.75, 0.9, "low-res decoder").args[0]
    return model, handle.open()


def run_row(model, vae, positive, negative, clip, settings, meter_device, warmup):
    """Run one configuration over ``clip``.

    Returns (outputs [T, H, W, 3], steady intervals in s, total s, peak bytes, how peak was measured).
    """
    import torch

    from streamv2v.nodes.engine import run_stream

    outputs = [None] * clip.shape[0]
    stamps = []

    def on_output(out):
        index, image = out.index, out.image
        if meter_device == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        outputs[index] = image.float().cpu().clamp(0, 1)

    with MemoryMeter(meter_device) as meter, torch.inference_mode():
        start = time.perf_counter()
        run_stream(model, positive, negative, vae, iter(clip), settings, on_output)
        total = time.perf_counter() - start
    full = stamps[warmup:clip.shape[0] - STEPS + 1]  # outputs finished by calls holding S latents
    intervals = [b - a for a, b in zip(full, full[1:])]
    return torch.stack(outputs), intervals, total, meter.peak, meter.how


# --------------------------------------------------------------------------- main

def machine_line(device: str) -> str:
    import torch

    if device == "cuda":
        what = torch.cuda.get_device_name(0)
    else:
        what = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, " \
               f"torch threads {torch.get_num_threads()}"
    return f"{what}; torch {torch.__version__}; Python {platform.python_version()}"


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_host(args.device)

    import torch

    from clips import find_clip, load_clip
    from host import tiny_models
    from streamv2v.nodes.engine import StreamSettings
    from streamv2v.streamv2v_core.metrics import warp_error

    clip_path = pathlib.Path(args.clip) if os.sep in args.clip else find_clip(args.clip)
    clip = load_clip(clip_path, args.frames, args.size, args.start)
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    device = torch.device(args.device)
    print(f"[table2] building the {args.model} SD1.5 UNet ({dtype}) ...", file=sys.stderr, flush=True)
    build = tiny_models.full_sd15_model if args.model == "full" else tiny_models.tiny_sd15_model
    model = build(args.seed, dtype=dtype, device=device, out_scale=args.out_scale)
    vae = tiny_models.tiny_taesd_vae(args.seed + 1)
    kind = "sd15_full" if args.model == "full" else "sd15"
    positive = tiny_models.random_conditioning(kind, args.seed + 2)
    negative = tiny_models.random_conditioning(kind, args.seed + 3)
    settings = StreamSettings(seed=args.seed, steps=STEPS)

    print("[table2] warm-up run (not measured) ...", file=sys.stderr, flush=True)
    run_row(model, vae, positive, negative, clip[:2], settings, args.device, 0)

    results = {label: [] for label, _, _ in ROWS}
    orders = []
    for repeat in range(args.repeats):
        order = ROWS[repeat % len(ROWS):] + ROWS[:repeat % len(ROWS)]
        orders.append(" > ".join(label for label, _, _ in order))
        for label, mode, size in order:
            row_model, bank = patched_model(model, label, mode, size, args.seed)
            outputs, intervals, total, peak, memory_how = run_row(row_model, vae, positive, negative, clip, settings,
                                                      args.device, args.warmup)
            warp = warp_error(outputs, source_frames=clip).mean
            bank_bytes = bank.nbytes() if bank is not None else 0
            results[label].append(dict(ms=1000 * statistics.fmean(intervals),
                                       sd=1000 * (statistics.stdev(intervals) if len(intervals) > 1 else 0.0),
                                       total=total, peak=peak, bank=bank_bytes, warp=warp))
            print(f"[table2] {label}: {1000 * statistics.fmean(intervals):.0f} ms/frame, total {total:.1f} s, "
                  f"peak +{peak / 2**20:.0f} MB, bank {bank_bytes / 2**20:.2f} MB, warp {warp:.2f}",
                  file=sys.stderr, flush=True)
            if bank is not None:
                bank.reset("table2: row done")

    source_warp = warp_error(clip, source_frames=clip).mean
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__), *(argv or sys.argv[1:])])
    print(f"\nTable 2 rows, {args.frames} frames of {clip_path.name} at {args.size}x{args.size}, "
          f"{'full-size' if args.model == 'full' else 'TINY (smoke test)'} SD1.5 UNet (random weights, {str(dtype).replace('torch.', '')}) + TAESD-shaped VAE "
          f"(random), 4 steps, strength 0.4, cfg 1, stream batch; bank interval 4, EA all blocks + "
          f"FF alpha 0.75 / threshold 0.9 on the low-res decoder.\n")
    print("| bank | ms/frame | s total | peak mem (MB) | bank (MB) | warp error |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, _, _ in ROWS:
        rs = results[label]
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        print(f"| {label} | {med['ms']:.0f} ± {med['sd']:.0f} | {med['total']:.1f} | {med['peak'] / 2**20:.0f} | "
              f"{med['bank'] / 2**20:.2f} | {med['warp']:.2f} |")
    print(f"\nFor scale: the source clip's own warp error (what an output identical to the input would score) "
          f"is {source_warp:.2f}. With bank interval 4, {args.frames} frames fill at most "
          f"{-(-args.frames // 4)} bank slot(s), so queue sizes above that behave alike.")
    print(f"ms/frame: mean ± sd of the intervals between outputs while the stream batch is full "
          f"({STEPS} latents per call; fill, flush and the first {args.warmup} steady output(s) left out); "
          f"s total: the whole clip; "
          f"peak mem: {memory_how} above the level before the row; "
          f"{args.repeats} repeat(s), median shown; order: {' | '.join(orders)}.")
    spread = [statistics.pstdev([r['warp'] for r in results[label]]) for label, _, _ in ROWS] \
        if args.repeats > 1 else []
    if spread:
        print(f"warp error spread over repeats (sd, largest row): {max(spread):.3f}")
    print("Random weights say nothing about image quality: the warp error column is the bank's effect on "
          "the temporal consistency of a random network's output, as measured.")
    print(f"Machine: {machine_line(args.device)}")
    print(f"Command: {command}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
