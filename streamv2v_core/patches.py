"""EA and FF as ComfyUI transformer patches (plain callables, no ComfyUI import).

ComfyUI's ``BasicTransformerBlock`` calls

* ``attn1_patch(n, context, value, extra_options) -> (n, context, value)`` before the
  self-attention's q/k/v projections, and
* ``attn1_output_patch(out, extra_options) -> out`` on its output (after ``to_out``,
  before the residual add).

``extra_options`` carries ``block`` (e.g. ``("output", 3)``), ``block_index`` (the
transformer within that block), ``original_shape`` (the latent ``[B, C, H, W]``),
``cond_or_uncond`` (one flag per batch chunk, 0 = positive, 1 = negative),
``sigmas`` (one per batch row) and ``sample_sigmas`` (the run's schedule). A driver
that puts several frames in one call (the stream batch) adds ``streamv2v_frames``:
for each row of a chunk, its frame's offset from the bank's ``frames_seen``.
"""
from __future__ import annotations

import math

import torch

from .attention import extend_with_bank, feature_fusion
from .bank import BankHandle, FeatureBank

ALL = "all"
DECODER = "decoder"
LOW_RES_DECODER = "low-res decoder"
BLOCK_CHOICES = (ALL, DECODER, LOW_RES_DECODER)
FRAMES_KEY = "streamv2v_frames"  # per call: frame offset of each row of a chunk
STREAM_KEY = "streamv2v_stream"  # on a model driven by the stream sampler, which numbers frames itself


def resolution_level(tokens: int, original_shape) -> int | None:
    """How many times the latent was halved to get ``tokens`` tokens (0 = full size)."""
    if original_shape is None or len(original_shape) < 4:
        return None
    ratio = original_shape[-2] * original_shape[-1] / tokens
    if ratio < 1:
        return None
    return round(math.log2(ratio) / 2)


def step_of(sigma: float, sample_sigmas) -> object:
    """Index of the schedule step nearest ``sigma`` (the sigma itself when no schedule is known)."""
    if sample_sigmas is None or len(sample_sigmas) == 0:
        return ("sigma", round(float(sigma), 4))
    s = torch.as_tensor(sample_sigmas, dtype=torch.float64).flatten()
    return int((s - float(sigma)).abs().argmin())


def row_groups(batch: int, extra_options: dict, bank: FeatureBank) -> list[tuple[tuple, list[int], int]]:
    """Split a call's ``batch`` rows into ``(step, cond_flag)`` groups.

    Returns ``[(key_suffix, rows, frame)]`` where ``key_suffix = (step, cond_flag)``,
    ``rows`` are batch positions in that group and ``frame`` the frame they belong to.
    Rows of one group are stored side by side (``[len(rows), m, C]``).
    """
    flags = list(extra_options.get("cond_or_uncond") or [0])
    if batch % len(flags):
        flags = [0]
    per_chunk = batch // len(flags)
    sigmas = extra_options.get("sigmas")
    sigmas = [0.0] if sigmas is None else torch.as_tensor(sigmas).flatten().tolist()
    if len(sigmas) == per_chunk:  # ComfyUI passes one sigma per row of a chunk
        sigmas = sigmas * len(flags)
    elif len(sigmas) != batch:
        sigmas = [sigmas[0]] * batch
    frames = extra_options.get(FRAMES_KEY)
    frames = [bank.frames_seen + int(f) for f in (frames if frames is not None else [0] * per_chunk)]
    if len(frames) != per_chunk:
        raise ValueError(f"{FRAMES_KEY} names {len(frames)} frames for {per_chunk} rows")
    schedule = extra_options.get("sample_sigmas")
    groups: dict[tuple, tuple[list[int], int]] = {}
    for chunk, flag in enumerate(flags):
        for r in range(per_chunk):
            row = chunk * per_chunk + r
            suffix = (step_of(sigmas[row], schedule), int(flag), frames[r])
            groups.setdefault(suffix, ([], frames[r]))[0].append(row)
    return [(suffix[:2], rows, frame) for suffix, (rows, frame) in groups.items()]


class _BankPatch:
    """Shared parts of the EA and FF patches: the bank handle and block selection."""

    def __init__(self, handle: BankHandle, blocks: str):
        if blocks not in BLOCK_CHOICES:
            raise ValueError(f"blocks must be one of {BLOCK_CHOICES}, got {blocks!r}")
        self.handle = handle
        self.blocks = blocks
        self._deepest: dict[tuple, int] = {}  # latent (H, W) -> lowest resolution level seen
        self._groups: tuple | None = None  # (what they were computed from, row groups)

    def groups(self, batch: int, extra_options: dict, bank: FeatureBank) -> list:
        """``row_groups`` for this call, computed once per UNet call rather than once per layer.

        Every attention of one UNet call sees the same ``sigmas`` tensor; reading it (a GPU
        sync on CUDA) once per call keeps the patches off the critical path.
        """
        # Tensors and lists by identity (the cache holds them, so an id cannot be reused), the rest by value.
        basis = (extra_options.get("sigmas"), extra_options.get(FRAMES_KEY),
                 tuple(extra_options.get("cond_or_uncond") or ()), bank.frames_seen, batch, bank)
        cached = self._groups
        if cached is None or cached[0][0] is not basis[0] or cached[0][1] is not basis[1] \
                or cached[0][2:] != basis[2:]:
            self._groups = cached = (basis, row_groups(batch, extra_options, bank))
        return cached[1]

    def selected(self, extra_options: dict, tokens: int) -> bool:
        """Whether this call's block is one the patch applies to.

        "low-res decoder" is the middle block and the output blocks at the two
        lowest resolution levels, found from the activation size: the middle block is
        the deepest level, and every forward pass visits it before the output blocks.
        """
        block = extra_options.get("block")
        if block is None:
            return self.blocks == ALL
        kind = block[0]
        shape = extra_options.get("original_shape")
        level = resolution_level(tokens, shape)
        if level is not None and kind in ("input", "middle"):
            hw = tuple(shape[-2:])
            self._deepest[hw] = max(self._deepest.get(hw, 0), level)
        if self.blocks == ALL:
            return True
        if self.blocks == DECODER:
            return kind in ("middle", "output")
        if kind == "middle":
            return True
        if kind != "output" or level is None:
            return False
        return level >= self._deepest.get(tuple(shape[-2:]), level) - 1

    def layer(self, extra_options: dict) -> tuple:
        block = extra_options.get("block") or ("?", 0)
        return (block[0], int(block[1]), int(extra_options.get("block_index", 0)))

    def to(self, device):
        self.handle.bank.to(device)
        return self


class ExtendedAttention(_BankPatch):
    """``attn1_patch``: self-attention also attends to the banked tokens (eq. 1).

    Reads the bank for each row's (layer, step, cond) key, extends the context and
    value with it, and writes this call's own context tokens when the row's frame is an
    update frame. Other packs' patches before or after this one keep working: only
    the key/value side is extended, the query ``n`` is passed through.
    """

    def __call__(self, n, context, value, extra_options):
        if not self.selected(extra_options, context.shape[1]):
            return n, context, value
        bank = self.handle.bank
        layer = self.layer(extra_options)
        groups = self.groups(context.shape[0], extra_options, bank)
        banked: list[torch.Tensor | None] = [None] * context.shape[0]
        for suffix, rows, _ in groups:
            stored = bank.read((layer,) + suffix, "n")
            if stored is not None and stored.shape[0] == len(rows) and stored.shape[2] == context.shape[2]:
                for i, row in enumerate(rows):
                    banked[row] = stored[i]
        for suffix, rows, frame in groups:
            bank.write((layer,) + suffix, "n", context[rows], frame)
        try:
            extended = extend_with_bank(context, banked)
        except ValueError:
            return n, context, value  # token count changed under us: the bank is stale, skip it
        if extended is None:
            return n, context, value
        if value is context:
            return n, extended, extended
        extra = extended[:, context.shape[1]:]
        return n, extended, torch.cat([value, extra.to(value)], dim=1)


class FeatureFusion(_BankPatch):
    """``attn1_output_patch``: fuse each output token with its nearest banked token (eq. 2)."""

    def __init__(self, handle: BankHandle, blocks: str, alpha: float, threshold: float):
        super().__init__(handle, blocks)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"feature fusion alpha must be in [0, 1], got {alpha}")
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"feature fusion threshold is a cosine similarity in [-1, 1], got {threshold}")
        self.alpha = float(alpha)
        self.threshold = float(threshold)

    def __call__(self, out, extra_options):
        if not self.selected(extra_options, out.shape[1]):
            return out
        bank = self.handle.bank
        layer = self.layer(extra_options)
        groups = self.groups(out.shape[0], extra_options, bank)
        by_length: dict[int, list[tuple[list[int], torch.Tensor]]] = {}
        for suffix, rows, _ in groups:
            stored = bank.read((layer,) + suffix, "o")
            if stored is not None and stored.shape[0] == len(rows) and stored.shape[2] == out.shape[2]:
                by_length.setdefault(stored.shape[1], []).append((rows, stored))
        for suffix, rows, frame in groups:
            bank.write((layer,) + suffix, "o", out[rows], frame)
        if not by_length:
            return out
        fused = out.clone()
        for parts in by_length.values():
            rows = [r for rs, _ in parts for r in rs]
            stored = torch.cat([s for _, s in parts], dim=0).to(out.device)
            fused[rows] = feature_fusion(out[rows], stored, self.alpha, self.threshold)
        return fused
