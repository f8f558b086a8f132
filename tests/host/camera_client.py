"""A camera in Python that speaks the panel's WebSocket protocol, and a plain MJPEG reader: for tests and benches
that need a live take without a browser (nodes/loop/routes.py has the protocol).

    camera = CameraClient(server.url, "s1", size=64)
    async with camera:                        # connects; sends a frame after every "ready"
        await camera.wait_outputs(10)
    camera.sent       # [(stamp, capture time)]: stamps are this process's time.monotonic() in ms
    camera.received   # [(arrival time, stamp)] of the restyled frames pushed back

    parts = read_mjpeg(url, count=5)          # [(headers, jpeg bytes, arrival time)] from a plain HTTP client
"""
from __future__ import annotations

import asyncio
import http.client
import json
import struct
import time
import urllib.parse

import cv2
import numpy as np

STAMP = struct.Struct("<d")


def now_ms() -> float:
    return time.monotonic() * 1000.0


def jpeg_frame(number: int, size: int) -> bytes:
    """A JPEG of random pixels (seeded by ``number``): every frame differs, as a camera's do."""
    pixels = np.random.default_rng(number).integers(0, 256, (size, size, 3), np.uint8)
    return cv2.imencode(".jpg", pixels)[1].tobytes()


class CameraClient:
    """Sends one frame (stamp = capture time in ms) after each "ready"; records what it sent and got back.

    ``frames``: how many to send at most (None: until stopped); ``pause_after``: stop sending after this many
    (the camera goes quiet, the socket stays open), e.g. to let a loop's idle_timeout end it.
    """

    def __init__(self, base_url: str, session: str, size: int = 64, frames: int | None = None):
        parsed = urllib.parse.urlsplit(base_url)
        self.url = f"ws://{parsed.netloc}/streamv2v/webcam/{session}/ws"
        self.size, self.limit = size, frames
        self.sent: list[tuple[float, float]] = []
        self.received: list[tuple[float, float]] = []
        self.statuses: list[dict] = []
        self.quiet = False  # True: answer no "ready" (a camera that stopped)
        self._task = None
        self._changed = asyncio.Event()

    async def __aenter__(self) -> "CameraClient":
        import aiohttp

        self._http = aiohttp.ClientSession()
        self.ws = await self._http.ws_connect(self.url, max_msg_size=0)
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self.ws.close()
        await self._http.close()

    async def _run(self) -> None:
        import aiohttp

        async for message in self.ws:
            if message.type == aiohttp.WSMsgType.BINARY:
                self.received.append((now_ms(), STAMP.unpack_from(message.data)[0]))
            elif message.type == aiohttp.WSMsgType.TEXT:
                data = json.loads(message.data)
                if data["type"] == "ready" and not self.quiet and (self.limit is None or len(self.sent) < self.limit):
                    stamp = now_ms()
                    await self.ws.send_bytes(STAMP.pack(stamp) + jpeg_frame(len(self.sent), self.size))
                    self.sent.append((stamp, stamp))
                elif data["type"] == "status":
                    self.statuses.append(data)
            self._changed.set()

    async def wait_outputs(self, count: int, timeout: float = 120.0) -> None:
        """Until ``count`` restyled frames came back."""
        deadline = time.monotonic() + timeout
        while len(self.received) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.received)} of {count} frames back after {timeout} s "
                                   f"({len(self.sent)} sent; last status {self.statuses[-1:]})")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), 1.0)
            except asyncio.TimeoutError:
                pass


def read_mjpeg(url: str, count: int, timeout: float = 60.0) -> list[tuple[dict, bytes, float]]:
    """``count`` parts of a multipart/x-mixed-replace stream read with a plain HTTP client:
    [(headers in lower case, JPEG bytes, arrival time in ms on ``now_ms``'s clock)]."""
    parsed = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parsed.netloc, timeout=timeout)
    connection.request("GET", parsed.path)
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"GET {url} -> {response.status}: {response.read()[:300]!r}")
    boundary = response.getheader("Content-Type").split("boundary=", 1)[1].encode()
    parts = []
    try:
        while len(parts) < count:
            line = response.readline()
            if not line:
                raise EOFError("the stream ended")
            if line.strip() != b"--" + boundary:
                continue
            headers = {}
            while (line := response.readline()) not in (b"\r\n", b""):
                key, value = line.decode().split(":", 1)
                headers[key.strip().lower()] = value.strip()
            jpeg = response.read(int(headers["content-length"]))
            parts.append((headers, jpeg, now_ms()))
    finally:
        connection.close()
    return parts
