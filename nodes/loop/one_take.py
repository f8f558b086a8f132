"""One live take a session: a second live loop queued for a session that already has one is refused at POST /prompt.

Refused by an aiohttp middleware in front of ComfyUI's own ``POST /prompt`` (its handler and validation
untouched), answered as ComfyUI answers a failed validation, on the loop's ``session`` input alone: a node's
``validate_inputs`` would put its message on every input it takes (a bad ``file`` would then light up
``source`` and ``session`` too).

Why refuse rather than wait: ComfyUI runs one prompt at a time, so a second copy (Ctrl+Enter on the canvas while
the take runs, a second Start) would wait in the queue and start a stray take, with the camera of whoever is
still sending, the moment the first one stops. Refused at validation, it never enters the queue, and the message
names the session. Checked: the session's running loop, every live loop waiting in ComfyUI's queue with the same
session, and the prompt running now if its loop has not started its take yet (one whose take already ended is
only finishing its MP4: a new take may be queued behind it).
"""
from __future__ import annotations

import json
import logging

from aiohttp import web

from ...streamv2v_core.live.session import SESSIONS, check_session_name
from ..node_status import running_server
from .sources import LIVE_SOURCES

LOOP = "StreamV2VLoop"
PROMPT_PATHS = ("/prompt", "/api/prompt")
log = logging.getLogger("streamv2v")


@web.middleware
async def refuse_second_take(request: web.Request, handler):
    """Before ComfyUI's ``POST /prompt``: a prompt whose live loop would take a busy session gets a 400 naming it."""
    if request.method == "POST" and request.path.rstrip("/") in PROMPT_PATHS:
        refusal = await _refusal(request)
        if refusal is not None:
            return web.json_response(refusal, status=400)
    return await handler(request)


async def _refusal(request: web.Request) -> dict | None:
    """ComfyUI's failed-validation answer for the live loops of the request's prompt whose session is busy, or None
    (also for a body this check cannot read: ComfyUI's handler then answers it as it would; aiohttp keeps the
    body read here for it)."""
    try:
        prompt = json.loads(await request.read()).get("prompt")
    except (ValueError, RecursionError, AttributeError):
        return None
    if not isinstance(prompt, dict):
        return None
    errors = {}
    for node_id, node in prompt.items():
        session = _live_session(node)
        reason = session_free(session) if session is not None else None
        if reason:
            errors[str(node_id)] = {"errors": [{"type": "custom_validation_failed",
                                                "message": "Custom validation failed for node",
                                                "details": f"session - {reason}",
                                                "extra_info": {"input_name": "session", "received_value": session}}],
                                    "dependent_outputs": [str(node_id)], "class_type": LOOP}
    if not errors:
        return None
    log.warning("StreamV2V: refused a prompt: %s", next(iter(errors.values()))["errors"][0]["details"][10:300])
    return {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                      "details": "", "extra_info": {}}, "node_errors": errors}


def _live_session(node) -> str | None:
    """The session of a live StreamV2VLoop node of an API prompt (widget values only), else None."""
    if not isinstance(node, dict) or node.get("class_type") != LOOP or not isinstance(node.get("inputs"), dict):
        return None
    inputs = node["inputs"]
    session = inputs.get("session", "webcam")
    return session if inputs.get("source") in LIVE_SOURCES and isinstance(session, str) else None


def session_free(session: str) -> str | None:
    """None when a new live loop may take ``session``; else why not (a bad name, a take running or queued)."""
    try:
        name = check_session_name(session)
    except ValueError as error:
        return str(error)
    session = SESSIONS.find(name)
    if (session is not None and session.running) or _queued(name, session):
        return (f"a loop is already queued or running on session {name!r}: press ■ Stop on its panel (or wait "
                f"for it to end) before starting another, or give this loop another session name")
    return None


def _queued(name: str, session) -> bool:
    """Whether ComfyUI's queue holds a live loop on session ``name`` that has not run its take yet: waiting, or
    running but not started (its prompt is not the one that started the session's last take)."""
    queue = getattr(running_server(), "prompt_queue", None)
    if queue is None:
        return False
    running, pending = queue.get_current_queue_volatile()
    started = session.prompt_id if session is not None else None
    return any(_takes(item[2], name) for item in pending if len(item) > 2 and isinstance(item[2], dict)) or \
        any(_takes(item[2], name) and item[1] != started for item in running
            if len(item) > 2 and isinstance(item[2], dict))


def _takes(prompt: dict, name: str) -> bool:
    """Whether API ``prompt`` holds a live StreamV2VLoop on session ``name`` (widget values only: a linked
    session or source is not known before the prompt runs)."""
    return any(_live_session(node) == name for node in prompt.values())
