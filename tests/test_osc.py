"""OSC control (streamv2v_core.live.osc) from a real OSC client library (python-osc's UDP client) on loopback.

Messages change the session's live parameters through the route's own check, a preset recall is one
change, and hostile traffic (garbage, oversized datagrams, huge bundles, future time tags, other
sessions' addresses) leaves the listener answering, its memory flat and nothing sent back.
"""
import socket
import time

import pytest
from pythonosc import udp_client

from host.osc_flood import hostile_packets
from host.waiting import wait_until

from streamv2v.streamv2v_core.live.osc import OscListener, change_body
from streamv2v.streamv2v_core.live.params import Capabilities, LiveParams

CAN = Capabilities(clip=True, control=True, fusion=True, bank=True, residual=True)


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


@pytest.fixture
def live():
    params = LiveParams()
    params.begin(CAN, {})
    listener = OscListener("stage", params.offer, 0)
    client = udp_client.SimpleUDPClient(*listener.address)
    yield params, listener, client
    listener.close()


def wait_for(predicate, timeout=5.0, what="the OSC listener", show=None):
    wait_until(predicate, timeout, what, show=show, poll=0.01)


def taken(params, count, timeout=5.0):
    """The next ``count`` changes (frames take them as they enter)."""
    changes = []

    def got():
        changes.extend(params.take())
        return len(changes) >= count
    wait_for(got, timeout, f"{count} changes", show=lambda: changes)
    return changes


def taken_fields(params, count, timeout=5.0):
    """The changes taken until they set ``count`` fields in all."""
    changes = []

    def got():
        changes.extend(params.take())
        return len({k for c in changes for k in c.fields()}) >= count
    wait_for(got, timeout)
    return changes


def test_messages_change_the_live_parameters_as_the_route_does(live):
    params, listener, client = live
    client.send_message("/streamv2v/stage/prompt", "oil painting")
    client.send_message("/streamv2v/stage/strength", 0.6)
    client.send_message("/streamv2v/stage/seed", 12345)
    client.send_message("/streamv2v/stage/blend_frames", 4.0)  # a fader's float for a whole number
    client.send_message("/streamv2v/stage/clear_bank", [])
    client.send_message("/streamv2v/stage/cfg", 99.0)  # refused by the same rule as the route's
    changes = taken_fields(params, 5)  # changes a frame has not taken yet merge into one (params.py)
    assert {k: v for c in changes for k, v in c.fields().items()} == {
        "prompt": "oil painting", "strength": pytest.approx(0.6), "seed": 12345, "blend_frames": 4, "clear_bank": True}
    wait_for(lambda: listener.counts["refused"] == 1)
    assert "cfg must be a number from 0 to 30" in listener.last_error


def test_a_preset_recall_is_one_change(live):
    params, listener, client = live
    params.set_presets([None, {"prompt": "neon city", "strength": 0.5, "seed": 3, "blend_frames": 6}])
    client.send_message("/streamv2v/stage/preset", 2)
    (change,) = taken(params, 1)
    assert change.fields() == {"prompt": "neon city", "strength": 0.5, "seed": 3, "blend_frames": 6, "preset": 2}
    assert change.describe().startswith("preset 2: prompt 'neon city' (blend 6 frames)")
    client.send_message("/streamv2v/stage/preset", 1)  # an empty slot
    wait_for(lambda: listener.counts["refused"] == 1)
    assert "preset 1 is empty" in listener.last_error


def test_change_bodies():
    assert change_body("clear_bank", [True]) == {"clear_bank": True}
    assert change_body("seed", [7.0]) == {"seed": 7} and change_body("strength", [1]) == {"strength": 1}
    for field, args, message in [("nope", [1], "unknown field 'nope'"), ("seed", [], "one value"),
                                 ("clear_bank", ["x"], "true/false or a number")]:
        with pytest.raises(ValueError, match=message):
            change_body(field, args)


def test_ten_thousand_hostile_packets_leave_the_listener_bounded_and_answering(live):
    params, listener, client = live
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.settimeout(0.5)
    packets = hostile_packets(10_000)
    for packet in packets[:700]:  # warm-up: the parser's and logger's first allocations
        sender.sendto(packet, listener.address)
    wait_for(lambda: sum(listener.counts.values()) > 300)
    before, start = rss_kib(), time.perf_counter()
    for i, packet in enumerate(packets):
        sender.sendto(packet, listener.address)
        if i % 50 == 49:
            time.sleep(0.01)  # paced so that most arrive (faster, the kernel drops what overflows its buffer)
    received = sum(listener.counts.values())
    change = None
    for _ in range(30):  # still answering (once the parsing budget has worked through what the kernel kept)
        client.send_message("/streamv2v/stage/ff_alpha", 0.25)
        try:
            (change,) = taken(params, 1, timeout=1.0)
            break
        except TimeoutError:
            pass
    after = rss_kib()
    assert change.ff_alpha == 0.25 and params.take() == []  # no garbage turned into a change
    with pytest.raises(socket.timeout):
        sender.recvfrom(100)  # nothing is ever sent back
    print(f"\nOSC flood: {len(packets)} hostile packets sent in {time.perf_counter() - start:.2f} s, counts "
          f"{dict(listener.counts)}; RSS {before} -> {after} KiB ({after - before:+d} KiB)")
    assert listener.counts["oversized"] and listener.counts["malformed"] and listener.counts["other session"]
    assert after - before < 4096, (before, after)
    assert received > 0
