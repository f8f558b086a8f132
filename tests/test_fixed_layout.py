"""One call layout per stream (issue 30): masked bank reads, padded stream batch, static bank tensors, no split calls.

Core: a masked read takes every key's whole capacity with an additive mask; attention with that mask equals
eq. 1 over exactly the frames the key holds, at every fill level (float64). Engine: compiled with dynamo's
``eager`` backend (the guards, graphs and recompiles inductor would see), a stream whose bank fills, with full
CFG, per-frame ControlNet hints, live changes of prompt, strength and alpha, or residual one-time negative
guidance, traces one graph, and a second stream traces none; every frame costs one UNet call.
"""
import logging
import math
import pathlib
import sys

import pytest
import torch

from host import tiny_models
from streamv2v.nodes.bank_nodes import ExtendedAttentionPatch, FeatureBankNode, FeatureFusionPatch
from streamv2v.nodes.engine import DEFAULT, FRESH, OFF, StreamSettings, run_stream
from streamv2v.nodes.engine import compiled_unet
from streamv2v.streamv2v_core import BANKS
from streamv2v.streamv2v_core.bank import merging
from streamv2v.streamv2v_core.bank.attention import feature_fusion
from streamv2v.streamv2v_core.bank.calls import BankCall, PendingMask, RowPlan
from streamv2v.streamv2v_core.bank.feature_bank import BankConfig, FeatureBank
from streamv2v.streamv2v_core.media.frames import quantize, to_uint8
from streamv2v.streamv2v_core.stream.conditioning import FrameConditioning
from streamv2v.streamv2v_core.stream.guidance import ONE_TIME_NEGATIVE, SELF_NEGATIVE

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "bench"))
from bank_overhead import controlnet  # noqa: E402  (a ControlNet of any UNet's layout, random weights)

F64 = torch.float64


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _attention(n, context, wq, wk, wv, heads, mask=None):
    """ComfyUI's self-attention on (n, context) with an optional additive mask ``[R, 1, 1, N]``."""
    q, k, v = n @ wq.T, context @ wk.T, context @ wv.T
    b, _, c = q.shape
    split = lambda t: t.view(b, -1, heads, c // heads).transpose(1, 2)
    out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
    return out.transpose(1, 2).reshape(b, -1, c)


def _write(bank, layer, frame, step, tokens):
    call = BankCall(bank, RowPlan((frame,), (step,), 4), [0], 1)
    call.extend(layer, tokens)
    call.fuse(layer, tokens, 0.5, 2.0)  # threshold 2: stages the output without fusing
    call.flush()


def test_masked_reads_are_eq1_over_the_frames_each_key_holds_at_every_fill_level():
    t, c, heads, layer = 8, 16, 2, ("input", 1, 0)
    bank = FeatureBank(BankConfig(mode="queue", size=3, interval=1))
    past = {step: [_randn(1, t, c, seed=10 * step + f) for f in range(step)] for step in range(4)}
    for step, frames in past.items():  # key (0, step) holds `step` frames: 0, 1, 2 and 3 (full)
        for frame, tokens in enumerate(frames):
            _write(bank, layer, frame, step, tokens)
    x = _randn(4, t, c, seed=99)
    masks = PendingMask()
    call = BankCall(bank, RowPlan((9, 8, 7, 6), (0, 1, 2, 3), 4), [0], 4, masks=masks)
    extended = call.extend(layer, x)
    assert extended.shape == (4, t + 3 * t, c)  # one shape, whatever each key holds
    mask = masks.take(extended.shape[1], 4)
    wq, wk, wv = (_randn(c, c, seed=s) / math.sqrt(c) for s in (1, 2, 3))
    got = _attention(x, extended, wq, wk, wv, heads, mask)
    for row, step in enumerate(range(4)):
        context = torch.cat([x[row]] + [f[0] for f in past[step]])
        want = _attention(x[row:row + 1], context[None], wq, wk, wv, heads)
        torch.testing.assert_close(got[row:row + 1], want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("threshold", [0.3, -1.0])
def test_masked_fusion_never_takes_an_empty_slot(threshold):
    """Empty slots are zero: below a positive threshold they can never be chosen; a threshold of 0 or less
    masks them. Either way FF equals eq. 2 over the frames the key holds (float64)."""
    t, c, layer = 6, 8, ("output", 3, 0)
    bank = FeatureBank(BankConfig(mode="queue", size=3, interval=1))
    stored = _randn(1, t, c, seed=5)
    _write(bank, layer, 0, 0, stored)  # one frame of three
    out = _randn(1, t, c, seed=6)
    call = BankCall(bank, RowPlan((5,), (0,), 4), [0], 1, masks=PendingMask())
    got = call.fuse(layer, out, 0.75, threshold)
    want = feature_fusion(out, stored, 0.75, threshold)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_bank_tensors_keep_their_addresses_through_writes_merges_and_a_new_stream():
    layer = ("middle", 0, 0)
    bank = FeatureBank(BankConfig(mode="dyme", size=1, interval=1))
    _write(bank, layer, 0, 0, _randn(1, 8, 4, seed=1))
    group = bank.store.by_shape("n", (8, 4))
    data, mask = group.data.data_ptr(), group.mask.data_ptr()
    assert getattr(group.data, "_dynamo_static_input_type", None) is not None  # no copy per CUDA graph replay
    for frame in range(1, 4):  # DyMe merges in place
        _write(bank, layer, frame, 0, _randn(1, 8, 4, seed=frame + 1))
    bank.reset("a new stream", keep_storage=True)
    assert bank.num_entries() == 0 and (bank.view("n", layer, 0, 1, 1) == 0).all()
    assert (group.data.data_ptr(), group.mask.data_ptr()) == (data, mask)
    assert torch.isinf(bank.mask("n", layer, 0, 1, 1)[:, 8:]).all()  # nothing held: masked again
    bank.reset("frame size changed")
    assert bank.nbytes() == 0


def test_dyme_matching_in_blocks_is_the_whole_matching(monkeypatch):
    x, keys = torch.randn(3, 40, 8, generator=torch.Generator().manual_seed(0)), torch.rand(3, 40)
    whole = merging.random_bipartite_matching(x, 20, keys)
    monkeypatch.setattr(merging, "SIMILARITY_BLOCK", 3 * 20 * 7)  # 7 sources a block
    blocks = merging.random_bipartite_matching(x, 20, keys)
    assert torch.equal(whole.dst_of_src, blocks.dst_of_src)


def test_fusion_of_a_half_precision_bank_decides_in_float32():
    layer = ("output", 3, 0)
    bank = FeatureBank(BankConfig(interval=1))
    _write(bank, layer, 0, 0, _randn(1, 6, 8, seed=3).half())
    assert bank.view("o#unit", layer, 0, 1, 1).dtype == torch.float32
    assert bank.view("o", layer, 0, 1, 1).dtype == torch.float16


def test_uint8_frames_are_to_uint8_values():
    pixels = torch.cat([torch.rand(4, 5, 3, generator=torch.Generator().manual_seed(2)),
                        torch.tensor([[[-0.1, 0.5 / 255, 1.5 / 255], [1.0, 1.2, 254.5 / 255]] * 2 + [[0, 0, 0]]])])
    assert (quantize(pixels).numpy() == to_uint8(pixels)).all()
    assert (to_uint8(quantize(pixels)) == to_uint8(pixels)).all()  # already converted: kept


# -- the engine ------------------------------------------------------------------------------------

@pytest.fixture
def eager_backend(monkeypatch):
    logging.getLogger("torch.__trace").setLevel(logging.WARNING)  # pytest's DEBUG capture slows tracing ~80x
    monkeypatch.setattr(compiled_unet, "COMPILE_BACKEND", "eager")
    compiled_unet.forget_compiled()
    yield
    compiled_unet.forget_compiled()


def _banked(model, name, mode="dyme", size=1, interval=2):
    BANKS.remove(name)
    handle = FeatureBankNode.execute(name, mode, size, interval, 0).args[0]
    model = ExtendedAttentionPatch.execute(model, handle, "all").args[0]
    return FeatureFusionPatch.execute(model, handle, 0.75, 0.9, "low-res decoder").args[0]


def _calls(model):
    import comfy.patcher_extension

    counted = []

    def count(executor, *args, **kwargs):
        counted.append(args[0].shape[0])
        return executor(*args, **kwargs)
    clone = model.clone()
    # APPLY_MODEL: outside the compiled UNet (a counter inside it would be traced, and retraced every call).
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test.calls", count)
    return clone, counted


def _clip(n, size=32, seed=2):
    return list(torch.rand(n, size, size, 3, generator=torch.Generator().manual_seed(seed)))


def test_a_filling_queue_with_cfg_controlnet_and_live_changes_is_one_graph_and_one_call_a_frame(eager_backend):
    """queue(3) updated every 2nd frame (fills over 5 frames), full CFG at 2, a ControlNet with each frame's own
    hint, and from frame 4 on each frame its own prompt, control strength and fusion alpha: the compiled stream
    traces one graph, a second stream none, each stream makes N + S - 1 UNet calls (S - 1 drain its pipeline)
    of the same rows, and the frames are the uncompiled ones (float32 rounding of padded calls)."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    from nodes import ControlNetApplyAdvanced

    unet = tiny_models.micro_sd15_model(0)
    model, calls = _calls(_banked(unet, "fixed-queue", "queue", 3, 2))
    cond, neg = tiny_models.random_conditioning("sd15", 1), tiny_models.random_conditioning("sd15", 2)
    net = controlnet(unet, torch, torch.float32, "cpu")
    frames, hints = _clip(10), _clip(10, seed=7)
    pos, neg = ControlNetApplyAdvanced().apply_controlnet(cond, neg, net, hints[0][None], 1.0, 0.0, 1.0)

    def steer(frame):
        live = frame.index >= 4
        return FrameConditioning(positive=[[pos[0][0] + 0.1, dict(pos[0][1])]] if live else None,
                                 hint=hints[frame.index][None], control_scale=0.6 if live else 1.0,
                                 fusion_alpha=0.5 if live else None)

    def stream(mode):
        out = []
        run_stream(model, pos, neg, vae, iter(frames), StreamSettings(steps=3, cfg=2.0, bank_start=FRESH,
                                                                        compile=mode, seed=1),
                   lambda o: out.append(o.image), conditioning=steer)
        return torch.stack(out)

    vae = tiny_models.tiny_taesd_vae(1)
    eager = stream(OFF)
    torch._dynamo.reset()
    counters.clear()
    calls.clear()
    first = stream(DEFAULT)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters)
    assert len(calls) == 10 + 2 and set(calls) == {2 * 3}  # cond and uncond rows of 3 steps, every call
    compiles, calls[:] = counters["frames"]["total"], []
    second = stream(DEFAULT)
    assert counters["frames"]["total"] == compiles, "the second stream compiled"
    assert len(calls) == 12
    torch.testing.assert_close(first, eager, rtol=0, atol=1e-4)
    torch.testing.assert_close(second, first, rtol=0, atol=0)


def test_one_time_negative_rides_in_the_frame_call_and_compiles_once(eager_backend):
    """Residual one-time negative: the frame's negative pass is one more row of its stream-batch call (6 frames
    at 4 steps: 9 calls, not 15; the same 30 rows); compiled, one graph."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    model, rows = _calls(_banked(tiny_models.micro_sd15_model(0), "fixed-one-time"))
    cond, neg = tiny_models.random_conditioning("sd15", 1), tiny_models.random_conditioning("sd15", 2)
    vae = tiny_models.tiny_taesd_vae(1)

    def stream(mode, cfg=2.0, guidance=ONE_TIME_NEGATIVE):
        out = []
        run_stream(model, cond, neg, vae, iter(_clip(6)), StreamSettings(cfg=cfg, guidance=guidance, compile=mode),
                   lambda o: out.append(o.image))
        return torch.stack(out)

    eager = stream(OFF)
    assert len(rows) == 9 and sum(rows) == 6 * 4 + 6
    rows.clear()
    torch._dynamo.reset()
    counters.clear()
    compiled = stream(DEFAULT)
    assert counters["stats"]["unique_graphs"] == 1 and set(rows) == {4 + 1}
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-4)
    # At cfg 1 or below a residual guidance guides nothing (StreamDiffusion's rule): the positive pass alone.
    assert torch.equal(stream(OFF, cfg=0.5, guidance=SELF_NEGATIVE), stream(OFF, cfg=1.0))


def test_uint8_output_is_converted_on_the_device_to_to_uint8_values():
    model = tiny_models.micro_sd15_model(0)
    cond, vae = tiny_models.random_conditioning("sd15", 1), tiny_models.tiny_taesd_vae(1)
    outs = {}
    for uint8 in (False, True):
        got = []
        run_stream(model, cond, cond, vae, iter(_clip(3)), StreamSettings(bank_start=FRESH), lambda o: got.append(o),
                   stream_key="uint8-test", uint8_output=uint8)
        outs[uint8] = got
    assert all(o.image.dtype == torch.uint8 for o in outs[True])
    for a, b in zip(outs[False], outs[True]):
        assert (to_uint8(a.image) == b.image.numpy()).all()


def test_warm_up_compiles_the_layout_before_the_first_frame_and_changes_no_frame(eager_backend):
    import torch._dynamo
    from torch._dynamo.utils import counters

    model, _ = _calls(_banked(tiny_models.micro_sd15_model(0), "fixed-warm"))
    cond, vae = tiny_models.random_conditioning("sd15", 1), tiny_models.tiny_taesd_vae(1)
    compiles = []

    def probe(executor, *args, **kwargs):
        compiles.append(counters["frames"]["total"])
        return executor(*args, **kwargs)
    model.add_wrapper_with_key(__import__("comfy.patcher_extension").patcher_extension.WrappersMP.APPLY_MODEL,
                               "test.compiles", probe)

    def stream(warm_up):
        out = []
        run_stream(model, cond, cond, vae, iter(_clip(5)), StreamSettings(compile=DEFAULT, bank_start=FRESH),
                   lambda o: out.append(o.image), warm_up=warm_up)
        return torch.stack(out)

    torch._dynamo.reset()
    counters.clear()
    cold = stream(0)
    compiled_unet.forget_compiled()
    torch._dynamo.reset()
    counters.clear()
    compiles.clear()
    warm = stream(2)
    assert len(compiles) == 2 + 5 + 3 and compiles[2] == compiles[-1] == 1  # compiled before the first frame's call
    # The same frames: the warm-up wrote nothing (the cold run's first call ran eagerly: float32 rounding).
    torch.testing.assert_close(warm, cold, rtol=0, atol=1e-4)


def test_the_attention_override_hands_the_mask_to_its_own_attention_only_and_keeps_another_packs():
    from streamv2v.streamv2v_core.bank.patches import MaskedAttention
    from streamv2v.streamv2v_core.bank.state import STATE_KEY, ModelState

    masks, seen = PendingMask(), []
    mask = torch.zeros(2, 1, 1, 12)
    masks.put(("input", 1, 0), mask)
    options = {STATE_KEY: ModelState(masks=masks)}

    def attention(q, k, v, heads, mask=None, **kwargs):
        seen.append(mask)
        return q

    def another_packs(func, *args, **kwargs):  # e.g. a sage-attention override set before StreamV2V's
        seen.append("theirs")
        return func(*args, **kwargs)

    override = MaskedAttention(another_packs)
    q = torch.zeros(2, 4, 8)
    override(attention, q, torch.zeros(2, 77, 8), torch.zeros(2, 77, 8), 2, transformer_options=options)  # attn2
    override(attention, q, torch.zeros(2, 12, 8), torch.zeros(2, 12, 8), 2, transformer_options=options)  # attn1
    assert seen[:2] == ["theirs", None] and seen[2] == "theirs" and seen[3] is mask and not masks.lost()
