"""The feature bank core against float64 references of the paper's equations (pure torch)."""
import copy
import math
import pickle

import pytest
import torch

from streamv2v.streamv2v_core.bank import attention, merging, patches
from streamv2v.streamv2v_core.bank import registry as bank_mod
from streamv2v.streamv2v_core.bank.feature_bank import BankConfig, FeatureBank
from streamv2v.streamv2v_core.bank.registry import BankHandle, BankRegistry
from streamv2v.streamv2v_core.bank.calls import BankCall, RowPlan
from streamv2v.streamv2v_core.log_once import forget_warnings
from streamv2v.streamv2v_core.bank.state import STATE_KEY, ModelState
from streamv2v.streamv2v_core.stream.schedule import strength_timesteps
from streamv2v.streamv2v_core.stream.similarity import SimilarityFilter, skip_probability


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64).to(dtype)


# -- eq. 1: extended self-attention ------------------------------------------------------------------

def _reference_ex_attn(x, x_fb, wq, wk, wv, heads):
    """softmax(Q [K_t, K_fb]^T / sqrt(d)) [V_t, V_fb] per head, float64; x: [T, C], x_fb: [m, C] or None."""
    x, wq, wk, wv = (t.double() for t in (x, wq, wk, wv))
    context = x if x_fb is None else torch.cat([x, x_fb.double()])
    q, k, v = x @ wq.T, context @ wk.T, context @ wv.T
    d = q.shape[1] // heads
    out = []
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        w = torch.softmax(q[:, sl] @ k[:, sl].T / math.sqrt(d), dim=-1)
        out.append(w @ v[:, sl])
    return torch.cat(out, dim=1)


def _attention_like_comfy(n, context, value, wq, wk, wv, heads):
    """What ComfyUI's CrossAttention does with (n, context, value): project, then SDPA."""
    q, k, v = n @ wq.T, context @ wk.T, value @ wv.T
    b, _, c = q.shape
    split = lambda t: t.view(b, -1, heads, c // heads).transpose(1, 2)
    out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(b, -1, c)


def _weights(c, seed=4):
    return [_randn(c, c, seed=s) / math.sqrt(c) for s in (seed, seed + 1, seed + 2)]


def test_extended_attention_matches_eq1_float64():
    t, c, heads = 24, 32, 4
    x = _randn(2, t, c, seed=1)
    banked = [_randn(2 * t, c, seed=2), _randn(2 * t, c, seed=3)]
    wq, wk, wv = _weights(c)
    extended = attention.extend_with_bank(x, banked)
    got = _attention_like_comfy(x, extended, extended, wq, wk, wv, heads)
    for row in range(2):
        want = _reference_ex_attn(x[row], banked[row], wq, wk, wv, heads)
        torch.testing.assert_close(got[row].double(), want, rtol=1e-5, atol=1e-5)


def test_extended_attention_with_a_bank_length_per_row_matches_eq1_float64():
    """Rows of one call that have seen 0, 1 and 2 past frames each attend to exactly their own past."""
    t, c, heads = 8, 16, 2
    x = _randn(3, t, c, seed=5)
    banked = [None, _randn(t, c, seed=6), _randn(2 * t, c, seed=7)]
    wq, wk, wv = _weights(c, 8)
    extended = attention.extend_with_bank(x, banked)
    assert extended.shape == (3, math.lcm(t, 2 * t, 3 * t), c)  # nothing truncated
    got = _attention_like_comfy(x, extended, extended, wq, wk, wv, heads)
    for row in range(3):
        want = _reference_ex_attn(x[row], banked[row], wq, wk, wv, heads)
        torch.testing.assert_close(got[row].double(), want, rtol=1e-5, atol=1e-5)
    assert attention.extend_with_bank(x, [None, None, None]) is None


def test_bank_call_reads_per_row_bank_lengths_exactly():
    """A stream-batch call whose rows hold 2, 1 and 0 banked frames (queue(2) filling up), through BankCall."""
    t, c, heads = 8, 16, 2
    bank = FeatureBank(BankConfig(mode="queue", size=2, interval=1))
    layer = ("input", 1, 0)
    frames = {f: _randn(1, t, c, seed=20 + f) for f in range(3)}
    # Write frames 0 and 1 at step 0, frame 0 at step 1 (as the stream batch does before this call).
    for frame, steps in ((0, [0, 1]), (1, [0])):
        for step in steps:
            call = BankCall(bank, RowPlan((frame,), (step,), 3), [0], 1)
            call.extend(layer, frames[frame])
            call.flush()
    x = torch.cat([frames[2], _randn(1, t, c, seed=30), _randn(1, t, c, seed=31)])
    call = BankCall(bank, RowPlan((2, 1, 0), (0, 1, 2), 3), [0], 3)
    assert [s.count for s in call.segments("n", layer)] == [2, 1, 0]
    extended = call.extend(layer, x)
    wq, wk, wv = _weights(c, 12)
    got = _attention_like_comfy(x, extended, extended, wq, wk, wv, heads)
    past = [torch.cat([frames[0][0], frames[1][0]]), frames[0][0], None]
    for row in range(3):
        want = _reference_ex_attn(x[row], past[row], wq, wk, wv, heads)
        torch.testing.assert_close(got[row].double(), want, rtol=1e-5, atol=1e-5)


def test_uniform_reads_are_views_and_padding_with_own_tokens_is_neutral():
    t, c, heads = 16, 32, 4
    bank = FeatureBank(BankConfig(size=1, interval=1))
    layer = ("middle", 0, 0)
    call = BankCall(bank, RowPlan((0,), (0,), 3), [0], 1)  # frame 0 at step 0 (the stream's first call)
    call.extend(layer, _randn(1, t, c, seed=40))
    call.flush()
    call = BankCall(bank, RowPlan((1, 0), (0, 1), 3), [0], 2)  # frame 1 reads frame 0; frame 0 at step 1 has none
    segments = call.segments("n", layer)
    view = bank.view("n", layer, segments[0].first, 1, 1, 1)
    assert view.untyped_storage().data_ptr() == bank.store.by_shape("n", (t, c)).data.untyped_storage().data_ptr()
    x = _randn(2, t, c, seed=50)
    extended = call.extend(layer, x)
    wq, wk, wv = _weights(c, 13)
    got = _attention_like_comfy(x, extended, extended, wq, wk, wv, heads)
    plain = _attention_like_comfy(x[1:], x[1:], x[1:], wq, wk, wv, heads)
    torch.testing.assert_close(got[1:], plain, rtol=1e-5, atol=1e-6)


# -- eq. 2: feature fusion ---------------------------------------------------------------------------

def _reference_fusion(out, bank, alpha, threshold):
    out, bank = out.double(), bank.double()
    res = out.clone()
    for p in range(out.shape[0]):
        sims = torch.stack([torch.dot(out[p], bank[q]) / (out[p].norm() * bank[q].norm()) for q in range(bank.shape[0])])
        q = int(sims.argmax())
        if sims[q] >= threshold:
            res[p] = (1 - alpha) * out[p] + alpha * bank[q]
    return res


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("stored_unit", [False, True])
def test_feature_fusion_matches_eq2_float64_with_threshold_mask(dtype, tol, stored_unit):
    t, m, c = 40, 30, 16
    out = _randn(1, t, c, seed=12)
    bank = _randn(1, m, c, seed=13)
    # Half the tokens have a near copy in the bank (similarity ~1), the rest only random ones.
    bank[0, :20] = out[0, :20] + 0.05 * _randn(20, c, seed=14)
    alpha, threshold = 0.75, 0.9
    unit = attention.unit(bank.to(dtype).float()).to(dtype) if stored_unit else None
    got = attention.feature_fusion(out.to(dtype), bank.to(dtype), alpha, threshold, unit)
    want = _reference_fusion(out.to(dtype)[0], bank.to(dtype)[0], alpha, threshold)
    torch.testing.assert_close(got[0].double(), want, rtol=tol, atol=tol)
    changed = (got[0].float() - out[0].to(dtype).float()).abs().amax(dim=1) > 0
    assert changed[:20].all() and not changed[20:].any(), "exactly the tokens with a match above threshold fuse"


# -- DyMe ---------------------------------------------------------------------------------------------

def test_dyme_merge_is_mean_of_destination_and_its_sources():
    x = _randn(2, 64, 8, seed=15)
    m = merging.random_bipartite_matching(x, 32, torch.rand(2, 64, generator=_gen(0)))
    merged = merging.apply_matching(x, m)
    assert merged.shape == (2, 32, 8)
    for row in range(2):
        unit = torch.nn.functional.normalize(x[row].double(), dim=-1)
        src, dst = m.src_idx[row].tolist(), m.dst_idx[row].tolist()
        for j, d in enumerate(dst):
            members = [x[row, d].double()]
            for i, s in enumerate(src):
                best = max(range(len(dst)), key=lambda k: float(unit[s] @ unit[dst[k]]))
                assert best == int(m.dst_of_src[row, i])
                if best == j:
                    members.append(x[row, s].double())
            torch.testing.assert_close(merged[row, j].double(), torch.stack(members).mean(0), rtol=1e-6, atol=1e-6)


def _write(bank, layer, frame, step, n, o=None, flag=0):
    call = BankCall(bank, RowPlan((frame,), (step,), max(step + 1, 1)), [flag], 1)
    call.extend(layer, n)
    if o is not None:
        call.fuse(layer, o, 0.5, 2.0)  # threshold 2: stage "o" without fusing
    call.flush()


def test_dyme_bank_stays_one_frame_after_1000_updates_with_one_matching_per_layer():
    b = FeatureBank(BankConfig(mode="dyme", size=1, interval=1))
    layer = ("output", 3, 0)
    t, c = 12, 6
    w = _randn(c, c, seed=16)  # "o" is a linear image of "n": the same matching keeps that exact
    g = _gen(17)
    for frame in range(1000):
        n = torch.randn(1, t, c, generator=g)
        _write(b, layer, frame, 0, n, n @ w)
        assert b.view("n", layer, 0, 1, 1, 1).shape == (1, t, c)
    torch.testing.assert_close(b.view("o", layer, 0, 1, 1, 1), b.view("n", layer, 0, 1, 1, 1) @ w,
                               rtol=1e-4, atol=1e-5)


def test_dyme_size_k_fills_then_merges_and_queue_keeps_the_newest_frames():
    t, c = 5, 3
    layer = ("input", 1, 0)
    dyme = FeatureBank(BankConfig(mode="dyme", size=3, interval=1))
    queue = FeatureBank(BankConfig(mode="queue", size=2, interval=1))
    frames = [torch.full((1, t, c), float(i)) for i in range(6)]
    for i, f in enumerate(frames):
        _write(dyme, layer, i, 0, f)
        _write(queue, layer, i, 0, f)
        assert dyme.count("n", 0, 0) == min(i + 1, 3)
    # The queue is a ring: order inside the bank is irrelevant to attention; the content is frames 4 and 5.
    held = sorted(queue.view("n", layer, 0, 1, 1, 2)[0, :, 0].tolist())
    assert held == [4.0] * t + [5.0] * t
    assert dyme.view("n", layer, 0, 1, 1, 3).shape == (1, 3 * t, c)


def test_interval_write_once_per_frame_and_private_rng():
    b = FeatureBank(BankConfig(mode="dyme", size=1, interval=4))
    layer = ("input", 1, 0)
    state = torch.get_rng_state()
    written = []
    for frame in range(9):
        x = torch.full((1, 4, 2), float(frame))
        _write(b, layer, frame, 0, x)
        _write(b, layer, frame, 0, x + 100)  # a second call at the same step of the same frame: ignored
        written.append(b.view("n", layer, 0, 1, 1, 1).clone())
    assert torch.equal(torch.get_rng_state(), state), "the global RNG must not be touched"
    assert [b.updates_on(f) for f in range(9)] == [f % 4 == 0 for f in range(9)]
    assert torch.equal(written[3], written[0]) and not torch.equal(written[4], written[3])
    assert (written[0] == 0).all() and (written[8] < 100).all()


def test_bank_keeps_the_compute_dtype_counts_bytes_and_resets(caplog):
    b = FeatureBank(BankConfig(interval=1), name="t")
    _write(b, ("input", 1, 0), 0, 0, torch.zeros(1, 8, 4, dtype=torch.float16))
    assert b.view("n", ("input", 1, 0), 0, 1, 1, 1).dtype == torch.float16
    assert b.nbytes() == 8 * 4 * 2
    b.to(torch.float8_e4m3fn)  # what ComfyUI passes for fp8 weights: ignored, the bank keeps fp16
    b.to("cpu")
    assert b.view("n", ("input", 1, 0), 0, 1, 1, 1).dtype == torch.float16
    b.check_signature({"frame size": ("8x8", "64x64")})
    with caplog.at_level("INFO", logger="streamv2v"):
        assert b.check_signature({"frame size": ("16x16", "128x128")}) == "frame size changed 64x64 -> 128x128"
    assert b.nbytes() == 0 and "bank 't' cleared: frame size changed 64x64 -> 128x128" in caplog.text
    assert "0x" not in caplog.text.split("cleared:")[1], "no object ids in the reason"


def test_registry_shares_by_name_and_explains_a_settings_change(caplog):
    reg = BankRegistry()
    a = reg.open("x", BankConfig())
    assert reg.find("x") is a
    _write(a, ("input", 1, 0), 0, 0, torch.zeros(1, 2, 2))
    with caplog.at_level("INFO", logger="streamv2v"):
        reg.open("x", BankConfig(mode="queue", size=2))
    assert a.num_entries() == 0 and a.config.mode == "queue"
    assert "bank settings changed: mode dyme -> queue, size 1 -> 2" in caplog.text
    assert reg.free("memory freed") == 0 and reg.names() == []


@pytest.mark.parametrize("kwargs", [dict(size=0), dict(interval=0), dict(mode="fifo")])
def test_bad_bank_settings_raise(kwargs):
    with pytest.raises(ValueError, match="bank"):
        BankConfig(**kwargs)


@pytest.mark.parametrize("alpha,threshold", [(1.5, 0.9), (-0.1, 0.9), (0.75, 1.2)])
def test_bad_fusion_settings_raise(alpha, threshold):
    with pytest.raises(ValueError, match="alpha|threshold"):
        patches.FeatureFusion(BankHandle("x", BankConfig()), "all", alpha, threshold)


# -- patches: keys, selection, copy safety -------------------------------------------------------------

def _options(bank, flags, steps, frames, block=("input", 1), total=4):
    opts = {"block": block, "block_index": 0, "original_shape": [1, 4, 8, 8], "cond_or_uncond": flags}
    call = BankCall(bank, RowPlan(tuple(frames), tuple(steps), total), flags, len(flags) * len(steps))
    opts[STATE_KEY] = ModelState(calls={bank.name: call})
    return opts, call


def test_rows_are_keyed_by_cond_flag_and_step_in_any_order():
    name = "keys-test"
    bank_mod.BANKS.remove(name)
    handle = BankHandle(name, BankConfig(interval=1))
    bank = handle.open()
    ea = patches.ExtendedAttention(handle, "all")
    # Chunk order negative-then-positive, two rows per chunk at two different steps (a stream batch).
    ctx = torch.stack([torch.full((64, 4), v) for v in (1.0, 2.0, 3.0, 4.0)])
    opts, call = _options(bank, [1, 0], [0, 1], [1, 0])
    ea(ctx, ctx, ctx, opts)
    call.flush()
    layer = ("input", 1, 0)
    stored = {(flag, step): bank.view("n", layer, (flag * 4 + step), 1, 1, 1)[0, 0, 0].item()
              for flag in (0, 1) for step in (0, 1)}
    assert stored == {(1, 0): 1.0, (1, 1): 2.0, (0, 0): 3.0, (0, 1): 4.0}
    # Next frame, positive chunk alone at step 1: it must get exactly the positive step-1 tokens.
    new = torch.full((1, 64, 4), 9.0)
    opts, _ = _options(bank, [0], [1], [2])
    _, context, value = ea(new, new, new, opts)
    assert context.shape == (1, 128, 4) and (context[0, 64:] == 4.0).all() and value is context
    bank_mod.BANKS.remove(name)


def test_low_res_decoder_selection_comes_from_activation_sizes_seen_in_the_call():
    bank = FeatureBank(BankConfig())
    ff = patches.FeatureFusion(BankHandle("sel", BankConfig()), "low-res decoder", 0.75, 0.9)
    shape = [1, 4, 64, 64]
    call = BankCall(bank, RowPlan((0,), (0,), 1), [0], 1)
    seen = []
    blocks = [("input", 1, 4096), ("input", 4, 1024), ("input", 7, 256), ("middle", 0, 64),
              ("output", 3, 256), ("output", 6, 1024), ("output", 9, 4096)]
    for kind, idx, tokens in blocks:
        if patches.selected(ff.blocks, call, {"block": (kind, idx), "original_shape": shape}, tokens, "FF"):
            seen.append((kind, idx))
    assert seen == [("middle", 0), ("output", 3)]


def test_patch_objects_copy_pickle_and_share_after_running():
    """ComfyUI 0.3.x deep-copies patches on clone(), 0.38.x shares them: both after a run (issue 9)."""
    handle = BankHandle("copy-test", BankConfig(interval=1))
    bank_mod.BANKS.remove(handle.name)
    ea, ff = patches.ExtendedAttention(handle, "all"), patches.FeatureFusion(handle, "all", 0.75, 0.9)
    x = torch.randn(1, 16, 4)
    for frame in range(2):
        opts, call = _options(handle.open(), [0], [0], [frame])
        ea(x, x, x, opts)
        ff(x, opts)
        call.flush()
    for patch in (ea, ff):
        assert copy.deepcopy(patch) == patch and pickle.loads(pickle.dumps(patch)) == patch
        assert patch.to("cpu") is patch and patch.to(torch.float16) is patch
    bank_mod.BANKS.remove(handle.name)


def test_missing_block_information_warns_once_by_name(caplog):
    handle = BankHandle("warn-test", BankConfig(interval=1))
    ff = patches.FeatureFusion(handle, "low-res decoder", 0.75, 0.9)
    opts, _ = _options(handle.open(), [0], [0], [0])
    del opts["block"]
    forget_warnings()
    with caplog.at_level("WARNING", logger="streamv2v"):
        for _ in range(3):
            ff(torch.randn(1, 16, 4), opts)
    lines = [r.message for r in caplog.records if "did not pass block" in r.message]
    assert len(lines) == 1 and "Feature Fusion" in lines[0] and "skipped" in lines[0]
    bank_mod.BANKS.remove(handle.name)


# -- strength -> timesteps, similarity filter ---------------------------------------------------------

def test_strength_gives_the_authors_timesteps_and_is_continuous():
    assert strength_timesteps(4, 0.4) == pytest.approx([399, 299, 199, 99])
    for steps in range(1, 9):
        for strength in [round(0.1 + 0.05 * i, 2) for i in range(19)]:
            ts = strength_timesteps(steps, strength)
            assert abs(ts[0] - 1000 * strength) <= 0.01 * 1000 * strength + 1e-9, (steps, strength)
            assert all(a > b for a, b in zip(ts, ts[1:])) and ts[-1] >= 0
    assert strength_timesteps(4, 0.45)[0] != strength_timesteps(4, 0.5)[0]  # no snapping to steps/k
    assert strength_timesteps(4, 0.85)[0] != strength_timesteps(4, 1.0)[0]
    with pytest.raises(ValueError, match="strength"):
        strength_timesteps(4, 0.0)


def test_similarity_skip_probability_matches_streamdiffusion_on_minus_one_to_one():
    g = _gen(60)
    for _ in range(20):
        a = torch.rand(8, 8, 3, generator=g)
        b = (a + 0.1 * torch.rand(8, 8, 3, generator=g)).clamp(0, 1)
        x, y = a.double().flatten() * 2 - 1, b.double().flatten() * 2 - 1
        cos = float(x @ y / (x.norm() * y.norm()))
        for threshold in (0.5, 0.9, 0.98):
            want = max(0.0, 1 - (1 - cos) / (1 - threshold))
            assert skip_probability(a, b, threshold) == pytest.approx(want, abs=1e-12)


def test_similarity_filter_keeps_its_reference_while_skipping_and_caps_skips():
    still = torch.rand(8, 8, 3, generator=_gen(61))
    f = SimilarityFilter(threshold=0.5, max_skips=3, seed=0)
    # More than max_skips in a row forces a frame through (StreamDiffusion's skip_count > max_skip_frame).
    assert [f.skip(still) for _ in range(11)] == [False, True, True, True, True, False, True, True, True, True, False]
    # Drifting frames: the reference stays the last processed frame, so drift accumulates until a frame is kept.
    f = SimilarityFilter(threshold=0.999, max_skips=100, seed=0)
    drift = [still + 0.002 * i for i in range(40)]
    decisions = [f.skip(frame.clamp(0, 1)) for frame in drift]
    assert not decisions[0] and not all(decisions[1:])


def test_a_batch_of_images_counts_one_frame_per_key():
    """A KSampler batch of 3 images writes 3 slots of each key, and that is one frame, not three."""
    b = FeatureBank(BankConfig(mode="queue", size=2, interval=1))
    layer = ("input", 1, 0)
    for frame in range(2):
        call = BankCall(b, RowPlan((frame,) * 3, (0, 0, 0), 1, slots=(0, 1, 2)), [0], 3)
        call.extend(layer, torch.full((3, 4, 2), float(frame)) + torch.arange(3.0).view(3, 1, 1))
        call.flush()
        assert b.count("n", 0, 0) == frame + 1
    for slot in range(3):  # each image keeps its own past: frames 0 and 1 of that image
        held = b.view("n", layer, slot, 1, 1, 2)[0, :, 0]
        assert sorted(set(held.tolist())) == [float(slot), 1.0 + slot]
