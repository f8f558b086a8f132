"""The real-time hot path, per output frame (issue 13): kernels, view ops, host syncs, host time, time vs floor.

What a GPU pays per frame besides arithmetic is deterministic and can be counted on any
device (``bench/counting.py``): ATen *kernels* (one launch each on a GPU), *view*
ops (host work only), and calls that make the host wait for the device (*syncs*: scalar
reads, ``.tolist()``, moves to the host, Python-list indexing, data-dependent shapes,
tensors built from Python data), the latter split into "inside the UNet forward" and the
rest. The one deliberate transfer per frame (the finished image to its sink) is counted
apart, as are host-to-device uploads.

Rows (all in steady state: the bank is filled first, and every counted model call holds the
full stream batch):
* floor: one 4-latent UNet call + TAESD encode + decode, called directly;
* stream batch: the StreamV2V engine on N frames in one run, frames kept in flight so every
  call is a full stream batch (what StreamV2V Sampler / Loop do in the middle of a video);
* per-frame runs: N runs of one frame each with ``bank_start`` "continue, frames in flight"
  (Auto Queue / comfystream: one UNet call per run) and, for comparison, one frame per run
  drained each time ("continue": S UNet calls per frame, what per-frame prompts cost before).
Banks: none, DyMe(1) interval 4 (the paper), DyMe(1) interval 1, queue(4) interval 4, all with
EA on every block and FF with its defaults.

Columns: per output frame; "host ms outside UNet and VAE" = wall time minus the time inside
the UNet forward and the VAE's encode/decode, per frame: the engine's own Python work and
ComfyUI's sampler glue (meaningful with ``--model tiny``, where the UNet is cheap);
"time vs floor" = wall time per frame / the floor's (meaningful with ``--model full``; the floor is
timed before and after the rows and the ratio uses their mean).
On CUDA, syncs are also counted by PyTorch itself (``torch.cuda.set_sync_debug_mode``).

Usage:
  python bench/hot_path.py --device cpu --model full --size 256 --frames 4   # counts, time vs floor
  python bench/hot_path.py --device cpu --model tiny --size 256 --frames 16  # host ms outside the UNet
  python bench/hot_path.py --device cuda                                     # 512x512, fp16, both models
"""
from __future__ import annotations

import argparse
import contextlib
import time

from bank_overhead import build_unet, conditioning, controlnet, cuda_sync_warnings, device_name, moving_texture, parse_common, setup, sync

CONTROLNET = "DyMe(1) interval 4 + ControlNet"  # a ControlNet of the UNet's layout, one hint
BANKS = [("no bank", None, 0, 0), ("DyMe(1) interval 4", "dyme", 1, 4), ("DyMe(1) interval 1", "dyme", 1, 1),
         ("queue(4) interval 4", "queue", 4, 4), (CONTROLNET, "dyme", 1, 4)]
PATHS = ("stream batch", "per-frame runs, frames in flight", "per-frame runs, drained")
STEPS = 4


class Probe:
    """Counts (optional) and times what happens inside the UNet forward: a DIFFUSION_MODEL wrapper."""

    def __init__(self, device):
        self.device, self.counters, self.inside, self.calls = device, (), 0.0, 0

    def __call__(self, executor, *args, **kwargs):
        self.calls += 1
        sync(self.device) if self.timing else None
        started = time.perf_counter()
        with contextlib.ExitStack() as stack:
            for counter in self.counters:
                stack.enter_context(counter.region("forward"))
            out = executor(*args, **kwargs)
        sync(self.device) if self.timing else None
        self.inside += time.perf_counter() - started
        return out

    timing = False


class VaeClock:
    """Time spent encoding and decoding (the bench times DeviceCodec; the engine itself is not changed)."""

    def __init__(self, device):
        from streamv2v.nodes.engine import device_vae

        self.device, self.seconds = device, 0.0
        for name in ("encode", "decode"):
            setattr(device_vae.DeviceCodec, name, self._timed(getattr(device_vae.DeviceCodec, name)))

    def _timed(self, fn):
        def timed(codec, *args):
            if not self.running:
                return fn(codec, *args)
            sync(self.device)
            started = time.perf_counter()
            try:
                return fn(codec, *args)
            finally:
                sync(self.device)
                self.seconds += time.perf_counter() - started
        return timed

    running = False


def probed(model, probe):
    import comfy.patcher_extension

    clone = model.clone()
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "bench.probe", probe)
    return clone


def bank_model(model, label, mode, size, interval):
    from streamv2v.nodes.bank_nodes import ExtendedAttentionPatch, FeatureBankNode, FeatureFusionPatch
    from streamv2v.streamv2v_core import BANKS as REGISTRY

    if mode is None:
        return model, None
    REGISTRY.remove(f"hot {label}")
    handle = FeatureBankNode.execute(f"hot {label}", mode, size, interval, 0).args[0]
    model = ExtendedAttentionPatch.execute(model, handle, "all").args[0]
    return FeatureFusionPatch.execute(model, handle, 0.75, 0.9, "low-res decoder").args[0], handle


def with_controlnet(args, torch, unet, cond):
    """``cond`` with a ControlNet applied (core Apply ControlNet, strength 1, one hint for every frame)."""
    from nodes import ControlNetApplyAdvanced

    hint = next(moving_texture(args.size, 1, seed=9)).unsqueeze(0)
    net = controlnet(unet, torch, unet.model_dtype(), args.device)
    return ControlNetApplyAdvanced().apply_controlnet(cond, cond, net, hint, 1.0, 0.0, 1.0)[0]


def run_path(path, model, cond, vae, frames, state_key):
    """Run ``frames`` through the engine along ``path``; returns the number of outputs."""
    from streamv2v.nodes.engine import CONTINUE, IN_FLIGHT, StreamSettings, run_stream

    if path == "stream batch":
        settings = StreamSettings(steps=STEPS, bank_start=IN_FLIGHT)
        return run_stream(model, cond, cond, vae, iter(frames), settings, lambda out: None,
                          stream_key=state_key).frames_out
    start = IN_FLIGHT if "in flight" in path else CONTINUE
    settings = StreamSettings(steps=STEPS, bank_start=start)
    return sum(run_stream(model, cond, cond, vae, iter([f]), settings, lambda out: None,
                          stream_key=state_key).frames_out for f in frames)


def measure(args, torch, unet, vae, cond, label, mode, size, interval, path, frames):
    """(counts per frame, wall s per frame, host s per frame outside the UNet, UNet calls per frame)."""
    from streamv2v.nodes.engine import FRESH, StreamSettings, run_stream
    from counting import OpCounter, SyncCounter

    probe = Probe(args.device)
    if label == CONTROLNET:
        cond = with_controlnet(args, torch, unet, cond)
    model, handle = bank_model(unet, label, mode, size, interval)
    model = probed(model, probe)
    key = f"hot {label} {path}"
    # Fill: the bank reaches its steady state and the pipeline is full before anything is counted.
    warm = list(moving_texture(args.size, max(STEPS, size * interval + STEPS), seed=1))
    run_stream(model, cond, cond, vae, iter(warm), StreamSettings(steps=STEPS, bank_start=FRESH),
               lambda out: None, stream_key=key)
    if path != "per-frame runs, drained":
        run_path(path, model, cond, vae, warm[:STEPS], key)  # leave STEPS - 1 frames in flight

    ops, syncs = OpCounter(), SyncCounter()
    probe.counters, probe.calls = (ops, syncs), 0
    cuda_syncs = []
    with syncs, ops, cuda_sync_warnings(torch, args.device, cuda_syncs):
        outputs = run_path(path, model, cond, vae, frames, key)
    calls = probe.calls
    probe.counters = ()
    counts = {
        "kernels": ops.total("kernels") / outputs,
        "views": ops.total("views") / outputs,
        "syncs in forward": (syncs.syncs("forward") + ops.total("scalar reads", "forward")) / outputs,
        "syncs elsewhere": (syncs.syncs("outside") + ops.total("scalar reads", "outside")) / outputs,
        "by kind": {k: v / outputs for k, v in sum((syncs.counts[r] for r in syncs.counts), start=__import__(
            "collections").Counter()).items()},
        "cuda syncs": len(cuda_syncs) / outputs if args.device == "cuda" else None,
        "calls": calls / outputs,
    }
    # Timed run (no counting modes: they cost more than the work).
    probe.timing, probe.inside = True, 0.0
    VAE_CLOCK.running, VAE_CLOCK.seconds = True, 0.0
    sync(args.device)
    started = time.perf_counter()
    outputs = run_path(path, model, cond, vae, frames, key)
    sync(args.device)
    wall = time.perf_counter() - started
    probe.timing, VAE_CLOCK.running = False, False
    return counts, wall / outputs, (wall - probe.inside - VAE_CLOCK.seconds) / outputs


def floor(args, torch, unet, vae, cond):
    """One S-latent UNet call + TAESD encode + decode, straight through ComfyUI's objects: (counts, s)."""
    import comfy.model_management

    from streamv2v.nodes.engine.device_vae import DeviceCodec
    from counting import OpCounter, SyncCounter

    comfy.model_management.load_models_gpu([unet, vae.patcher])
    base = unet.model
    device = unet.load_device
    codec = DeviceCodec(vae)
    frame = next(moving_texture(args.size, 1)).to(device)
    context = cond[0][0].to(device, base.get_dtype()).repeat(STEPS, 1, 1)
    sigmas = torch.linspace(6.0, 0.5, STEPS, device=device)

    def once():
        latent = base.process_latent_in(codec.encode(frame)).to(device)
        x = latent.repeat(STEPS, 1, 1, 1)
        out = base.apply_model(x, sigmas, c_crossattn=context)
        return codec.decode(base.process_latent_out(out[:1]))

    with torch.inference_mode():
        once()
        ops, syncs = OpCounter(), SyncCounter()
        with syncs, ops:
            once()
        sync(args.device)
        started = time.perf_counter()
        for _ in range(args.frames):
            once()
        sync(args.device)
    return {"kernels": ops.total("kernels"), "views": ops.total("views"),
            "syncs": syncs.syncs() + ops.total("scalar reads")}, (time.perf_counter() - started) / args.frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parse_common(parser)
    parser.add_argument("--frames", type=int, default=0, help="counted/timed frames per row (0: 4 on CPU, 32 on CUDA)")
    parser.add_argument("--banks", default="all", help="bank rows, separated by ';' (default all)")
    parser.add_argument("--paths", default="all", help="paths, separated by ';' (default all)")
    args = parser.parse_args()
    torch, dtype = setup(args)
    args.frames = args.frames or (32 if args.device == "cuda" else 4)
    if args.size == 128 and args.device == "cpu":
        args.size = 256
    from host import tiny_models as tm

    global VAE_CLOCK
    VAE_CLOCK = VaeClock(args.device)
    unet = build_unet(args, dtype)
    vae = tm.tiny_taesd_vae(1)
    cond = conditioning(args)
    frames = list(moving_texture(args.size, args.frames, seed=2))
    base_counts, base_time = floor(args, torch, unet, vae, cond)
    banks = BANKS if args.banks == "all" else [b for b in BANKS if b[0] in args.banks.split(";")]
    paths = PATHS if args.paths == "all" else [p for p in PATHS if p in args.paths.split(";")]
    rows = []
    for path in paths:
        for label, mode, size, interval in banks:
            counts, wall, host = measure(args, torch, unet, vae, cond, label, mode, size, interval, path, frames)
            rows.append((path, label, counts, wall, host))
            print(f"  measured {path} / {label}", flush=True)
    # The floor again at the end: on a shared CPU the machine's speed drifts over a long run, so the
    # ratio uses the mean of both and the row shows their range.
    base_time_end = floor(args, torch, unet, vae, cond)[1]
    base_range = f"{min(base_time, base_time_end):.3f}..{max(base_time, base_time_end):.3f}"
    base_time = (base_time + base_time_end) / 2

    print(f"\n# Hot path per output frame — {args.model} SD1.5 UNet, {args.size}x{args.size}, {STEPS} steps, "
          f"TAESD, {args.dtype}, {device_name(args.device)}, {args.frames} frames per row\n")
    print("| path | bank | UNet calls | kernels | vs no bank | views | syncs in UNet forward | other syncs "
          "| host ms outside UNet and VAE | s / frame | time vs floor |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| floor (1 UNet call + TAESD) | - | 1 | {base_counts['kernels']} | | {base_counts['views']} | "
          f"{base_counts['syncs']} | | | {base_range} | 1.00x |")
    no_bank = {path: c["kernels"] for path, label, c, _, _ in rows if label == "no bank"}
    for path, label, c, wall, host in rows:
        ratio = f"{c['kernels'] / no_bank[path]:.2f}x" if path in no_bank else ""
        print(f"| {path} | {label} | {c['calls']:.2f} | {c['kernels']:.0f} | {ratio} | {c['views']:.0f} | "
              f"{c['syncs in forward']:.2f} | {c['syncs elsewhere']:.2f} | {1000 * host:.1f} | {wall:.3f} | "
              f"{wall / base_time:.2f}x |")
    print("\nSyncs by kind (per frame, all regions): " + "; ".join(
        f"{path} / {label}: " + (", ".join(f"{k} {v:.2f}" for k, v in sorted(c["by kind"].items())) or "none")
        for path, label, c, _, _ in rows))
    if args.device == "cuda":
        print("CUDA syncs reported by torch.cuda.set_sync_debug_mode per frame: " + "; ".join(
            f"{path} / {label}: {c['cuda syncs']:.2f}" for path, label, c, _, _ in rows))


if __name__ == "__main__":
    main()
