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
    seed              int 0..2^64-1: the new seed's noise blended in over blend_frames (spherical interpolation)
    strength          float 0.01..1: SDEdit strength of the frames entering from now on (new timesteps)
    cfg               float 0..30: guidance scale of the frames entering from now on
    residual_delta    float 0..1: residual CFG's delta (only with a residual guidance)
    negative_prompt   str, 0..4000 characters: encoded once with the loop's CLIP, blended in like a prompt
    preset            int 1..8: recall a stored snapshot of these fields (``set_presets``): one change

What each costs is in the README's "Playing live": a prompt one CLIP encode; seed, strength, cfg
and delta no encode and no model call (a strength change reads its S sigmas from the model once
and keeps them; the bank is kept in every case but clear_bank).
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
MAX_SEED = 0xFFFFFFFFFFFFFFFF  # as the nodes' seed input
MIN_STRENGTH, MAX_CFG = 0.01, 30.0  # as the nodes' strength and cfg inputs
MAX_PRESETS = 8
FIELDS = ("prompt", "blend_frames", "control_strength", "ff_alpha", "clear_bank",
          "seed", "strength", "cfg", "residual_delta", "negative_prompt", "preset")
PRESET_FIELDS = ("prompt", "negative_prompt", "blend_frames", "seed", "strength", "cfg", "residual_delta",
                 "control_strength", "ff_alpha")  # what a preset snapshots (a bank clear is an act, not a look)


@dataclass(frozen=True)
class Capabilities:
    """What the running loop can change: set by the loop when it starts."""

    clip: bool = False      # a CLIP is connected (prompts can be encoded)
    control: bool = False   # the conditioning holds a ControlNet
    fusion: bool = False    # the model has a FeatureFusionPatch
    bank: bool = False      # the model uses a feature bank
    residual: bool = False  # the loop's guidance is a residual CFG (residual_delta acts)


@dataclass(frozen=True)
class Change:
    """One request's changes (None: unchanged)."""

    prompt: str | None = None
    blend_frames: int | None = None
    control_strength: float | None = None
    ff_alpha: float | None = None
    clear_bank: bool = False
    seed: int | None = None
    strength: float | None = None
    cfg: float | None = None
    residual_delta: float | None = None
    negative_prompt: str | None = None
    preset: int | None = None  # the preset this change recalled (its fields are above)

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
        if self.seed is not None:
            parts.append(f"seed {self.seed}")
        parts += [f"{label} {value:g}" for label, value in (("strength", self.strength), ("cfg", self.cfg),
                                                             ("residual delta", self.residual_delta))
                  if value is not None]
        if self.negative_prompt is not None:
            shown = self.negative_prompt if len(self.negative_prompt) <= 60 else self.negative_prompt[:57] + "..."
            parts.append(f"negative prompt {shown!r}")
        text = ", ".join(parts)
        return f"preset {self.preset}: {text}" if self.preset is not None else text

    def fields(self) -> dict:
        """The fields this change sets (JSON-ready; what a take file records)."""
        return {k: v for k, v in asdict(self).items() if v is not None and v is not False}


def _number(body: dict, name: str, low: float, high: float, integer: bool = False):
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (integer and value != int(value)) or not low <= value <= high:
        kind = "a whole number" if integer else "a number"
        raise ValueError(f"{name} must be {kind} from {low:g} to {high:g}, got {value!r}")
    return int(value) if integer else float(value)


def _text(body: dict, name: str, can: Capabilities, empty_ok: bool = False) -> str | None:
    text = body.get(name)
    if text is None:
        return None
    if not isinstance(text, str) or (not text.strip() and not empty_ok) or len(text) > MAX_PROMPT_CHARS:
        raise ValueError(f"{name} must be text of {0 if empty_ok else 1} to {MAX_PROMPT_CHARS} characters")
    if not can.clip:
        raise ValueError(f"the loop has no CLIP connected: connect the checkpoint's CLIP to the loop node's "
                         f"'clip' input to change the {name.replace('_', ' ')} live")
    return text.strip()


def parse_change(body, can: Capabilities, presets: list | None = None) -> Change:
    """A ``Change`` from a decoded JSON body; ValueError saying which field is wrong and why.

    ``presets``: the session's stored presets (``preset: n`` recalls number n, 1-based, as one change;
    fields sent beside it win).
    """
    if not isinstance(body, dict):
        raise ValueError(f"send a JSON object with any of {', '.join(FIELDS)}")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(map(repr, unknown))}: allowed are {', '.join(FIELDS)}")
    preset = _number(body, "preset", 1, MAX_PRESETS, integer=True)
    if preset is not None:
        body = {**_stored_preset(presets, preset), **{k: v for k, v in body.items() if k != "preset"}}
    change = Change(prompt=_text(body, "prompt", can),
                    blend_frames=_number(body, "blend_frames", 0, MAX_BLEND_FRAMES, integer=True),
                    control_strength=_number(body, "control_strength", 0.0, MAX_CONTROL_STRENGTH),
                    ff_alpha=_number(body, "ff_alpha", 0.0, 1.0),
                    clear_bank=_flag(body),
                    seed=_number(body, "seed", 0, MAX_SEED, integer=True),
                    strength=_number(body, "strength", MIN_STRENGTH, 1.0),
                    cfg=_number(body, "cfg", 0.0, MAX_CFG),
                    residual_delta=_number(body, "residual_delta", 0.0, 1.0),
                    negative_prompt=_text(body, "negative_prompt", can, empty_ok=True),
                    preset=preset)
    _check_capabilities(change, can)
    if change == Change():
        raise ValueError(f"nothing to change: send any of {', '.join(FIELDS)}")
    return change


def _stored_preset(presets: list | None, number: int) -> dict:
    stored = presets[number - 1] if presets and number <= len(presets) else None
    if not stored:
        raise ValueError(f"preset {number} is empty: store one first (the panel's preset buttons, or the loop's "
                         f"presets)")
    return stored


def check_presets(presets) -> list[dict | None]:
    """Up to ``MAX_PRESETS`` snapshots (None: an empty slot), each a dict of ``PRESET_FIELDS`` with valid values.

    Values are checked as a change is (capabilities at recall: a preset may hold a prompt for a loop
    that has a CLIP next time); ValueError naming the preset and the field.
    """
    if not isinstance(presets, list) or len(presets) > MAX_PRESETS:
        raise ValueError(f"presets must be a list of at most {MAX_PRESETS} snapshots (null for an empty slot)")
    everything = Capabilities(clip=True, control=True, fusion=True, bank=True, residual=True)
    out = []
    for number, preset in enumerate(presets, 1):
        if preset is None or preset == {}:
            out.append(None)
            continue
        if not isinstance(preset, dict) or set(preset) - set(PRESET_FIELDS):
            raise ValueError(f"preset {number} must be an object with any of {', '.join(PRESET_FIELDS)}")
        try:
            parse_change(preset, everything)
        except ValueError as error:
            raise ValueError(f"preset {number}: {error}") from None
        out.append(dict(preset))
    return out


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
    if change.residual_delta is not None and not can.residual:
        raise ValueError("the loop's guidance is full CFG: residual_delta acts only with a residual guidance (set the "
                         "loop's 'guidance' to a residual one)")


class LiveParams:
    """A session's live steering: pending changes (from the route), the applied log (from the loop) and the prompt
    in effect on the newest frame out (from the sink)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.capabilities: Capabilities | None = None  # None: no loop runs
        self._pending: collections.deque[Change] = collections.deque()
        self.log: collections.deque[tuple[int, str]] = collections.deque(maxlen=MAX_LOG)
        self.changes = 0  # applied, including those the log has forgotten
        self.current: dict = {}
        self.presets: list[dict | None] = []  # kept across runs: the workflow's snapshots (``set_presets``)
        self.run_number = 0  # counts the loop runs on this session: a panel starts a new run from the server's values
        self.in_effect: dict | None = None  # {"frame", "prompt"} of the newest frame out

    def begin(self, can: Capabilities, current: dict) -> None:
        """A loop starts on this session: forget the previous run's changes."""
        with self._lock:
            self.capabilities, self.current = can, dict(current)
            self._pending.clear()
            self.log.clear()
            self.changes = 0
            self.run_number += 1
            self.in_effect = None

    def shown(self, frame: int, prompt: str) -> None:
        """The frame ``frame`` that just left the stream was made with ``prompt`` (a text saying which)."""
        with self._lock:
            self.in_effect = {"frame": frame, "prompt": prompt}

    def end(self) -> None:
        with self._lock:
            self.capabilities = None
            self._pending.clear()

    def offer(self, body) -> Change:
        """Check ``body`` (ValueError: nothing changes) and queue it for the next frame."""
        with self._lock:
            if self.capabilities is None:
                raise LookupError("no loop is running on this session: start one first")
            change = parse_change(body, self.capabilities, self.presets)
            if len(self._pending) >= MAX_PENDING:
                raise OverflowError(f"{MAX_PENDING} changes are already waiting for the next frame: "
                                    f"send the next one after it")
            self._pending.append(change)
        return change

    def set_presets(self, presets) -> list[dict | None]:
        """Replace the stored presets (checked: ValueError, nothing changes); returns them."""
        checked = check_presets(presets)
        with self._lock:
            self.presets = checked
        return checked

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
        """JSON-ready: running, current values, pending count, the presets stored, the applied log (newest last), the
        run's number and the prompt in effect on the newest frame out."""
        with self._lock:
            return {"running": self.capabilities is not None,
                    "can": asdict(self.capabilities) if self.capabilities else None,
                    "current": dict(self.current), "pending": len(self._pending), "changes": self.changes,
                    "presets": [number for number, p in enumerate(self.presets, 1) if p],
                    "log": [{"frame": frame, "change": text} for frame, text in self.log],
                    "run": self.run_number, "in_effect": dict(self.in_effect) if self.in_effect else None}
