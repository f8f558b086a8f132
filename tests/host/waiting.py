"""Waiting in tests, always with a deadline: a test that waits for something that never comes fails with a
message saying what it waited for (and what it saw), instead of hanging the suite.

    value = wait_until(lambda: status()["running"], 60, "the loop to start", show=status)
    join(thread, 30, "the frame sender")
"""
from __future__ import annotations

import threading
import time
from typing import Callable


def wait_until(condition: Callable, timeout: float = 60.0, what: str = "condition", show: Callable | None = None,
               poll: float = 0.1):
    """``condition()``'s first truthy value, asked every ``poll`` seconds; TimeoutError naming ``what`` (and
    ``show()``, e.g. a status or the server's log tail) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:g} s for {what}" + (f"; last seen: {show()}" if show else ""))
        time.sleep(poll)


def join(thread: threading.Thread, timeout: float, what: str) -> None:
    """Join ``thread``; AssertionError naming ``what`` if it is still running after ``timeout`` seconds."""
    thread.join(timeout)
    assert not thread.is_alive(), f"{what} still running after {timeout:g} s"
