"""Live steering of a running loop (pure Python): what may change, checked, queued for the next frame.

The web route (``POST /streamv2v/loop/{session}/params``, nodes/loop_params_routes.py) turns a JSON
body into a ``Change`` with ``parse_change`` (ValueError naming the field and the rule: the route's
400) and hands it to the session's ``LiveParams``; the loop's conditioning provider takes the pending
changes when the next frame enters the stream and logs what it applied. Everything is bounded: a few
pending changes, the last ``MAX_LOG`` applied ones.

What a change may hold (all optional, at least one):

    prompt            str, 1..4000 characters: encoded once with the loop's CLIP, blended in
    blend_frames      int 0..1000: over how many frames the prompt is blended in (0 or 1: at once)
    control_strength  float 0..10: multiplies every ControlNet's own strength
    ff_alpha          float 0..1: feature fusion's alpha (the paper's 0.75)
    clear_bank        true: forget the feature bank's past (a new scene)
"""
from __future__ import annotations

import collections
import math
import threading
from dataclasses import asdict, dataclass

MAX_PROMPT_CHARS = 4000
MAX_BLEND_FRAMES = 1000
MAX_CONTROL_STRENGTH = 10.0  # as core Apply ControlNet
MAX_PENDING = 16             # changes sent faster than frames arrive: the route refuses more
MAX_LOG = 100
FIELDS = ("prompt", "blend_frames", "control_strength", "ff_alpha", "clear_bank")


@dataclass(frozen=True)
class Capabilities:
    """What the running loop can change: set by the loop when it starts."""

    clip: bool = False      # a CLIP is connected (prompts can be encoded)
    control: bool = False   # the conditioning holds a ControlNet
    fusion: bool = False    # the model has a FeatureFusionPatch
    bank: bool = False      # the model uses a feature bank


@dataclass(frozen=True)
class Change:
    """One request's changes (None: unchanged)."""

    prompt: str | None = None
    blend_frames: int | None = None
    control_strength: float | None = None
    ff_alpha: float | None = None
    clear_bank: bool = False

    def describe(self) -> str:
        """'prompt "oil painting" (blend 8 frames), control strength 0.5' for logs and the report."""
        parts = []
        if self.prompt is not None:
            shown = self.prompt if len(self.prompt) <= 60 else self.prompt[:57] + "..."
            parts.append(f"prompt {shown!r}" + (f" (blend {self.blend_frames} frames)" if self.blend_frames else ""))
        elif self.blend_frames is not None:
            parts.append(f"blend frames {self.blend_frames}")
        if self.control_strength is not None:
            parts.append(f"control strength {self.control_strength:g}")
        if self.ff_alpha is not None:
            parts.append(f"FF alpha {self.ff_alpha:g}")
        if self.clear_bank:
            parts.append("bank cleared")
        return ", ".join(parts)


def _number(body: dict, name: str, low: float, high: float, integer: bool = False):
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (integer and value != int(value)) or not low <= value <= high:
        kind = "a whole number" if integer else "a number"
        raise ValueError(f"{name} must be {kind} from {low:g} to {high:g}, got {value!r}")
    return int(value) if integer else float(value)


def parse_change(body, can: Capabilities) -> Change:
    """A ``Change`` from a decoded JSON body; ValueError saying which field is wrong and why."""
    if not isinstance(body, dict):
        raise ValueError(f"send a JSON object with any of {', '.join(FIELDS)}")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(map(repr, unknown))}: allowed are {', '.join(FIELDS)}")
    prompt = body.get("prompt")
    if prompt is not None:
        if not isinstance(prompt, str) or not prompt.strip() or len(prompt) > MAX_PROMPT_CHARS:
            raise ValueError(f"prompt must be text of 1 to {MAX_PROMPT_CHARS} characters")
        if not can.clip:
            raise ValueError("the loop has no CLIP connected: connect the checkpoint's CLIP to the loop node's "
                             "'clip' input to change the prompt live")
    change = Change(prompt=prompt.strip() if prompt is not None else None,
                    blend_frames=_number(body, "blend_frames", 0, MAX_BLEND_FRAMES, integer=True),
                    control_strength=_number(body, "control_strength", 0.0, MAX_CONTROL_STRENGTH),
                    ff_alpha=_number(body, "ff_alpha", 0.0, 1.0),
                    clear_bank=_flag(body))
    _check_capabilities(change, can)
    if change == Change():
        raise ValueError(f"nothing to change: send any of {', '.join(FIELDS)}")
    return change


def _flag(body: dict) -> bool:
    value = body.get("clear_bank", False)
    if not isinstance(value, bool):
        raise ValueError(f"clear_bank must be true or false, got {value!r}")
    return value


def _check_capabilities(change: Change, can: Capabilities) -> None:
    if change.control_strength is not None and not can.control:
        raise ValueError("the loop's conditioning holds no ControlNet: apply one (core 'Apply ControlNet') to "
                         "change control_strength")
    if change.ff_alpha is not None and not can.fusion:
        raise ValueError("the loop's model has no StreamV2V Feature Fusion patch: ff_alpha changes nothing")
    if change.clear_bank and not can.bank:
        raise ValueError("the loop's model uses no feature bank: there is nothing to clear")


class LiveParams:
    """A session's live steering: pending changes (from the route) and the applied log (from the loop)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.capabilities: Capabilities | None = None  # None: no loop runs
        self._pending: collections.deque[Change] = collections.deque()
        self.log: collections.deque[tuple[int, str]] = collections.deque(maxlen=MAX_LOG)
        self.changes = 0  # applied, including those the log has forgotten
        self.current: dict = {}

    def begin(self, can: Capabilities, current: dict) -> None:
        """A loop starts on this session: forget the previous run's changes."""
        with self._lock:
            self.capabilities, self.current = can, dict(current)
            self._pending.clear()
            self.log.clear()
            self.changes = 0

    def end(self) -> None:
        with self._lock:
            self.capabilities = None
            self._pending.clear()

    def offer(self, body) -> Change:
        """Check ``body`` (ValueError: nothing changes) and queue it for the next frame."""
        with self._lock:
            if self.capabilities is None:
                raise LookupError("no loop is running on this session: start one first")
            change = parse_change(body, self.capabilities)
            if len(self._pending) >= MAX_PENDING:
                raise OverflowError(f"{MAX_PENDING} changes are already waiting for the next frame: "
                                    f"send the next one after it")
            self._pending.append(change)
        return change

    def take(self) -> list[Change]:
        """The changes waiting, oldest first (the loop applies them to the frame entering now)."""
        with self._lock:
            taken = list(self._pending)
            self._pending.clear()
        return taken

    def applied(self, frame: int, change: Change, current: dict) -> None:
        with self._lock:
            self.log.append((frame, change.describe()))
            self.changes += 1
            self.current = dict(current)

    def status(self) -> dict:
        """JSON-ready: running, current values, pending count, the applied log (newest last)."""
        with self._lock:
            return {"running": self.capabilities is not None,
                    "can": asdict(self.capabilities) if self.capabilities else None,
                    "current": dict(self.current), "pending": len(self._pending), "changes": self.changes,
                    "log": [{"frame": frame, "change": text} for frame, text in self.log]}
