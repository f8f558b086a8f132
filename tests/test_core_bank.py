"""The feature bank core against float64 references of the paper's equations (pure torch)."""
import math

import pytest
import torch

from streamv2v.streamv2v_core import attention, bank as bank_mod, merging, patches
from streamv2v.streamv2v_core.bank import BankConfig, BankHandle, BankRegistry, FeatureBank


def _gen(seed):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64).to(dtype)


# -- eq. 1: extended self-attention ------------------------------------------------------------------

def _reference_ex_attn(x, x_fb, wq, wk, wv, heads):
    """softmax(Q [K_t, K_fb]^T / sqrt(d)) [V_t, V_fb] per head, float64, x: [T, C], x_fb: [m, C]."""
    x, x_fb, wq, wk, wv = (t.double() for t in (x, x_fb, wq, wk, wv))
    q = x @ wq.T
    k = torch.cat([x @ wk.T, x_fb @ wk.T])
    v = torch.cat([x @ wv.T, x_fb @ wv.T])
    d = q.shape[1] // heads
    out = []
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        w = torch.softmax(q[:, sl] @ k[:, sl].T / math.sqrt(d), dim=-1)
        out.append(w @ v[:, sl])
    return torch.cat(out, dim=1)


def _attention_like_comfy(n, context, value, wq, wk, wv, heads):
    """What ComfyUI's CrossAttention does with (n, context, value): project, then SDPA, float32."""
    q, k, v = n @ wq.T, context @ wk.T, value @ wv.T
    b, _, c = q.shape
    split = lambda t: t.view(b, -1, heads, c // heads).transpose(1, 2)
    out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(b, -1, c)


def test_extended_attention_matches_eq1_float64():
    t, c, heads = 24, 32, 4
    x = _randn(2, t, c, seed=1)
    banked = [_randn(2 * t, c, seed=2), _randn(2 * t, c, seed=3)]
    wq, wk, wv = (_randn(c, c, seed=s) / math.sqrt(c) for s in (4, 5, 6))
    extended = attention.extend_with_bank(x, banked)
    got = _attention_like_comfy(x, extended, extended, wq, wk, wv, heads)
    for row in range(2):
        want = _reference_ex_attn(x[row], banked[row], wq, wk, wv, heads)
        torch.testing.assert_close(got[row].double(), want, rtol=1e-5, atol=1e-5)


def test_rows_with_longer_banks_use_their_newest_frames():
    t, c = 8, 4
    x = _randn(2, t, c, seed=1)
    short, long = _randn(t, c, seed=2), _randn(3 * t, c, seed=3)
    extended = attention.extend_with_bank(x, [short, long])
    assert extended.shape == (2, 2 * t, c)
    assert torch.equal(extended[0, t:], short) and torch.equal(extended[1, t:], long[2 * t:])


def test_padding_with_own_tokens_leaves_attention_unchanged():
    t, c, heads = 16, 32, 4
    x = _randn(2, t, c, seed=7)
    wq, wk, wv = (_randn(c, c, seed=s) / math.sqrt(c) for s in (8, 9, 10))
    extended = attention.extend_with_bank(x, [None, _randn(3 * t, c, seed=11)])
    got = _attention_like_comfy(x, extended, extended, wq, wk, wv, heads)
    plain = _attention_like_comfy(x[:1], x[:1], x[:1], wq, wk, wv, heads)
    torch.testing.assert_close(got[:1], plain, rtol=1e-5, atol=1e-6)
    assert attention.extend_with_bank(x, [None, None]) is None


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
def test_feature_fusion_matches_eq2_float64_with_threshold_mask(dtype, tol):
    t, m, c = 40, 30, 16
    out = _randn(1, t, c, seed=12)
    bank = _randn(1, m, c, seed=13)
    # Half the tokens have a near copy in the bank (similarity ~1), the rest only random ones.
    bank[0, :20] = out[0, :20] + 0.05 * _randn(20, c, seed=14)
    alpha, threshold = 0.75, 0.9
    got = attention.feature_fusion(out.to(dtype), bank.to(dtype), alpha, threshold)
    want = _reference_fusion(out.to(dtype)[0], bank.to(dtype)[0], alpha, threshold)
    torch.testing.assert_close(got[0].double(), want, rtol=tol, atol=tol)
    changed = (got[0].float() - out[0].to(dtype).float()).abs().amax(dim=1) > 0
    assert changed[:20].all() and not changed[20:].any(), "exactly the tokens with a match above threshold fuse"


# -- DyMe ---------------------------------------------------------------------------------------------

def test_dyme_merge_is_mean_of_destination_and_its_sources():
    x = _randn(2, 64, 8, seed=15)
    m = merging.random_bipartite_matching(x, 32, _gen(0))
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


def test_dyme_bank_stays_one_frame_after_1000_updates_with_one_matching_per_layer():
    b = FeatureBank(BankConfig(mode="dyme", size=1, interval=1))
    key = (("output", 3, 0), 0, 0)
    t, c = 12, 6
    w = _randn(c, 5, seed=16)  # "o" is a linear image of "n": the same matching keeps that exact
    g = _gen(17)
    for frame in range(1000):
        n = torch.randn(1, t, c, generator=g)
        b.write(key, "n", n, frame)
        b.write(key, "o", n @ w, frame)
        assert b.read(key, "n").shape == (1, t, c)
    torch.testing.assert_close(b.read(key, "o"), b.read(key, "n") @ w, rtol=1e-4, atol=1e-5)


def test_dyme_size_k_fills_then_merges_and_queue_is_fifo():
    t, c = 5, 3
    dyme = FeatureBank(BankConfig(mode="dyme", size=3, interval=1))
    queue = FeatureBank(BankConfig(mode="queue", size=2, interval=1))
    frames = [torch.full((1, t, c), float(i)) for i in range(6)]
    for i, f in enumerate(frames):
        dyme.write("k", "n", f, i)
        queue.write("k", "n", f, i)
        assert dyme.read("k", "n").shape[1] == min(i + 1, 3) * t
    torch.testing.assert_close(queue.read("k", "n"), torch.cat(frames[4:], dim=1))


def test_interval_write_once_per_frame_and_private_rng():
    b = FeatureBank(BankConfig(mode="dyme", size=1, interval=4))
    state = torch.get_rng_state()
    written = []
    for frame in range(9):
        x = torch.full((1, 4, 2), float(frame))
        b.write("k", "n", x, frame)
        b.write("k", "n", x + 100, frame)  # a second call at the same step of the same frame: ignored
        written.append(b.read("k", "n").clone())
    assert torch.equal(torch.get_rng_state(), state), "the global RNG must not be touched"
    assert [b.updates_on(f) for f in range(9)] == [f % 4 == 0 for f in range(9)]
    assert torch.equal(written[3], written[0]) and not torch.equal(written[4], written[3])
    assert (written[0] == 0).all() and (written[8] < 100).all()


def test_bank_follows_dtype_counts_bytes_and_resets(caplog):
    b = FeatureBank(BankConfig(interval=1), name="t")
    b.write("k", "n", torch.zeros(1, 8, 4, dtype=torch.float16), 0)
    assert b.read("k", "n").dtype == torch.float16
    assert b.nbytes() == 8 * 4 * 2
    b.to("cpu")
    b.check_signature({"latent size": "8x8"})
    with caplog.at_level("INFO", logger="streamv2v"):
        assert b.check_signature({"latent size": "16x16"})
    assert b.nbytes() == 0 and "latent size changed from 8x8 to 16x16" in caplog.text
    b.write("k", "n", torch.zeros(1, 8, 4), 0)
    b.reset()
    assert b.num_entries() == 0 and b.frames_seen == 0


def test_registry_shares_by_name_and_resets_on_new_settings():
    reg = BankRegistry()
    a = reg.get("x", BankConfig())
    assert reg.get("x") is a
    a.write("k", "n", torch.zeros(1, 2, 2), 0)
    reg.get("x", BankConfig(mode="queue"))
    assert a.num_entries() == 0 and a.config.mode == "queue"
    reg.clear()
    assert reg.names() == []


@pytest.mark.parametrize("kwargs", [dict(size=0), dict(interval=0), dict(mode="fifo")])
def test_bad_bank_settings_raise(kwargs):
    with pytest.raises(ValueError, match="bank"):
        BankConfig(**kwargs)


@pytest.mark.parametrize("alpha,threshold", [(1.5, 0.9), (-0.1, 0.9), (0.75, 1.2)])
def test_bad_fusion_settings_raise(alpha, threshold):
    with pytest.raises(ValueError, match="alpha|threshold"):
        patches.FeatureFusion(BankHandle("x", BankConfig()), "all", alpha, threshold)


# -- keys: cond/uncond and steps never mix ------------------------------------------------------------

def _options(flags, sigmas, block=("input", 1), frames=None):
    opts = {"block": block, "block_index": 0, "original_shape": [1, 4, 8, 8], "cond_or_uncond": flags,
            "sigmas": torch.tensor(sigmas), "sample_sigmas": torch.tensor([14.6, 3.0, 1.0, 0.5, 0.0])}
    if frames is not None:
        opts[patches.FRAMES_KEY] = frames
    return opts


def test_rows_are_keyed_by_cond_flag_and_step_in_any_order():
    name = "keys-test"
    bank_mod.BANKS.remove(name)
    handle = BankHandle(name, BankConfig(interval=1))
    ea = patches.ExtendedAttention(handle, "all")
    # Chunk order negative-then-positive, two rows per chunk at two different steps (a stream batch);
    # ComfyUI passes one sigma per row of a chunk.
    ctx = torch.stack([torch.full((64, 4), v) for v in (1.0, 2.0, 3.0, 4.0)])
    ea(ctx, ctx, ctx, _options([1, 0], [14.6, 3.0], frames=[0, 0]))
    bank = handle.bank
    layer = ("input", 1, 0)
    assert bank.read((layer, 0, 1), "n")[0, 0, 0] == 1.0
    assert bank.read((layer, 1, 1), "n")[0, 0, 0] == 2.0
    assert bank.read((layer, 0, 0), "n")[0, 0, 0] == 3.0
    assert bank.read((layer, 1, 0), "n")[0, 0, 0] == 4.0
    # Next frame, positive chunk alone at step 1: it must get exactly the positive step-1 tokens.
    new = torch.full((1, 64, 4), 9.0)
    _, context, value = ea(new, new, new, _options([0], [3.0], frames=[1]))
    assert context.shape == (1, 128, 4) and (context[0, 64:] == 4.0).all() and value is context
    bank_mod.BANKS.remove(name)


def test_low_res_decoder_selection_comes_from_activation_sizes():
    ff = patches.FeatureFusion(BankHandle("sel", BankConfig()), "low-res decoder", 0.75, 0.9)
    shape = [1, 4, 64, 64]
    seen = []
    blocks = [("input", 1, 4096), ("input", 4, 1024), ("input", 7, 256), ("middle", 0, 64),
              ("output", 3, 256), ("output", 6, 1024), ("output", 9, 4096)]
    for kind, idx, tokens in blocks:
        if ff.selected({"block": (kind, idx), "original_shape": shape}, tokens):
            seen.append((kind, idx))
    assert seen == [("middle", 0), ("output", 3)]
