"""Moving frames between the host and the model's device without stalling the device or growing memory.

A blocking copy makes the host wait until the device has finished everything queued
before it; a copy from ordinary (pageable) host memory is one. The stream engine moves
each input frame (and a per-frame ControlNet hint) up and each finished frame down.
``Upload`` stages host tensors in pinned memory and copies them asynchronously; ``Handoff``
copies a finished frame down asynchronously and hands it to the host callback one frame
later, after the next frame's work is queued, so the device never runs dry while the host
waits. Both stage through a ``PinnedRing``: a few pinned buffers reused in turn, so pinned
memory stays bounded however long a stream runs (the host allocator keeps every pinned
block it ever handed out). On the CPU both are plain pass-throughs.
"""
from __future__ import annotations

from typing import Callable

import torch

RING_SLOTS = 4  # pinned buffers per shape and dtype: copies in flight at once (one frame late needs 2)


def _is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


class PinnedRing:
    """Pinned host buffers per ``(shape, dtype)``, ``slots`` of each, handed out in turn.

    ``take`` returns the next buffer once the copy that last used it is done (it waits on that
    copy's event, long finished in a stream: ``slots`` copies were queued since); ``done``
    records the event of the copy just queued on the buffer.
    """

    def __init__(self, slots: int = RING_SLOTS):
        self.slots = slots
        self._buffers: dict[tuple, list] = {}  # (shape, dtype) -> [[buffer, event | None], ...]
        self._next: dict[tuple, int] = {}
        self.allocated = 0  # pinned buffers made (bounded by slots per shape and dtype)

    def take(self, shape, dtype) -> torch.Tensor:
        key = (tuple(shape), dtype)
        ring = self._buffers.setdefault(key, [])
        i = self._next.get(key, 0)
        self._next[key] = (i + 1) % self.slots
        if i == len(ring):
            ring.append([torch.empty(key[0], dtype=dtype, pin_memory=True), None])
            self.allocated += 1
        buffer, event = ring[i]
        if event is not None:
            event.synchronize()  # the copy that used this buffer ``slots`` copies ago
        ring[i][1] = None
        return buffer

    def done(self, buffer: torch.Tensor) -> torch.cuda.Event:
        """Record (on the current stream) the end of the copy just queued on ``buffer``; returns the event."""
        event = torch.cuda.Event()
        event.record()
        for ring in self._buffers.values():
            for entry in ring:
                if entry[0] is buffer:
                    entry[1] = event
        return event


class Upload:
    """Host tensors -> ``device`` without a blocking copy (pinned ring + non_blocking)."""

    def __init__(self, device, ring: PinnedRing | None = None):
        self.device = torch.device(device)
        self.ring = ring or PinnedRing()
        self.count = 0  # host-to-device transfers made

    def __call__(self, frame: torch.Tensor) -> torch.Tensor:
        """frame: a host tensor; returns it on the device (the same tensor when it is already there)."""
        if frame.device == self.device or (frame.device.type == self.device.type == "cuda"):
            return frame
        self.count += 1
        if _is_cuda(self.device):
            staged = self.ring.take(frame.shape, frame.dtype)
            staged.copy_(frame)
            moved = staged.to(self.device, non_blocking=True)
            self.ring.done(staged)
            return moved
        return frame.to(self.device)


class Handoff:
    """Hands finished device images to ``deliver(payload, image_on_host, finite_on_host)``, one frame late on CUDA.

    ``put`` starts the copy of a new image (and of its ``finite`` flag, a device bool, if given) and delivers
    the previous one (waiting only for that earlier copy); ``flush`` delivers what is left (call it in
    ``finally``). Each image costs exactly one device-to-host transfer (its flag rides along, one byte); the
    image handed over is the caller's own (copied out of the ring's pinned buffer, which the next frames reuse).
    """

    def __init__(self, deliver: Callable[[object, torch.Tensor, torch.Tensor | None], None],
                 ring: PinnedRing | None = None):
        self.deliver = deliver
        self.ring = ring or PinnedRing()
        self.pending: tuple | None = None
        self.count = 0  # device-to-host transfers made (one per output frame)

    def put(self, payload, image: torch.Tensor, finite: torch.Tensor | None = None) -> None:
        self.count += 1
        if image.device.type == "cuda":
            flag = None
            if finite is not None:  # queued before the image: the image's event covers both copies
                flag = self.ring.take((1,), torch.bool)
                flag.copy_(finite.reshape(1), non_blocking=True)
            host = self.ring.take(image.shape, image.dtype)
            host.copy_(image, non_blocking=True)
            done = self.ring.done(host)
            if flag is not None:
                self.ring.done(flag)
            previous, self.pending = self.pending, (payload, host, flag, done)
            if previous is not None:
                self._deliver(previous)
            return
        self.flush()
        self.deliver(payload, _on_host(image), None if finite is None else _on_host(finite))

    def flush(self) -> None:
        if self.pending is not None:
            previous, self.pending = self.pending, None
            self._deliver(previous)

    def _deliver(self, item) -> None:
        payload, host, flag, done = item
        done.synchronize()  # waits for this copy only; later frames' work stays queued
        self.deliver(payload, host.clone(), None if flag is None else flag.clone())


def _on_host(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` on the host (itself when it is there: no copy, and no read the sync counters would count)."""
    return tensor if tensor.device.type == "cpu" else tensor.cpu()
