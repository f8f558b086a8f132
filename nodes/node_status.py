"""A running node's progress bar (with the newest frame as preview) and its status text."""
from __future__ import annotations

import sys

import numpy as np
import torch

import comfy.utils

from .previews import PREVIEW_INTERVAL_S, Throttle, preview_of


class NodeStatus:
    """Progress, preview and a text line under the node; updates are rate-limited.

    ``preview`` False: no preview image (the browser webcam panel on the node already shows every frame, and
    encoding and drawing a second copy costs the live link frames).
    """

    def __init__(self, node_id, total: int | None, preview: bool = True):
        self.node_id, self.total, self.preview = node_id, total, preview
        self.progress = comfy.utils.ProgressBar(total or 1, node_id=node_id)
        self.updates = Throttle(PREVIEW_INTERVAL_S)
        self.text = ""

    def frame(self, count: int, image: torch.Tensor | np.ndarray, text: str) -> None:
        """``count`` frames done, the newest ``image [H, W, 3]`` (float in 0..1, or uint8 pixels)."""
        if not self.updates.due(final=count == self.total):
            return
        self.progress.update_absolute(count, self.total or count, preview_of(image) if self.preview else None)
        self.say(text)

    def say(self, text: str) -> None:
        """Show ``text`` on the node when a ComfyUI server runs (no-op in-process)."""
        self.text = text
        instance = running_server()
        if instance is not None and self.node_id is not None and hasattr(instance, "send_progress_text"):
            instance.send_progress_text(text, self.node_id)


def running_server():
    """ComfyUI's ``PromptServer`` instance while a server runs; None in-process (tests, scripts)."""
    return getattr(getattr(sys.modules.get("server"), "PromptServer", None), "instance", None)


def node_id_of(cls) -> str | None:
    """The id of the node ``cls`` is executing as (None when called outside ComfyUI's executor)."""
    return getattr(getattr(cls, "hidden", None), "unique_id", None)
