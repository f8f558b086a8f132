"""One warning per cause per process: a patch runs in every layer of every call, a wrapper in every call."""
from __future__ import annotations

import logging
import threading

log = logging.getLogger("streamv2v")
_said: set[str] = set()
_lock = threading.Lock()


def warn_once(message: str) -> None:
    """Log ``message`` as a warning the first time it is given (thread-safe)."""
    with _lock:
        if message in _said:
            return
        _said.add(message)
    log.warning(message)


def forget_warnings() -> None:
    """Let every message be logged once more (tests; a changed setting)."""
    with _lock:
        _said.clear()
