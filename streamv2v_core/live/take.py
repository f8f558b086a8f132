"""A take: a live loop's input exactly as it entered the stream, and every live change with its frame.

Recorded beside the loop's MP4, in ComfyUI's *input* folder (so it is read back under the same
file rule as any upload, and listed as an image folder):

    <input>/streamv2v-take-<session>-<date>/
        000000.jpg, 000001.jpg, ...   the received frames, byte for byte (never re-encoded)
        take.jsonl                    one JSON object per line, appended as the take runs:
            {"take": 1, "session": ..., "settings": {...}, "started": "2026-12-07 06:12:00"}
            {"frame": 0, "file": "000000.jpg", "stamp": 1234.5, "received_at": 0.0}
            {"change": {"prompt": "oil painting", "blend_frames": 8}, "at": 12}
            {"output": 0, "ms": 0}                       the live MP4's time of output 0
            {"end": {"frames": 300, "outputs": 300}}

Lines are flushed as they are written, so a take cut short (a crash, a full disk) keeps every
line written before; the reader ignores a last line cut in half. ``at`` counts the frames that
entered the stream (the steering's frame numbers, as the live log shows them). Re-rendering a
take (the loop's ``take`` source) replays the frames and applies each change at its frame, with
the node's own size, steps, strength and model; ``prompt_schedule`` exports its prompt changes as
a schedule a person can edit (written beside the take as ``prompt_schedule.txt`` when it ends).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator

from ..file_rules import FileRefused, check_inside, read_image_bytes
from ..stream.frame import Frame
from .params import Capabilities, Change, parse_change
from .session import decode_frame

log = logging.getLogger("streamv2v")

TAKE_FILE = "take.jsonl"
SCHEDULE_FILE = "prompt_schedule.txt"  # the take's prompt changes, for the loop's prompt_schedule input
VERSION = 1
MAX_TAKE_BYTES = 64 * 2**20    # the take file (a 2-hour take at 60 fps is about 15 MiB)
MAX_LINE_BYTES = 64 * 1024     # one line: a change holds at most two 4000-character prompts
MAX_TAKE_FRAMES = 1_000_000    # about 4.6 hours at 60 fps
SIGNATURES = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG", "png"), (b"RIFF", "webp"), (b"BM", "bmp"), (b"GIF8", "gif"))


def extension_of(data: bytes) -> str:
    """The file extension for encoded image bytes (what the browser sent), 'bin' if unknown."""
    return next((ext for magic, ext in SIGNATURES if data.startswith(magic)), "bin")


class TakeRecorder:
    """Writes one take as the loop runs; every write error stops the recording (logged), never the loop."""

    def __init__(self, folder: str, session: str, settings: dict):
        os.makedirs(folder)  # a new folder: an existing take is never written into
        self.folder, self.session = folder, session
        self.frames = self.outputs = self.changes = 0
        self.error: str | None = None
        self._file = open(os.path.join(folder, TAKE_FILE), "w", encoding="utf-8")
        self._line({"take": VERSION, "session": session, "settings": settings,
                    "started": datetime.datetime.now().isoformat(sep=" ", timespec="seconds")})

    @property
    def name(self) -> str:
        return os.path.basename(self.folder)

    def frame(self, data: bytes, stamp: float | None, received_at: float | None) -> None:
        """A received frame that entered the stream (its bytes as they came)."""
        if self.error or self.frames >= MAX_TAKE_FRAMES:
            return
        name = f"{self.frames:06d}.{extension_of(data)}"
        try:
            with open(os.path.join(self.folder, name), "wb") as file:
                file.write(data)
        except OSError as error:
            self._stop(error)
            return
        self._line({"frame": self.frames, "file": name, "stamp": stamp, "received_at": received_at})
        self.frames += 1

    def change(self, at: int, change: Change) -> None:
        """A live change applied to the frame ``at`` (the steering's count of frames entering the stream)."""
        self._line({"change": change.fields(), "at": int(at)})
        self.changes += 1

    def output(self, index: int, ms: int | None) -> None:
        """The live MP4's time (ms from its first frame) of output ``index``."""
        if ms is not None:
            self._line({"output": int(index), "ms": int(ms)})
            self.outputs += 1

    def close(self) -> None:
        if self._file.closed:
            return
        self._line({"end": {"frames": self.frames, "outputs": self.outputs, "changes": self.changes}})
        self._file.close()
        self._export_schedule()

    def _export_schedule(self) -> None:
        """``prompt_schedule.txt`` beside the take when prompts changed live (read back: bounded like any take)."""
        try:
            schedule = read_take(self.folder).prompt_schedule()
            if schedule:
                with open(os.path.join(self.folder, SCHEDULE_FILE), "w", encoding="utf-8") as file:
                    file.write(schedule + "\n")
        except (OSError, ValueError) as error:
            log.warning("StreamV2V take %r: no prompt schedule written (%s)", self.name, error)

    def _line(self, entry: dict) -> None:
        if self.error or self._file.closed:
            return
        try:
            self._file.write(json.dumps(entry, allow_nan=False) + "\n")
            self._file.flush()
        except (OSError, ValueError) as error:
            self._stop(error)

    def _stop(self, error: Exception) -> None:
        self.error = f"{type(error).__name__}: {error}"
        log.warning("StreamV2V take %r: recording stopped after %d frames (%s); the loop goes on", self.name,
                    self.frames, self.error)


@dataclass
class Take:
    """A take read back: frame files (checked names), changes by frame, the live MP4's output times."""

    folder: str
    session: str
    settings: dict
    frames: list[dict] = field(default_factory=list)          # {"file", "stamp", "received_at"}
    changes: dict[int, list[dict]] = field(default_factory=dict)  # frame -> the bodies applied there, in order
    output_ms: list[int] = field(default_factory=list)
    complete: bool = False

    def frame_bytes(self, i: int) -> bytes:
        """Frame ``i``'s bytes, read under the file rule (inside the take's folder, bounded)."""
        return read_image_bytes(self.folder, os.path.join(self.folder, self.frames[i]["file"]))

    def checked_changes(self, can: Capabilities) -> dict[int, list[Change]]:
        """The take's changes checked as the route checks them, for the loop that re-renders it (ValueError)."""
        out = {}
        for at, bodies in self.changes.items():
            try:
                out[at] = [_replayed(body, can) for body in bodies]
            except ValueError as error:
                raise ValueError(f"the take's change at frame {at} cannot be applied by this loop: {error}") from None
        return out

    def prompt_schedule(self, first_prompt: str = "") -> str:
        """The take's prompt changes as 'frame: prompt' lines (the loop's prompt_schedule format), for editing."""
        lines = [f"0: {first_prompt}"] if first_prompt else []
        for at in sorted(self.changes):
            for body in self.changes[at]:
                if body.get("prompt"):
                    lines.append(f"{at}: {' '.join(str(body['prompt']).split())}")
        return "\n".join(lines)


def _replayed(body: dict, can: Capabilities) -> Change:
    """A recorded change: its fields as sent (a preset recall was recorded with the preset's fields: its number
    is kept for the log only, the take stands on its own)."""
    if not isinstance(body, dict):
        raise ValueError("a change must be an object")
    fields = {k: v for k, v in body.items() if k != "preset"}
    change = parse_change(fields, can)
    preset = body.get("preset")
    return dataclasses.replace(change, preset=preset) if isinstance(preset, int) and 1 <= preset <= 8 else change


def read_take(folder: str) -> Take:
    """The take in ``folder`` (already resolved inside the input folder); ValueError saying what is wrong."""
    path = os.path.join(folder, TAKE_FILE)
    try:
        real = check_inside(folder, path)
        with open(real, "rb") as file:
            data = file.read(MAX_TAKE_BYTES + 1)
    except FileRefused:
        raise
    except OSError as error:
        raise ValueError(f"{os.path.basename(folder)!r} holds no take ({TAKE_FILE}: {error.strerror or error}): pick "
                         f"a folder a live loop recorded (streamv2v-take-...)") from None
    if len(data) > MAX_TAKE_BYTES:
        raise ValueError(f"the take file is over {MAX_TAKE_BYTES // 2**20} MiB")
    lines = data.split(b"\n")
    take = _header(lines[0], folder)
    for number, raw in enumerate(lines[1:], 2):
        if raw.strip():
            _entry(take, raw, number, last=number == len(lines))
    return take


def _load(raw: bytes, number: int):
    if len(raw) > MAX_LINE_BYTES:
        raise ValueError(f"line {number} of the take file is over {MAX_LINE_BYTES // 1024} KiB")
    return json.loads(raw.decode("utf-8"))


def _header(raw: bytes, folder: str) -> Take:
    try:
        head = _load(raw, 1)
    except ValueError:
        head = None
    if not isinstance(head, dict) or head.get("take") != VERSION or not isinstance(head.get("settings"), dict):
        raise ValueError(f"{os.path.basename(folder)!r}: {TAKE_FILE} does not start with a take header (version "
                         f"{VERSION})")
    return Take(folder, str(head.get("session", "")), head["settings"])


def _entry(take: Take, raw: bytes, number: int, last: bool) -> None:
    try:
        entry = _load(raw, number)
        if not isinstance(entry, dict):
            raise ValueError("not an object")
        if "frame" in entry:
            _frame(take, entry)
        elif "change" in entry:
            at = entry["at"]
            if not isinstance(at, int) or at < 0 or not isinstance(entry["change"], dict):
                raise ValueError("a change needs a frame number 'at' and an object")
            take.changes.setdefault(at, []).append(entry["change"])
        elif "output" in entry:
            take.output_ms.append(int(entry["ms"]))
        elif "end" in entry:
            take.complete = True
    except (ValueError, KeyError, TypeError) as error:
        if last:  # a take cut short mid-line: everything before it stands
            return
        raise ValueError(f"line {number} of the take file is not usable: {error}") from None


def _frame(take: Take, entry: dict) -> None:
    name = entry["file"]
    if entry["frame"] != len(take.frames) or not isinstance(name, str) or os.path.basename(name) != name \
            or len(take.frames) >= MAX_TAKE_FRAMES:
        raise ValueError("frames must be numbered 0, 1, ... with a plain file name in the take's folder")
    take.frames.append({"file": name, "stamp": entry.get("stamp"), "received_at": entry.get("received_at")})


class TakeSource:
    """A take's frames as a loop source (``media.video_io``'s reader protocol), decoded as the live loop decoded
    them: the same bytes through the same decoder, at the stream's size (``fit()``) once known, each ``Frame``
    with its recorded capture stamp and arrival time."""

    fps = None
    ended_early = None
    total_exact = True

    def __init__(self, take: Take, fit: Callable[[], tuple[int, int] | None] = lambda: None):
        self.take, self.fit = take, fit
        self.name = os.path.basename(take.folder)
        self.total = len(take.frames)
        if not self.total:
            raise ValueError(f"the take {self.name!r} holds no frames")

    def audio(self, skip_seconds: float = 0.0) -> None:
        return None

    def __iter__(self) -> Iterator[Frame]:
        for i, entry in enumerate(self.take.frames):
            yield Frame(decode_frame(self.take.frame_bytes(i), self.fit()), stamp=entry["stamp"],
                        received_at=entry["received_at"])

    def close(self) -> None:
        pass
