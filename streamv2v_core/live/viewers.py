"""Viewers of a session's restyled frames: the stage page, OBS, VLC, ffmpeg, an ``<img>`` (pure Python).

One design keeps viewers from ever reaching the loop:

* The writer thread publishes each finished frame once, as JPEG, into the session (the newest
  frame replaces the previous one: ``BrowserSession.publish``). Nothing is queued per viewer.
* Each viewer is one coroutine on the server's event loop that wakes when a new frame is
  published and sends the newest one. A viewer still busy sending the last frame simply finds a
  newer one when it is done: a slow viewer skips frames, and holds at most the frame it is
  sending (plus its socket's buffer). A viewer that takes no data for ``STALL_S`` seconds is
  dropped, which frees its seat.
* Seats are bounded: at most ``PER_SESSION`` viewers of one session and ``TOTAL`` in all
  (``ViewerSeats``); one more is refused with a message, before any work.

The stream is ``multipart/x-mixed-replace`` (MJPEG, what OBS's Media Source, VLC, ffmpeg and an
``<img>`` read): each part is one JPEG with its length and, for the stage page, the frame's
number and the capture stamp of its source frame.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

BOUNDARY = "streamv2v-frame"
CONTENT_TYPE = f"multipart/x-mixed-replace; boundary={BOUNDARY}"
PER_SESSION = 32   # viewers of one session
TOTAL = 128        # viewers of all sessions together
STALL_S = 10.0     # a viewer that takes no data for this long is dropped
KEEPALIVE_S = 2.0  # with no new frame, the newest is sent again this often (players that time out keep playing)


class TooManyViewers(RuntimeError):
    """No seat is free (the route answers 503 with this message)."""


class ViewerSeats:
    """Counts viewers by session name, at most ``per_session`` each and ``total`` in all (thread-safe)."""

    def __init__(self, per_session: int = PER_SESSION, total: int = TOTAL):
        self.per_session, self.total = per_session, total
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}  # only names with a viewer: at most ``total`` entries

    @contextlib.contextmanager
    def seat(self, name: str) -> Iterator[None]:
        """Hold a seat for one viewer of ``name`` while the block runs; ``TooManyViewers`` when none is free."""
        with self._lock:
            held = self._counts.get(name, 0)
            if held >= self.per_session:
                raise TooManyViewers(f"session {name!r} already has {held} viewers (at most {self.per_session}): "
                                     f"close a stage page or player first")
            if sum(self._counts.values()) >= self.total:
                raise TooManyViewers(f"{self.total} viewers are watching already (at most {self.total} in all): "
                                     f"close a stage page or player first")
            self._counts[name] = held + 1
        try:
            yield
        finally:
            with self._lock:
                left = self._counts[name] - 1
                if left:
                    self._counts[name] = left
                else:
                    del self._counts[name]

    def count(self, name: str | None = None) -> int:
        """Viewers of ``name`` (of every session when None)."""
        with self._lock:
            return self._counts.get(name, 0) if name is not None else sum(self._counts.values())


def mjpeg_part(jpeg: bytes, number: int, stamp: float | None = None) -> bytes:
    """One part of the MJPEG stream: headers (type, length, frame number, source stamp), the JPEG, CRLF."""
    head = [f"--{BOUNDARY}", "Content-Type: image/jpeg", f"Content-Length: {len(jpeg)}",
            f"X-StreamV2V-Frame: {number}"]
    if stamp is not None:
        head.append(f"X-StreamV2V-Stamp: {stamp!r}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + jpeg + b"\r\n"


SEATS = ViewerSeats()
