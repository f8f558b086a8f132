"""The browser webcam's link to a running loop: one session per name (pure Python + PIL/OpenCV).

A ``BrowserSession`` holds one waiting frame (the newest wins: live video wants the present,
not a backlog), the newest restyled frame (JPEG) and counters. Frames are offered by the web
routes (HTTP or WebSocket, on the server's event loop) and taken by the loop (ComfyUI's
executor thread); ``listen()`` tells a route when something happened, from whichever thread
it happened on. A frame is stored only while a loop runs, so posting to a name nobody runs
costs no memory. ``SessionRegistry`` keeps at most ``limit`` sessions (the least recently used
idle ones are forgotten first) and checks names.

Every frame carries an optional ``stamp`` (a float from the sender's clock, e.g. the capture
time in milliseconds): it comes back with the restyled frame made from it, so the sender can
measure capture-to-display latency on its own clock.
"""
from __future__ import annotations

import collections
import io
import logging
import re
import threading
import time
from typing import Callable, Iterator, NamedTuple

import cv2
import numpy as np
import torch
from PIL import Image

from ..media.frames import to_tensor
from ..registry import Registry
from ..stream.frame import Frame
from .params import LiveParams

log = logging.getLogger("streamv2v")

MIN_SIDE = 16      # a smaller "frame" is no webcam picture (a 4x4 would be scaled into noise)
MAX_SIDE = 4096    # larger frames are refused from their header, before any decoding
MAX_SESSIONS = 16
SESSION_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
SESSION_RULE = "1 to 64 letters, digits, '_', '-' or '.'"
DROP_REASONS = ("undecodable", "too small", "too large")


class BadFrame(ValueError):
    """A live frame that cannot be used; ``reason`` is one of ``DROP_REASONS``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def check_session_name(name: str) -> str:
    """``name`` if it is a usable session name; ValueError saying what is allowed otherwise."""
    name = str(name)
    if not SESSION_NAME.fullmatch(name):
        shown = name if len(name) <= 40 else name[:40] + f"... ({len(name)} characters)"
        raise ValueError(f"session name {shown!r} is not allowed: use {SESSION_RULE} (e.g. 'webcam')")
    return name


def decode_frame(encoded: bytes, fit: tuple[int, int] | None = None) -> torch.Tensor:
    """Encoded image bytes (JPEG/PNG/WebP/...) -> ``[H, W, 3]`` in 0..1; ``BadFrame`` if unusable.

    The size is read from the header first: sides under ``MIN_SIDE`` or over ``MAX_SIDE`` are
    refused without decoding. ``fit`` (height, width): a JPEG much larger than that is
    decoded at 1/2, 1/4 or 1/8 scale (still covering ``fit``), which is several times faster.
    """
    try:
        with Image.open(io.BytesIO(encoded)) as image:
            width, height = image.size
            if min(width, height) < MIN_SIDE:
                raise BadFrame("too small", f"{width}x{height} (at least {MIN_SIDE} pixels a side)")
            if max(width, height) > MAX_SIDE:
                raise BadFrame("too large", f"{width}x{height} (at most {MAX_SIDE} pixels a side)")
            if fit is not None and image.format == "JPEG":
                image.draft("RGB", (fit[1], fit[0]))
            rgb = np.array(image.convert("RGB"))  # a writable copy: torch shares its memory
    except BadFrame:
        raise
    except Image.DecompressionBombError as error:  # PIL's own bound on the header's pixels came first
        raise BadFrame("too large", str(error)) from None
    except (OSError, ValueError, SyntaxError) as error:
        raise BadFrame("undecodable", f"{type(error).__name__}: {error}") from None
    return to_tensor(rgb)


def encode_jpeg(pixels: np.ndarray, quality: int = 85) -> bytes:
    """``uint8 [H, W, 3]`` RGB -> JPEG bytes."""
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return data.tobytes()


class Published(NamedTuple):
    """A restyled frame as viewers get it: JPEG bytes, the capture stamp of its source frame, its number in the
    take (1 = the first frame out)."""

    jpeg: bytes
    stamp: float | None
    number: int


class BrowserSession:
    """One named link between browsers and a running loop (see the module docstring)."""

    def __init__(self, name: str):
        self.name = name
        self._ready = threading.Condition()
        self._waiting: tuple[bytes, float | None, float] | None = None  # (encoded, stamp, received_at)
        self._listeners: list[Callable[[str], None]] = []
        self.running = False
        self.stopped = False
        self.frames_in = 0      # frames accepted while a loop ran
        self.replaced = 0       # accepted, then replaced by a newer one before the loop took them
        self.taken = 0          # frames the loop took (good or not)
        self.dropped = collections.Counter()  # frames the loop took but could not use, by reason
        self.frames_out = 0
        self.output: Published | None = None  # newest restyled frame (JPEG), its source's stamp, its number
        self.idle_timeout = 0.0  # the running loop ends after this many seconds without a frame (0: never)
        self.camera_fps: float | None = None  # the sender's camera rate, if it said (a live recording's default)
        self.prompt_id: str | None = None  # the prompt whose loop started the last take (one take a session)
        self.writer: dict = {}  # the loop's sink: frames, ms on the loop's thread, ms waited for its writer
        self.last_frame_at: float | None = None
        self.started_at: float | None = None
        self.used_at = time.monotonic()
        self.params = LiveParams()  # live steering (prompt, strengths) of the loop running this session

    # ------------------------------------------------------------------ senders' side
    def offer(self, encoded: bytes, stamp: float | None = None) -> bool:
        """Hand the loop a frame (the newest wins); False (nothing kept) while no loop runs."""
        with self._ready:
            self.used_at = time.monotonic()
            if not self.running or self.stopped:
                return False
            if self._waiting is not None:
                self.replaced += 1
            self._waiting = (encoded, stamp, self.used_at)
            self.frames_in += 1
            self.last_frame_at = self.used_at
            self._ready.notify_all()
        return True

    def stop(self) -> None:
        """Ask the running loop to finish (it finalises its file and returns normally)."""
        with self._ready:
            self.stopped = True
            self._ready.notify_all()
        self._tell("stopped")

    def listen(self, listener: Callable[[str], None]) -> Callable[[], None]:
        """Call ``listener(event)`` on "started", "taken", "output", "stopped", "finished"; returns an unsubscribe."""
        with self._ready:
            self._listeners.append(listener)

        def unsubscribe() -> None:
            with self._ready:
                if listener in self._listeners:
                    self._listeners.remove(listener)
        return unsubscribe

    def wants_frame(self) -> bool:
        """Whether a loop runs and no frame is waiting for it (a sender may send one now)."""
        return self.running and not self.stopped and self._waiting is None

    def status(self) -> dict:
        """Counters for the routes and the node (JSON-ready)."""
        now = time.monotonic()
        since = self.last_frame_at or self.started_at
        return {"running": self.running, "stopped": self.stopped, "frames_in": self.frames_in,
                "replaced": self.replaced, "taken": self.taken, "dropped": dict(self.dropped),
                "frames_out": self.frames_out,
                "idle_s": round(now - since, 1) if self.running and since is not None else None,
                "idle_timeout": self.idle_timeout if self.running else None, "writer": dict(self.writer)}

    # ------------------------------------------------------------------ the loop's side
    def start(self, idle_timeout: float = 0.0, prompt_id: str | None = None) -> None:
        """Called by the loop when it starts: forget an old frame and an old stop request. ``idle_timeout``: the
        seconds without a frame after which the loop ends (for the status: the loop's source ends it);
        ``prompt_id``: the ComfyUI prompt running the loop."""
        with self._ready:
            self.idle_timeout, self.prompt_id = float(idle_timeout), prompt_id
            self._waiting = None
            self.stopped = False
            self.running = True
            self.frames_out = self.taken = self.frames_in = self.replaced = 0
            self.writer = {}
            self.dropped.clear()
            self.last_frame_at = None
            self.started_at = self.used_at = time.monotonic()
        self._tell("started")

    def finish(self) -> None:
        """Called by the loop when it ends (normally or not)."""
        with self._ready:
            self.running = False
            self._waiting = None
            self.used_at = time.monotonic()
        self._tell("finished")

    def take(self, timeout: float) -> tuple[bytes, float | None, float] | None:
        """The waiting frame (bytes, stamp, ``time.monotonic()`` when it arrived), or None after ``timeout``
        seconds or a stop."""
        with self._ready:
            if self._waiting is None and not self.stopped:
                self._ready.wait(timeout)
            if self.stopped or self._waiting is None:
                return None
            item, self._waiting = self._waiting, None
            self.taken += 1
        self._tell("taken")
        return item

    def drop(self, reason: str) -> None:
        """Count a frame the loop took but could not use."""
        with self._ready:
            self.dropped[reason] += 1

    def idle_seconds(self) -> float:
        """Seconds since the last frame arrived (or since the loop started)."""
        since = self.last_frame_at or self.started_at or self.used_at
        return time.monotonic() - since

    def publish(self, pixels: np.ndarray, stamp: float | None = None) -> None:
        """Keep ``pixels`` (uint8 ``[H, W, 3]``) as the newest restyled frame, with the stamp of its source frame.

        Called on the loop's writer thread (JPEG encoding off the stream's thread); viewers and the browser link
        read ``output``, the newest only."""
        data = encode_jpeg(pixels)
        with self._ready:
            self.frames_out += 1
            self.output = Published(data, stamp, self.frames_out)
        self._tell("output")

    def watched(self) -> bool:
        """Whether anyone listens (a browser link, a stage viewer): publishing then has a reader."""
        with self._ready:
            return bool(self._listeners)

    def _tell(self, event: str) -> None:
        with self._ready:
            listeners = list(self._listeners)
        for listener in listeners:
            listener(event)


def live_frames(session: BrowserSession, fit: Callable[[], tuple[int, int] | None],
                idle: Callable[[float], None], poll_s: float = 0.25,
                record: Callable[[bytes, float | None, float | None], None] | None = None) -> Iterator[Frame]:
    """``Frame``s (image ``[H, W, 3]``, the sender's stamp, when it arrived) as the browser sends them, until a stop.

    A frame that cannot be used is dropped and counted in ``session.dropped``; the stream
    goes on. ``idle(seconds since the last frame)`` runs while none comes (raise there to
    cancel); ``fit()`` is the stream's size once known, for faster JPEG decoding. ``record(bytes, stamp,
    received_at)`` gets every frame that is used, as it came (a take keeps them).
    """
    while not session.stopped:
        item = session.take(poll_s)
        if item is None:
            idle(session.idle_seconds())
            continue
        encoded, stamp, received_at = item
        try:
            image = decode_frame(encoded, fit())
        except BadFrame as bad:
            session.drop(bad.reason)
            log.info("StreamV2V session %r: dropped a frame (%s)", session.name, bad)
            continue
        if record is not None:
            record(encoded, stamp, received_at)
        yield Frame(image, stamp=stamp, received_at=received_at)


class SessionRegistry:
    """Browser sessions by name, at most ``limit`` of them (a ``registry.Registry``): creating one more
    forgets the least recently used session that no loop runs; a forgotten session is stopped."""

    def __init__(self, limit: int = MAX_SESSIONS, register: bool = False):
        self._sessions: Registry[BrowserSession] = Registry(
            "browser session", limit, "lru", close=BrowserSession.stop, busy=lambda s: s.running,
            hint="Stop a running webcam loop first.", register=register)
        self.limit = limit

    def get(self, name: str) -> BrowserSession:
        """The session ``name`` (checked), created if needed (for the loop node)."""
        name = check_session_name(name)
        return self._sessions.get_or_create(name, lambda: BrowserSession(name))

    def find(self, name: str) -> BrowserSession | None:
        """The session ``name`` if one exists (for the web routes: they never create one)."""
        return self._sessions.find(name)

    def __len__(self) -> int:
        return len(self._sessions)

    def reset(self, name: str | None = None) -> None:
        """Stop and forget ``name`` (every session when None)."""
        if name is None:
            self._sessions.clear_all()
        else:
            self._sessions.remove(name)


SESSIONS = SessionRegistry(register=True)
