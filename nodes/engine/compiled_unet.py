"""The stream engine's compiled UNet path: ``torch.compile`` of the diffusion model, in one of three modes.

Modes (the nodes' ``compile`` input):

* ``off``: the UNet runs eagerly (ComfyUI's usual path).
* ``default``: inductor's default mode (fused kernels; Python still launches each graph).
* ``CUDA graphs``: inductor's ``reduce-overhead`` mode: each compiled graph is recorded as a CUDA graph
  and replayed with one launch, inputs copied into its static buffers. It runs ``default`` instead, with one
  log line saying why and what to change, where inductor's CUDA-graph trees cannot run: a device that is not
  CUDA, ComfyUI's default cudaMallocAsync allocator (the trees check their memory pool in a way that
  allocator does not implement: ``--disable-cuda-malloc``), a model ComfyUI loaded partially (low VRAM, or
  newer ComfyUI's dynamic VRAM: weights move during the forward). A saved workflow runs everywhere.

Saved workflows from before the modes had a boolean: True means ``default``, False ``off``.

Where it runs: ``CompiledUNet`` (APPLY_MODEL) decides per call and runs a compiled call on one compile thread
(``compile_thread.py``), so ComfyUI's Cancel takes effect while a compile runs; ``CompiledForward``
(DIFFUSION_MODEL) runs the forward's compiled function there. Both are refused, with a log line, when the
model already goes through ComfyUI's own ``TorchCompileModel`` wrapper: two compiles never stack.

Errors: an out-of-memory error, ComfyUI's interrupt and ``KeyboardInterrupt`` propagate exactly as without
compile (also when a compile error wraps them). After any other error of a compiled call (a compile error:
no C++ compiler or Triton, an op the backend cannot lower; a CUDA-graph replay error; the recompile limit)
the call is run again eagerly, so the frame is made and an error that is the model's own is raised by the
eager call as it would be uncompiled. Only when the eager call succeeds is compiling turned off (one log
line with the error's type), and the show goes on uncompiled.

Compiled functions are shared by every stream (the forward's function, with the model as an argument), so a
new run, e.g. one frame per Auto Queue prompt, reuses the graphs instead of compiling again. ComfyUI's Free
memory releases them with their CUDA-graph memory pools (``release_compiled``).
"""
from __future__ import annotations

import concurrent.futures
import logging
import threading
import weakref
from dataclasses import dataclass
from typing import Callable

import torch

import comfy.model_management
import comfy.patcher_extension

from ...streamv2v_core.bank.state import model_state
from ...streamv2v_core.log_once import forget_warnings
from ...streamv2v_core.log_once import warn_once as _log_once
from .compile_thread import CompileThread

log = logging.getLogger("streamv2v")

COMPILE_KEY = "streamv2v.compile"
RUN_COMPILED_KEY = "streamv2v.compiled_call"  # transformer_options: a compiled call's ``_Request``
CORE_COMPILE_KEY, CORE_COMPILE_OPTIONS = "torch.compile", "torch_compile_kwargs"  # comfy_api.torch_helpers
COMPILE_BACKEND = "inductor"  # tests use "eager" (dynamo tracing only, no code generation)
OFF, DEFAULT, CUDA_GRAPHS = "off", "default", "CUDA graphs"
COMPILE_MODES = (OFF, DEFAULT, CUDA_GRAPHS)
INDUCTOR_MODES = {DEFAULT: None, CUDA_GRAPHS: "reduce-overhead"}
# Graph variants one stream needs (see README "Compiled path"): dynamo's default limit of 8 per code
# object would silently send the rest of a stream back to eager Python, so the compiled call raises it
# (and, where torch can, turns hitting it into an error: the layout runs eagerly with a log line).
RECOMPILE_LIMIT = 32
CUDA_MALLOC_MESSAGE = (
    "StreamV2V compile: CUDA graphs cannot run with the cudaMallocAsync allocator, which ComfyUI turns on by "
    "default (inductor's CUDA-graph trees need PyTorch's native allocator), so the UNet is compiled in "
    "'default' mode instead; start ComfyUI with --disable-cuda-malloc to use CUDA graphs")
LOWVRAM_MESSAGE = (
    "StreamV2V compile: CUDA graphs need the whole model on the GPU, but ComfyUI loaded it partially (low "
    "VRAM: weights move during the forward), so the UNet is compiled in 'default' mode instead; free VRAM "
    "(a smaller model, fewer models loaded) or start ComfyUI with --highvram to use CUDA graphs")
DYNAMIC_VRAM_MESSAGE = (
    "StreamV2V compile: CUDA graphs need the model's weights to stay in place, but ComfyUI loads this model "
    "with dynamic VRAM (weights stream in during the forward), so the UNet is compiled in 'default' mode "
    "instead")
LIMIT_MESSAGE = (
    f"StreamV2V compile: the UNet has {RECOMPILE_LIMIT} compiled graph variants (dynamo's recompile limit), so "
    f"call layouts met from now on run uncompiled while the compiled ones keep running; ComfyUI's Free memory "
    f"releases every graph and starts the count again")
CORE_COMPILE_MESSAGE = (
    "StreamV2V compile: the model already goes through ComfyUI's TorchCompileModel node, so StreamV2V's "
    "compile setting ('{mode}') is skipped (two compiles must not stack); remove TorchCompileModel to use "
    "StreamV2V's compile modes, or set compile to off to keep TorchCompileModel")


def compile_mode(value) -> str:
    """The compile mode for a node input or setting: a mode name, or a saved workflow's boolean."""
    if value is None or value is False:
        return OFF
    if value is True:
        return DEFAULT
    if isinstance(value, str):
        for mode in COMPILE_MODES:
            if value.strip().lower() == mode.lower():
                return mode
        if value.strip().lower() in ("true", "false"):
            return DEFAULT if value.strip().lower() == "true" else OFF
    raise ValueError(f"compile must be one of {COMPILE_MODES} (or a saved workflow's true/false), got {value!r}")


def device_mode(mode: str, device, model=None) -> str:
    """The mode that runs on ``device`` for ``model`` (a ModelPatcher, optional): ``CUDA graphs`` becomes
    ``default`` where inductor's CUDA-graph trees cannot run (see module doc), with one log line."""
    mode = compile_mode(mode)
    if mode != CUDA_GRAPHS:
        return mode
    if torch.device(device).type != "cuda":
        _log_once(f"StreamV2V compile: CUDA graphs need a CUDA device; the model runs on "
                  f"'{torch.device(device).type}', so the UNet is compiled in 'default' mode instead")
        return DEFAULT
    blocker = cuda_graphs_blocker(model)
    if blocker is not None:
        _log_once(blocker)
        return DEFAULT
    return mode


def cuda_graphs_blocker(model=None) -> str | None:
    """Why inductor's CUDA-graph trees cannot run on this CUDA machine with ``model``, or None.

    The allocator is read from torch (``PYTORCH_CUDA_ALLOC_CONF``, which ComfyUI's ``cuda_malloc.py`` sets
    before torch is imported); a partial (low VRAM) load is only known at call time (``CompiledUNet``).
    """
    try:
        backend = torch.cuda.get_allocator_backend()
    except (AttributeError, RuntimeError):  # a torch without it, or without CUDA: the native allocator
        backend = "native"
    if backend == "cudaMallocAsync":
        return CUDA_MALLOC_MESSAGE
    is_dynamic = getattr(model, "is_dynamic", None)
    if callable(is_dynamic) and is_dynamic():
        return DYNAMIC_VRAM_MESSAGE
    return None


def compile_error_types() -> tuple[type, ...]:
    """Exception types that mean "compiling failed" (never the model's own errors; see module doc)."""
    import torch._dynamo.exc
    import torch._inductor.exc

    kinds = [torch._dynamo.exc.TorchDynamoException]  # BackendCompilerFailed, InductorError, Unsupported, ...
    kinds += [getattr(torch._inductor.exc, name) for name in ("CppCompileError", "InvalidCxxCompiler",
                                                              "LoweringException", "OperatorIssue")
              if isinstance(getattr(torch._inductor.exc, name, None), type)]
    return tuple(kinds)


def _chain(error: BaseException | None):
    """``error`` and what it wraps (dynamo's ``inner_exception``, ``__cause__``), outermost first."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = getattr(error, "inner_exception", None) or error.__cause__


def propagating_cause(error: BaseException) -> BaseException | None:
    """An out-of-memory error or ComfyUI interrupt that a compile error wraps, if any (followed to its root)."""
    propagate = (comfy.model_management.OOM_EXCEPTION, torch.OutOfMemoryError,
                 comfy.model_management.InterruptProcessingException)
    return next((e for e in _chain(error) if isinstance(e, propagate) and not isinstance(e, compile_error_types())),
                None)


def _recompile_limit_hit(error: BaseException) -> bool:
    """Whether ``error`` (or what it wraps) is dynamo's "recompile limit hit" (``fail_on_recompile_limit_hit``)."""
    return any(type(e).__name__ == "FailOnRecompileLimitHit" for e in _chain(error))


_lock = threading.Lock()  # the compiled functions and per-model states (the compile thread and the caller's)


@dataclass
class CompileStats:
    """What the compiled path did since the last release (``bench/gpu_check.py`` reports it per row)."""

    compiled: int = 0  # UNet calls that ran the compiled forward
    eager: int = 0  # calls it ran eagerly: a layout's first call, a mode that failed, a compile still running
    fallbacks: int = 0  # compiled calls that raised and were run again eagerly


class _Compiled:
    """One diffusion model's call layouts met so far, and the modes that failed on it (and why)."""

    def __init__(self):
        self.failed: dict[tuple, str] = {}
        self.seen: set[tuple] = set()  # (key, call layout) met so far (see ``call_layout``)
        self.uncompiled: set[tuple] = set()  # (key, call layout) past dynamo's recompile limit: eager


_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, _Compiled]" = weakref.WeakKeyDictionary()
_FUNCTIONS: dict[tuple, Callable] = {}  # (forward function, backend, mode) -> its torch.compile
STATS = CompileStats()
COMPILER = CompileThread()


def _state(module: torch.nn.Module) -> _Compiled:
    with _lock:
        return _CACHE.setdefault(module, _Compiled())


def forget_compiled() -> None:
    """Forget every compiled function, met layout, failure, logged line and count (tests; a changed backend)."""
    with _lock:
        _CACHE.clear()
        _FUNCTIONS.clear()
        STATS.compiled = STATS.eager = STATS.fallbacks = 0
    forget_warnings()


def release_compiled(reason: str) -> "concurrent.futures.Future | None":
    """Drop the compiled graphs and their memory (ComfyUI's Free memory): dynamo's caches, and inductor's
    CUDA-graph trees with their memory pools, reset on the thread that holds them. Returns the reset's future
    when anything had been compiled since the last release (else None: nothing is reset); it is queued behind
    a compile still running, so a caller may wait for it with a bound, never for ever. The next compiled run
    compiles again."""
    with _lock:
        compiled = bool(_FUNCTIONS)
    forget_compiled()
    if not compiled:
        return None
    log.info("StreamV2V: %s released the compiled UNet graphs", reason)
    return COMPILER.submit(_reset_compiled)


def _reset_compiled() -> None:
    import torch._dynamo

    torch._dynamo.reset()  # also resets this thread's CUDA-graph trees when CUDA is initialised
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _dynamo_limits() -> dict:
    """Dynamo settings for a compiled call: graph variants a stream may need (``RECOMPILE_LIMIT``), and, where
    this torch has the switch, an error instead of silently running eagerly past the limit."""
    import torch._dynamo.config

    limits = {"recompile_limit": RECOMPILE_LIMIT}
    if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
        limits["fail_on_recompile_limit_hit"] = True
    return limits


class _Request:
    """A compiled call's request to ``CompiledForward`` (in ``transformer_options``): which compile, and
    whether the diffusion model's forward reached it (one that has no wrapper point never does)."""

    def __init__(self, backend, mode: str):
        self.backend, self.mode, self.ran = backend, mode, False


class CompiledUNet:
    """APPLY_MODEL wrapper: decides per UNet call whether the compiled forward runs, and runs it on the
    compile thread (``compile_thread.py``: Cancel never waits for a compile).

    The bank's per-call wrapper (``BankCall``) runs outside, so the compiled region holds only the UNet
    forward with the bank patches inside, which read per-call layout integers that are constant in
    steady state. mode: ``default`` or ``CUDA graphs`` (already resolved for the device by ``device_mode``).
    """

    def __init__(self, mode: str = DEFAULT, backend=None):
        self.mode = compile_mode(mode)
        self.backend = backend or COMPILE_BACKEND

    def _key(self, base) -> tuple:
        mode = self.mode
        if mode == CUDA_GRAPHS and getattr(base, "model_lowvram", False):
            _log_once(LOWVRAM_MESSAGE)
            mode = DEFAULT
        return (self.backend, mode)

    def __call__(self, executor, *args, **kwargs):
        base = executor.class_obj
        entry = _state(base.diffusion_model)
        key = self._key(base)
        layout = (key, call_layout(args, kwargs))
        if key in entry.failed or layout in entry.uncompiled or layout not in entry.seen or COMPILER.busy():
            # A layout met for the first time runs eagerly: the pipeline's filling and draining calls (each
            # layout once a run) do not stall the stream for a graph they would use once; it compiles when
            # it comes back (the steady state from its second call, a later run's filling and draining).
            entry.seen.add(layout)
            STATS.eager += 1
            return executor(*args, **kwargs)
        request = _Request(*key)
        try:
            out = COMPILER.run(lambda: _compiled_call(executor, request, args, kwargs))
        except Exception as error:  # noqa: BLE001 - sorted below: propagated, or the eager call decides
            cause = propagating_cause(error)
            if cause is not None:
                raise cause from None  # out of memory / interrupt: as the eager call would raise it
            failure = error
        else:
            if request.ran:
                STATS.compiled += 1
            else:  # it ran eagerly: this model's forward has no wrapper point to compile
                STATS.eager += 1
                self._give_up(entry, key, RuntimeError(f"{type(base.diffusion_model).__name__}'s forward has "
                                                       f"no DIFFUSION_MODEL wrapper point"))
            return out
        # Outside the except clause, so that an error of the model itself is raised exactly as uncompiled
        # (not chained). The patches' per-call state is only staged, so running again is safe; compiling is
        # given up only once the eager call has succeeded: any error of a compiled call that the eager call
        # does not raise (a compile error, a CUDA-graph replay error, ...) turns compiling off, not the show.
        STATS.fallbacks += 1
        out = executor(*args, **kwargs)
        if _recompile_limit_hit(failure):  # this layout stays eager; the graphs compiled so far are kept
            entry.uncompiled.add(layout)
            _log_once(LIMIT_MESSAGE)
        else:
            self._give_up(entry, key, failure)
        return out

    def _give_up(self, entry: _Compiled, key: tuple, error: BaseException) -> None:
        reason = _describe(error)
        inner = getattr(error, "inner_exception", None) or error.__cause__
        if inner is not None:
            reason += f", caused by {_describe(inner)}"
        entry.failed[key] = reason
        _log_once(f"StreamV2V compile ({key[1]}): compiling the UNet failed ({reason}); the stream runs "
                  f"uncompiled from here on (the same frames, eager speed)")


def _compiled_call(executor, request: _Request, args: tuple, kwargs: dict):
    """On the compile thread: the APPLY_MODEL call with ``request`` in its transformer options."""
    args, kwargs = list(args), dict(kwargs)
    if len(args) > 5:
        args[5] = {**(args[5] or {}), RUN_COMPILED_KEY: request}
    else:
        kwargs["transformer_options"] = {**(kwargs.get("transformer_options") or {}), RUN_COMPILED_KEY: request}
    with torch._dynamo.config.patch(**_dynamo_limits()):
        return executor(*args, **kwargs)


class CompiledForward:
    """DIFFUSION_MODEL wrapper: runs the diffusion model's forward through ``torch.compile`` when the call
    carries a request (``CompiledUNet``), else passes through.

    The compiled function is the forward's function (``_forward``), shared by every model of its class and
    called with the model as its first argument: no model attribute is swapped, so a call abandoned on the
    compile thread cannot leak a compiled module into other calls, and the cache keeps no model alive.
    """

    def __call__(self, executor, *args, **kwargs):
        options = (args[5] if len(args) > 5 else kwargs.get("transformer_options")) or {}
        request = options.get(RUN_COMPILED_KEY)
        function = getattr(executor.original, "__func__", None)
        if request is None or function is None or executor.idx + 1 != len(executor.wrappers):
            return executor(*args, **kwargs)  # no request, or wrappers after this one: eager
        compiled = _compiled_function(function, request.backend, request.mode)
        request.ran = True
        return compiled(executor.class_obj, *args, **kwargs)


def _compiled_function(function: Callable, backend, mode: str) -> Callable:
    key = (function, backend, mode)
    with _lock:
        compiled = _FUNCTIONS.get(key)
    if compiled is None:
        options = {} if backend != "inductor" else {"mode": INDUCTOR_MODES[mode]}
        compiled = torch.compile(function, backend=backend, dynamic=False, **options)
        with _lock:
            _FUNCTIONS[key] = compiled
    return compiled


def call_layout(args: tuple, kwargs: dict) -> tuple:
    """What tells a UNet call's graph apart, from host values only: the latent's shape and dtype, the stream
    engine's rows (steps and steps per frame), the cond/uncond chunks and whether a ControlNet is attached.

    args, kwargs: ``BaseModel.apply_model``'s ``(x, t, c_concat, c_crossattn, control, transformer_options)``.
    The bank's fill level is not in it: a call whose bank is still filling (once per stream) and the steady
    calls after it share a layout, so it is the second, steady call that compiles.
    """
    x = args[0] if args else kwargs.get("x")
    control = args[4] if len(args) > 4 else kwargs.get("control")
    options = (args[5] if len(args) > 5 else kwargs.get("transformer_options")) or {}
    plan = model_state(options).plan
    rows = (tuple(plan.steps), plan.total_steps) if plan is not None else None
    return (tuple(x.shape), x.dtype, rows, tuple(options.get("cond_or_uncond") or ()), control is not None)


def _describe(error: BaseException) -> str:
    """'module.Type: first line of the message' (at most 300 characters)."""
    text = str(error).strip()
    return f"{type(error).__module__}.{type(error).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def attention_warning(attention=None) -> str | None:
    """Why ComfyUI's attention backend will break the compiled graph, or None (SDPA, xformers, sage, ...).

    attention: the function ``comfy.ldm.modules.attention.optimized_attention`` (read when None). ComfyUI's
    sub-quadratic and split attention (its default on a CPU, or when PyTorch attention is off) loop over
    chunks in Python and ask psutil for free memory: dynamo breaks the graph there and recompiles per shape.
    """
    import comfy.ldm.modules.attention as attention_module

    attention = attention or attention_module.optimized_attention
    loops = {attention_module.attention_sub_quad: "sub-quadratic", attention_module.attention_split: "split"}
    name = loops.get(attention)
    if name is None:
        return None
    return (f"StreamV2V compile: ComfyUI runs its {name} cross attention here, whose Python chunk loop breaks "
            f"the compiled graph into hundreds of pieces and recompiles per shape (measured 2-3x slower than "
            f"uncompiled); start ComfyUI with --use-pytorch-cross-attention (or xformers) to compile the UNet")


def core_compile_present(model) -> bool:
    """Whether ``model`` (a ModelPatcher) goes through core ComfyUI's ``TorchCompileModel`` wrapper
    (``comfy_api.torch_helpers.set_torch_compile_wrapper``, 0.3.75 and newer)."""
    wrappers = model.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, CORE_COMPILE_KEY)
    return bool(wrappers) or CORE_COMPILE_OPTIONS in model.model_options


def install_compile(model, mode) -> str:
    """Put the compiled path for ``mode`` on ``model`` (the engine's own clone); returns the mode that runs.

    ``off`` installs nothing; a model compiled by core's ``TorchCompileModel`` keeps only that compile.
    """
    mode = device_mode(mode, model.load_device, model)
    if mode != OFF and core_compile_present(model):
        _log_once(CORE_COMPILE_MESSAGE.format(mode=mode))
        mode = OFF
    for kind in (comfy.patcher_extension.WrappersMP.APPLY_MODEL, comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL):
        model.remove_wrappers_with_key(kind, COMPILE_KEY)
    if mode == OFF:
        return mode
    warning = attention_warning()
    if warning:
        _log_once(warning)
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, COMPILE_KEY, CompiledUNet(mode))
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, COMPILE_KEY, CompiledForward())
    return mode
