"""Live steering of a running loop (pure Python): what may change, checked, coalesced for the next frame.

One rule for everything a running show accepts, from any control surface (the panel and the
web route, OSC, MIDI, ...): **a change is fully checked before it is answered.** Every surface
hands the values it received to ``parse_change`` (the JSON route first through ``read_json``):
the one entry point, which refuses (ValueError naming the field and the rule: the route's
400) anything the loop could not apply. The session's ``LiveParams`` then keeps the changes
waiting for the next frame *coalesced* into one (the newest value of each field wins; a prompt
that never reached a frame is counted and named as superseded), so a frame costs at most one
text encode however fast changes arrive. What the loop applied, could not apply, or discarded
when it ended is in the log the panel and the report show. Everything is bounded: one pending
change, the last ``MAX_LOG`` log entries.

What a change may hold (all optional, at least one), ``FIELDS`` below:

    prompt            str, 1..4000 characters a text encoder can take (prompt_text.check_prompt: no lone
                      surrogates or control characters, weights finite and within +-10): encoded once with
                      the loop's CLIP, blended in
    blend_frames      int 0..1000: over how many frames the prompt is blended in (0 or 1: at once)
    control_strength  float 0..10: multiplies every ControlNet's own strength
    ff_alpha          float 0..1: feature fusion's alpha (the paper's 0.75)
    clear_bank        true: forget the feature bank's past (a new scene)
    seed              int 0..2^64-1: the new seed's noise blended in over blend_frames (spherical interpolation)
    strength          float 0.01..1: SDEdit strength of the frames entering from now on (new timesteps)
    cfg               float 0..30: guidance scale of the frames entering from now on
    residual_delta    float 0..1: residual CFG's delta (only with a residual guidance)
    negative_prompt   str, 0..4000 characters (as prompt; empty: no negative text): encoded once, blended in
    preset            int 1..8: recall a stored snapshot of these fields (``set_presets``): one change

What each costs is in the README's "Playing live": a prompt one CLIP encode; seed, strength, cfg
and delta no encode and no model call (a strength change reads its S sigmas from the model once
and keeps them; the bank is kept in every case but clear_bank).

Adding a field (e.g. seed, guidance, a negative prompt): a ``Change`` attribute (None = unchanged)
and a ``Field`` in ``FIELDS`` with its reader; describing, coalescing and answering follow.
"""
from __future__ import annotations

import collections
import json
import math
import threading
from dataclasses import asdict, dataclass, fields
from typing import Callable

from ..stream.prompt_text import check_prompt

MAX_PROMPT_CHARS = 4000
MAX_BLEND_FRAMES = 1000
MAX_CONTROL_STRENGTH = 10.0  # as core Apply ControlNet
MAX_LOG = 100
MAX_SUPERSEDED_SHOWN = 3     # superseded prompts named in a log line (all are counted)
MAX_SEED = 0xFFFFFFFFFFFFFFFF  # as the nodes' seed input
MIN_STRENGTH, MAX_CFG = 0.01, 30.0  # as the nodes' strength and cfg inputs
MAX_PRESETS = 8
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
    """One request's changes (None: unchanged; ``clear_bank`` False: not asked)."""

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

    def fields(self) -> dict:
        """The fields this change sets (an applied zero included; JSON-ready): what the route answers, a take
        records."""
        return {f.name: getattr(self, f.name) for f in fields(self) if _is_set(getattr(self, f.name))}

    def then(self, newer: "Change") -> tuple["Change", list[str]]:
        """This change followed by ``newer`` before any frame took them: one change (``newer``'s values win),
        and the texts ``newer`` superseded (they never reached a frame)."""
        mine, theirs = self.fields(), newer.fields()
        superseded = [value for name, value in mine.items() if name in theirs and isinstance(value, str)]
        return Change(**{**mine, **theirs}), superseded

    def describe(self) -> str:
        """'prompt "oil painting" (blend 8 frames), control strength 0.5' for logs and the report."""
        values, parts = self.fields(), []
        for name, value in values.items():
            if name == "preset" or (name == "blend_frames" and "prompt" in values):
                continue
            text = FIELDS[name].describe(value)
            if name == "prompt" and "blend_frames" in values:
                text += f" (blend {values['blend_frames']} frames)"
            parts.append(text)
        text = ", ".join(parts)
        return f"preset {self.preset}: {text}" if self.preset is not None else text


def _is_set(value) -> bool:
    return value is not None and value is not False  # identity: 0 and 0.0 are set


@dataclass(frozen=True)
class Field:
    """One value a running show accepts: how a sent value is read, what the loop needs to apply it."""

    name: str
    read: Callable[[object], object]   # the value as sent -> the value applied; ValueError saying the rule
    describe: Callable[[object], str]  # the applied value, for the log and the report
    needs: str | None = None           # a Capabilities flag the running loop must have
    missing: str = ""                  # the error when it has not (what to connect)


def _number(name: str, low: float, high: float, integer: bool = False) -> Callable[[object], float | int]:
    def read(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or (integer and value != int(value)) or not low <= value <= high:
            kind = "a whole number" if integer else "a number"
            raise ValueError(f"{name} must be {kind} from {low:g} to {high:g}, got {value!r}")
        return int(value) if integer else float(value)
    return read


def _flag(name: str) -> Callable[[object], bool]:
    def read(value):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return value
    return read


def _shown(text: str) -> str:
    return repr(text if len(text) <= 60 else text[:57] + "...")


def _prompt(name: str, empty_ok: bool = False) -> Callable[[object], str]:
    def read(value):
        if empty_ok and isinstance(value, str) and not value.strip():
            return ""
        return check_prompt(value, name, MAX_PROMPT_CHARS)
    return read


def _needs_clip(name: str) -> str:
    return (f"the loop has no CLIP connected: connect the checkpoint's CLIP to the loop node's 'clip' input to "
            f"change the {name.replace('_', ' ')} live")


FIELDS: dict[str, Field] = {field.name: field for field in (
    Field("prompt", _prompt("prompt"), lambda v: f"prompt {_shown(v)}", "clip", _needs_clip("prompt")),
    Field("blend_frames", _number("blend_frames", 0, MAX_BLEND_FRAMES, integer=True), lambda v: f"blend frames {v}"),
    Field("control_strength", _number("control_strength", 0.0, MAX_CONTROL_STRENGTH),
          lambda v: f"control strength {v:g}", "control",
          "the loop's conditioning holds no ControlNet: apply one (core 'Apply ControlNet') to change "
          "control_strength"),
    Field("ff_alpha", _number("ff_alpha", 0.0, 1.0), lambda v: f"FF alpha {v:g}", "fusion",
          "the loop's model has no StreamV2V Feature Fusion patch: ff_alpha changes nothing"),
    Field("clear_bank", _flag("clear_bank"), lambda v: "bank cleared", "bank",
          "the loop's model uses no feature bank: there is nothing to clear"),
    Field("seed", _number("seed", 0, MAX_SEED, integer=True), lambda v: f"seed {v}"),
    Field("strength", _number("strength", MIN_STRENGTH, 1.0), lambda v: f"strength {v:g}"),
    Field("cfg", _number("cfg", 0.0, MAX_CFG), lambda v: f"cfg {v:g}"),
    Field("residual_delta", _number("residual_delta", 0.0, 1.0), lambda v: f"residual delta {v:g}", "residual",
          "the loop's guidance is full CFG: residual_delta acts only with a residual guidance (set the loop's "
          "'guidance' to a residual one)"),
    Field("negative_prompt", _prompt("negative_prompt", empty_ok=True), lambda v: f"negative prompt {_shown(v)}",
          "clip", _needs_clip("negative_prompt")),
    Field("preset", _number("preset", 1, MAX_PRESETS, integer=True), lambda v: f"preset {v}"),
)}


def parse_change(body, can: Capabilities, presets: list | None = None) -> Change:
    """The one check of every change a running show is sent: a ``Change`` from ``{field: value}`` (a decoded
    JSON body, an OSC or MIDI message's values, a take's line), or ValueError saying which field is wrong and why.

    ``presets``: the session's stored presets (``preset: n`` recalls number n, 1-based, as one change;
    fields sent beside it win).
    """
    if not isinstance(body, dict):
        raise ValueError(f"send a JSON object with any of {', '.join(FIELDS)}")
    unknown = sorted(str(name)[:40] for name in body if name not in FIELDS)
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(map(repr, unknown[:5]))}: allowed are {', '.join(FIELDS)}")
    if body.get("preset") is not None:
        number = FIELDS["preset"].read(body["preset"])
        body = {**_stored_preset(presets, number), **body, "preset": number}
    values = {}
    for name, value in body.items():
        if value is None:
            continue
        field = FIELDS[name]
        values[name] = field.read(value)
        if field.needs and _is_set(values[name]) and not getattr(can, field.needs):
            raise ValueError(field.missing)
    change = Change(**values)
    if not change.fields():
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


def read_json(data: bytes):
    """A request body's JSON value; ValueError (the route's 400) for text that is not UTF-8 JSON, or nests too
    deeply for the parser (its RecursionError would be a 500)."""
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"the body is not UTF-8 text: {error.reason} at byte {error.start}") from None
    except RecursionError:
        raise ValueError("the body is not JSON this route takes: it nests too deeply (send one flat JSON "
                         "object)") from None
    except ValueError as error:
        raise ValueError(f"the body is not JSON: {error}") from None


class LiveParams:
    """A session's live steering: the pending change (from any surface), the log (from the loop) and the prompt
    in effect on the newest frame out (from the sink)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.capabilities: Capabilities | None = None  # None: no loop runs
        self._pending: Change | None = None
        self._superseded: list[str] = []  # prompts the pending change replaced before a frame took them
        self._taken_superseded: list[str] = []
        self.log: collections.deque[dict] = collections.deque(maxlen=MAX_LOG)
        self.changes = 0     # applied, including those the log has forgotten
        self.superseded = 0  # prompts replaced by a newer one before any frame used them
        self.discarded = 0   # changes accepted that no frame took (the loop ended first)
        self.problems = 0    # changes the loop could not apply, frames it could not use (each one logged)
        self.current: dict = {}
        self.presets: list[dict | None] = []  # kept across runs: the workflow's snapshots (``set_presets``)
        self.run_number = 0  # counts the loop runs on this session: a panel starts a new run from the server's values
        self.in_effect: dict | None = None  # {"frame", "prompt"} of the newest frame out

    def begin(self, can: Capabilities, current: dict) -> None:
        """A loop starts on this session: forget the previous run's changes."""
        with self._lock:
            self.capabilities, self.current = can, dict(current)
            self._pending, self._superseded, self._taken_superseded = None, [], []
            self.log.clear()
            self.changes = self.superseded = self.discarded = self.problems = 0
            self.run_number += 1
            self.in_effect = None

    def shown(self, frame: int, prompt: str) -> None:
        """The frame ``frame`` that just left the stream was made with ``prompt`` (a text saying which)."""
        with self._lock:
            self.in_effect = {"frame": frame, "prompt": prompt}

    def end(self) -> None:
        """The loop ended: a change no frame took is logged and counted as discarded."""
        with self._lock:
            self.capabilities = None
            if self._pending is not None:
                self.discarded += 1
                self.log.append({"frame": None, "problem": f"discarded (the loop ended before a frame took it): "
                                                          f"{self._pending.describe()}"})
            self._pending, self._superseded = None, []

    def offer(self, body) -> Change:
        """Check ``body`` (ValueError: nothing changes) and merge it into the change the next frame takes."""
        with self._lock:
            if self.capabilities is None:
                raise LookupError("no loop is running on this session: start one first")
            change = parse_change(body, self.capabilities, self.presets)
            if self._pending is None:
                self._pending = change
            else:
                self._pending, replaced = self._pending.then(change)
                self._superseded += replaced
                self.superseded += len(replaced)
                del self._superseded[:-MAX_SUPERSEDED_SHOWN]
        return change

    def set_presets(self, presets) -> list[dict | None]:
        """Replace the stored presets (checked: ValueError, nothing changes); returns them."""
        checked = check_presets(presets)
        with self._lock:
            self.presets = checked
        return checked

    def take(self) -> list[Change]:
        """The change waiting (all that arrived since the last frame, coalesced), or ``[]``."""
        with self._lock:
            if self._pending is None:
                return []
            taken, self._pending = self._pending, None
            self._taken_superseded, self._superseded = self._superseded, []
        return [taken]

    def applied(self, frame: int, change: Change, current: dict) -> None:
        """The loop applied ``change`` (the one it took) to frame ``frame``."""
        with self._lock:
            text = change.describe()
            if self._taken_superseded:
                text += f" (superseding {', '.join(map(_shown, self._taken_superseded))})"
                self._taken_superseded = []
            self.log.append({"frame": frame, "change": text})
            self.changes += 1
            self.current = dict(current)

    def problem(self, frame: int | None, text: str) -> None:
        """Something the loop could not apply or use at ``frame`` (shown in the panel and the report)."""
        with self._lock:
            self.log.append({"frame": frame, "problem": text})
            self.problems += 1

    def status(self) -> dict:
        """JSON-ready: running, current values, pending, counters, the log (newest last), the presets stored, the
        run's number and the prompt in effect on the newest frame out."""
        with self._lock:
            return {"running": self.capabilities is not None,
                    "can": asdict(self.capabilities) if self.capabilities else None,
                    "current": dict(self.current), "pending": int(self._pending is not None),
                    "changes": self.changes, "superseded": self.superseded, "discarded": self.discarded,
                    "problems": self.problems, "log": [dict(entry) for entry in self.log],
                    "presets": [number for number, p in enumerate(self.presets, 1) if p],
                    "run": self.run_number, "in_effect": dict(self.in_effect) if self.in_effect else None}
