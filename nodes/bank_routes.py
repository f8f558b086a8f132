"""HTTP routes for the feature banks, and releasing their memory with ComfyUI's "Free memory".

GET    /streamv2v/banks               {"banks": [FeatureBank.status(), ...]}: the status line under
                                      FeatureBank nodes is refreshed from it after every prompt (a
                                      cached FeatureBank node does not run again)
POST   /streamv2v/banks/{name}/clear  forget the bank's features and frame count (the node's Clear
                                      button); {"status": {...}}; a bank a running loop reads is the
                                      bank of that name, so this clears what the loop sees
DELETE /streamv2v/banks/{name}        drop the bank and release its memory; {"removed", "bytes"};
                                      409 while a running loop reads it (clear it instead)

Both change state: they take only requests of the server's own pages or of HTTP clients, POST
with ``Content-Type: application/json`` (``request_guard.guarded``).

``POST /free`` with ``free_memory`` (the "Free memory" button / API) also clears every bank and
drops every stream state, every bank no loop runs on and the compiled UNet graphs with their
CUDA-graph memory pools: an aiohttp middleware observes that request after ComfyUI handled it
(ComfyUI's own handler is unchanged). A running loop keeps its bank (cleared in place: its past
is forgotten) under its name.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import json
import logging

from aiohttp import web

from ..streamv2v_core.bank.registry import BANKS, MAX_NAME, check_bank_name
from ..streamv2v_core.registry import clear_all_registries
from .engine import bank_status
from .engine.compiled_unet import release_compiled
from .request_guard import guarded

log = logging.getLogger("streamv2v")
RESET_WAIT_S = 5.0  # how long /free waits for the compiled graphs' reset (a compile still running is not waited for)


def _name(request: web.Request) -> str | None:
    """The bank name of the route, or None if no bank can have it (FeatureBank refuses the same names)."""
    try:
        return check_bank_name(request.match_info["name"])
    except ValueError:
        return None


async def get_banks(request: web.Request) -> web.Response:
    statuses = [bank_status(bank) for bank in map(BANKS.find, BANKS.names()) if bank is not None]
    return web.json_response({"banks": statuses}, headers={"Cache-Control": "no-store"})


async def clear_bank(request: web.Request) -> web.Response:
    name = _name(request)
    bank = BANKS.find(name) if name else None
    if bank is None:
        return web.json_response({"error": f"no bank named {request.match_info['name'][:MAX_NAME]!r}"}, status=404)
    bank.reset("cleared with the Clear bank button")
    return web.json_response({"status": bank_status(bank)})


async def delete_bank(request: web.Request) -> web.Response:
    name = _name(request)
    bank = BANKS.find(name) if name else None
    if bank is not None and bank.users:
        return web.json_response({"error": f"bank {name!r} is read by a running loop: stop the loop before deleting "
                                           f"it, or clear it (POST /streamv2v/banks/{{name}}/clear)"}, status=409)
    held = bank.nbytes() if bank is not None else 0
    if bank is not None:
        BANKS.remove(name)
        bank.reset("deleted (memory released)")
    return web.json_response({"removed": bank is not None, "bytes": held})


def free_all(reason: str) -> tuple[int, "concurrent.futures.Future | None"]:
    """Clear every bank; drop every stream state, compiled UNet graph (with its CUDA-graph memory pools), and
    every bank, session and cursor no loop runs on. Returns the bytes the banks held and the future of the
    compiled graphs' reset (None when nothing was compiled)."""
    held = BANKS.free(reason)
    clear_all_registries()  # stream states, browser sessions, frame cursors (whatever is registered)
    reset = release_compiled(reason)
    log.info("StreamV2V: %s released %.1f MiB of feature banks", reason, held / 2**20)
    return held, reset


@web.middleware
async def release_on_free(request: web.Request, handler):
    """Before ComfyUI's own ``POST /free`` with ``free_memory`` is handled, drop the banks, stream states and
    compiled graphs too.

    Before, not after: what the pack drops may hold the last reference to a model ComfyUI tracks, whose
    finalizer edits ComfyUI's list of loaded models (``cleanup_models``); ComfyUI's worker walks that list as
    soon as the handler has set its flag (``unload_all_models``), so doing both at once crashed the worker
    thread (seen in two of seven full test runs). Here everything the pack drops is gone (collected, cycles
    included), and the reset of the compiled graphs done (waited for at most ``RESET_WAIT_S``: a compile still
    running is not waited for), before ComfyUI is told to free.
    """
    if request.method == "POST" and request.path.rstrip("/") in ("/free", "/api/free"):
        try:
            body = json.loads(await request.read() or b"{}")
        except (ValueError, RecursionError):
            body = {}
        if isinstance(body, dict) and body.get("free_memory"):
            _, reset = free_all("ComfyUI's Free memory")
            if reset is not None:
                with contextlib.suppress(asyncio.TimeoutError, Exception):
                    await asyncio.wait_for(asyncio.wrap_future(reset), RESET_WAIT_S)
            # What was dropped may sit in reference cycles (model clones, ControlNet copies): collected here, their
            # finalizers run now, not later inside ComfyUI's unload_all_models (a collection there crashed it).
            gc.collect()
    return await handler(request)


def add_bank_routes(routes, app) -> None:
    """Add the bank routes, and the /free observer to ``app`` (before the server starts)."""
    routes.get("/streamv2v/banks")(get_banks)
    routes.post("/streamv2v/banks/{name}/clear")(guarded("json")(clear_bank))
    routes.delete("/streamv2v/banks/{name}")(guarded("none")(delete_bank))
    if app is not None and not app.frozen:
        app.middlewares.append(release_on_free)
    else:
        log.warning("StreamV2V: the server was already started; ComfyUI's Free memory will not release banks "
                    "(use DELETE /streamv2v/banks/{name})")
