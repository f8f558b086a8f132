"""One thread that runs every compiled UNet call, so that ComfyUI's Cancel never waits for a compile.

``torch.compile`` compiles inside the first call of a compiled function, on the calling thread, for as
long as dynamo and inductor need (about a minute for an SD1.5 UNet on a GPU machine, minutes on a CPU),
and nothing in it looks at ComfyUI's interrupt flag: Cancel used to take effect only after the compile
(about 170 s measured). Here the call runs on this thread while the calling thread (ComfyUI's prompt
worker) waits and polls the flag: Cancel raises there within ``POLL_S``. The abandoned call finishes on
this thread in the background; its output and its staged bank writes are dropped (the bank is written by
the caller, after the call), and the graph it compiled stays cached for the next call.

One thread for every compiled call also keeps inductor's CUDA-graph trees, which are per thread, in one
place, where ``release`` can reset them.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import queue
import threading
from typing import Callable

import torch

import comfy.model_management

POLL_S = 0.05  # how often the waiting caller looks at ComfyUI's interrupt flag


def _in_caller_state(fn: Callable) -> Callable:
    """``fn`` to run on another thread with the caller's grad / inference mode, CUDA stream and context vars."""
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()
    stream = torch.cuda.current_stream() if torch.cuda.is_initialized() else None  # the caller's, on its device
    context = contextvars.copy_context()

    def job():
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode(inference))
            stack.enter_context(torch.set_grad_enabled(grad))
            if stream is not None:
                stack.enter_context(torch.cuda.stream(stream))
            return context.run(fn)
    return job


class CompileThread:
    """A daemon thread running submitted jobs one at a time (started on first use)."""

    def __init__(self, name: str = "streamv2v-compile"):
        self.name = name
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._abandoned = 0  # jobs whose caller stopped waiting (Cancel) that are still queued or running

    @property
    def started(self) -> bool:
        return self._thread is not None

    def busy(self) -> bool:
        """Whether a call abandoned by Cancel is still running (callers then run eagerly instead of queueing)."""
        with self._lock:
            return self._abandoned > 0

    def submit(self, fn: Callable) -> concurrent.futures.Future:
        """Queue ``fn`` (run in the caller's torch state); its future holds the result or the exception."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
                self._thread.start()
        self._jobs.put((future, _in_caller_state(fn)))
        return future

    def run(self, fn: Callable):
        """``fn()`` on this thread; the caller waits, and ComfyUI's interrupt raises here within ``POLL_S``."""
        future = self.submit(fn)
        while True:
            try:
                return future.result(timeout=POLL_S)
            except concurrent.futures.TimeoutError:
                if comfy.model_management.processing_interrupted():
                    self._abandon(future)
                    comfy.model_management.throw_exception_if_processing_interrupted()

    def _abandon(self, future: concurrent.futures.Future) -> None:
        with self._lock:
            self._abandoned += 1

        def done(_):
            with self._lock:
                self._abandoned -= 1
        future.add_done_callback(done)

    def _serve(self) -> None:
        while True:
            future, job = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = job()
            except BaseException as error:  # noqa: BLE001 - handed to the waiting caller, who raises it
                future.set_exception(error)
            else:
                future.set_result(result)
            del future, job  # drop the call's tensors before waiting for the next job
