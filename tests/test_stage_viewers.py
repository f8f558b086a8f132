"""The stage's viewers in-process (aiohttp's test server with the stage routes, a session publishing frames from a
thread as the loop's writer does): a plain HTTP client reads successive JPEGs; stalled viewers are dropped and never
slow the publisher; seats are bounded; the page is served without ComfyUI's editor. The same against the real
server and loop: tests/test_stage_server.py; figures: bench/stage_viewers.py.
"""
import asyncio
import http.client
import io
import socket
import threading
import time

import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from PIL import Image

from host import browser
from host.camera_client import read_mjpeg
from streamv2v.nodes.loop import stage as stage_routes
from streamv2v.streamv2v_core.live import viewers
from streamv2v.streamv2v_core.live.session import SESSIONS
from streamv2v.streamv2v_core.media.frame_grid import FrameGrid
from streamv2v.streamv2v_core.media.writer_thread import WriterThread


class Publisher:
    """Publishes numbered frames into a session from a thread of its own, as the loop's writer thread does."""

    def __init__(self, session, fps=50.0, noise=False):
        self.session, self.period, self.noise = session, 1.0 / fps, noise
        self.times, self.stop = [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        frame = 0
        while not self.stop.is_set():
            # noise: a large JPEG (about 150 KB) that fills a stalled viewer's socket buffers within a second
            pixels = (np.random.default_rng(frame).integers(0, 256, (256, 256, 3), np.uint8) if self.noise
                      else np.full((48, 64, 3), frame % 256, np.uint8))
            start = time.perf_counter()
            self.session.publish(pixels, stamp=float(frame))
            self.times.append(time.perf_counter() - start)
            frame += 1
            time.sleep(self.period)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


class StageServer:
    """The stage routes alone on an aiohttp server in a thread; ``restart()`` brings it back on the same port."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port, self.server = None, None
        self.start()

    def _call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(10)

    def start(self):
        routes = web.RouteTableDef()
        stage_routes.add_stage_routes(routes)
        app = web.Application()
        app.add_routes(routes)
        self.server = TestServer(app, host="127.0.0.1", port=self.port)
        self._call(self.server.start_server(shutdown_timeout=0.5))  # streaming viewers: cut at once
        self.port = self.server.port

    def stop(self):
        self._call(self.server.close())

    def close(self):
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def stage_server(monkeypatch):
    monkeypatch.setattr(stage_routes, "STALL_S", 1.0)
    monkeypatch.setattr(stage_routes, "SEATS", viewers.ViewerSeats(per_session=24, total=30))
    server = StageServer()
    session = SESSIONS.get("stage_unit")
    session.start()
    yield server, session
    session.finish()
    SESSIONS.reset("stage_unit")
    server.close()


@pytest.fixture
def stage(stage_server):
    """(base URL, session) with the stage routes served on a thread's event loop."""
    server, session = stage_server
    return f"http://127.0.0.1:{server.port}", session


def test_mjpeg_gives_successive_jpegs_to_a_plain_http_client(stage):
    base, session = stage
    with Publisher(session):
        parts = read_mjpeg(f"{base}/streamv2v/stage/stage_unit/mjpeg", 5)
    numbers = []
    for headers, jpeg, _ in parts:
        assert headers["content-type"] == "image/jpeg"
        with Image.open(io.BytesIO(jpeg)) as image:
            assert image.format == "JPEG" and image.size == (64, 48)
        numbers.append(int(headers["x-streamv2v-frame"]))
    assert numbers == sorted(numbers) and len(set(numbers)) == 5, numbers


def test_the_page_is_standalone_and_names_are_checked(stage):
    base, _ = stage
    connection = http.client.HTTPConnection(base.removeprefix("http://"), timeout=10)
    connection.request("GET", "/streamv2v/stage/stage_unit")
    response = connection.getresponse()
    page = response.read().decode()
    assert response.status == 200 and response.getheader("Content-Type").startswith("text/html")
    assert "/mjpeg" in page and "scripts/app.js" not in page  # its own page: no ComfyUI frontend
    connection.request("GET", "/streamv2v/stage/bad%20name/mjpeg")
    response = connection.getresponse()
    assert response.status == 400 and "is not allowed" in response.read().decode()


def stalled_viewer(base: str) -> socket.socket:
    """A viewer that asks for the stream and then never reads (a tiny receive buffer: it stalls at once)."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    sock.sendall(b"GET /streamv2v/stage/stage_unit/mjpeg HTTP/1.1\r\nHost: x\r\n\r\n")
    return sock


def test_stalled_viewers_are_dropped_and_seats_are_bounded(stage):
    base, session = stage
    stalled = [stalled_viewer(base) for _ in range(20)]
    try:
        with Publisher(session, fps=100, noise=True):
            deadline = time.monotonic() + 10
            while stage_routes.SEATS.count("stage_unit") < 20 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert stage_routes.SEATS.count("stage_unit") == 20
            # 4 more fit (24 a session), the 25th is refused before any work
            extra = [stalled_viewer(base) for _ in range(4)]
            while stage_routes.SEATS.count("stage_unit") < 24 and time.monotonic() < deadline:
                time.sleep(0.05)
            connection = http.client.HTTPConnection(base.removeprefix("http://"), timeout=10)
            connection.request("GET", "/streamv2v/stage/stage_unit/mjpeg")
            refused = connection.getresponse()
            assert refused.status == 503 and "already has 24 viewers" in refused.read().decode()
            # a stalled viewer takes nothing for STALL_S (1 s here): dropped, its seat free again
            while stage_routes.SEATS.count("stage_unit") and time.monotonic() < deadline + 10:
                time.sleep(0.1)
            assert stage_routes.SEATS.count("stage_unit") == 0
    finally:
        for sock in stalled + extra:
            sock.close()


def test_writer_thread_keeps_order_bounds_its_queue_and_raises_on_the_caller():
    done, gate = [], threading.Event()

    def work(item):
        gate.wait(5)
        done.append(item)

    writer = WriterThread(work, limit=2)
    writer.put(0)
    writer.put(1)
    writer.put(2)  # 0 is being worked on, 1 and 2 wait: the queue is full now
    blocked = threading.Thread(target=writer.put, args=(3,))
    blocked.start()
    blocked.join(0.3)
    assert blocked.is_alive(), "put did not wait for room in the queue"
    gate.set()
    blocked.join(5)
    writer.close()
    assert done == [0, 1, 2, 3] and writer.done == 4

    def fail(item):
        raise OSError("disk full")

    failing = WriterThread(fail)
    failing.put(0)
    with pytest.raises(OSError, match="disk full"):
        failing.close()


def test_frame_grid_places_frames_at_their_capture_time():
    grid = FrameGrid(10, max_hold_s=1.0)  # 10 slots a second, gaps cut to 1 s
    written = []
    for image, t in [("a", 5.00), ("b", 5.02), ("c", 5.31), ("d", 5.40), ("e", 9.40), ("f", 9.50)]:
        written += grid.add(image, t)
    written += grid.close()
    # a and b share slot 0 (b wins), c is slot 3 (b held over 0-2), d slot 4, then a 4 s gap cut to 1 s
    assert written == ["b", "b", "b", "c"] + ["d"] * 10 + ["e", "f"]
    assert grid.replaced == 1 and grid.cut_s == pytest.approx(3.0) and grid.duration() == pytest.approx(1.6)
    with pytest.raises(ValueError, match="positive frame rate"):
        FrameGrid(0)


@pytest.mark.skipif(not browser.available(), reason=browser.SKIP_REASON)
def test_stage_page_draws_frames_and_reconnects_after_a_server_restart(stage_server):
    server, session = stage_server
    with Publisher(session, fps=20), browser.Chromium(f"http://127.0.0.1:{server.port}/streamv2v/stage/stage_unit") \
            as chrome:
        asyncio.run(_watch_through_a_restart(server, chrome))


async def _watch_through_a_restart(server, chrome):
    async with chrome.page() as page:
        await page.wait_for("window.streamv2vStage?.frames >= 5", timeout=60)
        size = await page.js("[document.querySelector('canvas').width, document.querySelector('canvas').height]")
        assert size == [64, 48]
        server.stop()  # the server goes away (a restart, a network blip): the page notices and retries
        await page.wait_for("!window.streamv2vStage.receiving && !!window.streamv2vStage.lastError", timeout=30)
        server.start()
        before = await page.js("window.streamv2vStage.frames")
        await page.wait_for(f"window.streamv2vStage.frames >= {before + 5} && window.streamv2vStage.connects >= 2",
                            timeout=30)
