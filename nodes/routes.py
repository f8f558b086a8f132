"""HTTP routes under /streamv2v/: the browser's link to running loop nodes and to the feature banks.

Webcam and loop routes: see nodes/webcam_routes.py.
GET  /streamv2v/banks                    {"banks": [FeatureBank.status(), ...]}: the status line under
                                         FeatureBank nodes is refreshed from it after every prompt,
                                         since a cached FeatureBank node does not run again

Routes are added only when a ComfyUI server exists (``server.PromptServer.instance``), so
importing the pack in-process (tests, scripts) registers nothing.
"""
from __future__ import annotations

import logging
import sys

from aiohttp import web

from ..streamv2v_core.bank import BANKS
from .webcam_routes import add_webcam_routes

log = logging.getLogger("streamv2v")
_registered = False


async def get_banks(request: web.Request) -> web.Response:
    statuses = [BANKS.get(name).status() for name in BANKS.names()]
    return web.json_response({"banks": statuses}, headers={"Cache-Control": "no-store"})


def register_routes() -> bool:
    """Add the routes to the running ComfyUI server, once; False when there is no server."""
    global _registered
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None or _registered:
        return _registered
    routes = instance.routes
    add_webcam_routes(routes)
    routes.get("/streamv2v/banks")(get_banks)
    _registered = True
    return True
