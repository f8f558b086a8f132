"""Cancel during the first compile (issue 26 item 6, issue 30): seconds from ComfyUI's interrupt to the end of
the run, while ``torch.compile`` compiles the UNet for the first time.

A stream with ``compile`` default (DyMe(1), EA on every block + FF, frames in flight) runs until its steady
call compiles; ``--after`` seconds into that compile (dynamo's compile-start callback) the interrupt flag is
set, as ComfyUI's ``/interrupt`` does. Reported: Cancel latency (interrupt -> the run raised), and how long
the abandoned compile still ran on the compile thread: what Cancel waited for when the compile ran on the
calling thread (before ``compile_thread.py``), since the compile itself is the same.

Usage: ``python bench/compile_interrupt.py --model micro --size 32 --backend inductor``
"""
from __future__ import annotations

import argparse
import itertools
import threading
import time

from bank_overhead import moving_texture, patched, table, write_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("micro", "tiny"), default="micro")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--after", type=float, default=2.0, help="seconds into the compile the interrupt comes")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    from _host import setup_host

    setup_host("cpu", threads=args.threads or None)
    import logging

    import torch
    import torch._dynamo.callback

    import comfy.model_management
    from host import tiny_models as tm
    from streamv2v.nodes.engine import IN_FLIGHT, StreamSettings, compiled_unet, run_stream

    logging.getLogger("torch.__trace").setLevel(logging.WARNING)
    compiled_unet.COMPILE_BACKEND = args.backend
    build = tm.micro_sd15_model if args.model == "micro" else tm.tiny_sd15_model
    model, _ = patched(build(0), "compile-interrupt", "dyme", 1, 4)
    vae, cond = tm.tiny_taesd_vae(1), tm.random_conditioning("sd15", 1)
    marks: dict[str, float] = {}
    started = threading.Event()

    def on_start(*_args, **_kwargs):
        marks.setdefault("compile started", time.perf_counter())
        started.set()
    torch._dynamo.callback.on_compile_start(on_start)

    def cancel():
        started.wait()
        time.sleep(args.after)
        marks["interrupt"] = time.perf_counter()
        comfy.model_management.interrupt_current_processing(True)
    threading.Thread(target=cancel, daemon=True).start()
    settings = StreamSettings(steps=4, bank_start=IN_FLIGHT, compile="default")
    marks["run started"] = time.perf_counter()
    try:
        run_stream(model, cond, cond, vae, itertools.cycle(list(moving_texture(args.size, 16, seed=1))), settings,
                   lambda out: None, stream_key="compile-interrupt")
    except comfy.model_management.InterruptProcessingException:
        marks["run raised"] = time.perf_counter()
    busy_at_cancel = compiled_unet.COMPILER.busy()
    compiled_unet.COMPILER.run(lambda: None)  # the abandoned compiled call finishes
    marks["abandoned call finished"] = time.perf_counter()
    report(args, marks, busy_at_cancel)


def report(args, marks: dict, busy_at_cancel: bool) -> None:
    origin = marks["run started"]
    rows = [[name, f"{at - origin:.1f}"] for name, at in sorted(marks.items(), key=lambda kv: kv[1])]
    cancel = marks["run raised"] - marks["interrupt"]
    rest = marks["abandoned call finished"] - marks["interrupt"]
    text = "\n".join([
        f"### Cancel during the first compile (CPU, {args.model} SD1.5-shaped UNet, {args.size}x{args.size}, "
        f"backend {args.backend})", "", table(["event", "s from the run's start"], rows), "",
        f"- Cancel took effect {cancel:.2f} s after the interrupt (the compile was still running: {busy_at_cancel}).",
        f"- The abandoned call (compile + its forward) ended {rest:.1f} s after the interrupt, on the compile "
        f"thread: the time Cancel waited before, when the compile ran on the calling thread.",
    ])
    write_report(text + "\n", args.out or None)


if __name__ == "__main__":
    main()
