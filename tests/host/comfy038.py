"""Emulate ComfyUI 0.38's ``ModelPatcher.clone()`` on 0.3.75.

0.38 copies ``model_options`` with ``comfy.utils.deepcopy_list_dict``: dicts and lists are
copied, every other object (patch callables, wrappers, handles) is *shared* between the
clone and its source. 0.3.75 deep-copies everything. Code that keeps per-run state in a
patch object, or mutates one, behaves differently under the two; tests run both.

In-process: ``with emulate_038_clone(): ...``. In the test server: set the environment
variable ``STREAMV2V_EMULATE_COMFY_038=1`` (tests/host/test_nodes installs it at import).
"""
from __future__ import annotations

import contextlib

ENV = "STREAMV2V_EMULATE_COMFY_038"


def deepcopy_list_dict(obj, memo=None):
    """A copy of ``obj`` in which dicts and lists are new and everything else is shared."""
    memo = {} if memo is None else memo
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, dict):
        result = {deepcopy_list_dict(k, memo): deepcopy_list_dict(v, memo) for k, v in obj.items()}
    elif isinstance(obj, list):
        result = [deepcopy_list_dict(v, memo) for v in obj]
    else:
        result = obj
    memo[id(obj)] = result
    return result


def install():
    """Make ``ModelPatcher.clone`` share patch objects as 0.38 does; returns a function that undoes it."""
    import comfy.model_patcher

    cls = comfy.model_patcher.ModelPatcher
    original = cls.clone

    def clone(self, *args, **kwargs):
        n = original(self, *args, **kwargs)
        n.model_options = deepcopy_list_dict(self.model_options)
        return n

    clone.streamv2v_emulates_038 = True
    cls.clone = clone
    return lambda: setattr(cls, "clone", original)


@contextlib.contextmanager
def emulate_038_clone():
    undo = install()
    try:
        yield
    finally:
        undo()
