"""Live steering routes of a running loop (any source: webcam, camera or file).

POST /streamv2v/loop/{session}/params   JSON object with any of prompt, blend_frames, control_strength,
                                        ff_alpha, clear_bank (streamv2v_core/live/params.py says the rules)
     200 {"accepted": {...}, "pending": n}: applied to the next frame that enters the stream
     400 {"error": ...}: a bad name, body or value; nothing changes
     404 {"error": ...}: no loop runs that session (no route creates one)
     413: a body over 64 KiB;  429: too many changes waiting for the next frame
GET  /streamv2v/loop/{session}/params   {"running", "can", "current", "pending", "changes", "log"}
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict

from aiohttp import web

from ..streamv2v_core.live.session import SESSIONS
from .webcam_routes import _session_name

log = logging.getLogger("streamv2v")
MAX_BODY = 64 * 1024
IDLE = {"running": False, "can": None, "current": {}, "pending": 0, "changes": 0, "log": []}


def _error(status: int, text: str) -> web.Response:
    return web.json_response({"error": text}, status=status)


async def post_params(request: web.Request) -> web.Response:
    name = _session_name(request)
    if request.content_length is not None and request.content_length > MAX_BODY:
        return _error(413, f"the body is over {MAX_BODY // 1024} KiB: send only the fields that change")
    data = await request.content.read(MAX_BODY + 1)  # bounded even without a Content-Length
    if len(data) > MAX_BODY:
        return _error(413, f"the body is over {MAX_BODY // 1024} KiB: send only the fields that change")
    session = SESSIONS.find(name)
    if session is None or not session.running:
        return _error(404, f"no loop is running on session {name!r}: queue the loop (or press Start) first")
    try:
        body = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        return _error(400, f"the body is not JSON: {error}")
    try:
        change = session.params.offer(body)
    except LookupError as error:
        return _error(404, str(error))
    except OverflowError as error:
        return _error(429, str(error))
    except ValueError as error:
        return _error(400, str(error))
    log.info("StreamV2V session %r: live change requested: %s", name, change.describe())
    return web.json_response({"accepted": {k: v for k, v in asdict(change).items() if v not in (None, False)},
                              "pending": session.params.status()["pending"]})


async def get_params(request: web.Request) -> web.Response:
    session = SESSIONS.find(_session_name(request))
    return web.json_response(session.params.status() if session else IDLE, headers={"Cache-Control": "no-store"})


def add_loop_params_routes(routes: web.RouteTableDef) -> None:
    routes.post("/streamv2v/loop/{session}/params")(post_params)
    routes.get("/streamv2v/loop/{session}/params")(get_params)

