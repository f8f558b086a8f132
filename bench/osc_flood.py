"""A running stream while 10,000 hostile OSC packets hit its listener: frame time and resident memory.

    .venv/bin/python -P bench/osc_flood.py [--frames 240] [--packets 10000] [--threads 1]

Runs the stream engine in-process on the CPU (tiny random SD1.5 model with a DyMe bank, TAESD, 64x64, 2
steps) with an OSC listener open on loopback, as a loop with ``osc_port`` set has. Another process
(tests/host/osc_flood.py) fires ``--packets`` hostile packets (garbage, truncated messages, oversized
datagrams, 52-message bundles an hour ahead, other sessions' addresses) over about ``--seconds``, twice:
first at a socket nobody reads (what the sending process alone costs a shared machine), then at the
listener. The difference between the two is what the listener costs the stream. Prints a table of median frame time before, during and after the flood, and RSS.
"""
from __future__ import annotations

import argparse
import pathlib
import socket
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
    from _host import setup_host, tiny_banked_parts

    setup_host("cpu", threads=args.threads)
    import torch

    from streamv2v.nodes.engine import StreamSettings, run_stream
    from streamv2v.streamv2v_core.live.osc import OscListener
    from streamv2v.streamv2v_core.live.params import Capabilities, LiveParams

    model, cond, vae = tiny_banked_parts("osc_flood")
    params = LiveParams()
    params.begin(Capabilities(fusion=True, bank=True), {})
    listener = OscListener("bench", params.offer, 0)
    unread = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    unread.bind(("127.0.0.1", 0))
    floods = {"unread socket": (args.frames // 5, unread.getsockname()[1]),
              "listener": (3 * args.frames // 5, listener.address[1])}
    spans = {}

    def send(name: str, port: int) -> None:
        start = time.perf_counter()
        pause = args.seconds / (args.packets / 50)
        subprocess.run([sys.executable, "-P", str(REPO / "tests" / "host" / "osc_flood.py"), "127.0.0.1", str(port),
                        str(args.packets), str(pause)], check=True, stdout=subprocess.DEVNULL)
        spans[name] = (start, time.perf_counter())

    times, rss = [], {}

    def on_output(out) -> None:
        index = out.index
        times.append(time.perf_counter())
        for name, (at, port) in floods.items():
            if index == at:
                rss.setdefault("before", rss_mib())
                threading.Thread(target=send, args=(name, port), daemon=True).start()

    g = torch.Generator().manual_seed(0)
    frames = (torch.rand(64, 64, 3, generator=g) for _ in range(args.frames))
    with torch.inference_mode():
        run_stream(model, cond, cond, vae, frames, StreamSettings(steps=2, strength=0.5), on_output)
    rss["after"] = rss_mib()
    listener.close()
    _table(times, spans, rss, listener.counts, args)


def _table(times, spans, rss, counts, args) -> None:
    gaps = [(b, b - a) for a, b in zip(times, times[1:])]
    inside = lambda t: any(a <= t <= b for a, b in spans.values())  # noqa: E731
    phases = {"no flood": [d for t, d in gaps if not inside(t)]}
    for name, (a, b) in spans.items():
        phases[f"flood at the {name}"] = [d for t, d in gaps if a <= t <= b]
    took = ", ".join(f"{b - a:.1f} s" for a, b in spans.values())
    print(f"\n{args.packets} hostile OSC packets per flood ({took}) while {args.frames} frames streamed (tiny SD1.5 "
          f"+ DyMe bank, 64x64, 2 steps, CPU, {args.threads} thread(s)); the listener received: {dict(counts)}\n")
    print("| phase | frames | median frame time (ms) |\n|---|---|---|")
    for name, values in phases.items():
        shown = f"{statistics.median(values) * 1000:.1f}" if values else "-"
        print(f"| {name} | {len(values)} | {shown} |")
    print(f"\nRSS when the flood started {rss['before']:.1f} MiB, at the end {rss['after']:.1f} MiB "
          f"({rss['after'] - rss['before']:+.1f} MiB)")


if __name__ == "__main__":
    main()
