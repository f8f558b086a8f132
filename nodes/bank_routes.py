"""GET /streamv2v/banks: the status of every feature bank, for the status line under FeatureBank nodes.

Answers ``{"banks": [{"name", "mode", "size", "interval", "frames_seen", "entries", "bytes", "last_reset"}]}``.
The FeatureBank node reports its status when it executes; the browser asks this route after every prompt,
because a cached FeatureBank node does not execute again while its bank keeps changing.
Added only when a ComfyUI server exists (``server.PromptServer.instance``).
"""
from __future__ import annotations

import sys

from aiohttp import web

from ..streamv2v_core.bank import BANKS

_registered = False


def bank_statuses() -> list[dict]:
    return [BANKS.get(name).status() for name in BANKS.names()]


async def get_banks(request: web.Request) -> web.Response:
    return web.json_response({"banks": bank_statuses()}, headers={"Cache-Control": "no-store"})


def register_bank_routes() -> bool:
    """Add the route to the running ComfyUI server, once; False when there is no server."""
    global _registered
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None or _registered:
        return _registered
    instance.routes.get("/streamv2v/banks")(get_banks)
    _registered = True
    return True
