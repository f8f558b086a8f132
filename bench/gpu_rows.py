"""The GPU check's worker: one process per CUDA allocator (``bench/gpu_check.py`` starts them and orders the
rows). It sets ComfyUI up in-process with its allocator, builds the models once, says ``ready`` and then
measures each row it is sent, one JSON line per row (``@@gpu_check@@ {...}`` on stdout).

A stream row (``measure_stream``) resets every compiled graph first (dynamo, inductor's CUDA-graph trees:
the same path as ComfyUI's Free memory), so no row inherits another's graphs or counts against dynamo's
recompile limit; then:
* cold run (``--warmup`` frames, compile included): latency of its first frame and its worst frame;
* timed run (``--frames`` frames, the real sink: MP4 through PyAV and a JPEG for the browser, as the live
  loop writes them): fps, p50/p95 latency (frame pulled -> its output handed to the sink), per-frame time of
  the UNet call, the ControlNet, the VAE and the bank's per-call work (CUDA events, read after the run);
* a few counted frames: host-device syncs (``torch.cuda.set_sync_debug_mode``);
* peak GPU memory, the bank's bytes, CUDA-graph pool bytes (segments outside the default pool, native
  allocator only); dynamo graphs, CUDA-graph recordings / re-recordings, compiled vs eager UNet calls.
Two rows run once: fp16 against fp32 (NaN/Inf, drift) and pinned host memory over ``--long-frames`` frames.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import tempfile
import time
from fractions import Fraction

from bank_overhead import controlnet, cuda_sync_warnings, device_name, moving_texture, patched, sync

STEPS = 4
MARK = "@@gpu_check@@"
BANKS = {"DyMe(1)": ("dyme", 1, 4), "DyMe(1) + ControlNet": ("dyme", 1, 4), "queue(4)": ("queue", 4, 4)}


def say(message: dict) -> None:
    print(f"{MARK} {json.dumps(message)}", flush=True)


class PartTimer:
    """Time per part of each frame: CUDA events on a GPU (read after the run: no sync inside it), the host clock
    on a CPU. Parts: ``call`` (an APPLY_MODEL call: bank wrapper + compiled path + UNet), ``unet`` (inside the
    bank wrapper), ``ControlNet``, ``VAE`` (forward hooks); the bank's share is ``call`` minus ``unet``."""

    def __init__(self, torch, device: str):
        self.torch, self.cuda, self.active = torch, device == "cuda", False
        self.marks: dict[str, list] = {"call": [], "unet": [], "ControlNet": [], "VAE": []}
        self._open: dict[str, list] = {part: [] for part in self.marks}

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = self.torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def begin(self, part: str) -> None:
        if self.active:
            self._open[part].append(self._now())

    def end(self, part: str) -> None:
        if self.active and self._open[part]:
            self.marks[part].append((self._open[part].pop(), self._now()))

    def wrapper(self, part: str):
        def timed(executor, *args, **kwargs):
            self.begin(part)
            try:
                return executor(*args, **kwargs)
            finally:
                self.end(part)
        return timed

    def hook(self, module, part: str) -> None:
        module.register_forward_pre_hook(lambda m, args: self.begin(part))
        module.register_forward_hook(lambda m, args, out: self.end(part))

    @contextlib.contextmanager
    def timing(self):
        for part in self.marks:
            self.marks[part], self._open[part] = [], []
        self.active = True
        try:
            yield self
        finally:
            self.active = False

    def per_frame(self, frames: int) -> dict:
        sync("cuda" if self.cuda else "cpu")
        ms = {part: sum((a.elapsed_time(b) if self.cuda else 1000 * (b - a)) for a, b in marks)
              for part, marks in self.marks.items()}
        parts = {"UNet": ms["unet"], "ControlNet": ms["ControlNet"], "VAE": ms["VAE"], "bank": ms["call"] - ms["unet"]}
        return {part: round(value / max(1, frames), 2) for part, value in parts.items()}


class Clock:
    """Latency of each frame: from the moment it is pulled from the source to its output reaching the sink (the
    output names its frame; the pipeline's fill, which shows an earlier input, is not counted)."""

    def __init__(self, images):
        self.images, self.mine, self.latency = images, set(), []

    def source(self):
        from streamv2v.streamv2v_core.stream.frame import Frame

        for index, image in enumerate(self.images):
            frame = Frame(image=image, index=index, received_at=time.monotonic())
            self.mine.add(id(frame))
            yield frame

    def sink(self, out) -> None:
        if id(out.source) in self.mine and out.index - out.source.index == STEPS - 1:
            self.latency.append(1000 * (time.monotonic() - out.source.received_at))

    def quantile(self, q: float) -> float | None:
        ordered = sorted(self.latency)
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1) if ordered else None


class Sink:
    """The live loop's own sink (``LoopSink``: MP4 through PyAV, a JPEG per frame for the browser), or, where
    it cannot start, a JPEG-only stand-in, with the reason in ``note``."""

    def __init__(self):
        self.note, self.sink, self.jpeg, self.nonfinite = None, None, None, 0

    def put(self, out) -> None:
        self.nonfinite += int((~out.image.isfinite()).sum())
        if self.sink is None and self.jpeg is None:
            self._open()
        if self.sink is not None:
            self.sink.put(out)
        else:
            self.jpeg(out.image)

    def _open(self) -> None:
        from streamv2v.nodes.loop.sink import LoopSink
        from streamv2v.nodes.node_status import NodeStatus
        from streamv2v.streamv2v_core.live.session import BrowserSession

        try:
            self.sink = LoopSink("gpu_check/row", Fraction(30), None, NodeStatus(None, None, preview=False),
                                 BrowserSession("gpu-check"))
        except Exception as error:  # noqa: BLE001 - the check goes on with what it can measure
            from streamv2v.streamv2v_core.live.session import encode_jpeg
            from streamv2v.streamv2v_core.media.frames import to_uint8

            self.note = f"MP4 sink unavailable ({type(error).__name__}: {error}); JPEG only"
            self.jpeg = lambda image: encode_jpeg(to_uint8(image.cpu()))

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()


class Worker:
    """The models of every row and the measurements (see module doc)."""

    def __init__(self, args, torch, dtype):
        self.args, self.torch, self.dtype = args, torch, dtype
        self.timer = PartTimer(torch, args.device)
        self.parts = self._build()
        self.folder = tempfile.mkdtemp(prefix="gpu-check-")
        import folder_paths

        folder_paths.set_output_directory(self.folder)

    def _model(self, dtype, seed: int = 0):
        import comfy.patcher_extension
        from host import tiny_models as tm

        unet = tm.tiny_sd15_model(seed, dtype) if self.args.dry_run else tm.full_sd15_model(seed, dtype)
        kind = comfy.patcher_extension.WrappersMP.APPLY_MODEL
        unet.add_wrapper_with_key(kind, "gpu-check.call", self.timer.wrapper("call"))  # before the bank's
        return unet

    def _banked(self, unet, label: str, name: str):
        mode, size, interval = BANKS[label]
        model, handle = patched(unet, name, mode, size, interval)
        import comfy.patcher_extension

        model = model.clone()  # after the bank's wrapper, before the compiled path (added per run)
        model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "gpu-check.unet",
                                   self.timer.wrapper("unet"))
        return model, handle

    def _build(self) -> dict:
        from nodes import ControlNetApplyAdvanced
        from host import tiny_models as tm

        torch, args = self.torch, self.args
        unet = self._model(self.dtype)
        dim = 64 if args.dry_run else 768
        g = torch.Generator().manual_seed(0)
        pos = [[torch.randn(1, 77, dim, generator=g), {"pooled_output": torch.randn(1, dim, generator=g)}]]
        neg = [[torch.randn(1, 77, dim, generator=g), {"pooled_output": torch.randn(1, dim, generator=g)}]]
        net = controlnet(unet, torch, self.dtype, args.device)
        self.timer.hook(net.control_model, "ControlNet")
        hint = next(moving_texture(args.size, 1, seed=9)).unsqueeze(0)
        c_pos, c_neg = ControlNetApplyAdvanced().apply_controlnet(pos, neg, net, hint, 1.0, 0.0, 1.0)
        vae = tm.tiny_taesd_vae(1)
        for module in (vae.first_stage_model.taesd_encoder, vae.first_stage_model.taesd_decoder):
            self.timer.hook(module, "VAE")
        parts = {"vae": vae, "weights": sum(_bytes(m) for m in (unet.model, net.control_model, vae.first_stage_model))}
        for label in BANKS:
            model, handle = self._banked(unet, label, f"gpu-check-{len(parts)}")
            control = "ControlNet" in label
            parts[label] = (model, c_pos if control else pos, c_neg if control else neg, handle)
        return parts

    def run(self, label: str, mode: str, frames, on_output, key: str, model=None):
        """``frames`` through row ``label``'s model (or ``model``, with the row's conditioning), frames in flight."""
        from streamv2v.nodes.engine import IN_FLIGHT, StreamSettings, run_stream

        own, pos, neg, _ = self.parts[label]
        settings = StreamSettings(steps=STEPS, cfg=1.0, bank_start=IN_FLIGHT, compile=mode)
        return run_stream(model or own, pos, neg, self.parts["vae"], frames, settings, on_output, stream_key=key)


def _bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def reset_row(worker: Worker, label: str) -> None:
    """Every compiled graph released (as ComfyUI's Free memory does), counters and the bank cleared."""
    from torch._dynamo.utils import counters

    from streamv2v.nodes.engine import compiled_unet

    if compiled_unet.release_compiled("gpu check: a new row"):
        compiled_unet.COMPILER.run(lambda: None)  # wait for the reset queued on the compile thread
    counters.clear()
    worker.parts[label][3].open().reset("gpu check: a new row")
    gc.collect()
    if worker.args.device == "cuda":
        worker.torch.cuda.synchronize()
        worker.torch.cuda.empty_cache()
        worker.torch.cuda.reset_peak_memory_stats()


def cold_and_timed(worker: Worker, label: str, mode: str, key: str) -> dict:
    """The cold run (compile included) and the timed run with the sink and the part timer."""
    args = worker.args
    cold, sink = Clock(list(moving_texture(args.size, args.warmup, seed=1))), Sink()
    started = time.perf_counter()
    worker.run(label, mode, cold.source(), lambda out: (sink.put(out), cold.sink(out)), key)
    sync(args.device)
    warmup_s = time.perf_counter() - started
    timed = Clock(list(moving_texture(args.size, args.frames, seed=2)))
    with worker.timer.timing():
        started = time.perf_counter()
        worker.run(label, mode, timed.source(), lambda out: (sink.put(out), timed.sink(out)), key)
        sync(args.device)
        wall = time.perf_counter() - started
        parts = worker.timer.per_frame(args.frames)
    sink.close()
    return {"fps": round(args.frames / wall, 1), "ms_frame": round(1000 * wall / args.frames, 1),
            "p50": timed.quantile(0.5), "p95": timed.quantile(0.95), "cold_first": round(cold.latency[0], 1) if cold.latency
            else None, "cold_worst": round(max(cold.latency), 1) if cold.latency else None,
            "warmup_s": round(warmup_s, 1), "parts": parts, "nonfinite": sink.nonfinite, "sink": sink.note}


def measure_stream(worker: Worker, spec: dict) -> dict:
    """One stream row: ``spec`` = {"bank": a BANKS label, "mode": a compile mode}. See module doc."""
    from torch._dynamo.utils import counters

    from streamv2v.nodes.engine import compiled_unet

    torch, args, label, mode = worker.torch, worker.args, spec["bank"], spec["mode"]
    reset_row(worker, label)
    key = f"gpu-check {label} {mode}"
    result = cold_and_timed(worker, label, mode, key)
    cuda, caught, counted = args.device == "cuda", [], 4
    if cuda:  # host-device syncs exist only on a GPU
        with cuda_sync_warnings(torch, args.device, caught):
            worker.run(label, mode, moving_texture(args.size, counted, seed=3), lambda out: None, key)
    model = worker.parts[label][0]
    result.update(
        ran=compiled_unet.device_mode(mode, args.device, model),
        syncs=round(len(caught) / counted, 2) if cuda else None,
        peak_mib=round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None,
        bank_mib=round(worker.parts[label][3].open().nbytes() / 2**20, 1), pool_mib=graph_pool_mib(torch, cuda),
        graphs=counters["stats"]["unique_graphs"], compiles=counters["frames"]["total"],
        compiled_calls=compiled_unet.STATS.compiled, eager_calls=compiled_unet.STATS.eager,
        fallbacks=compiled_unet.STATS.fallbacks, trees=cuda_graph_counts(torch) if cuda else None,
        cudagraph_skips=counters["inductor"]["cudagraph_skips"])
    return result


def graph_pool_mib(torch, cuda: bool) -> float | None:
    """MiB in memory pools other than the default one (CUDA graphs' private pools); native allocator only."""
    if not cuda or torch.cuda.get_allocator_backend() != "native":
        return None
    segments = torch.cuda.memory_snapshot()
    return round(sum(s["total_size"] for s in segments if tuple(s.get("segment_pool_id", (0, 0))) != (0, 0))
                 / 2**20, 1)


def cuda_graph_counts(torch) -> dict | None:
    """Inductor's CUDA-graph tree of the compile thread: graphs recorded, re-recorded, functions warmed up.
    Private torch API (read defensively: another torch version gives None)."""
    from streamv2v.nodes.engine import compiled_unet

    def count():
        from torch._inductor import cudagraph_trees as trees

        manager = trees.get_container(torch.cuda.current_device()).tree_manager
        if manager is None:
            return {"recorded": 0, "rerecorded": 0, "warmed_up": 0}
        nodes, recorded = [n for ns in manager.roots.values() for n in ns], 0
        while nodes:
            node = nodes.pop()
            recorded += 1
            nodes.extend(n for ns in node.children.values() for n in ns)
        return {"recorded": recorded, "rerecorded": sum(getattr(manager, "num_rerecord", {}).values()),
                "warmed_up": len(getattr(manager, "warmed_up_functions", ()))}

    if not compiled_unet.COMPILER.started:
        return None
    try:
        return compiled_unet.COMPILER.run(count)
    except Exception:  # noqa: BLE001 - a torch without these internals
        return None


def measure_drift(worker: Worker, spec: dict) -> dict:
    """fp16 (this worker's dtype) against fp32, eager, the same seeds and frames: NaN/Inf and drift (0..1)."""
    torch, args = worker.torch, worker.args
    label = "DyMe(1)"
    reset_row(worker, label)
    frames = list(moving_texture(args.size, spec.get("frames", 8), seed=4))
    low = []
    worker.run(label, "off", iter(frames), lambda out: low.append(out.image.float()), "gpu-check drift fp16")
    model, handle = worker._banked(worker._model(torch.float32), label, "gpu-check-fp32")  # same seeds, fp32
    high = []
    worker.run(label, "off", iter(frames), lambda out: high.append(out.image.float()), "gpu-check drift fp32",
               model=model)
    handle.open().reset("gpu check: drift measured")
    pairs = list(zip(low, high))[STEPS - 1:]  # the pipeline's first outputs are its inputs
    diff = torch.stack([(a - b).abs() for a, b in pairs])
    nonfinite = int(sum((~a.isfinite()).sum() for a in low))
    del model
    gc.collect()
    return {"frames": len(pairs), "nonfinite": nonfinite, "max_abs": round(float(diff.nan_to_num(1.0).max()), 4),
            "mean_abs": round(float(diff.nan_to_num(1.0).mean()), 5)}


def measure_pinned(worker: Worker, spec: dict) -> dict:
    """Pinned host memory while ``frames`` eager DyMe(1) frames go through the real sink."""
    torch, args, label = worker.torch, worker.args, "DyMe(1)"
    reset_row(worker, label)
    total, every = spec["frames"], max(1, spec["frames"] // 5)
    cuda = args.device == "cuda" and hasattr(torch.cuda, "host_memory_stats")
    marks, sink = [], Sink()

    def put(out):
        sink.put(out)
        if (out.index + 1) % every == 0:
            held = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0) if cuda else 0
            marks.append([out.index + 1, round(held / 2**20, 1)])
    started = time.perf_counter()
    worker.run(label, "off", moving_texture(args.size, total, seed=5), put, "gpu-check pinned")
    sync(args.device)
    wall = time.perf_counter() - started
    sink.close()
    return {"frames": total, "fps": round(total / wall, 1), "pinned_mib": marks if cuda else None,
            "sink": sink.note}


MEASURE = {"stream": measure_stream, "drift": measure_drift, "pinned": measure_pinned}


def describe(args, torch) -> dict:
    """What the rows run on."""
    info = {"device": device_name(args.device), "torch": torch.__version__, "python": sys.version.split()[0],
            "allocator": torch.cuda.get_allocator_backend() if args.device == "cuda" else "-"}
    for name in ("triton", "xformers"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - optional
            info[name] = None
    return info


def serve(args) -> None:
    """The worker's loop: set up, build, ``ready``, then one result per row spec read from stdin."""
    from _host import setup_host

    started = time.perf_counter()
    setup_host(args.device, threads=args.threads or None, cuda_malloc=args.allocator == "cudaMallocAsync")
    import logging

    import torch

    logging.getLogger("torch.__trace").setLevel(logging.WARNING)
    from streamv2v.nodes.engine import compiled_unet

    compiled_unet.COMPILE_BACKEND = "eager" if args.dry_run else args.backend
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    with torch.inference_mode():
        worker = Worker(args, torch, dtype)
    say({"ready": True, "setup_s": round(time.perf_counter() - started, 1), "weights_mib":
         round(worker.parts["weights"] / 2**20), **describe(args, torch)})
    for line in sys.stdin:
        spec = json.loads(line)
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                result = MEASURE[spec["kind"]](worker, spec)
        except Exception as error:  # noqa: BLE001 - the row says what failed; the next row runs
            result = {"error": f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300] if str(error).strip() else ''}"}
        result["seconds"] = round(time.perf_counter() - started, 1)
        say({"id": spec["id"], **result})


if __name__ == "__main__":
    print("bench/gpu_rows.py is started by bench/gpu_check.py", file=sys.stderr)
    sys.exit(os.EX_USAGE)
