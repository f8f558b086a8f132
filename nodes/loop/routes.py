"""The loop's HTTP routes on ComfyUI's server: the browser webcam (one WebSocket per browser, plain HTTP for
other clients), stop and status of a run, and live steering of a running loop (any source).

GET  /streamv2v/webcam/{session}/ws      WebSocket (what the node's panel uses):
     browser -> server  binary: 8-byte little-endian float64 stamp (the sender's clock, e.g. the capture
                        time in ms) + one encoded image (JPEG/PNG/WebP), sent after each "ready"
                        text:   {"type": "stop"}; {"type": "camera", "fps": 30} (the camera's rate: the default
                                frame rate of the live recording)
     server -> browser  text:   {"type": "ready"}: the loop took the last frame (or started), send the next now
                        binary: the stamp of the source frame (the frame whose pixels it holds) + the restyled
                                frame as JPEG, as each finishes (newest first: a slow reader skips older ones)
                        text:   {"type": "status", "running", "frames_in", "taken", "replaced", "dropped",
                                 "frames_out", "idle_s", "idle_timeout", "writer"} twice a second
POST /streamv2v/webcam/{session}/frame   body: one encoded image (Content-Type image/jpeg, png or webp, and
                                         the header X-StreamV2V-Client); optional header X-StreamV2V-Stamp
                                         -> {"accepted", "running", "frames_in"} (frames are kept only
                                         while a loop runs the session; the newest wins)
GET  /streamv2v/webcam/{session}/output  newest restyled frame as image/jpeg (204 while there is none);
                                         headers X-StreamV2V-Frames (count), X-StreamV2V-Stamp
POST /streamv2v/loop/{session}/stop      ask the loop of that session to finish (it keeps its MP4); JSON
GET  /streamv2v/loop/{session}/status    {"running", "stopped", "frames_in", "taken", "replaced", "dropped",
                                          "frames_out", "idle_s", "idle_timeout", "writer" ({"frames", "loop_ms":
                                          time on the loop's thread in the sink, "waited_ms": for its writer})}

POST /streamv2v/loop/{session}/params   JSON object with any of prompt, blend_frames, control_strength,
                                        ff_alpha, clear_bank (streamv2v_core/live/params.py says the rules)
     200 {"accepted": {...}, "pending": 1}: applied to the next frame that enters the stream (changes sent
         before it are merged: the newest value of each field wins, a superseded prompt is counted)
     400 {"error": ...}: a bad name, body (not JSON, nested too deeply) or value; nothing changes
     404 {"error": ...}: no loop runs that session (no route creates one)
     413: a body over 64 KiB
GET  /streamv2v/loop/{session}/params   {"running", "can", "current", "pending", "changes", "superseded",
                                         "discarded", "problems", "log", "presets", "run" (counts the session's
                                         loop runs), "in_effect" ({"frame", "prompt"}: the newest frame out)}
POST/GET /streamv2v/loop/{session}/presets  the session's presets (preset_routes.py)
GET  /streamv2v/stage/{session}[/mjpeg] the stage page and its MJPEG stream (stage.py)

Session names are checked (400 with the rule); no route creates a session, so requests to names
no loop runs cost no memory. Every route that changes state (frame, WebSocket, stop, params) takes
only requests of the server's own pages or of HTTP clients with the right body type
(``nodes/request_guard.py``: 403 / 415 otherwise).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import struct
import time
from dataclasses import asdict
from typing import Callable

from aiohttp import WSMsgType, web

from ...streamv2v_core.live.params import read_json
from ...streamv2v_core.live.session import SESSIONS, BrowserSession, check_session_name
from ..request_guard import guarded

log = logging.getLogger("streamv2v")
MAX_FRAME_BYTES = 16 * 1024 * 1024
STAMP = struct.Struct("<d")
STATUS_EVERY_S = 0.5
REASK_S = 5.0  # a "ready" with no frame in answer for this long is sent again (e.g. the camera was not on yet)
MAX_BODY = 64 * 1024  # a live change
MIN_CAMERA_FPS, MAX_CAMERA_FPS = 1.0, 240.0  # a camera rate outside this is no camera's: ignored
# What the status and params routes answer for a session no loop has run: a fresh session's own answers.
_IDLE = BrowserSession("idle")


def session_name(request: web.Request) -> str:
    try:
        return check_session_name(request.match_info["session"])
    except ValueError as error:
        raise web.HTTPBadRequest(text=json.dumps({"error": str(error)}), content_type="application/json")


async def post_frame(request: web.Request) -> web.Response:
    name = session_name(request)
    data = await request.read()
    if not data or len(data) > MAX_FRAME_BYTES:
        return web.json_response({"error": "send one encoded image (JPEG/PNG/WebP) up to 16 MiB"}, status=400)
    try:
        stamp = float(request.headers["X-StreamV2V-Stamp"]) if "X-StreamV2V-Stamp" in request.headers else None
    except ValueError:
        stamp = None
    session = SESSIONS.find(name)
    accepted = session is not None and session.offer(data, stamp)
    return web.json_response({"accepted": accepted, "running": bool(session and session.running),
                              "frames_in": session.frames_in if session else 0})


async def get_output(request: web.Request) -> web.Response:
    session = SESSIONS.find(session_name(request))
    output = session.output if session else None
    headers = {"X-StreamV2V-Frames": str(session.frames_out if session else 0), "Cache-Control": "no-store"}
    if output is None:
        return web.Response(status=204, headers=headers)
    if output.stamp is not None:
        headers["X-StreamV2V-Stamp"] = repr(output.stamp)
    return web.Response(body=output.jpeg, content_type="image/jpeg", headers=headers)


async def post_stop(request: web.Request) -> web.Response:
    name = session_name(request)
    session = SESSIONS.find(name)
    if session is not None:
        session.stop()
        log.info("StreamV2V: stop requested from the browser (session %r)", name)
    return web.json_response({"stopped": session is not None, "running": bool(session and session.running)})


async def get_status(request: web.Request) -> web.Response:
    session = SESSIONS.find(session_name(request))
    return web.json_response((session or _IDLE).status(), headers={"Cache-Control": "no-store"})


async def webcam_socket(request: web.Request) -> web.WebSocketResponse:
    name = session_name(request)
    ws = web.WebSocketResponse(max_msg_size=MAX_FRAME_BYTES + STAMP.size, heartbeat=30.0)
    await ws.prepare(request)
    await _Link(ws, name).run()
    return ws


class SessionFollower:
    """Follows the session registered under ``name`` (none yet, or a new one a loop run made) for a coroutine on
    the server's event loop: the session's events arrive on the loop's or the writer's thread and are handed to
    ``on_event(event)`` on the event loop. ``follow()`` after every wake-up; ``close()`` at the end."""

    def __init__(self, name: str, on_event: Callable[[str], None]):
        self.name, self.on_event = name, on_event
        self.loop = asyncio.get_running_loop()
        self.session: BrowserSession | None = None
        self._unsubscribe = None

    def follow(self) -> bool:
        """Listen to the session now registered under the name; True when it changed."""
        session = SESSIONS.find(self.name)
        if session is self.session:
            return False
        self.close()
        self.session = session
        if session is not None:
            self._unsubscribe = session.listen(self._event)
        return True

    def _event(self, event: str) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is closing
            self.loop.call_soon_threadsafe(self.on_event, event)

    def close(self) -> None:
        if self._unsubscribe:
            self._unsubscribe()
            self._unsubscribe = None


class _Link:
    """One browser's WebSocket to a session: frames in after each "ready", restyled frames out as they finish.

    The session's events arrive on the loop's thread; they only set flags here (through the
    event loop) and wake the one coroutine that sends, so sends never interleave.
    """

    def __init__(self, ws: web.WebSocketResponse, name: str):
        self.ws, self.name = ws, name
        self.wake = asyncio.Event()
        self.follower = SessionFollower(name, self._flag)
        self.ready_due = False
        self.sent_out = 0
        self.asked_at: float | None = None  # when the last "ready" went out that no frame answered yet

    async def run(self) -> None:
        receiver = asyncio.create_task(self._receive())
        try:
            next_status = 0.0
            while not self.ws.closed and not receiver.done():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), STATUS_EVERY_S)
                self.wake.clear()
                if self.follower.follow():  # a new session: its frames count afresh, and it wants one
                    self.sent_out, self.ready_due = 0, self.session is not None
                await self._send_output()
                await self._send_ready()
                now = time.monotonic()
                if now >= next_status:
                    next_status = now + STATUS_EVERY_S
                    status = (self.session or _IDLE).status()
                    await self.ws.send_str(json.dumps({"type": "status", **status}))
        except (ConnectionResetError, RuntimeError):
            pass  # the browser went away mid-send
        finally:
            receiver.cancel()
            self.follower.close()

    @property
    def session(self) -> BrowserSession | None:
        return self.follower.session

    def _flag(self, event: str) -> None:
        if event in ("taken", "started"):
            self.ready_due = True
        self.wake.set()

    async def _send_output(self) -> None:
        session = self.session
        output = session.output if session is not None else None
        if output is None or output.number == self.sent_out:
            return
        self.sent_out = output.number
        await self.ws.send_bytes(STAMP.pack(float("nan") if output.stamp is None else output.stamp) + output.jpeg)

    async def _send_ready(self) -> None:
        session = self.session
        if session is None or not session.wants_frame():
            return
        # One "ready" per frame taken; asked again only when the last one went unanswered for
        # long (sooner would make a slow browser send two frames, and the newer replace the older).
        unanswered = self.asked_at is not None and time.monotonic() - self.asked_at > REASK_S
        if self.ready_due or unanswered:
            self.ready_due = False
            self.asked_at = time.monotonic()
            await self.ws.send_str('{"type": "ready"}')

    async def _receive(self) -> None:
        async for message in self.ws:
            if message.type == WSMsgType.BINARY:
                self.asked_at = None
                data = message.data
                stamp = STAMP.unpack_from(data)[0] if len(data) >= STAMP.size else None
                session = SESSIONS.find(self.name)
                if session is not None:
                    session.offer(bytes(data[STAMP.size:]), stamp)
            elif message.type == WSMsgType.TEXT:
                with contextlib.suppress(ValueError, AttributeError, TypeError, RecursionError):  # junk is ignored
                    self._on_text(json.loads(message.data))
            elif message.type == WSMsgType.ERROR:
                return

    def _on_text(self, message: dict) -> None:
        session = SESSIONS.find(self.name)
        if session is None:
            return
        if message.get("type") == "stop":
            session.stop()
        elif message.get("type") == "camera":  # the sender's camera rate: a live recording's default grid
            fps = float(message.get("fps"))
            session.camera_fps = fps if math.isfinite(fps) and MIN_CAMERA_FPS <= fps <= MAX_CAMERA_FPS else None


def _error(status: int, text: str) -> web.Response:
    return web.json_response({"error": text}, status=status)


async def read_body(request: web.Request) -> bytes | web.Response:
    """The request's body, or a 413 over ``MAX_BODY`` (bounded even without a Content-Length)."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        return _error(413, f"the body is over {MAX_BODY // 1024} KiB: send only the fields that change")
    data = await request.content.read(MAX_BODY + 1)
    if len(data) > MAX_BODY:
        return _error(413, f"the body is over {MAX_BODY // 1024} KiB: send only the fields that change")
    return data


async def post_params(request: web.Request) -> web.Response:
    name = session_name(request)
    data = await read_body(request)
    if isinstance(data, web.Response):
        return data
    session = SESSIONS.find(name)
    if session is None or not session.running:
        return _error(404, f"no loop is running on session {name!r}: queue the loop (or press Start) first")
    try:
        change = session.params.offer(read_json(data))
    except LookupError as error:
        return _error(404, str(error))
    except ValueError as error:
        return _error(400, str(error))
    log.info("StreamV2V session %r: live change requested: %s", name, change.describe())
    return web.json_response({"accepted": change.fields(), "pending": session.params.status()["pending"]})


async def get_params(request: web.Request) -> web.Response:
    session = SESSIONS.find(session_name(request))
    return web.json_response((session or _IDLE).params.status(),
                             headers={"Cache-Control": "no-store"})


def add_loop_routes(routes: web.RouteTableDef, app: web.Application | None = None) -> None:
    """The loop's routes (webcam link, stop, status, live params, presets, the stage) on ComfyUI's route table,
    and on ``app`` (before the server starts) the one-take check in front of ``POST /prompt``."""
    from .one_take import refuse_second_take
    from .preset_routes import add_preset_routes  # here: both build on this module's helpers
    from .stage import add_stage_routes

    if app is not None and not app.frozen:
        app.middlewares.append(refuse_second_take)
    else:
        log.warning("StreamV2V: the server was already started; a second live loop on a busy session will not be "
                    "refused when queued")

    routes.get("/streamv2v/webcam/{session}/ws")(guarded("none")(webcam_socket))  # frames in, stop: guarded
    routes.post("/streamv2v/webcam/{session}/frame")(guarded("image")(post_frame))
    routes.get("/streamv2v/webcam/{session}/output")(get_output)
    routes.post("/streamv2v/loop/{session}/stop")(guarded("json")(post_stop))
    routes.get("/streamv2v/loop/{session}/status")(get_status)
    routes.post("/streamv2v/loop/{session}/params")(guarded("json")(post_params))
    routes.get("/streamv2v/loop/{session}/params")(get_params)
    add_stage_routes(routes)
    add_preset_routes(routes)
