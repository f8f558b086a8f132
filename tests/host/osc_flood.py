"""Hostile OSC traffic for the OSC tests and bench/osc_flood.py (python-osc's builders; no pack import).

    python tests/host/osc_flood.py HOST PORT [COUNT] [PAUSE_S_PER_50]   # send COUNT packets from another process
"""
from __future__ import annotations

import os
import socket
import sys
import time

from pythonosc import osc_bundle_builder, osc_message_builder

OVERSIZED = 8192 + 500  # over the listener's MAX_PACKET
BUNDLE_MESSAGES = 52    # over its MAX_MESSAGES


def hostile_packets(count: int) -> list[bytes]:
    """Garbage, truncated messages, oversized datagrams, big bundles an hour ahead, other sessions' addresses."""
    good = osc_message_builder.OscMessageBuilder("/streamv2v/stage/ff_alpha")
    good.add_arg(0.5)
    message = good.build().dgram
    bundle = osc_bundle_builder.OscBundleBuilder(time.time() + 3600)  # an hour ahead: never waited for
    for _ in range(BUNDLE_MESSAGES):
        other = osc_message_builder.OscMessageBuilder("/streamv2v/other/seed")
        other.add_arg(1)
        bundle.add_content(other.build())
    kinds = [os.urandom(64), message[:12], b"#bundle\0" + os.urandom(40), b"\0" * OVERSIZED,
             bundle.build().dgram, b"/streamv2v/stage\0\0\0\0,s\0\0\xff\xfe\0\0", b""]
    return [kinds[i % len(kinds)] for i in range(count)]


def send(host: str, port: int, count: int, pause_s: float = 0.01) -> float:
    """Send ``count`` hostile packets, pausing ``pause_s`` every 50 (so most reach the listener); seconds taken."""
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    start = time.perf_counter()
    for i, packet in enumerate(hostile_packets(count)):
        sender.sendto(packet, (host, port))
        if i % 50 == 49:
            time.sleep(pause_s)
    return time.perf_counter() - start


if __name__ == "__main__":
    host, port = sys.argv[1], int(sys.argv[2])
    count = int(sys.argv[3]) if len(sys.argv) > 3 else 10_000
    print(f"{send(host, port, count, float(sys.argv[4]) if len(sys.argv) > 4 else 0.01):.2f}")
