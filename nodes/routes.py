"""HTTP routes under /streamv2v/: the browser's link to running loop nodes and to the feature banks.

POST /streamv2v/webcam/{session}/frame   body: one encoded image (JPEG/PNG/WebP) -> {"frames_in", "running"}
GET  /streamv2v/webcam/{session}/output  newest restyled frame as image/jpeg (204 while there is none);
                                         header X-StreamV2V-Frames: frames restyled so far
POST /streamv2v/loop/{session}/stop      ask the loop of that session to finish (it keeps its MP4)
GET  /streamv2v/loop/{session}/status    {"running", "stopped", "frames_in", "frames_out"}
(The bank routes are in bank_routes.py.)

Routes are added only when a ComfyUI server exists (``server.PromptServer.instance``), so
importing the pack in-process (tests, scripts) registers nothing.
"""
from __future__ import annotations

import logging
import sys

from aiohttp import web

from ..streamv2v_core.video_io import SESSIONS

log = logging.getLogger("streamv2v")
MAX_FRAME_BYTES = 16 * 1024 * 1024
_registered = False


async def post_frame(request: web.Request) -> web.Response:
    session = SESSIONS.get(request.match_info["session"])
    data = await request.read()
    if not data or len(data) > MAX_FRAME_BYTES:
        return web.json_response({"error": "send one encoded image (JPEG/PNG/WebP) up to 16 MiB"}, status=400)
    session.push(data)
    return web.json_response({"frames_in": session.frames_in, "running": session.running})


async def get_output(request: web.Request) -> web.Response:
    session = SESSIONS.get(request.match_info["session"])
    data = session.output_jpeg
    headers = {"X-StreamV2V-Frames": str(session.frames_out), "Cache-Control": "no-store"}
    if data is None:
        return web.Response(status=204, headers=headers)
    return web.Response(body=data, content_type="image/jpeg", headers=headers)


async def post_stop(request: web.Request) -> web.Response:
    session = SESSIONS.get(request.match_info["session"])
    session.stop()
    log.info("StreamV2V: stop requested from the browser (session %r)", session.name)
    return web.json_response({"stopped": True, "running": session.running})


async def get_status(request: web.Request) -> web.Response:
    session = SESSIONS.get(request.match_info["session"])
    return web.json_response({"running": session.running, "stopped": session.stopped,
                              "frames_in": session.frames_in, "frames_out": session.frames_out})


def register_routes() -> bool:
    """Add the routes to the running ComfyUI server, once; False when there is no server."""
    global _registered
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None or _registered:
        return _registered
    routes = instance.routes
    routes.post("/streamv2v/webcam/{session}/frame")(post_frame)
    routes.get("/streamv2v/webcam/{session}/output")(get_output)
    routes.post("/streamv2v/loop/{session}/stop")(post_stop)
    routes.get("/streamv2v/loop/{session}/status")(get_status)
    _registered = True
    return True
