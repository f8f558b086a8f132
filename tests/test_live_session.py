"""The browser webcam's sessions (streamv2v_core.live.session): bad frames dropped, newest frame wins, bounded."""
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from host.waiting import join, wait_until
from streamv2v.streamv2v_core.media.frames import FrameResizer, StreamSizer
from streamv2v.streamv2v_core.live.session import (BadFrame, BrowserSession, SessionRegistry, check_session_name,
                                                   decode_frame, live_frames)


def encoded(width, height, kind="JPEG", seed=0):
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, kind)
    return buffer.getvalue()


def test_decode_frame_refuses_what_a_webcam_never_sends():
    assert decode_frame(encoded(160, 120)).shape == (120, 160, 3)
    jpeg = encoded(1600, 1200)
    small = decode_frame(jpeg, fit=(120, 160))  # decoded at 1/8 scale: still covers the stream's size
    assert small.shape == (150, 200, 3) and 0.0 <= float(small.min()) and float(small.max()) <= 1.0
    big = Image.new("RGB", (5000, 40))
    buffer = io.BytesIO()
    big.save(buffer, "PNG")
    for data, reason in [(b"not an image", "undecodable"), (jpeg[: len(jpeg) // 2], "undecodable"),
                         (encoded(4, 4, "PNG"), "too small"), (buffer.getvalue(), "too large"), (b"", "undecodable")]:
        with pytest.raises(BadFrame) as caught:
            decode_frame(data)
        assert caught.value.reason == reason


def test_newest_frame_wins_and_nothing_is_kept_without_a_loop():
    session = BrowserSession("s")
    assert not session.offer(b"early") and session.frames_in == 0  # no loop runs: not kept
    events = []
    session.listen(events.append)
    session.start()
    assert session.wants_frame()
    assert session.offer(b"a", 1.0) and session.offer(b"b", 2.0)
    assert session.replaced == 1 and not session.wants_frame()
    encoded_frame, stamp, received_at = session.take(0.1)
    assert (encoded_frame, stamp) == (b"b", 2.0) and session.taken == 1 and received_at <= time.monotonic()
    assert session.take(0.01) is None
    session.publish(np.zeros((16, 16, 3), np.uint8), 2.0)
    assert session.output[1] == 2.0 and session.frames_out == 1
    session.stop()
    session.finish()
    assert events == ["started", "taken", "output", "stopped", "finished"]
    assert session.status()["running"] is False and not session.offer(b"late")


def test_live_frames_drop_bad_frames_and_go_on():
    session = BrowserSession("live")
    session.start()
    sizer = StreamSizer(FrameResizer(64, 48))
    idle = []
    sent = [encoded(160, 120, seed=1), b"garbage", encoded(4, 4, "PNG"), encoded(2000, 1500, seed=2),
            encoded(320, 240, seed=3)]

    failed = []

    def sender():
        try:
            for stamp, data in enumerate(sent):
                wait_until(session.wants_frame, 30, f"the loop to want frame {stamp}", poll=0.005)
                session.offer(data, float(stamp))
            wait_until(session.wants_frame, 30, "the loop to take the last frame", poll=0.005)
        except BaseException as error:  # reported below, after the reader has ended
            failed.append(error)
        finally:
            session.stop()  # ends live_frames below whatever happened here

    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    got = [(sizer(frame.image).shape, frame.stamp) for frame in live_frames(session, sizer.hint, idle.append, 0.02)]
    join(thread, 30, "the frame sender")
    assert not failed, failed
    assert got == [((48, 64, 3), 0.0), ((48, 64, 3), 3.0), ((48, 64, 3), 4.0)]
    assert dict(session.dropped) == {"undecodable": 1, "too small": 1} and session.taken == 5


def test_registry_is_bounded_and_checks_names():
    registry = SessionRegistry(limit=3)
    running = registry.get("running")
    running.start()
    for i in range(10):
        registry.get(f"name{i}")
    assert len(registry) == 3 and registry.find("running") is running  # a running session is never evicted
    assert registry.find("name0") is None and registry.find("name9") is not None
    assert registry.find("never-made") is None and len(registry) == 3  # finding creates nothing
    for name in ["", "x" * 65, "a/b", "spaced name", "x" * 10_000]:
        with pytest.raises(ValueError, match="is not allowed: use 1 to 64 letters"):
            registry.get(name)
    assert check_session_name("webcam-2.a_b") == "webcam-2.a_b"


def test_a_png_bomb_posted_to_the_webcam_is_counted_too_large():
    """Its header promises 60000x60000: PIL refuses it as a decompression bomb, which is "too large"."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(180001)))
            + chunk(b"IEND", b""))
    with pytest.raises(BadFrame) as bad:
        decode_frame(bomb)
    assert bad.value.reason == "too large"
