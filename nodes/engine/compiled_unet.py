"""The stream engine's compiled UNet path: ``torch.compile`` of the diffusion model, in one of three modes.

Modes (the nodes' ``compile`` input):

* ``off``: the UNet runs eagerly (ComfyUI's usual path).
* ``default``: inductor's default mode (fused kernels; Python still launches each graph).
* ``CUDA graphs``: inductor's ``reduce-overhead`` mode: each compiled graph is recorded as a CUDA graph
  and replayed with one launch, inputs copied into its static buffers. CUDA graphs exist on CUDA devices
  only: on any other device the stream runs in ``default`` mode and the log says why (a workflow saved on
  a GPU machine still runs on a CPU one, which a refusal would not allow).

Saved workflows from before the modes had a boolean: True means ``default``, False ``off``.

Errors: only *compile* errors (``torch._dynamo`` / ``torch._inductor`` exception types: no C++ compiler or
Triton, an op the backend cannot lower, a dynamo bug) fall back to the eager path, logged once with their
type. An out-of-memory error, ComfyUI's interrupt, ``KeyboardInterrupt`` and any error of the model itself
propagate exactly as without compile: a compile-typed error that wraps one of the first two is unwrapped
and re-raised, and after any other compile-typed error the call is run again eagerly, so an error that is
the model's own (dynamo reports shape errors found while tracing as ``TorchRuntimeError``) is raised by
the eager call as it would be uncompiled. Only when the eager call succeeds is compiling turned off.

Compiled callables are shared by every stream of one diffusion model (a weak cache), so a new run, e.g.
one frame per Auto Queue prompt, reuses the graphs instead of compiling again.
"""
from __future__ import annotations

import logging
import weakref

import torch

import comfy.model_management

from ...streamv2v_core.bank.state import model_state
from ...streamv2v_core.log_once import forget_warnings
from ...streamv2v_core.log_once import warn_once as _log_once

log = logging.getLogger("streamv2v")

COMPILE_KEY = "streamv2v.compile"
COMPILE_BACKEND = "inductor"  # tests use "eager" (dynamo tracing only, no code generation)
OFF, DEFAULT, CUDA_GRAPHS = "off", "default", "CUDA graphs"
COMPILE_MODES = (OFF, DEFAULT, CUDA_GRAPHS)
INDUCTOR_MODES = {DEFAULT: None, CUDA_GRAPHS: "reduce-overhead"}
# Graph variants one stream needs (see README "Compiled path"): dynamo's default limit of 8 per code
# object would silently send the rest of a stream back to eager Python, so the compiled call raises it.
RECOMPILE_LIMIT = 32


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


def device_mode(mode: str, device) -> str:
    """The mode that runs on ``device``: CUDA graphs need a CUDA device, elsewhere ``default`` runs."""
    mode = compile_mode(mode)
    if mode == CUDA_GRAPHS and torch.device(device).type != "cuda":
        _log_once(f"StreamV2V compile: CUDA graphs need a CUDA device; the model runs on "
                  f"'{torch.device(device).type}', so the UNet is compiled in 'default' mode instead")
        return DEFAULT
    return mode


def compile_error_types() -> tuple[type, ...]:
    """Exception types that mean "compiling failed" (never the model's own errors; see module doc)."""
    import torch._dynamo.exc
    import torch._inductor.exc

    kinds = [torch._dynamo.exc.TorchDynamoException]  # BackendCompilerFailed, InductorError, Unsupported, ...
    kinds += [getattr(torch._inductor.exc, name) for name in ("CppCompileError", "InvalidCxxCompiler",
                                                              "LoweringException", "OperatorIssue")
              if isinstance(getattr(torch._inductor.exc, name, None), type)]
    return tuple(kinds)


def propagating_cause(error: BaseException) -> BaseException | None:
    """An out-of-memory error or ComfyUI interrupt that a compile error wraps, if any (followed to its root)."""
    propagate = (comfy.model_management.OOM_EXCEPTION, torch.OutOfMemoryError,
                 comfy.model_management.InterruptProcessingException)
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, propagate) and not isinstance(error, compile_error_types()):
            return error
        error = getattr(error, "inner_exception", None) or error.__cause__
    return None


class _Compiled:
    """The compiled callables of one diffusion model, by mode, and the modes that failed (and why)."""

    def __init__(self):
        self.by_mode: dict[tuple, torch.nn.Module] = {}
        self.failed: dict[tuple, str] = {}
        self.seen: set[tuple] = set()  # call layouts met so far (see ``call_layout``)


_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, _Compiled]" = weakref.WeakKeyDictionary()


def forget_compiled() -> None:
    """Drop every cached compiled callable and failure (tests; a changed backend)."""
    _CACHE.clear()
    forget_warnings()


class CompiledUNet:
    """APPLY_MODEL wrapper: the UNet forward, with the bank patches inside, through ``torch.compile``.

    The bank's per-call wrapper (``BankCall``) runs outside this one's compiled region, and the patches
    read only per-call layout integers that are constant in steady state, so the compiled graphs are
    reused call after call (a bounded number of variants while the pipeline and the bank fill).
    mode: ``default`` or ``CUDA graphs`` (already resolved for the device by ``device_mode``).
    """

    def __init__(self, mode: str = DEFAULT, backend: str | None = None):
        self.mode = compile_mode(mode)
        self.backend = backend or COMPILE_BACKEND

    @property
    def key(self) -> tuple:
        return (self.backend, self.mode)

    def compiled_for(self, module: torch.nn.Module) -> torch.nn.Module:
        """The shared compiled callable of ``module`` for this mode (made on first use)."""
        entry = _CACHE.setdefault(module, _Compiled())
        compiled = entry.by_mode.get(self.key)
        if compiled is None:
            options = {} if self.backend != "inductor" else {"mode": INDUCTOR_MODES[self.mode]}
            compiled = torch.compile(module, backend=self.backend, dynamic=False, **options)
            entry.by_mode[self.key] = compiled
        return compiled

    def __call__(self, executor, *args, **kwargs):
        base = executor.class_obj
        original = base.diffusion_model
        entry = _CACHE.setdefault(original, _Compiled())
        layout = (self.key, call_layout(args, kwargs))
        if self.key in entry.failed or layout not in entry.seen:
            # A layout met for the first time runs eagerly: the pipeline's filling and draining calls (each
            # layout once a run) do not stall the stream for a graph they would use once; it compiles when
            # it comes back (the steady state from its second call, a later run's filling and draining).
            entry.seen.add(layout)
            return executor(*args, **kwargs)
        try:
            compiled = self.compiled_for(original)
            base.diffusion_model = compiled
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                return executor(*args, **kwargs)
        except compile_error_types() as error:
            cause = propagating_cause(error)
            if cause is not None:
                raise cause from None  # out of memory / interrupt: as the eager call would raise it
            failure = error
        finally:
            base.diffusion_model = original
        # Outside the except clause, so that an error of the model itself is raised exactly as uncompiled
        # (not chained to the compile error). The patches' per-call state is only staged, so running again
        # is safe; compiling is given up only once the eager call has succeeded.
        out = executor(*args, **kwargs)
        self._give_up(original, failure)
        return out

    def _give_up(self, module: torch.nn.Module, error: BaseException) -> None:
        reason = _describe(error)
        inner = getattr(error, "inner_exception", None) or error.__cause__
        if inner is not None:
            reason += f", caused by {_describe(inner)}"
        _CACHE.setdefault(module, _Compiled()).failed[self.key] = reason
        _log_once(f"StreamV2V compile ({self.mode}): compiling the UNet failed ({reason}); the stream runs "
                  f"uncompiled from here on (the same frames, eager speed)")


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


def compile_wrapper(mode, device) -> CompiledUNet | None:
    """The APPLY_MODEL wrapper for ``mode`` on ``device``, or None for ``off``."""
    mode = device_mode(mode, device)
    if mode == OFF:
        return None
    warning = attention_warning()
    if warning:
        _log_once(warning)
    return CompiledUNet(mode)
