"""Moving frames between the host and the model's device without stalling the device.

A blocking copy makes the host wait until the device has finished everything queued
before it. The stream engine needs exactly two transfers per frame: the input frame up
and the finished frame down. ``Upload`` stages host frames in pinned memory and copies
them asynchronously; ``Handoff`` copies a finished frame down asynchronously and hands
it to the host callback one frame later, after the next frame's work is queued, so the
device never runs dry while the host waits. On the CPU both are plain pass-throughs.
"""
from __future__ import annotations

from typing import Callable

import torch


def _is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


class Upload:
    """Host frames -> ``device`` without a blocking copy (pinned staging + non_blocking)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.count = 0  # host-to-device transfers made (one per frame)

    def __call__(self, frame: torch.Tensor) -> torch.Tensor:
        """frame: a host tensor; returns it on the device (the same tensor on the CPU)."""
        if frame.device == self.device:
            return frame
        self.count += 1
        if _is_cuda(self.device):
            staged = torch.empty(frame.shape, dtype=frame.dtype, pin_memory=True)
            staged.copy_(frame)
            return staged.to(self.device, non_blocking=True)
        return frame.to(self.device)


class Handoff:
    """Hands finished device images to ``deliver(payload, image_on_host)``, one frame late on CUDA.

    ``put`` starts the copy of a new image and delivers the previous one (waiting only for
    that earlier copy); ``flush`` delivers what is left (call it in ``finally``). Each
    image costs exactly one device-to-host transfer.
    """

    def __init__(self, deliver: Callable[[object, torch.Tensor], None]):
        self.deliver = deliver
        self.pending: tuple | None = None
        self.count = 0  # device-to-host transfers made (one per output frame)

    def put(self, payload, image: torch.Tensor) -> None:
        self.count += 1
        if image.device.type == "cuda":
            host = torch.empty(image.shape, dtype=image.dtype, pin_memory=True)
            host.copy_(image, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            previous, self.pending = self.pending, (payload, host, done)
            if previous is not None:
                self._deliver(previous)
            return
        self.flush()
        self.deliver(payload, image.cpu() if image.device.type != "cpu" else image)

    def flush(self) -> None:
        if self.pending is not None:
            previous, self.pending = self.pending, None
            self._deliver(previous)

    def _deliver(self, item) -> None:
        payload, host, done = item
        done.synchronize()  # waits for this copy only; later frames' work stays queued
        self.deliver(payload, host)
