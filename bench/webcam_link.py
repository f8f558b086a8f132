"""The browser webcam link without a model: frames per second through the WebSocket and capture-to-display latency.

    .venv/bin/python -P bench/webcam_link.py [--seconds 10] [--sizes 256 512]

Starts the real ComfyUI server (CPU) with the pack and headless Chromium with a fake camera, adds a
StreamV2VWebcamEcho node (the loop's session, WebSocket and sink, no model), presses Start webcam, queues
it, and reads the panel's own figures: frames shown per second over ``--seconds`` and the latency from
capture (before JPEG encoding) to the restyled frame drawn on the node, over the last 60 frames. Needs the
test host (scripts/setup_host.sh) and Debian's chromium.
"""
from __future__ import annotations

import argparse
import asyncio
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from host.browser import SKIP_REASON, Chromium, available  # noqa: E402
from host.server import ComfyServer  # noqa: E402
from host.webcam import FAKE_CAMERA, measure_echo_link  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    args = parser.parse_args()
    if not available():
        sys.exit(SKIP_REASON)
    rows = []
    with ComfyServer() as server, Chromium(server.url, FAKE_CAMERA) as chrome:
        for size in args.sizes:
            figures = asyncio.run(measure_echo_link(server, chrome, seconds=args.seconds, size=size))
            rows.append((size, figures))
            print(f"{size}x{size}: {figures['fps']:.1f} fps", flush=True)
    print("\n| frame size | fps through the link | latency mean | p50 | p95 | capture + JPEG in the browser | frames sent |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for size, f in rows:
        print(f"| {size}x{size} | {f['fps']:.1f} | {f['latency_mean_ms']:.1f} ms | {f['latency_p50_ms']:.1f} ms | "
              f"{f['latency_p95_ms']:.1f} ms | {f['capture_ms']:.1f} ms | {f['sent']} |")


if __name__ == "__main__":
    main()
