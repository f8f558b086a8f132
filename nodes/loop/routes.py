"""The loop's HTTP routes on ComfyUI's server: the browser webcam (one WebSocket per browser, plain HTTP for
other clients), stop and status of a run, and live steering of a running loop (any source).

GET  /streamv2v/webcam/{session}/ws      WebSocket (what the node's "Start webcam" uses):
     browser -> server  binary: 8-byte little-endian float64 stamp (the sender's clock, e.g. the capture
                        time in ms) + one encoded image (JPEG/PNG/WebP), sent after each "ready"
                        text:   {"type": "stop"}
     server -> browser  text:   {"type": "ready"}: the loop took the last frame (or started), send the next now
                        binary: the stamp of the source frame + the restyled frame as JPEG, as each finishes
                                (newest first: a slow reader skips older ones)
                        text:   {"type": "status", "running", "frames_in", "taken", "replaced", "dropped",
                                 "frames_out", "idle_s"} twice a second
POST /streamv2v/webcam/{session}/frame   body: one encoded image (Content-Type image/jpeg, png or webp, and
                                         the header X-StreamV2V-Client); optional header X-StreamV2V-Stamp
                                         -> {"accepted", "running", "frames_in"} (frames are kept only
                                         while a loop runs the session; the newest wins)
GET  /streamv2v/webcam/{session}/output  newest restyled frame as image/jpeg (204 while there is none);
                                         headers X-StreamV2V-Frames (count), X-StreamV2V-Stamp
POST /streamv2v/loop/{session}/stop      ask the loop of that session to finish (it keeps its MP4); JSON
GET  /streamv2v/loop/{session}/status    {"running", "stopped", "frames_in", "taken", "replaced", "dropped",
                                          "frames_out", "idle_s"}

POST /streamv2v/loop/{session}/params   JSON object with any of prompt, blend_frames, control_strength,
                                        ff_alpha, clear_bank (streamv2v_core/live/params.py says the rules)
     200 {"accepted": {...}, "pending": 1}: applied to the next frame that enters the stream (changes sent
         before it are merged: the newest value of each field wins, a superseded prompt is counted)
     400 {"error": ...}: a bad name, body (not JSON, nested too deeply) or value; nothing changes
     404 {"error": ...}: no loop runs that session (no route creates one)
     413: a body over 64 KiB
GET  /streamv2v/loop/{session}/params   {"running", "can", "current", "pending", "changes", "superseded",
                                         "discarded", "problems", "log", "presets"}
POST/GET /streamv2v/loop/{session}/presets  the session's presets (preset_routes.py)

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
import struct
import time
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
    if output[1] is not None:
        headers["X-StreamV2V-Stamp"] = repr(output[1])
    return web.Response(body=output[0], content_type="image/jpeg", headers=headers)


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


class _Link:
    """One browser's WebSocket to a session: frames in after each "ready", restyled frames out as they finish.

    The session's events arrive on the loop's thread; they only set flags here (through the
    event loop) and wake the one coroutine that sends, so sends never interleave.
    """

    def __init__(self, ws: web.WebSocketResponse, name: str):
        self.ws, self.name = ws, name
        self.loop = asyncio.get_running_loop()
        self.wake = asyncio.Event()
        self.session: BrowserSession | None = None
        self.unsubscribe = None
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
                self._follow(SESSIONS.find(self.name))
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
            if self.unsubscribe:
                self.unsubscribe()

    def _follow(self, session: BrowserSession | None) -> None:
        """Listen to the session now registered under the name (a loop run may have made a new one)."""
        if session is self.session:
            return
        if self.unsubscribe:
            self.unsubscribe()
        self.session, self.unsubscribe, self.sent_out = session, None, 0
        if session is not None:
            self.unsubscribe = session.listen(self._on_event)
            self.ready_due = True

    def _on_event(self, event: str) -> None:
        """Called on the loop's thread (or ours): hand over to the event loop."""
        with contextlib.suppress(RuntimeError):  # the event loop is closing
            self.loop.call_soon_threadsafe(self._flag, event)

    def _flag(self, event: str) -> None:
        if event in ("taken", "started"):
            self.ready_due = True
        self.wake.set()

    async def _send_output(self) -> None:
        session = self.session
        if session is None or session.output is None or session.frames_out == self.sent_out:
            return
        self.sent_out = session.frames_out
        data, stamp = session.output
        await self.ws.send_bytes(STAMP.pack(float("nan") if stamp is None else stamp) + data)

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
                with contextlib.suppress(ValueError, AttributeError, RecursionError):  # junk text is ignored
                    if json.loads(message.data).get("type") == "stop":
                        session = SESSIONS.find(self.name)
                        if session is not None:
                            session.stop()
            elif message.type == WSMsgType.ERROR:
                return


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


def add_loop_routes(routes: web.RouteTableDef) -> None:
    """The loop's routes (webcam link, stop, status, live params) on ComfyUI's route table."""
    routes.get("/streamv2v/webcam/{session}/ws")(guarded("none")(webcam_socket))  # frames in, stop: guarded
    routes.post("/streamv2v/webcam/{session}/frame")(guarded("image")(post_frame))
    routes.get("/streamv2v/webcam/{session}/output")(get_output)
    routes.post("/streamv2v/loop/{session}/stop")(guarded("json")(post_stop))
    routes.get("/streamv2v/loop/{session}/status")(get_status)
    routes.post("/streamv2v/loop/{session}/params")(guarded("json")(post_params))
    routes.get("/streamv2v/loop/{session}/params")(get_params)
    from .preset_routes import add_preset_routes  # it builds on this module's helpers

    add_preset_routes(routes)
