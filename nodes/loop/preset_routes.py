"""The presets a session's live changes recall (``preset: n`` in a change, OSC ``/streamv2v/{session}/preset n``).

POST /streamv2v/loop/{session}/presets  {"presets": [up to 8 snapshots, null for an empty slot]}: the panel
                                        sends the workflow's (kept in the node's properties); each checked
                                        as a change is (streamv2v_core/live/params.py), kept across runs
     200 {"presets": [...]};  400 naming the preset and field at fault (nothing changes);  404 no such
     session (no route creates one: queue the loop first);  413 over 64 KiB;  403 / 415 from another
     site or not JSON (``request_guard``)
GET  /streamv2v/loop/{session}/presets  {"presets": [...]}
"""
from __future__ import annotations

import logging

from aiohttp import web

from ...streamv2v_core.live.params import read_json
from ...streamv2v_core.live.session import SESSIONS
from ..request_guard import guarded
from .routes import _error, read_body, session_name

log = logging.getLogger("streamv2v")


async def post_presets(request: web.Request) -> web.Response:
    name, data = session_name(request), await read_body(request)
    session = SESSIONS.find(name)
    if isinstance(data, web.Response) or session is None:
        return data if isinstance(data, web.Response) else _error(404, f"no session {name!r}: queue the loop first")
    try:
        body = read_json(data)
        if not isinstance(body, dict) or set(body) != {"presets"}:
            raise ValueError('send {"presets": [up to 8 snapshots, null for an empty slot]}')
        presets = session.params.set_presets(body["presets"])
    except ValueError as error:
        return _error(400, str(error))
    log.info("StreamV2V session %r: %d presets stored", name, sum(1 for p in presets if p))
    return web.json_response({"presets": presets})


async def get_presets(request: web.Request) -> web.Response:
    session = SESSIONS.find(session_name(request))
    return web.json_response({"presets": session.params.presets if session else []},
                             headers={"Cache-Control": "no-store"})


def add_preset_routes(routes: web.RouteTableDef) -> None:
    routes.post("/streamv2v/loop/{session}/presets")(guarded("json")(post_presets))
    routes.get("/streamv2v/loop/{session}/presets")(get_presets)
