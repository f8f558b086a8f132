"""Slow and stalled stage viewers against a running live loop: the loop's frame time and the server's memory.

    .venv/bin/python -P bench/stage_viewers.py [--viewers 20] [--outputs 60] [--size 256]

Starts the real ComfyUI server (CPU) with the pack, runs a browser-webcam StreamV2VLoop (tiny random-weight model,
2 steps) fed by a camera in Python (tests/host/camera_client.py: one frame after each "ready", as the panel), and
measures, over ``--outputs`` restyled frames each, with no viewer, with ``--viewers`` slow viewers of
GET /streamv2v/stage/<session>/mjpeg (each reads 4 KiB every half second) and with as many stalled ones (they ask
for the stream and never read): the milliseconds between restyled frames at the camera (the loop's frame time:
wall clock, as noisy as the machine is busy), the milliseconds the loop's thread spent in the sink per frame and
the milliseconds it waited for the writer thread (GET .../status "writer": deterministic enough to compare), and
the server's resident memory (VmRSS) at the end of each phase. Stalled viewers are dropped after STALL_S (10 s)
without data, which frees their seat. Prints a table (and writes it to --out).
"""
from __future__ import annotations

import argparse
import asyncio
import pathlib
import socket
import statistics
import sys
import threading
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from host.camera_client import CameraClient  # noqa: E402
from host.prompts import loop_prompt  # noqa: E402
from host.server import ComfyServer  # noqa: E402

SESSION = "bench_stage"


def rss_mib(pid: int) -> float:
    """Resident memory of a process and its children threads (VmRSS), MiB."""
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS")


class Viewer:
    """A viewer of the MJPEG stream on a raw socket: ``reads`` bytes every ``period`` s (0 bytes: stalled)."""

    def __init__(self, url_host: str, port: int, reads: int, period: float = 0.5):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        self.sock.connect((url_host, port))
        self.sock.sendall(f"GET /streamv2v/stage/{SESSION}/mjpeg HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
        self.reads, self.period, self.got = reads, period, 0
        self.stop = threading.Event()
        if reads:
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        self.sock.settimeout(self.period)
        while not self.stop.is_set():
            try:
                data = self.sock.recv(self.reads)
                if not data:
                    return
                self.got += len(data)
            except (socket.timeout, OSError):
                pass
            time.sleep(self.period)

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


def writer(server: ComfyServer) -> dict:
    return server._request("GET", f"/streamv2v/loop/{SESSION}/status")["writer"]


async def phase(server: ComfyServer, camera: CameraClient, label: str, outputs: int) -> dict:
    """The next ``outputs`` frames: ms between them at the camera, ms a frame in the sink on the loop's thread,
    ms waited for the writer, the server's RSS."""
    start, before = len(camera.received), writer(server)
    await camera.wait_outputs(start + outputs + 1, timeout=1200)
    after = writer(server)
    times = [t for t, _ in camera.received[start:start + outputs + 1]]
    frames = after["frames"] - before["frames"]
    return {"label": label, "gaps": [b - a for a, b in zip(times, times[1:])],
            "sink_ms": (after["loop_ms"] - before["loop_ms"]) / frames,
            "waited_ms": after["waited_ms"] - before["waited_ms"], "rss": rss_mib(server.proc.pid)}


async def run(server: ComfyServer, args) -> list[dict]:
    host, port = "127.0.0.1", server.port
    rows = []
    async with CameraClient(server.url, SESSION, size=args.size) as camera:
        await camera.wait_outputs(5, timeout=600)  # the stream is warm
        rows.append(await phase(server, camera, "no viewer", args.outputs))
        for label, reads in ((f"{args.viewers} slow viewers (4 KiB every 0.5 s)", 4096),
                             (f"{args.viewers} stalled viewers (never read)", 0)):
            viewers = [Viewer(host, port, reads) for _ in range(args.viewers)]
            try:
                rows.append(await phase(server, camera, label, args.outputs))
            finally:
                for viewer in viewers:
                    viewer.close()
        rows.append(await phase(server, camera, "after the viewers left", args.outputs))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--viewers", type=int, default=20)
    parser.add_argument("--outputs", type=int, default=60)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "stage_viewers-cpu.md"))
    args = parser.parse_args()
    with ComfyServer() as server:
        prompt = loop_prompt("bench/stage", source="browser webcam", session=SESSION, width=args.size,
                             height=args.size, steps=2)
        prompt_id = server.queue_prompt(prompt)
        rows = asyncio.run(run(server, args))
        server._request("POST", f"/streamv2v/loop/{SESSION}/stop", {})
        server.wait(prompt_id, 120)
    lines = [f"Live loop {args.size}x{args.size} (tiny model, 2 steps, CPU), {args.outputs} restyled frames a phase:",
             "", "| viewers of the stage stream | ms between restyled frames: mean | p95 | ms a frame in the sink "
                 "(loop's thread) | ms waited for the writer | server RSS (MiB) |", "|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        gaps = row["gaps"]
        p95 = sorted(gaps)[int(0.95 * (len(gaps) - 1))]
        lines.append(f"| {row['label']} | {statistics.fmean(gaps):.1f} | {p95:.1f} | {row['sink_ms']:.2f} | "
                     f"{row['waited_ms']:.1f} | {row['rss']:.1f} |")
    text = "\n".join(lines)
    print(text)
    pathlib.Path(args.out).write_text(f"`python -P bench/stage_viewers.py --viewers {args.viewers} --outputs "
                                      f"{args.outputs} --size {args.size}`\n\n{text}\n")


if __name__ == "__main__":
    main()
