"""The one bounded registry behind banks, browser sessions, frame cursors (streamv2v_core/registry.py)."""
import threading

import pytest

from host.waiting import join
from streamv2v.streamv2v_core.bank.feature_bank import BankConfig
from streamv2v.streamv2v_core.bank.registry import MAX_BANKS, BankHandle, BankRegistry, check_bank_name
from streamv2v.streamv2v_core.registry import Registry, RegistryFull, clear_all_registries


def test_lru_drops_the_least_recently_used_idle_entry_and_closes_it():
    closed = []
    reg = Registry("thing", 3, "lru", close=closed.append, busy=lambda v: v == "busy", register=False)
    reg.put("a", "busy")
    for name in "bcd":
        reg.put(name, name)
    assert reg.names() == ["a", "c", "d"] and closed == ["b"]  # "a" is busy: never dropped
    reg.get("c")  # used: "d" is now the oldest idle entry
    reg.put("e", "e")
    assert reg.names() == ["a", "c", "e"] and closed == ["b", "d"]
    assert reg.find("zzz") is None and len(reg) == 3  # finding creates nothing


def test_refuse_policy_and_all_busy_say_what_to_do():
    reg = Registry("widget", 2, "refuse", hint="Delete one first.", register=False)
    reg.put("a", 1)
    reg.put("b", 2)
    reg.put("a", 3)  # replacing a name needs no room
    with pytest.raises(RegistryFull, match="too many widgets: at most 2 .* Delete one first."):
        reg.put("c", 4)
    busy = Registry("session", 1, "lru", busy=lambda v: True, register=False)
    busy.put("x", 1)
    with pytest.raises(RegistryFull, match="at most 1"):
        busy.put("y", 2)


def test_clear_all_keeps_busy_entries_and_clear_all_registries_reaches_registered_ones(monkeypatch):
    import weakref

    from streamv2v.streamv2v_core import registry
    monkeypatch.setattr(registry, "_ALL", weakref.WeakSet())  # leave the pack's own banks and sessions alone
    closed = []
    reg = Registry("probe-kind", 4, close=closed.append, busy=lambda v: v == "running")
    reg.put("a", "idle")
    reg.put("b", "running")
    assert clear_all_registries()["probe-kind"] == 1
    assert reg.names() == ["b"] and closed == ["idle"]


def test_clear_all_never_compares_values():
    """Stream states are dataclasses holding tensors: ``==`` on them raises, and /free answered 500."""
    import torch

    from streamv2v.nodes.engine.streams import StreamState
    reg = Registry("probe-states", 4, register=False)
    for name in "ab":
        reg.put(name, StreamState(frame_data={0: torch.rand(2, 4, 4, 3)}))
    assert reg.clear_all() == 2 and not reg.names()


def test_concurrent_get_or_create_of_one_name_makes_one_value():
    """Threads asking for one name at once all get one value, made once: the look-up and the put happen under
    one lock. Without it every caller misses, makes its own value and replaces the others' (a webcam session
    made twice: the loop and the browser hold different sessions)."""
    reg = Registry("t", 8, register=False)
    callers = 4
    arrived = threading.Barrier(callers + 1, timeout=30)  # the callers and this test
    second_maker = threading.Event()
    made, got = [], {}

    def make():
        made.append(1)
        if len(made) > 1:
            second_maker.set()
        # The first maker keeps the window open: under the lock nobody else can get here; without it the
        # others (already past the barrier, one dictionary look-up away) arrive within microseconds.
        second_maker.wait(0.5)
        return object()

    def work(i):
        arrived.wait()
        got[i] = reg.get_or_create("shared", make)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(callers)]
    for t in threads:
        t.start()
    arrived.wait()
    for i, t in enumerate(threads):
        join(t, 30, f"get_or_create caller {i}")
    assert len(made) == 1, f"{len(made)} values made for one name by {callers} concurrent callers"
    assert len(got) == callers and all(value is reg.find("shared") for value in got.values())


def test_get_or_create_stays_bounded_and_closes_every_value_it_drops_under_threads():
    closed = []
    reg = Registry("t", 8, close=closed.append, register=False)
    made = []

    def make():
        value = object()
        made.append(value)
        return value

    def work(i):
        for j in range(200):
            reg.get_or_create(f"n{(i * 7 + j) % 20}", make)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    for i, t in enumerate(threads):
        join(t, 60, f"worker {i}")
    assert len(reg) == 8
    kept = reg.values()
    assert len(made) == len(closed) + len(kept)  # every value made is either kept or was closed, once
    assert {id(v) for v in made} == {id(v) for v in closed} | {id(v) for v in kept}


def test_banks_are_bounded_and_finding_a_bank_never_resets_it():
    reg = BankRegistry(limit=3)
    for i in range(5):
        reg.open(f"b{i}", BankConfig())
    assert reg.names() == ["b2", "b3", "b4"] and MAX_BANKS == 64
    import streamv2v.streamv2v_core.bank.registry as bank_mod
    bank_mod.BANKS.remove("shared")
    a, b = BankHandle("shared", BankConfig(size=1)), BankHandle("shared", BankConfig(size=2))
    bank = a.open()
    bank.frames_seen = 5
    assert bank_mod.BANKS.find("shared") is bank and bank.frames_seen == 5  # no reset on looking
    assert b.open().frames_seen == 0 and bank.config.size == 2  # a run with b's settings: cleared, with the reason
    assert "size 1 -> 2" in bank.last_reset_reason
    bank_mod.BANKS.remove("shared")


@pytest.mark.parametrize("name", ["", "   ", "x" * 201, "evil\nStreamV2V bank 'x' cleared: forged", "tab\there"])
def test_bank_names_that_cannot_be_cleared_or_logged_safely_are_refused(name):
    with pytest.raises(ValueError, match="is not allowed: use 1 to 200 printable characters"):
        check_bank_name(name)
    assert check_bank_name("  my bank é ") == "my bank é"


def test_signatures_never_take_a_reused_id_for_the_same_model(monkeypatch):
    """A reloaded checkpoint often gets its predecessor's id() (CPython reuses freed memory): signatures hold weak
    references instead. Here the reuse is certain, not left to the allocator: every object gets one id."""
    import gc

    from streamv2v.nodes.engine import signatures
    from streamv2v.nodes.engine.signatures import SameObject

    monkeypatch.setattr(signatures, "id", lambda obj: 0x5EED, raising=False)  # as if each address were reused

    class Model:
        pass

    first = Model()
    kept = SameObject(first)
    assert kept == SameObject(first) and hash(kept) == hash(SameObject(first))
    del first
    gc.collect()
    reloaded = Model()
    assert hash(SameObject(reloaded)) == hash(kept)  # what a reused id gives
    assert SameObject(reloaded) != kept
    assert frozenset({("w", SameObject(reloaded))}) != frozenset({("w", kept)})
    other = Model()
    assert SameObject(other) != SameObject(reloaded)  # two living objects with one id stay apart


def test_bank_status_counts_a_running_streams_frames():
    """The status route showed frames_seen 0 until a running loop ended."""
    from streamv2v.nodes.engine.streams import STREAMS, StreamState, bank_status
    from streamv2v.streamv2v_core.bank.feature_bank import FeatureBank
    bank = FeatureBank(BankConfig(), name="live")
    STREAMS.put("bank live", StreamState(next_frame=7, bank_generation=bank.generation))  # a run on it, mid-way
    try:
        assert bank_status(bank)["frames_seen"] == 7
        bank.reset("done")  # a new generation: that stream ended
        assert bank_status(bank)["frames_seen"] == 0
    finally:
        STREAMS.remove("bank live")
