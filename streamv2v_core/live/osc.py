"""OSC control of a running loop: a UDP listener that turns OSC messages into live changes (python-osc parses).

TouchDesigner, Max/MSP, Ableton (Max for Live) and TouchOSC send OSC over UDP. A loop with
``osc_port`` above 0 opens one ``OscListener`` while it runs, bound to 127.0.0.1 unless the user
names another address. Messages:

    /streamv2v/{session}/{field} value     any live field (params.py: prompt, seed, strength, cfg, ...)
    /streamv2v/{session}/clear_bank        (no value, or a true one)
    /streamv2v/{session}/preset n          recall stored preset n (1..8)

go through the same check as the HTTP route (``LiveParams.offer``) and are logged the same way.
The listener is bounded whatever arrives: a datagram over ``MAX_PACKET`` bytes is dropped unread,
at most ``MAX_MESSAGES`` messages of a bundle are used, bundle time tags are ignored (never a
sleep), nothing is ever sent back (no reply to spoof), and refusals are counted, not kept; a
warning about them is logged at most every ``WARN_EVERY_S`` seconds. Parsing is budgeted
(``PARSE_BYTES_PER_S``, at least ``MIN_COST`` a packet): past it the listener sleeps and the
kernel drops what overflows its socket buffer, so a flood takes at most a few percent of one core
(and of the interpreter lock the stream's thread needs) instead of all of it; a performer's
controls send a few hundred small messages a second, far below it. (python-osc itself logs one
line on the root logger per unreadable part of a bundle; while a listener is open, a filter on the
root logger lets one such line through every ``WARN_EVERY_S`` seconds, so a flood cannot fill the log.)
"""
from __future__ import annotations

import collections
import logging
import math
import socket
import threading
import time

from pythonosc import osc_packet

from .params import FIELDS

log = logging.getLogger("streamv2v")

MAX_PACKET = 8192       # bytes; OSC control messages are tens of bytes (a long prompt a few KiB)
PARSE_BYTES_PER_S = 64 * 1024  # parsing budget: python-osc takes ~1 us a byte (a 52-message bundle: 1.7 ms)
MIN_COST = 64           # bytes charged per packet however small (so at most 1,000 packets a second are parsed)
MAX_MESSAGES = 32       # per packet (a bundle may hold more: the rest are dropped)
WARN_EVERY_S = 10.0
PREFIX = "streamv2v"
REFUSALS = ("oversized", "malformed", "other session", "unknown address", "refused")


class _QuietParser(logging.Filter):
    """Lets python-osc's per-packet parse warnings through once every ``WARN_EVERY_S`` seconds."""

    def __init__(self):
        super().__init__()
        self.users, self.passed_at, self.lock = 0, -WARN_EVERY_S, threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if "pythonosc" not in record.pathname:
            return True
        now = time.monotonic()
        if now - self.passed_at < WARN_EVERY_S:
            return False
        self.passed_at = now
        return True

    def opened(self) -> None:
        with self.lock:
            self.users += 1
            if self.users == 1:
                logging.getLogger().addFilter(self)

    def closed(self) -> None:
        with self.lock:
            self.users -= 1
            if self.users == 0:
                logging.getLogger().removeFilter(self)


_QUIET = _QuietParser()


def change_body(field: str, args: list) -> dict:
    """The route's JSON body for one OSC message ``/streamv2v/{session}/{field} args``; ValueError if unusable."""
    if field not in FIELDS:
        raise ValueError(f"unknown field {field!r}: the address ends in one of {', '.join(FIELDS)}")
    if field == "clear_bank":
        if len(args) > 1:
            raise ValueError("clear_bank takes no value or one")
        return {"clear_bank": True if not args else _truth(args[0])}
    if len(args) != 1:
        raise ValueError(f"{field} takes one value, got {len(args)}")
    value = args[0]
    if isinstance(value, float) and math.isfinite(value) and value == int(value) and field in ("seed", "preset",
                                                                                               "blend_frames"):
        value = int(value)  # a fader's float (8.0) for a whole-number field
    return {field: value}


def _truth(value) -> bool:
    if isinstance(value, (bool, int, float)):
        return bool(value)
    raise ValueError(f"clear_bank takes true/false or a number, got {type(value).__name__}")


class OscListener:
    """A UDP OSC listener for one session's live changes, on its own thread, until ``close()``.

    offer: ``body -> Change`` (``LiveParams.offer``: raises ValueError / LookupError / OverflowError
    to refuse). ``counts`` says what arrived: accepted and each refusal.
    """

    def __init__(self, session: str, offer, port: int, host: str = "127.0.0.1"):
        self.session, self.offer = session, offer
        self.counts: collections.Counter = collections.Counter()
        self.last_error: str | None = None
        self._warned_at = 0.0
        self._warned_counts: collections.Counter = collections.Counter()
        self._budget, self._budget_at = float(PARSE_BYTES_PER_S), time.monotonic()
        self.socket = socket.socket(_family(host), socket.SOCK_DGRAM)
        try:
            self.socket.bind((host, int(port)))
        except OSError as error:
            self.socket.close()
            raise ValueError(f"osc_port {port} cannot be opened on {host} ({error.strerror or error}): pick another "
                             f"port (or 0 for no OSC)") from None
        self.socket.settimeout(0.2)  # close() is noticed within this
        self.address = self.socket.getsockname()[:2]
        self._closed = threading.Event()
        _QUIET.opened()
        self._thread = threading.Thread(target=self._serve, name=f"streamv2v-osc-{session}", daemon=True)
        self._thread.start()
        log.info("StreamV2V session %r: OSC listener on %s:%d (/%s/%s/<field> value)", session, self.address[0],
                 self.address[1], PREFIX, session)

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=5)
        self.socket.close()
        _QUIET.closed()
        if sum(self.counts.values()):
            log.info("StreamV2V session %r: OSC listener closed (%s)", self.session, self.describe())

    def describe(self) -> str:
        """'3 accepted, 2 malformed' for the loop's report."""
        return ", ".join(f"{n} {what}" for what, n in self.counts.most_common()) or "nothing received"

    # -- the listener's thread ------------------------------------------------------------
    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                data, sender = self.socket.recvfrom(MAX_PACKET + 1)
            except socket.timeout:
                continue
            except OSError:  # closed under us, or a transient error (e.g. an ICMP reply): go on until closed
                continue
            if len(data) > MAX_PACKET:
                self._spend(MIN_COST)
                self._refuse("oversized", f"{len(data)}+ bytes")
                continue
            self._spend(max(MIN_COST, len(data)))
            self._packet(data, sender)
        self._warn(force=True)

    def _spend(self, cost: int) -> None:
        """Take ``cost`` bytes from the parsing budget; sleep while it is spent (a flood: the kernel drops the rest)."""
        now = time.monotonic()
        self._budget = min(float(PARSE_BYTES_PER_S), self._budget + (now - self._budget_at) * PARSE_BYTES_PER_S)
        self._budget_at = now
        if self._budget < cost:
            self.counts["throttled"] += 1
            self._closed.wait(min(0.25, (cost - self._budget) / PARSE_BYTES_PER_S))
            self._budget, self._budget_at = 0.0, time.monotonic()
            return
        self._budget -= cost

    def _packet(self, data: bytes, sender) -> None:
        try:
            messages = [timed.message for timed in osc_packet.OscPacket(data).messages]
        except Exception as error:  # noqa: BLE001 - whatever the parser raises on hostile bytes: count and go on
            self._refuse("malformed", f"{type(error).__name__}: {error}")
            return
        if len(messages) > MAX_MESSAGES:
            self._refuse("refused", f"a bundle of {len(messages)} messages: the first {MAX_MESSAGES} used")
        for message in messages[:MAX_MESSAGES]:
            self._message(str(message.address), list(message.params), sender)

    def _message(self, address: str, args: list, sender) -> None:
        parts = address.split("/")
        if len(parts) != 4 or parts[0] or parts[1] != PREFIX:
            self._refuse("unknown address", f"{address[:80]!r}: send /{PREFIX}/{self.session}/<field> value")
            return
        if parts[2] != self.session:
            self._refuse("other session", f"{address[:80]!r}: this listener belongs to session {self.session!r}")
            return
        try:
            change = self.offer(change_body(parts[3], args))
        except (ValueError, LookupError, OverflowError) as error:
            self._refuse("refused", f"{address[:80]}: {error}")
            return
        self.counts["accepted"] += 1
        log.info("StreamV2V session %r: live change requested over OSC from %s: %s", self.session, sender[0],
                 change.describe())

    def _refuse(self, what: str, detail: str) -> None:
        self.counts[what] += 1
        self.last_error = f"{what}: {detail}"
        self._warn()

    def _warn(self, force: bool = False) -> None:
        """At most one warning per ``WARN_EVERY_S``: what was refused since the last one (a flood logs little)."""
        now = time.monotonic()
        if not force and now - self._warned_at < WARN_EVERY_S:
            return
        new = {k: self.counts[k] - self._warned_counts[k] for k in REFUSALS if self.counts[k] > self._warned_counts[k]}
        if new:
            log.warning("StreamV2V session %r: OSC messages refused: %s (last: %s)", self.session,
                        ", ".join(f"{n} {what}" for what, n in new.items()), self.last_error)
        self._warned_at, self._warned_counts = now, collections.Counter(self.counts)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
