"""Work on finished frames off the stream's thread (pure Python): encode the MP4, publish JPEGs to viewers.

The loop's thread hands each finished frame to ``WriterThread.put`` and goes on with the next
model call while a thread of the writer's own encodes it. The queue between them is bounded
(``limit`` frames): when the encoder falls behind, ``put`` waits, so memory stays bounded and
no frame is ever dropped from the recording; nothing a viewer does reaches this thread (viewers
read the newest published frame, see ``live/viewers.py``). ``close()`` waits until every frame
handed over is done (also on cancel or error: call it in a ``finally``), so a cancelled take keeps
every frame it produced. An error on the writer's thread is raised on the loop's thread by the
next ``put`` or by ``close``.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable

QUEUE_LIMIT = 4  # frames waiting for the encoder (a few: enough to absorb one slow encode, bounded memory)
_END = object()


class WriterThread:
    """Calls ``work(item)`` for every item ``put``, in order, on one thread of its own."""

    def __init__(self, work: Callable[[Any], None], limit: int = QUEUE_LIMIT, name: str = "streamv2v-writer"):
        self._work = work
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, int(limit)))
        self._error: BaseException | None = None
        self._closed = False
        self.done = 0  # items finished
        self.waited_s = 0.0  # time ``put`` waited for room (the writer fell behind the loop)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, item: Any) -> None:
        """Queue ``item`` (waits while ``limit`` items are queued); raises the writer's error if it failed."""
        self._raise()
        if self._closed:
            raise RuntimeError("the writer thread is closed")
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            start = time.perf_counter()
            self._queue.put(item)
            self.waited_s += time.perf_counter() - start

    def close(self) -> None:
        """Finish every queued item, stop the thread, then raise the writer's error if it failed (safe twice)."""
        if not self._closed:
            self._closed = True
            self._queue.put(_END)
            self._thread.join()
        self._raise()

    def _raise(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if self._error is not None:
                continue  # after a failure, items are taken (``put`` never blocks for ever) but not worked on
            try:
                self._work(item)
                self.done += 1
            except BaseException as error:  # handed to the loop's thread
                self._error = error
