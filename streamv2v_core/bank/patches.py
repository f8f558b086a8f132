"""EA and FF as ComfyUI transformer patches (plain callables, no ComfyUI import).

ComfyUI's ``BasicTransformerBlock`` calls

* ``attn1_patch(n, context, value, extra_options) -> (n, context, value)`` before the
  self-attention's q/k/v projections, and
* ``attn1_output_patch(out, extra_options) -> out`` on its output (after ``to_out``,
  before the residual add).

``extra_options`` carries ``block`` (e.g. ``("output", 3)``), ``block_index`` (the
transformer within that block), ``original_shape`` (the latent ``[B, C, H, W]``) and
whatever the caller put into ``transformer_options``: here the pack's ``ModelState``
(``state.py``) with the ``BankCall`` of each bank for this model call (made by the driver's
wrapper before the UNet runs, flushed after it). Patch objects are immutable (a bank handle
and settings): ComfyUI 0.3.x deep-copies them on ``clone()`` and 0.38.x shares them between
clones, and both are safe. Per-call state never lives in them.

``MaskedAttention`` speaks the third protocol: ComfyUI's attention functions hand themselves
to ``transformer_options["optimized_attention_override"](func, q, k, v, heads, ...)`` if one is
set (every backend, ComfyUI 0.3.75 and newer). It passes the mask of a masked EA extension to
the attention call that follows it, whatever backend the user runs.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from ..log_once import warn_once
from .calls import BankCall
from .registry import BANKS, BankHandle
from .state import model_state

log = logging.getLogger("streamv2v")

ALL = "all"
DECODER = "decoder"
LOW_RES_DECODER = "low-res decoder"
BLOCK_CHOICES = (ALL, DECODER, LOW_RES_DECODER)
OVERRIDE_KEY = "optimized_attention_override"  # ComfyUI's transformer_options slot for an attention wrapper


def resolution_level(tokens: int, original_shape) -> int | None:
    """How many times the latent was halved to get ``tokens`` tokens (0 = full size)."""
    if original_shape is None or len(original_shape) < 4:
        return None
    ratio = original_shape[-2] * original_shape[-1] / tokens
    if ratio < 1:
        return None
    return round(math.log2(ratio) / 2)


def step_of(sigma: float, sample_sigmas) -> int:
    """Index of the schedule step nearest ``sigma`` (host floats: call it with values already read)."""
    return min(range(len(sample_sigmas)), key=lambda i: abs(float(sample_sigmas[i]) - float(sigma)))


def bank_call(extra_options: dict, name: str, patch: str) -> BankCall | None:
    """This model call's ``BankCall`` for bank ``name``; warns once if the driver's wrapper did not run."""
    calls = model_state(extra_options).calls
    if not calls:
        warn_once(f"StreamV2V {patch}: this model call carries no bank state (ComfyUI did not run the bank's "
                  f"apply_model wrapper); the bank is not used. Please report your ComfyUI version.")
        return None
    return calls.get(name)


def layer_of(extra_options: dict) -> tuple:
    """``(block kind, block id, transformer index)``: one self-attention layer."""
    block = extra_options.get("block") or ("?", 0)
    return (block[0], int(block[1]), int(extra_options.get("block_index", 0)))


def selected(blocks: str, call: BankCall, extra_options: dict, tokens: int, patch: str) -> bool:
    """Whether this call's block is one the patch applies to.

    "low-res decoder" is the middle block and the output blocks at the two lowest
    resolution levels, found from the activation size: the middle block is the deepest
    level, and every forward pass visits the encoder and middle blocks (which record the
    deepest level in the call) before the output blocks.
    """
    block, shape = extra_options.get("block"), extra_options.get("original_shape")
    if block is None or shape is None:
        missing = " and ".join(k for k, v in (("block", block), ("original_shape", shape)) if v is None)
        warn_once(f"StreamV2V {patch}: ComfyUI did not pass {missing} to the attention patches, so the "
                  f"{blocks!r} block choice cannot be applied; " +
                  ("every block is used." if blocks == ALL else "this patch is skipped."))
        return blocks == ALL
    kind = block[0]
    level = resolution_level(tokens, shape)
    hw = tuple(shape[-2:])
    if level is not None and kind in ("input", "middle"):
        call.note_level(hw, level)
    if blocks == ALL:
        return True
    if blocks == DECODER:
        return kind in ("middle", "output")
    if kind == "middle":
        return True
    if kind != "output" or level is None:
        return False
    return level >= call.deepest.get(hw, level) - 1


def _check_blocks(blocks: str) -> None:
    if blocks not in BLOCK_CHOICES:
        raise ValueError(f"blocks must be one of {BLOCK_CHOICES}, got {blocks!r}")


@dataclass(frozen=True)
class ExtendedAttention:
    """``attn1_patch``: self-attention also attends to the banked tokens (eq. 1).

    Extends the context and value with each row's banked attention inputs and stages this
    call's own context for writing. Only the key/value side is extended (the query ``n``
    passes through), so other packs' patches before or after this one keep working.
    """

    handle: BankHandle
    blocks: str = ALL

    def __post_init__(self):
        _check_blocks(self.blocks)

    def __call__(self, n, context, value, extra_options):
        call = bank_call(extra_options, self.handle.name, "Extended Attention")
        if call is None or not selected(self.blocks, call, extra_options, context.shape[1], "Extended Attention"):
            return n, context, value
        layer = layer_of(extra_options)
        extended = call.extend(layer, context)
        if extended is None:
            return n, context, value
        if value is context:
            return n, extended, extended
        # Another patch changed the value side: extend it alike (padding rows with its own values).
        values = call.extend_values(layer, value)
        return n, extended, values

    def to(self, device):
        """Follow ComfyUI's model offloading (device only: a dtype is ignored)."""
        bank = BANKS.find(self.handle.name)
        if bank is not None:
            bank.to(device)
        return self


@dataclass(frozen=True)
class FeatureFusion:
    """``attn1_output_patch``: fuse each output token with its nearest banked token (eq. 2)."""

    handle: BankHandle
    blocks: str = LOW_RES_DECODER
    alpha: float = 0.75
    threshold: float = 0.9

    def __post_init__(self):
        _check_blocks(self.blocks)
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"feature fusion alpha must be in [0, 1], got {self.alpha}")
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"feature fusion threshold is a cosine similarity in [-1, 1], got {self.threshold}")

    def __call__(self, out: torch.Tensor, extra_options):
        call = bank_call(extra_options, self.handle.name, "Feature Fusion")
        if call is None or not selected(self.blocks, call, extra_options, out.shape[1], "Feature Fusion"):
            return out
        return call.fuse(layer_of(extra_options), out, self.alpha, self.threshold)

    to = ExtendedAttention.to


@dataclass(frozen=True)
class MaskedAttention:
    """``optimized_attention_override``: the attention after a masked EA extension gets its mask.

    previous: the override that was set before (another pack's), called in turn; else ComfyUI's own
    attention function. Calls of other attentions (cross-attention, unpatched layers) pass unchanged.
    """

    previous: object = None

    def __call__(self, func, *args, **kwargs):
        masks = model_state(kwargs.get("transformer_options")).masks
        if masks is not None and len(args) >= 3:
            k = args[1]
            mask = masks.take(k.shape[-2] if kwargs.get("skip_reshape") else k.shape[1], k.shape[0])
            if mask is not None:
                args, kwargs = _with_mask(args, kwargs, mask)
        if self.previous is not None:
            return self.previous(func, *args, **kwargs)
        return func(*args, **kwargs)


def _with_mask(args: tuple, kwargs: dict, mask: torch.Tensor) -> tuple[tuple, dict]:
    """The attention arguments with ``mask`` (additive, ``[R, 1, 1, N]``) added to any mask they carry."""
    given = args[4] if len(args) > 4 else kwargs.get("mask")
    if given is not None:  # never the case for ComfyUI's self-attention; combined exactly if it comes
        mask = torch.where(given, mask, float("-inf")) if given.dtype == torch.bool else mask + given
    if len(args) > 4:
        return args[:4] + (mask,) + args[5:], kwargs
    return args, {**kwargs, "mask": mask}
