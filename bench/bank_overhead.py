"""Cost of the feature bank: time per frame and peak memory for no bank, queue(1/2/4) and DyMe(1).

Issue 2. The full-size SD1.5 UNet architecture with random weights (real shapes, so real
costs), EA on all blocks + FF with its defaults (low-res decoder, alpha 0.75, threshold 0.9),
bank interval 4 (the paper's). One "frame" is a 4-step LCM-schedule img2img at strength 0.4,
driven through ``run_stream`` (stream batch on) over a synthetic moving texture; time per
frame = run time / frames. The VAE is the TAESD-shaped one (its cost is the same for every
variant and not what this measures).

Method
* Every bank is first filled to capacity (``size + 1`` untimed update frames, so DyMe has
  merged and queues have evicted once): the timed frames see a steady-state bank.
* Timed runs: ``--frames`` frames per variant per round (a multiple of the interval, so
  every run holds the same number of bank updates), all variants in this one process,
  interleaved; the order is rotated every round. Ratios are to "no bank" of the same run.
* Where the bank's time goes: time inside the EA and FF patches (and, within them, in
  ``FeatureBank.commit``: appending, evicting, DyMe merging) is summed per variant. The rest
  of the overhead is ComfyUI's attention over the longer key/value sequence. On CUDA this
  needs synchronisation, so it is only collected with ``--breakdown``.
* Peak memory, CUDA: ``torch.cuda.max_memory_allocated`` during each variant's timed run
  (peak stats reset per variant), minus the other variants' bank bytes (all banks live in
  the one process). CPU: one fresh subprocess per variant builds the model, resets the
  kernel's peak-RSS mark (``/proc/self/clear_refs`` = 5, after gc + malloc_trim), then runs
  ``max(4, size + 2)`` frames with interval 1 (the bank reaches the same capacity as with
  interval 4, and merges/evicts, in fewer frames); reported: peak RSS (VmHWM) and its growth
  over the RSS after the model was built.
* Bank bytes at 512x512: one real 512x512 frame through a queue(1) bank at ``--bytes-steps``
  steps, scaled by 4 / steps (one bank entry per step, all the same shape) and by the size
  (queue(k) holds k frames' worth, DyMe(1) one frame's).

Usage: ``python bench/bank_overhead.py --device cpu --size 128 --frames 4 --threads 1``
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import subprocess
import sys
import time
import warnings

VARIANTS = [("no bank", None, 0), ("queue(1)", "queue", 1), ("queue(2)", "queue", 2), ("queue(4)", "queue", 4),
            ("DyMe(1)", "dyme", 1)]
INTERVAL = 4
TARGET_TIME, TARGET_MEM = 1.10, 1.05


# --------------------------------------------------------------------------- shared helpers (stream_fps uses them)

def parse_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--dtype", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                        help="UNet dtype (auto: fp16 on CUDA, fp32 on CPU)")
    parser.add_argument("--size", type=int, default=0, help="frame size in pixels (0: 512 on CUDA, 128 on CPU)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: the host helper's default)")
    parser.add_argument("--out", default="", help="also write the markdown table to this file")
    parser.add_argument("--model", choices=("full", "tiny"), default="full",
                        help="tiny: the 8.6M-parameter SD1.5-shaped test UNet (smoke-testing this script only)")


def resolve_device(name: str) -> str:
    if name != "auto":
        return name
    try:
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def setup(args):
    """Host + pack; returns (torch, dtype)."""
    from _host import setup_host

    args.device = resolve_device(args.device)
    setup_host(args.device, threads=args.threads or None)
    import torch

    if args.dtype == "auto":
        args.dtype = "fp16" if args.device == "cuda" else "fp32"
    if not args.size:
        args.size = 512 if args.device == "cuda" else 128
    return torch, {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]


def device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def build_unet(args, dtype):
    """The UNet ModelPatcher: the full-size SD1.5 architecture (or the tiny test one with --model tiny)."""
    from host import tiny_models as tm

    return tm.full_sd15_model(0, dtype) if args.model == "full" else tm.tiny_sd15_model(0, dtype)


def conditioning(args, seed: int = 0):
    """SD1.5 CONDITIONING (context 768 for the full model), without a text encoder."""
    import torch

    dim = 768 if args.model == "full" else 64
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 77, dim, generator=g), {"pooled_output": torch.randn(1, dim, generator=g)}]]


def moving_texture(size: int, count: int, seed: int = 0, speed: int = 3):
    """``count`` frames ``[size, size, 3]`` in 0..1: a smooth random texture panning diagonally."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    big = size + speed * count + 8
    coarse = F.interpolate(torch.rand(1, 3, big // 32 + 2, big // 32 + 2, generator=g), size=(big, big),
                           mode="bicubic", align_corners=False)
    fine = F.interpolate(torch.rand(1, 3, big // 4, big // 4, generator=g), size=(big, big), mode="bilinear",
                         align_corners=False)
    texture = (0.7 * coarse + 0.3 * fine).clamp(0, 1)[0].permute(1, 2, 0)
    for i in range(count):
        y, x = i * speed, (i * speed) // 2
        yield texture[y:y + size, x:x + size].contiguous()


def patched(model, name: str, mode: str, size: int, interval: int = INTERVAL):
    """(model with EA on all blocks + FF defaults, bank handle) for a fresh bank called ``name``."""
    from streamv2v.nodes.bank_nodes import ExtendedAttentionPatch, FeatureBankNode, FeatureFusionPatch

    handle = FeatureBankNode.execute(name=name, mode=mode, size=size, interval=interval, seed=0).args[0]
    handle.open().reset("benchmark: a new variant")
    model = ExtendedAttentionPatch.execute(model, handle, blocks="all").args[0]
    model = FeatureFusionPatch.execute(model, handle).args[0]
    return model, handle


def run_frames(model, cond, vae, frames, stream_batch: bool = True, steps: int = 4, compile: str = "off") -> int:
    from streamv2v.nodes.engine import StreamSettings, run_stream

    settings = StreamSettings(seed=0, steps=steps, strength=0.4, cfg=1.0, stream_batch=stream_batch, compile=compile)
    return run_stream(model, cond, cond, vae, frames, settings, lambda out: None).frames_out


def sync(device: str) -> None:
    if device == "cuda":
        import torch
        torch.cuda.synchronize()


@contextlib.contextmanager
def cuda_sync_warnings(torch, device: str, log: list):
    """Collects into ``log`` the warnings CUDA's sync debug mode gives for each host-device sync inside
    (nothing elsewhere than on CUDA)."""
    if device != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")
    log.extend(w for w in caught if "synchroniz" in str(w.message))


def controlnet(model, torch, dtype, device):
    """A ComfyUI ControlNet with the UNet's encoder layout, random weights (its zero convs too), pixel hints."""
    import inspect

    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops
    from host import tiny_models as tm

    accepted = inspect.signature(comfy.cldm.cldm.ControlNet.__init__).parameters
    config = {k: v for k, v in model.model.model_config.unet_config.items() if k in accepted and k != "out_channels"}
    config.update(hint_channels=3, operations=comfy.ops.disable_weight_init, dtype=dtype, device="cpu")
    net = tm.init_params_(comfy.cldm.cldm.ControlNet(**config), 5)  # N(0, 1/fan_in): zero convs made non-zero
    return comfy.controlnet.ControlNet(net, load_device=torch.device(device))


# CPU memory: the kernel's peak-RSS mark, reset on demand.

def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_reset() -> int:
    """Free what can be freed, reset the peak-RSS mark; returns the RSS now (bytes)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kb("VmRSS")


def rss_peak() -> int:
    return _status_kb("VmHWM")


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def write_report(text: str, out: str | None) -> None:
    """Print the report and, with ``--out``, save it (bench/results/ is quoted by the README)."""
    print(text)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(text)


def command_line() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0], os.getcwd())] + sys.argv[1:])


# --------------------------------------------------------------------------- breakdown

class Breakdown:
    """Seconds spent in the EA / FF patches and in bank writes, per variant label."""

    def __init__(self, device: str):
        self.device = device
        self.current = None
        self.seconds: dict[str, dict[str, float]] = {}

    def install(self):
        from streamv2v.streamv2v_core.bank.feature_bank import FeatureBank
        from streamv2v.streamv2v_core.bank.patches import ExtendedAttention, FeatureFusion

        for cls, attr, part in ((ExtendedAttention, "__call__", "ea"), (FeatureFusion, "__call__", "ff"),
                                (FeatureBank, "commit", "write")):
            setattr(cls, attr, self._timed(getattr(cls, attr), part))

    def _timed(self, fn, part):
        def wrapper(*a, **k):
            if self.current is None:
                return fn(*a, **k)
            sync(self.device)
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                sync(self.device)
                d = self.seconds.setdefault(self.current, {})
                d[part] = d.get(part, 0.0) + time.perf_counter() - t0
        return wrapper


# --------------------------------------------------------------------------- memory child (CPU)

def memory_child(args, torch, dtype) -> dict:
    from host import tiny_models as tm

    label, mode, size = next(v for v in VARIANTS if v[0] == args.child)
    model = build_unet(args, dtype)
    vae = tm.tiny_taesd_vae(1)
    cond = conditioning(args)
    frames = max(4, size + 2)
    if mode is not None:
        model, handle = patched(model, f"mem-{label}", mode, size, interval=1)
    baseline = rss_reset()
    with torch.inference_mode():
        run_frames(model, cond, vae, moving_texture(args.size, frames))
    peak = rss_peak()
    return {"label": label, "baseline": baseline, "peak": peak, "frames": frames,
            "bank_bytes": handle.open().nbytes() if mode is not None else 0}


def memory_children(args) -> dict[str, dict]:
    results = {}
    for label, _, _ in VARIANTS:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", label, "--device", "cpu", "--dtype", args.dtype,
               "--size", str(args.size), "--threads", str(args.threads), "--model", args.model]
        print(f"[memory] {label}: fresh subprocess", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode or not lines:
            raise RuntimeError(f"memory child for {label} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        results[label] = json.loads(lines[-1])
    return results


# --------------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parse_common(parser)
    parser.add_argument("--frames", type=int, default=0,
                        help=f"timed frames per variant per round, a multiple of {INTERVAL} (0: 16 CUDA, 4 CPU)")
    parser.add_argument("--rounds", type=int, default=0, help="interleaved rounds (0: 3 CUDA, 1 CPU)")
    parser.add_argument("--bytes-size", type=int, default=512, help="frame size for the bank-bytes row (0: skip)")
    parser.add_argument("--bytes-steps", type=int, default=0,
                        help="steps for the bank-bytes frame (0: 4 on CUDA, 1 on CPU; scaled to 4)")
    parser.add_argument("--breakdown", action="store_true", help="time the patches on CUDA too (adds syncs)")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch, dtype = setup(args)

    if args.child:
        print(json.dumps(memory_child(args, torch, dtype)), flush=True)
        return

    cuda = args.device == "cuda"
    args.frames = args.frames or (16 if cuda else 4)
    args.rounds = args.rounds or (3 if cuda else 1)
    args.bytes_steps = args.bytes_steps or (4 if cuda else 1)
    if args.frames % INTERVAL:
        raise SystemExit(f"--frames must be a multiple of the bank interval {INTERVAL}")
    started = time.perf_counter()

    # CPU memory first, in subprocesses, before this process holds a model of its own.
    mem_cpu = None if cuda else memory_children(args)

    from host import tiny_models as tm

    base = build_unet(args, dtype)
    vae = tm.tiny_taesd_vae(1)
    cond = conditioning(args)
    breakdown = Breakdown(args.device)
    if not cuda or args.breakdown:
        breakdown.install()

    models, handles = {}, {}
    with torch.inference_mode():
        for label, mode, size in VARIANTS:
            print(f"[fill] {label}", flush=True)
            if mode is None:
                models[label] = base
                run_frames(base, cond, vae, moving_texture(args.size, 1))  # warm-up
                continue
            models[label], handles[label] = patched(base, f"bench-{label}", mode, size)
            bank = handles[label].bank
            for k in range(size + 1):  # every one an update frame: bank at capacity, merged/evicted once
                bank.frames_seen = k * INTERVAL
                run_frames(models[label], cond, vae, moving_texture(args.size, 1, seed=k))
        sync(args.device)

        seconds = {label: 0.0 for label, _, _ in VARIANTS}
        peak_cuda = {label: 0 for label, _, _ in VARIANTS}
        for r in range(args.rounds):
            order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
            if r % 2:
                order = order[::-1]
            for label, mode, size in order:
                if mode is not None:
                    handles[label].open().frames_seen = 0  # a multiple of the interval: frames/interval updates
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                breakdown.current = label
                sync(args.device)
                t0 = time.perf_counter()
                n = run_frames(models[label], cond, vae, moving_texture(args.size, args.frames, seed=100 + r))
                sync(args.device)
                seconds[label] += time.perf_counter() - t0
                breakdown.current = None
                assert n == args.frames
                if cuda:
                    others = sum(h.open().nbytes() for k, h in handles.items() if k != label)
                    peak_cuda[label] = max(peak_cuda[label], torch.cuda.max_memory_allocated() - others)
                print(f"[round {r}] {label}: {seconds[label]:.1f} s so far", flush=True)

        bank_bytes = {label: (handles[label].open().nbytes() if label in handles else 0) for label, _, _ in VARIANTS}

        # Bank bytes at --bytes-size from one real frame.
        bytes_512 = None
        if args.bytes_size:
            print(f"[bytes] one {args.bytes_size}x{args.bytes_size} frame, {args.bytes_steps} step(s)", flush=True)
            m, h = patched(base, "bench-bytes", "queue", 1)
            run_frames(m, cond, vae, moving_texture(args.bytes_size, 1), steps=args.bytes_steps)
            one_frame = h.open().nbytes() * 4 / args.bytes_steps
            bytes_512 = {label: one_frame * size for label, _, size in VARIANTS}
            h.open().reset("benchmark done")

    per_frame = {k: v / (args.frames * args.rounds) for k, v in seconds.items()}
    ref_t = per_frame["no bank"]
    if cuda:
        peak = {k: peak_cuda[k] for k in peak_cuda}
    else:
        peak = {k: mem_cpu[k]["peak"] for k in mem_cpu}
        growth = {k: mem_cpu[k]["peak"] - mem_cpu[k]["baseline"] for k in mem_cpu}
    ref_m = peak["no bank"]
    n_timed = args.frames * args.rounds

    header = ["variant", f"bank bytes ({args.size}px)"]
    if bytes_512:
        header.append(f"bank bytes ({args.bytes_size}px)")
    header += ["s / frame", "time vs no bank", "peak memory", "memory vs no bank"]
    if not cuda:
        header.append("peak RSS growth")
    if breakdown.seconds:
        header += ["in EA patch s/frame", "in FF patch s/frame", "bank writes s/frame", "attention etc. s/frame"]
    rows = []
    for label, _, _ in VARIANTS:
        row = [label, mib(bank_bytes[label])]
        if bytes_512:
            row.append(mib(bytes_512[label]))
        row += [f"{per_frame[label]:.3f}", f"{per_frame[label] / ref_t:.3f}x", mib(peak[label]),
                f"{peak[label] / ref_m:.3f}x"]
        if not cuda:
            row.append(mib(growth[label]))
        if breakdown.seconds:
            part = breakdown.seconds.get(label, {})
            ea, ff, wr = (part.get(k, 0.0) / n_timed for k in ("ea", "ff", "write"))
            rest = per_frame[label] - ref_t - ea - ff
            row += [f"{ea:.3f}", f"{ff:.3f}", f"{wr:.3f}", f"{rest:+.3f}" if label != "no bank" else "-"]
        rows.append(row)

    t_ratio, m_ratio = per_frame["DyMe(1)"] / ref_t, peak["DyMe(1)"] / ref_m
    verdict = (f"Targets, DyMe(1) vs no bank: time <= {TARGET_TIME:.2f}x -> {t_ratio:.3f}x "
               f"({'met' if t_ratio <= TARGET_TIME else 'NOT met'}); memory <= +{(TARGET_MEM - 1) * 100:.0f}% -> "
               f"{(m_ratio - 1) * 100:+.1f}% ({'met' if m_ratio <= TARGET_MEM else 'NOT met'})")
    mem_method = ("CUDA max_memory_allocated per variant (reset before each timed run), other variants' banks "
                  "subtracted" if cuda else
                  "peak RSS (VmHWM) of a fresh subprocess per variant; growth = peak minus RSS after the model was "
                  "built (peak mark reset via /proc/self/clear_refs); that run: max(4, size+2) frames, interval 1")
    notes = [
        f"Machine: {device_name(args.device)}; UNet dtype {args.dtype}; Python {platform.python_version()}, "
        f"torch {torch.__version__}",
        f"Command: `{command_line()}`",
        f"Model: {'full-size SD1.5 UNet architecture' if args.model == 'full' else 'TINY test UNet (smoke test)'}, random weights; TAESD-shaped VAE. EA all blocks + FF "
        f"defaults (low-res decoder, alpha 0.75, threshold 0.9), bank interval {INTERVAL}. Frame = 4-step LCM "
        f"schedule img2img, strength 0.4, cfg 1 (no uncond), run_stream with stream batch on, "
        f"{args.size}x{args.size} synthetic moving texture.",
        f"Timing: {args.frames} frames x {args.rounds} round(s) per variant after filling each bank to capacity, "
        f"variants interleaved in one process (order rotated per round); ratios are to no bank of the same run.",
        f"Peak memory: {mem_method}.",
    ]
    if bytes_512:
        notes.append(f"Bank bytes at {args.bytes_size}px: one real {args.bytes_size}x{args.bytes_size} frame "
                     f"through a queue(1) bank at {args.bytes_steps} step(s), x4/{args.bytes_steps} (one entry per "
                     f"step), x bank size (DyMe(1) holds one frame's worth). Bench-size bytes are measured after "
                     f"the timed runs.")
    if breakdown.seconds:
        notes.append("Breakdown: seconds inside the EA / FF patch calls (bank writes -- append, evict, DyMe merge -- "
                     "are inside them); attention etc. = overhead vs no bank not spent in the patches (attention "
                     "and k/v projections over the longer sequence).")
    notes.append(f"Total run time: {time.perf_counter() - started:.0f} s.")
    text = "\n".join([f"### Bank overhead ({args.device}, {args.size}x{args.size})", "",
                      table(header, rows), "", verdict, "", *[f"- {n}" for n in notes]]) + "\n"
    write_report(text, args.out)


if __name__ == "__main__":
    main()
