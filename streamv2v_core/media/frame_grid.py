"""Live frames on a constant frame-rate grid (pure Python): what a live recording writes, and when.

Live capture is irregular (a webcam restyled at 3 to 30 frames a second, with gaps when the
camera or the network stalls), but video editors expect a constant frame rate. ``FrameGrid``
places each restyled frame at its capture time on a grid of ``fps`` slots a second: a frame
fills its slot and every empty slot after it until the next frame's slot (the last frame is
held through a gap), two frames for the same slot keep the newer one, and a gap longer than
``max_hold_s`` is cut to that length (the recording goes on after it instead of showing a
frozen picture for minutes). So the recording lasts as long as the take (first capture to last
capture, plus one slot), less the part of long gaps that was cut.

    grid = FrameGrid(fps=30)
    for image, captured_at in outputs:
        for picture in grid.add(image, captured_at):
            writer.write(picture)
    for picture in grid.close():
        writer.write(picture)
"""
from __future__ import annotations

from fractions import Fraction
from typing import Any

MAX_HOLD_S = 10.0  # a longer gap is shortened to this (a take paused for minutes is not minutes of one picture)


class FrameGrid:
    """Frames (any object: an image) with capture times in seconds, out as a constant-rate sequence."""

    def __init__(self, fps: Fraction | float, max_hold_s: float = MAX_HOLD_S):
        if not fps or float(fps) <= 0:
            raise ValueError(f"a frame grid needs a positive frame rate, got {fps!r}")
        self.fps = float(fps)
        self.max_hold = max(1, round(max_hold_s * self.fps))
        self._origin: float | None = None  # capture time of slot 0 (moved on when a long gap is cut)
        self._pending: tuple[Any, int] | None = None  # newest frame and its slot, written when the next slot comes
        self.slots = 0      # slots written so far
        self.replaced = 0   # frames a newer frame for the same slot replaced (captured faster than the grid)
        self.cut_s = 0.0    # seconds of long gaps left out

    def add(self, image: Any, captured_at: float) -> list:
        """The frame captured at ``captured_at`` (seconds, any clock that only goes forward); returns the frames to
        write now, in order (the previous frame, once per slot it fills)."""
        if self._origin is None:
            self._origin = captured_at
        slot = round((captured_at - self._origin) * self.fps)
        if self._pending is None:
            self._pending = (image, max(slot, 0))
            return []
        held, held_slot = self._pending
        if slot <= held_slot:  # the same slot (or a stamp out of order): the newer frame wins
            self._pending = (image, held_slot)
            self.replaced += 1
            return []
        gap = slot - held_slot
        if gap > self.max_hold:
            self.cut_s += (gap - self.max_hold) / self.fps
            self._origin += (gap - self.max_hold) / self.fps
            gap = self.max_hold
        self._pending = (image, held_slot + gap)
        self.slots += gap
        return [held] * gap

    def close(self) -> list:
        """The last frame, once (its own slot): call when the take ends."""
        if self._pending is None:
            return []
        held, self._pending = self._pending[0], None
        self.slots += 1
        return [held]

    def duration(self) -> float:
        """Seconds written so far."""
        return self.slots / self.fps
