"""One model call's view of a bank: which stored tokens each row reads and which rows it writes.

A model call carries ``R = chunks * rows_per_chunk`` rows (``cond_or_uncond`` gives each
chunk's flag, 0 positive / 1 negative). The driver says, per chunk row, which frame and
denoising step it is (``RowPlan``). Before the UNet runs, ``BankCall`` turns that into
host-side integers only: for every row its key, how many frames the bank holds for it,
contiguous *segments* of rows whose stored tokens are one strided view, and the rows to
write. Inside the forward the patches then only slice, concatenate and stage tensors
(no tensor value is read on the host, no Python-list indexing); after the forward
``flush()`` writes the staged rows into the bank (merges batched per shape group).

A *masked* call (``masks`` given: the bank's wrapper also routes attention through
``patches.MaskedAttention``) reads every key's whole capacity with its mask, so its shapes do
not depend on how full the bank is: one compiled graph serves a stream from its first call.
An unmasked call reads exactly the frames each key holds (the fallback where no mask can reach
the attention, e.g. another pack's attention replacement).

Everything a patch object needs per call lives here, in an object made fresh for every
model call and passed through ``transformer_options`` (``state.ModelState``); the patch objects
themselves stay immutable, so ComfyUI may deep-copy or share them freely.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from .attention import extend_with_bank, feature_fusion
from .feature_bank import UNIT, FeatureBank
from .runs import arithmetic_runs
from .writes import KeyWrite

NAMES = ("n", "o")  # EA's attention input, FF's attention output
PADDING = -1  # the frame of a padding row: computed with its call, never written to the bank, never output


@dataclass(frozen=True)
class RowPlan:
    """What each row of a chunk is: its frame index, denoising step and image slot.

    frames, steps: one entry per row of a chunk (every chunk has the same rows); frame
        ``PADDING``: a row that fills the call to its fixed shape (nothing of it is kept).
    total_steps: steps per frame (sizes the bank's storage).
    slots: image index within a key (a KSampler batch); None = all 0 (one image per frame).
    fusion_alphas: per row, the feature fusion alpha its frame chose live (None: the patch's).
    flags: per row, the prompt it is conditioned on (0 positive, 1 negative) in a call of one
        chunk that carries both (residual one-time negative); None = the chunk's flag.
    control: per row, the factor on ControlNet outputs (its frame's strength, 0 where no
        ControlNet is active at its step); None = 1 for every row (read by the engine, not the bank).
    """

    frames: tuple[int, ...]
    steps: tuple[int, ...]
    total_steps: int
    slots: tuple[int, ...] | None = None
    fusion_alphas: tuple[float | None, ...] | None = None
    flags: tuple[int, ...] | None = None
    control: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Segment:
    """Call rows ``start .. stop-1`` reading keys ``first, first + stride, ...`` that hold ``count`` frames.

    ``count == 0``: those rows have no bank yet; ``count`` None: a masked call's read (the whole capacity).
    """

    start: int
    stop: int
    first: int
    stride: int
    count: int | None


class PendingMask:
    """The additive mask ``[R, 1, 1, N]`` of the self-attention an EA patch just extended to ``N`` keys.

    The attention call that follows takes it (``patches.MaskedAttention``), matched by its key length.
    """

    def __init__(self):
        self.mask: torch.Tensor | None = None
        self.layer = None
        self.missed = 0  # masks no attention took (another pack changed the keys after EA, or replaced it)

    def put(self, layer, mask: torch.Tensor) -> None:
        if self.mask is not None and self.layer != layer:
            self.missed += 1
        self.mask, self.layer = mask, layer

    def lost(self) -> bool:
        """After the forward: whether a mask never reached its attention."""
        return self.missed > 0 or self.mask is not None

    def own(self, tokens: int) -> torch.Tensor | None:
        """The pending mask if it covers ``tokens`` keys (an earlier bank's extension of this layer)."""
        return self.mask if self.mask is not None and self.mask.shape[-1] == tokens else None

    def take(self, keys: int, rows: int) -> torch.Tensor | None:
        """The pending mask if it is for an attention over ``keys`` keys and ``rows`` rows (then forgotten)."""
        mask = self.mask
        if mask is None or mask.shape[-1] != keys or mask.shape[0] != rows:
            return None
        self.mask = None
        return mask


class BankCall:
    """Per-model-call reads, staged writes and flush for one bank. See module doc.

    bank: the bank; plan: the driver's ``RowPlan``; flags: ``cond_or_uncond`` (one flag per
    chunk); rows: the call's batch size (a multiple of ``len(flags)``). frame: the ``FrameWrites``
    of a frame that spans several calls of a plain sampler; ``flush()`` then hands the writes to
    it instead of the bank, so no call of the frame reads what the frame itself wrote. masks: the
    call's ``PendingMask`` for a masked call (see module doc). alphas: ``[R, 1, 1]`` feature fusion
    alpha per call row (data, not a Python constant, so a compiled graph does not specialise on
    its value), or None for the patch's own alpha.
    """

    def __init__(self, bank: FeatureBank, plan: RowPlan, flags, rows: int, frame: "FrameWrites | None" = None,
                 masks: PendingMask | None = None, alphas: torch.Tensor | None = None):
        flags = [int(f) for f in (flags or [0])]
        per_chunk = rows // len(flags)
        if per_chunk * len(flags) != rows or len(plan.frames) != per_chunk or len(plan.steps) != per_chunk:
            raise ValueError(f"a plan for {len(plan.frames)} rows per chunk does not fit a call of {rows} rows "
                             f"in {len(flags)} chunks")
        if plan.flags is not None and len(flags) != 1:
            raise ValueError("a plan with a prompt flag per row needs a call of one chunk")
        slots = plan.slots or (0,) * per_chunk
        row_flags = [list(plan.flags) if plan.flags is not None else [flag] * per_chunk for flag in flags]
        self.bank, self.frame, self.masks, self.alphas = bank, frame, masks, alphas
        self.rows = [(chunk[j], plan.steps[j], slots[j], plan.frames[j]) for chunk in row_flags
                     for j in range(per_chunk)]
        self.geometry = (max(row[0] for row in self.rows) + 1, plan.total_steps, max(slots) + 1)
        self.deepest: dict[tuple, int] = {}  # latent (H, W) -> deepest resolution level seen in this call
        if masks is not None:  # a masked call reads every key its rows address: they must exist
            bank.grow(self.geometry)
        self._writes = {name: self._plan_writes(name) for name in NAMES}
        # Everything the forward reads is computed here, from host integers, and holds no frame
        # numbers: under torch.compile it becomes guards, which then match call after call.
        self._segments = {(name, geometry): self._build_segments(name, geometry)
                          for name in NAMES for geometry in bank.geometries(name)}
        self._staged: dict[str, dict] = {name: {} for name in NAMES}

    # -- planning (host integers only) ---------------------------------------------------
    def _plan_writes(self, name: str) -> tuple[list[slice], list[KeyWrite]]:
        """Rows of this call that write ``name`` (update frames, each key once) as slices."""
        chosen, seen = [], set()
        for i, (flag, step, slot, frame) in enumerate(self.rows):
            if ((flag, step, slot) not in seen and self.bank.plans_write(name, flag, step, frame)
                    and (self.frame is None or self.frame.claim(name, flag, step, slot))):
                seen.add((flag, step, slot))
                chosen.append(i)
        slices = [slice(first, first + (count - 1) * stride + 1, stride)
                  for first, count, stride in arithmetic_runs(chosen)]
        writes = [KeyWrite(*self.rows[i][:3], frame=self.rows[i][3]) for i in chosen]
        return slices, writes

    def segments(self, name: str, layer) -> list[Segment] | None:
        """Row segments for reading ``name`` of ``layer``; None when the bank has no storage for it."""
        geometry = self.bank.geometry(name, layer)
        return None if geometry is None else self._segments.get((name, geometry))

    def _build_segments(self, name: str, geometry) -> list[Segment]:
        """Consecutive rows whose keys form one stride (unmasked: and hold the same number of frames)."""
        _, steps, slots = geometry
        rows = [((flag * steps + step) * slots + slot, None if self.masks else self.bank.count(name, flag, step))
                for flag, step, slot, _ in self.rows]
        segments: list[Segment] = []
        start = 0
        for count, group in itertools.groupby(rows, key=lambda row: row[1]):
            keys = [key for key, _ in group]
            # Rows without a bank read nothing (they are padded with their own tokens): one segment.
            for first, n, stride in [(keys[0], len(keys), 1)] if count == 0 else arithmetic_runs(keys):
                segments.append(Segment(start, start + n, first, stride, count))
                start += n
        return segments

    def note_level(self, hw: tuple, level: int) -> None:
        """Remember the deepest resolution level an encoder/middle block reached in this call."""
        if level > self.deepest.get(hw, -1):
            self.deepest[hw] = level

    # -- inside the forward -------------------------------------------------------------
    def extend(self, layer, tokens: torch.Tensor, stage: bool = True) -> torch.Tensor | None:
        """EA: ``tokens`` ``[R, T, C]`` followed by each row's banked tokens -> ``[R, N, C]`` (or None).

        Stages ``tokens`` for writing (unless ``stage`` is False). Masked: every row reads its keys'
        whole capacity and the mask goes to ``masks``. Unmasked: rows without a bank are padded with
        copies of their own tokens, which leaves attention unchanged; rows holding different numbers
        of frames fall back to ``extend_with_bank``'s exact repetition.
        """
        if stage:
            self._stage("n", layer, tokens)
        segments = self._readable("n", layer, tokens)
        if segments is None:
            return None
        if self.masks is not None:
            return self._extend_masked(layer, tokens, segments)
        counts = {s.count for s in segments if s.count}
        if len(counts) > 1:
            return extend_with_bank(tokens, self._per_row("n", layer, segments))
        count = counts.pop()
        parts = [tokens[s.start:s.stop].repeat(1, count, 1) if s.count == 0 else
                 self.bank.view("n", layer, s.first, s.stop - s.start, s.stride, count) for s in segments]
        return torch.cat([tokens, _joined(parts)], dim=1)

    def _extend_masked(self, layer, tokens: torch.Tensor, segments: list[Segment]) -> torch.Tensor:
        banked = _joined([self.bank.view("n", layer, s.first, s.stop - s.start, s.stride) for s in segments])
        mask = _joined([self.bank.mask("n", layer, s.first, s.stop - s.start, s.stride) for s in segments])
        mask = mask[:, None, None, :]
        own = self.masks.own(tokens.shape[1])  # another bank extended this layer before: keep its mask
        if own is not None:
            mask = torch.cat([own, mask[..., mask.shape[-1] - banked.shape[1]:]], dim=-1)
        self.masks.put(layer, mask)
        return torch.cat([tokens, banked], dim=1)

    def extend_values(self, layer, values: torch.Tensor) -> torch.Tensor | None:
        """EA's value side when another patch made it differ from the context: ``values`` padded alike."""
        return self.extend(layer, values, stage=False)

    def fuse(self, layer, out: torch.Tensor, alpha: float, threshold: float) -> torch.Tensor:
        """FF: each row of ``out`` ``[R, T, C]`` fused with its nearest banked output (eq. 2)."""
        self._stage("o", layer, out)
        segments = self._readable("o", layer, out)
        if segments is None:
            return out
        parts = []
        for s in segments:
            rows = out[s.start:s.stop]
            if s.count is None or s.count:
                n = s.stop - s.start
                bank = self.bank.view("o", layer, s.first, n, s.stride, s.count)
                bank_unit = self.bank.view("o" + UNIT, layer, s.first, n, s.stride, s.count)
                # Empty slots are zero, so their cosine is 0: below a positive threshold they can never be
                # chosen; a threshold of 0 or less needs the mask.
                empty = None if s.count is not None or threshold > 0 else \
                    self.bank.mask("o", layer, s.first, n, s.stride)[:, rows.shape[1]:]
                weight = alpha if self.alphas is None else self.alphas[s.start:s.stop]
                rows = feature_fusion(rows, bank, weight, threshold, bank_unit, empty)
            parts.append(rows)
        return _joined(parts)

    def _stage(self, name: str, layer, tokens: torch.Tensor) -> None:
        # Compiled, every call stages (``flush`` ignores calls that write nothing): reading whether this call
        # writes would be a guard, and the calls that do and do not write would need two graphs. A masked
        # call also stages a layer the bank has no storage for yet (``flush`` reserves it).
        if (torch.compiler.is_compiling() or self._writes[name][1]  # is_compiling first: no guard
                or (self.masks is not None and self.bank.token_shape(name, layer) != tuple(tokens.shape[1:]))):
            self._staged[name][layer] = tokens

    def _readable(self, name: str, layer, tokens: torch.Tensor) -> list[Segment] | None:
        segments = self.segments(name, layer)
        if segments is None or (self.masks is None and not any(s.count for s in segments)):
            return None
        if self.bank.token_shape(name, layer) != tuple(tokens.shape[1:]):
            return None  # another latent size than the bank's (its signature check resets it next run)
        return segments

    def _per_row(self, name: str, layer, segments: list[Segment]) -> list[torch.Tensor | None]:
        banked: list[torch.Tensor | None] = []
        for s in segments:
            for r in range(s.stop - s.start):
                banked.append(None if s.count == 0 else
                              self.bank.view(name, layer, s.first + r * s.stride, 1, 1, s.count)[0])
        return banked

    # -- after the forward ---------------------------------------------------------------
    def flush(self) -> None:
        """Write the staged rows into the bank ("n" first: "o" reuses its DyMe matchings), or hand
        them to the frame's ``FrameWrites`` to be written when the frame ends. A masked call first
        makes storage for staged layers that have none (so every later read has its final shape)."""
        pending = [(name, self._staged[name], *self._writes[name]) for name in NAMES]
        self._staged = {name: {} for name in NAMES}
        if self.masks is not None:
            for name, staged, _, _ in pending:
                if staged:
                    self.bank.reserve(name, staged, self.geometry)
        if self.frame is not None:
            self.frame.add(pending, self.geometry)
        else:
            commit_calls(self.bank, [(pending, self.geometry)])


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def commit_calls(bank: FeatureBank, calls: list) -> None:
    """Write the staged rows of model calls into ``bank``, call by call, "n" before "o".

    calls: ``[(pending, geometry)]``, pending = ``[(name, {layer: [R, T, C]}, row slices, KeyWrites)]``.
    """
    for pending, geometry in calls:
        matchings = None
        for name, staged, rows, writes in pending:
            if staged and writes:
                matchings = bank.commit(name, staged, rows, writes, geometry, matchings)


class FrameWrites:
    """The bank writes of one frame whose denoising spans several model calls (a plain sampler run).

    A two-call sampler (heun, dpm_2, dpmpp_sde, ...) evaluates step i's second call at step i+1's
    sigma: if that call wrote the bank, the frame's next call would attend to the frame itself.
    So the calls of such a frame stage their writes here (each key by the first call that plans
    it) and ``commit()`` writes them all once the frame's last call is done.
    """

    def __init__(self, bank: FeatureBank):
        self.bank = bank
        self._claimed: set[tuple] = set()
        self._calls: list = []

    def claim(self, name: str, flag: int, step: int, slot: int) -> bool:
        """True the first time a call of this frame plans to write this key and slot."""
        key = (name, flag, step, slot)
        if key in self._claimed:
            return False
        self._claimed.add(key)
        return True

    def add(self, pending: list, geometry: tuple) -> None:
        if any(staged and writes for _, staged, _, writes in pending):
            self._calls.append((pending, geometry))

    def commit(self) -> None:
        """Write every staged call into the bank (once; later calls do nothing)."""
        calls, self._calls = self._calls, []
        commit_calls(self.bank, calls)
