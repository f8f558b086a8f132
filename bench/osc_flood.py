"""A running stream while 10,000 hostile OSC packets hit its listener: frame time and resident memory.

    .venv/bin/python -P bench/osc_flood.py [--frames 240] [--packets 10000] [--threads 1]

Runs the stream engine in-process on the CPU (tiny random SD1.5 model with a DyMe bank, TAESD, 64x64, 2
steps) with an OSC listener open on loopback, as a loop with ``osc_port`` set has. After a third of the
frames another process (tests/host/osc_flood.py) fires ``--packets`` hostile packets (garbage, truncated
messages, oversized datagrams, 52-message bundles an hour ahead, other sessions' addresses) over about
``--seconds``. Prints a table of median frame time before, during and after the flood, and RSS.
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import subprocess
import sys
import threading
import time

REPO = pathlib.Path(__file__).resolve().parent.parent


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=240)
    parser.add_argument("--packets", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "bench"))
    from _host import setup_host

    setup_host("cpu", threads=args.threads)
    import torch

    from host import tiny_models
    from streamv2v.nodes.bank_nodes import ExtendedAttentionPatch, FeatureBankNode, FeatureFusionPatch
    from streamv2v.nodes.engine import StreamSettings, run_stream
    from streamv2v.streamv2v_core.live.osc import OscListener
    from streamv2v.streamv2v_core.live.params import Capabilities, LiveParams

    handle = FeatureBankNode.execute("osc_flood", "dyme", 1, 1, 0).args[0]
    model = ExtendedAttentionPatch.execute(tiny_models.tiny_sd15_model(0), handle, "all").args[0]
    model = FeatureFusionPatch.execute(model, handle, 0.75, 0.9, "low-res decoder").args[0]
    cond, vae = tiny_models.random_conditioning("sd15", 0), tiny_models.tiny_taesd_vae(0)
    params = LiveParams()
    params.begin(Capabilities(fusion=True, bank=True), {})
    listener = OscListener("bench", params.offer, 0)
    flood_at, flood = args.frames // 3, {}

    def send() -> None:
        flood["start"] = time.perf_counter()
        pause = args.seconds / (args.packets / 50)
        subprocess.run([sys.executable, "-P", str(REPO / "tests" / "host" / "osc_flood.py"), listener.address[0],
                        str(listener.address[1]), str(args.packets), str(pause)], check=True, stdout=subprocess.DEVNULL)
        flood["end"] = time.perf_counter()

    times, rss = [], {}

    def on_output(index, image) -> None:
        times.append(time.perf_counter())
        if index == flood_at:
            rss["before"] = rss_mib()
            threading.Thread(target=send, daemon=True).start()

    g = torch.Generator().manual_seed(0)
    frames = (torch.rand(64, 64, 3, generator=g) for _ in range(args.frames))
    with torch.inference_mode():
        run_stream(model, cond, cond, vae, frames, StreamSettings(steps=2, strength=0.5), on_output)
    rss["after"] = rss_mib()
    listener.close()
    _table(times, flood, rss, listener.counts, args)


def _table(times, flood, rss, counts, args) -> None:
    gaps = [(b, b - a) for a, b in zip(times, times[1:])]
    phases = {"before the flood": [d for t, d in gaps if t < flood["start"]],
              "during the flood": [d for t, d in gaps if flood["start"] <= t <= flood["end"]],
              "after the flood": [d for t, d in gaps if t > flood["end"]]}
    print(f"\n{args.packets} hostile OSC packets in {flood['end'] - flood['start']:.1f} s while {args.frames} frames "
          f"streamed (tiny SD1.5 + DyMe bank, 64x64, 2 steps, CPU, {args.threads} thread(s)); received: "
          f"{dict(counts)}\n")
    print("| phase | frames | median frame time (ms) |\n|---|---|---|")
    for name, values in phases.items():
        shown = f"{statistics.median(values) * 1000:.1f}" if values else "-"
        print(f"| {name} | {len(values)} | {shown} |")
    print(f"\nRSS when the flood started {rss['before']:.1f} MiB, at the end {rss['after']:.1f} MiB "
          f"({rss['after'] - rss['before']:+.1f} MiB)")


if __name__ == "__main__":
    main()
