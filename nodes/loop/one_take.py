"""One live take a session: a second live loop queued for a session that already has one is refused at POST /prompt.

Why refuse rather than wait: ComfyUI runs one prompt at a time, so a second copy (Ctrl+Enter on the canvas while
the take runs, a second Start) would wait in the queue and start a stray take, with the camera of whoever is
still sending, the moment the first one stops. Refused at validation, it never enters the queue, and the message
names the session. Checked: the session's running loop, every live loop waiting in ComfyUI's queue with the same
session, and the prompt running now if its loop has not started its take yet (one whose take already ended is
only finishing its MP4: a new take may be queued behind it).
"""
from __future__ import annotations

from ...streamv2v_core.live.session import SESSIONS, check_session_name
from ..node_status import running_server
from .sources import LIVE_SOURCES

LOOP = "StreamV2VLoop"


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
    for node in prompt.values():
        if not isinstance(node, dict) or node.get("class_type") != LOOP or not isinstance(node.get("inputs"), dict):
            continue
        if node["inputs"].get("source") in LIVE_SOURCES and node["inputs"].get("session") == name:
            return True
    return False
