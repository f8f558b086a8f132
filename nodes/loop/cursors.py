"""Positions in a source that outlive a prompt (StreamV2VNextFrame): a bounded registry of open cursors."""
from __future__ import annotations

import logging

import torch

from ...streamv2v_core.media.frames import select_frames, selected_count
from ...streamv2v_core.media.video_io import shortfall
from ...streamv2v_core.registry import Registry
from .sources import FramePick, SourceChoice

log = logging.getLogger("streamv2v")

MAX_CURSORS = 16  # each holds an open file; the least recently used is closed first


class FrameCursor:
    """An open source and the index of the next frame it gives; ``key`` names what it was opened with."""

    def __init__(self, key: tuple, origin: SourceChoice, pick: FramePick):
        self.key, self.pick = key, pick
        self.reader = origin.open()
        self.sizer = pick.sizer()
        self.total = selected_count(self.reader.total, pick.skip_first, pick.every_nth)
        self.frames = select_frames(self.reader, pick.skip_first, pick.every_nth)
        self.index = 0

    def next(self) -> torch.Tensor | None:
        """The next frame ``[H, W, 3]`` (at the cursor's one size), or None at the end."""
        frame = next(self.frames, None)
        if frame is None:
            short = shortfall(self.reader, self.index, self.pick.skip_first, self.pick.every_nth)
            if short:
                log.warning("StreamV2V cursor: %s", short)
            return None
        self.index += 1
        return self.sizer(frame)

    def close(self) -> None:
        self.reader.close()


class CursorRegistry:
    """Named frame cursors that outlive a prompt, at most ``limit`` (a ``registry.Registry``: the least
    recently used is closed first); ``reset()`` closes and forgets them."""

    def __init__(self, limit: int = MAX_CURSORS, register: bool = False):
        self._cursors: Registry[FrameCursor] = Registry("frame cursor", limit, "lru", close=FrameCursor.close,
                                                        register=register)
        self.lock = self._cursors.lock
        self.limit = limit

    def get(self, name: str) -> FrameCursor | None:
        return self._cursors.get(name)

    def put(self, name: str, cursor: FrameCursor) -> None:
        self._cursors.put(name, cursor)

    def reset(self, name: str | None = None) -> None:
        if name is None:
            self._cursors.clear_all()
        else:
            self._cursors.remove(name)

    def __len__(self) -> int:
        return len(self._cursors)


CURSORS = CursorRegistry(register=True)
