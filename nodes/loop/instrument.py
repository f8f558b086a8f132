"""The loop's instrument: an OSC listener while it runs, a take recorded from a live source, a take re-rendered.

``instrument_inputs()`` are the loop node's last inputs (after every older one: saved workflows keep their
widget values in place). A live browser run records its take (``streamv2v_core/live/take.py``) in ComfyUI's
input folder; the ``take`` source reads one back under the same file rule as any input.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import folder_paths
from comfy_api.latest import io

from ...streamv2v_core.live.osc import OscListener
from ...streamv2v_core.live.take import Take, TakeRecorder, read_take
from .._schema import advanced
from ..input_files import resolve_input

TAKE = "take"
TAKE_PREFIX = "streamv2v-take"
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class InstrumentChoice:
    """The loop's OSC and take inputs."""

    osc_port: int = 0
    osc_host: str = LOOPBACK
    record_take: bool = True


def instrument_inputs() -> list:
    """osc_port, osc_host, record_take."""
    return [
        io.Int.Input("osc_port", default=0, min=0, max=65535, optional=True,
                     tooltip="Listen for OSC (TouchDesigner, Max/MSP, Ableton, TouchOSC) on this UDP port while the "
                             "loop runs: /streamv2v/<session>/<field> value, e.g. /streamv2v/webcam/strength 0.5, "
                             "/streamv2v/webcam/preset 3 (the README's 'Playing live' lists them). 0: no OSC."),
        advanced(io.String.Input("osc_host", default=LOOPBACK, optional=True,
                                 tooltip="The address the OSC listener binds: 127.0.0.1 takes messages from this "
                                         "machine only; 0.0.0.0 from the network (anyone on it can then steer "
                                         "the show).")),
        advanced(io.Boolean.Input("record_take", default=True, optional=True,
                                  tooltip="With the browser webcam: record the take (the received frames byte for "
                                          "byte and every live change with its frame) in a 'streamv2v-take-...' "
                                          "folder of the input folder, to re-render it later with source 'take' "
                                          "at any size, steps and strength.")),
    ]


def open_osc(choice: InstrumentChoice, session) -> OscListener | None:
    """The run's OSC listener (None for port 0); ValueError naming the input when it cannot open."""
    if not int(choice.osc_port or 0):
        return None
    host = str(choice.osc_host or LOOPBACK).strip() or LOOPBACK
    return OscListener(session.name, session.params.offer, int(choice.osc_port), host)


def start_take(session_name: str, settings: dict) -> TakeRecorder:
    """A new take folder in the input folder (never an existing one)."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = os.path.join(folder_paths.get_input_directory(), f"{TAKE_PREFIX}-{session_name}-{stamp}")
    folder, n = base, 1
    while os.path.exists(folder):
        n += 1
        folder = f"{base}-{n}"
    return TakeRecorder(folder, session_name, settings)


def open_take(name: str) -> Take:
    """The take ``name`` (a folder in the input folder, as the file list shows it); ValueError naming the fix."""
    return read_take(resolve_input(name))


def take_text(recorder: TakeRecorder | None, osc: OscListener | None) -> list[str]:
    """The report's lines about the take recorded and the OSC traffic."""
    lines = []
    if recorder is not None:
        what = f"take recorded in the input folder: {recorder.name}/ ({recorder.frames} frames, {recorder.changes} " \
               f"live changes)"
        lines.append(what + (f"; WARNING: recording stopped: {recorder.error}" if recorder.error else ""))
    if osc is not None:
        lines.append(f"OSC on {osc.address[0]}:{osc.address[1]}: {osc.describe()}")
    return lines


# The node inputs a take's header keeps (what it was played with: a re-render may use others).
TAKE_SETTINGS = ("seed", "steps", "strength", "cfg", "guidance", "residual_delta", "width", "height", "resize_mode",
                 "skip_first", "every_nth", "blend_frames", "prompt_schedule", "control_hint", "stream_batch",
                 "fixed_noise", "similarity_filter", "bank_start")


class LoopInstrument:
    """What one loop run opens for playing live: an OSC listener, a take recorded (live) or replayed (``take``)."""

    def __init__(self, choice: InstrumentChoice, session, steering):
        self.choice, self.session, self.steering = choice, session, steering
        self.recorder: TakeRecorder | None = None
        self.osc: OscListener | None = None

    def recording(self, live: bool, inputs: dict):
        """For a live browser run: start the take and return the frame recorder (None: nothing recorded)."""
        if not (live and self.choice.record_take):
            return None
        settings = {k: inputs[k] for k in TAKE_SETTINGS if isinstance(inputs.get(k), (int, float, str, bool))}
        self.recorder = start_take(self.session.name, settings)
        self.steering.recorder = self.recorder
        return self.recorder.frame

    def replaying(self, reader) -> None:
        """A take as the source: its changes go to the steering (its frames bring their arrival times: the MP4
        places them on the live take's timeline)."""
        take = getattr(reader, "take", None)
        if take is not None:
            self.steering.replay = take.checked_changes(self.steering.can)

    def listen(self) -> None:
        self.osc = open_osc(self.choice, self.session)

    def report(self) -> list[str]:
        return take_text(self.recorder, self.osc)

    def close(self) -> None:
        if self.osc is not None:
            self.osc.close()
        if self.recorder is not None:
            self.recorder.close()
