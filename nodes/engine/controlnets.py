"""ControlNets in a stream: this run's copies of the conditioning's ControlNet chains, and per-row strength.

The user's ControlNet objects are never changed: a run works on its own copies (``ControlCopies``),
one chain per set of active ControlNets, with ComfyUI's per-call timestep check turned off
(which rows a ControlNet acts on is decided on the host from each row's step, without a device
read). A frame's own strength (a live control scale) and a ControlNet that is off at a row's
step are per-row factors on the ControlNet outputs (``RowControl``), so one model call serves
rows with different strengths: no call is split for them.
"""
from __future__ import annotations

from ...streamv2v_core.bank.state import model_state
from ...streamv2v_core.registry import Registry
from ...streamv2v_core.stream.device_values import DeviceValues

# Set by a ControlNet's pre_run on the run's originals; a copy made afterwards needs them too.
_RUNTIME_ATTRS = ("control_model", "control_model_wrapped", "model_sampling_current", "t2i_model")
_COPIES_KEPT = 8  # distinct sets of active ControlNets kept per run
_FACTORS = DeviceValues("ControlNet strength")  # per-row factors on the device, by value (no sync)


def chain(control) -> list:
    """A ControlNet and every one it was applied on top of, head first."""
    out = []
    while control is not None:
        out.append(control)
        control = control.previous_controlnet
    return out


class ControlCopies:
    """This run's copies of ``controls`` (every ControlNet of the run's conditioning), by active set.

    ``for_active(active)`` maps ``id(original)`` to its copy, relinked past the inactive ones (None
    where nothing of a chain is active). Copies keep their original's strength; the per-row factor
    scales them (``RowControl``).
    """

    def __init__(self, controls: list):
        self.controls = controls
        self._sets: Registry[dict] = Registry("ControlNet copy set", _COPIES_KEPT, "lru", close=_release,
                                              register=False)

    def for_active(self, active: tuple) -> dict:
        return self._sets.get_or_create(repr(active), lambda: self._make(active))

    def _make(self, active: tuple) -> dict:
        on = {id(c) for c, is_on in zip(self.controls, active) if is_on}
        memo: dict[int, object] = {}
        for control in self.controls:
            self._copy_chain(control, on, memo)
        return memo

    def _copy_chain(self, control, on: set, memo: dict):
        if control is None:
            return None
        if id(control) in memo:
            return memo[id(control)]
        below = self._copy_chain(control.previous_controlnet, on, memo)
        if id(control) not in on:
            memo[id(control)] = below
            return below
        copy = control.copy()
        for attr in _RUNTIME_ATTRS:
            if getattr(copy, attr, None) is None and getattr(control, attr, None) is not None:
                setattr(copy, attr, getattr(control, attr))
        copy.timestep_range = None  # decided per row on the host: no device read per call
        copy.previous_controlnet = below
        memo[id(control)] = copy
        return copy

    def close(self) -> None:
        """Drop the copies and their scaled hints."""
        self._sets.clear_all()


def _release(copies: dict) -> None:
    for copy in {id(c): c for c in copies.values() if c is not None}.values():
        copy.cond_hint = None


class RowControl:
    """APPLY_MODEL wrapper: multiplies each row's ControlNet outputs by its factor (``RowPlan.control``).

    Runs only for calls whose plan has factors other than 1 (a live strength, a ControlNet off at some
    rows' steps); the factors repeat for each cond/uncond chunk of the call.
    """

    def __call__(self, executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        plan = model_state(transformer_options).plan
        like = next((c for outputs in (control or {}).values() for c in outputs if c is not None), None)
        if like is not None and plan is not None and plan.control is not None:
            factors = _FACTORS.rows(plan.control * (x.shape[0] // len(plan.control)), like, 4)
            control = {kind: [None if c is None else c * factors for c in outputs] for kind, outputs in control.items()}
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
