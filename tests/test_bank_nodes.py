"""The bank nodes on ComfyUI's real UNet, ModelPatcher and KSampler (in-process, CPU)."""
import copy
import logging

import pytest
import torch

import nodes as comfy_nodes  # ComfyUI's nodes.py
from comfy_extras.nodes_tomesd import TomePatchModel
from host import tiny_models
from host.comfy038 import emulate_038_clone
from streamv2v.nodes.bank_nodes import ExtendedAttentionPatch, FeatureBankNode, FeatureFusionPatch
from streamv2v.streamv2v_core import BANKS
from streamv2v.streamv2v_core.bank.patches import FeatureFusion, step_of

LATENT = 16  # 128x128 images: 256 tokens at full resolution


def _bank(name, **kw):
    BANKS.remove(name)
    args = dict(mode="dyme", size=1, interval=1, seed=0) | kw
    return FeatureBankNode.execute(name, args["mode"], args["size"], args["interval"], args["seed"]).args[0]


def _patch(model, handle, ea=True, ff=True, alpha=0.75, ea_blocks="all"):
    if ea:
        model = ExtendedAttentionPatch.execute(model, handle, ea_blocks).args[0]
    if ff:
        model = FeatureFusionPatch.execute(model, handle, alpha, 0.9, "low-res decoder").args[0]
    return model


def _sample(model, pos, neg, seed=0, cfg=1.0, size=LATENT, steps=4, batch=1, denoise=1.0):
    latent = {"samples": torch.zeros(batch, 4, size, size)}
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        return comfy_nodes.common_ksampler(model, seed, steps, cfg, "lcm", "sgm_uniform", pos, neg, latent,
                                           denoise=denoise)[0]["samples"]


class Recorder:
    """An attn1_patch of 'another pack' that records what it sees: (layer, step, flag) -> context rows."""

    def __init__(self):
        self.seen = {}

    def __deepcopy__(self, memo):  # ModelPatcher.clone() deep-copies model options; keep one record
        return self

    def __call__(self, n, context, value, extra_options):
        flags = extra_options["cond_or_uncond"]
        per_chunk = context.shape[0] // len(flags)
        sigmas, schedule = extra_options["sigmas"].tolist(), extra_options["sample_sigmas"].tolist()
        block = extra_options["block"]
        layer = (block[0], block[1], extra_options["block_index"])
        for chunk, flag in enumerate(flags):
            for r in range(per_chunk):
                self.seen[(layer, step_of(sigmas[r], schedule), flag)] = context[chunk * per_chunk + r].clone()
        return n, context, value


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_cond_uncond_and_steps_never_mix_in_the_real_unet(kind):
    """Frame 1 attends to exactly frame 0's tokens of the same layer, step and prompt side."""
    model = tiny_models.tiny_sd15_model(0) if kind == "sd15" else tiny_models.tiny_sdxl_model(0)
    pos, neg = tiny_models.random_conditioning(kind, 1), tiny_models.random_conditioning(kind, 2)
    handle = _bank(f"mix-{kind}")
    before, after = Recorder(), Recorder()
    m = model.clone()
    m.set_model_attn1_patch(before)
    m = _patch(m, handle, ea=True, ff=False)
    m.set_model_attn1_patch(after)

    _sample(m, pos, neg, seed=1, cfg=3.0)  # frame 0: fills the bank, attends to nothing extra
    frame0 = dict(before.seen)
    assert {k[2] for k in frame0} == {0, 1} and len({k[1] for k in frame0}) == 4
    assert all(after.seen[k].shape == frame0[k].shape for k in frame0)

    _sample(m, pos, neg, seed=2, cfg=3.0)  # frame 1: reads it
    for key, tokens0 in frame0.items():
        extended = after.seen[key]
        own = before.seen[key]
        assert extended.shape[0] == 2 * own.shape[0]
        assert torch.equal(extended[: own.shape[0]], own)
        torch.testing.assert_close(extended[own.shape[0]:], tokens0, rtol=0, atol=0, msg=f"{key} mixed")
    # Positive and negative features really differ: everywhere but the first self-attention of
    # each step, which sees the same latent on both sides.
    positive = [k for k in frame0 if k[2] == 0]
    differ = sum(not torch.equal(frame0[k], frame0[(k[0], k[1], 1)]) for k in positive)
    assert differ >= len(positive) - 4
    assert handle.open().frames_seen == 2


def test_incoming_model_is_never_mutated():
    model = tiny_models.tiny_sd15_model(0)
    pos, neg = tiny_models.random_conditioning("sd15", 1), tiny_models.random_conditioning("sd15", 2)
    options_before = copy.deepcopy(model.model_options)
    wrappers_before = copy.deepcopy(model.wrappers)
    plain = _sample(model, pos, neg, seed=3, cfg=2.0)
    patched = _patch(model, _bank("mutate"))
    patched = _patch(patched, _bank("mutate"))  # patching twice = patching once
    assert len(patched.model_options["transformer_options"]["patches"]["attn1_patch"]) == 1
    for seed in (4, 5):
        _sample(patched, pos, neg, seed=seed, cfg=2.0)
    assert model.model_options == options_before and model.wrappers == wrappers_before
    assert torch.equal(_sample(model, pos, neg, seed=3, cfg=2.0), plain)


def test_stacks_with_core_tome_patch():
    model = tiny_models.tiny_sd15_model(0)
    pos, neg = tiny_models.random_conditioning("sd15", 1), tiny_models.random_conditioning("sd15", 2)
    tome = TomePatchModel.execute(model, 0.5).args[0]
    outputs = {}
    for name, base in (("bank", model), ("tome+bank", tome)):
        m = _patch(base, _bank(name, interval=1))
        _sample(m, pos, neg, seed=1, size=32)  # frame 0 fills the bank
        outputs[name] = _sample(m, pos, neg, seed=2, size=32)
    outputs["tome"] = _sample(tome, pos, neg, seed=2, size=32)
    stacked = _patch(tome, _bank("x"))
    patch_types = [type(p).__name__ for p in stacked.model_options["transformer_options"]["patches"]["attn1_patch"]]
    assert len(patch_types) == 2 and "ExtendedAttention" in patch_types
    assert torch.isfinite(outputs["tome+bank"]).all()
    assert not torch.allclose(outputs["tome+bank"], outputs["tome"])
    assert not torch.allclose(outputs["tome+bank"], outputs["bank"])


def test_frame_counting_and_readable_resets(caplog):
    """Every clear says why in words (no object ids): size, model, LoRA strength, settings."""
    import comfy.sd

    model = tiny_models.tiny_sd15_model(0)
    pos = tiny_models.random_conditioning("sd15", 1)
    handle = _bank("resets", interval=4)
    m = _patch(model, handle)
    for seed in range(3):
        _sample(m, pos, pos, seed=seed)
    bank = handle.open()
    assert bank.frames_seen == 3 and bank.nbytes() > 0

    def reason_after(run):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="streamv2v"):
            run()
        lines = [r.message for r in caplog.records if "cleared" in r.message]
        assert len(lines) == 1, lines
        assert "@" not in lines[0] and "0x" not in lines[0] and "uuid" not in lines[0].lower()
        return lines[0].split("cleared: ")[1]

    assert reason_after(lambda: _sample(m, pos, pos, size=LATENT + 8)) == "frame size changed 128x128 -> 192x192"
    assert bank.frames_seen == 1
    other = _patch(tiny_models.tiny_sd15_model(1), handle)
    assert reason_after(lambda: _sample(other, pos, pos, size=LATENT + 8)) == "model (checkpoint or model loader) changed"
    lora = tiny_models.random_self_attention_lora(model)
    weak = _patch(comfy.sd.load_lora_for_models(model, None, lora, 0.5, 0.0)[0], handle)
    strong = _patch(comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)[0], handle)
    assert reason_after(lambda: _sample(weak, pos, pos)) == ("model (checkpoint or model loader) changed; LoRA or "
                                                            "weight patches changed none -> 16 patched weights; "
                                                            "frame size changed 192x192 -> 128x128")
    assert reason_after(lambda: _sample(strong, pos, pos)) == "LoRA strength changed 0.5 -> 1"
    assert reason_after(lambda: _sample(strong, pos, pos, steps=6)) == "steps changed 4 -> 6"
    assert reason_after(lambda: _sample(strong, pos, pos, steps=6, denoise=0.5)).startswith("noise schedule")
    assert reason_after(lambda: FeatureBankNode.execute("resets", "queue", 2, 4, 0)) == \
        "bank settings changed: mode dyme -> queue, size 1 -> 2"
    assert bank.last_reset_reason.startswith("bank settings changed")


def test_bank_changes_the_next_frame_and_a_clear_restores_it():
    model = tiny_models.tiny_sd15_model(0)
    pos = tiny_models.random_conditioning("sd15", 1)
    handle = _bank("effect", interval=1)
    m = _patch(model, handle)
    first = _sample(m, pos, pos, seed=1)
    assert torch.equal(first, _sample(model, pos, pos, seed=1)), "an empty bank changes nothing"
    with_past = _sample(m, pos, pos, seed=2)
    handle.open().reset("test")
    fresh = _sample(m, pos, pos, seed=2)
    assert not torch.allclose(with_past, fresh)
    assert torch.equal(fresh, _sample(model, pos, pos, seed=2))


@pytest.mark.parametrize("semantics", ["0.3.75 deep copy", "0.38 shared patches"])
def test_edits_users_make_between_runs_work_under_both_clone_semantics(semantics):
    """EA -> KSampler, then FF inserted; alpha changed; EA blocks changed; two samplers on the EA model."""
    model = tiny_models.tiny_sd15_model(0)
    pos, neg = tiny_models.random_conditioning("sd15", 1), tiny_models.random_conditioning("sd15", 2)
    handle = _bank(f"edits-{semantics}", interval=1)
    emulate = emulate_038_clone() if semantics.startswith("0.38") else _nothing()
    with emulate:
        ea = _patch(model, handle, ff=False)  # a cached node output, re-used by every edit below
        _sample(ea, pos, neg, seed=1, cfg=2.0)
        with_ff = FeatureFusionPatch.execute(ea, handle, 0.75, 0.9, "low-res decoder").args[0]
        _sample(with_ff, pos, neg, seed=2, cfg=2.0)
        other_alpha = FeatureFusionPatch.execute(ea, handle, 0.5, 0.9, "low-res decoder").args[0]
        _sample(other_alpha, pos, neg, seed=3, cfg=2.0)
        decoder_only = _patch(model, handle, ff=False, ea_blocks="decoder")
        _sample(decoder_only, pos, neg, seed=4, cfg=2.0)
        a = _sample(ea, pos, neg, seed=5, cfg=2.0)  # two samplers on the same EA model in one prompt
        b = _sample(ea, pos, neg, seed=6, cfg=2.0)
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
        copy.deepcopy(ea.model_options)  # what 0.3.75's clone() does: must never fail
    assert handle.open().frames_seen == 6
    # The EA model is still EA only (FF went on clones), and the original model has no patches at all.
    assert set(ea.model_options["transformer_options"]["patches"]) == {"attn1_patch"}
    assert "patches" not in model.model_options.get("transformer_options", {})


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_fp8_weights_keep_the_bank_in_the_compute_dtype():
    """ComfyUI moves patches to the weight dtype too (model_patches_to(fp8)); the bank must not follow."""
    model = tiny_models.tiny_sd15_model(0, dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    assert model.model_dtype() == torch.float8_e4m3fn
    pos = tiny_models.random_conditioning("sd15", 1)
    handle = _bank("fp8", interval=1)
    m = _patch(model, handle)
    m.model_patches_to(torch.float8_e4m3fn)
    for seed in (1, 2):
        out = _sample(m, pos, pos, seed=seed)
    assert torch.isfinite(out).all()
    bank = handle.open()
    groups = [g for store in (bank.store, bank.units.store) for name in ("n", "o") for g in store.groups(name)]
    assert {g.data.dtype for g in groups} == {torch.float32}
    elements = sum(g.data.numel() for g in groups)
    assert bank.nbytes() == 4 * elements and bank.status()["bytes"] == bank.nbytes()


@pytest.mark.parametrize("alpha,threshold", [(1.5, 0.9), (0.75, -2.0)])
def test_bad_fusion_input_is_refused_before_sampling(alpha, threshold):
    model = tiny_models.tiny_sd15_model(0)
    with pytest.raises(ValueError, match="alpha|threshold"):
        FeatureFusionPatch.execute(model, _bank("bad"), alpha, threshold, "low-res decoder")
    with pytest.raises(ValueError, match="blocks"):
        ExtendedAttentionPatch.execute(model, _bank("bad"), "everything")


def test_patches_trace_without_graph_breaks_and_reuse_the_graph_across_frames():
    """torch.compile (dynamo, eager backend: tracing only) of a ComfyUI transformer block with EA and FF
    inside: no graph break, and new frames reuse the compiled graphs (frame numbers are not guarded on)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    import comfy.ops

    # pytest captures every log record; torch's structured trace log at DEBUG makes tracing ~80x slower.
    logging.getLogger("torch.__trace").setLevel(logging.WARNING)
    from comfy.ldm.modules.attention import BasicTransformerBlock
    from streamv2v.streamv2v_core.bank.calls import BankCall, RowPlan
    from streamv2v.streamv2v_core.bank.state import STATE_KEY, ModelState

    block = tiny_models.init_params_(BasicTransformerBlock(32, 4, 8, context_dim=16,
                                                           operations=comfy.ops.disable_weight_init), 3)
    handle = _bank("compiled", interval=4)
    ea = ExtendedAttentionPatch.execute(tiny_models.tiny_sd15_model(0), handle, "all").args[0]
    patches = {"attn1_patch": [p for p in ea.model_options["transformer_options"]["patches"]["attn1_patch"]],
               "attn1_output_patch": [FeatureFusion(handle, "all", 0.75, 0.9)]}
    steps, g = 4, torch.Generator().manual_seed(0)
    context = torch.randn(steps, 7, 16, generator=g)

    def call(frame):
        """One stream-batch call: rows = frames frame..frame-3 at steps 0..3."""
        rows = [f for f in range(frame, frame - steps, -1) if f >= 0]
        bank_call = BankCall(handle.open(), RowPlan(tuple(rows), tuple(range(len(rows))), steps), [0], len(rows))
        options = {"patches": patches, "block": ("middle", 0), "block_index": 0, "original_shape": [1, 4, 4, 4],
                   "cond_or_uncond": [0], STATE_KEY: ModelState(calls={handle.name: bank_call})}
        return bank_call, torch.randn(len(rows), 16, 32, generator=g), options

    with torch.inference_mode():
        for frame in range(8):  # fill the bank and the pipeline, uncompiled
            bank_call, x, options = call(frame)
            block(x, context[:x.shape[0]], transformer_options=options)
            bank_call.flush()
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(lambda x, c, o: block(x, c, transformer_options=o), backend="eager", dynamic=False)
        for frame in range(8, 20):
            bank_call, x, options = call(frame)
            out = compiled(x, context, options)
            eager = block(x, context, transformer_options=options)
            torch.testing.assert_close(out, eager, rtol=0, atol=1e-6)
            bank_call.flush()
    assert not counters["graph_break"], dict(counters["graph_break"])
    # Steady state: one graph per position of the updating frame in the stream batch (interval 4: 4 of them).
    assert counters["stats"]["unique_graphs"] <= 4, counters["stats"]["unique_graphs"]


def test_compiled_path_falls_back_cleanly_when_it_cannot_apply(caplog, monkeypatch):
    from streamv2v.nodes.engine import compiled_unet
    from streamv2v.nodes.sampler_nodes import StreamV2VSampler

    monkeypatch.setattr(compiled_unet, "COMPILE_BACKEND", "no-such-backend")
    compiled_unet.forget_compiled()
    model = _patch(tiny_models.tiny_sd15_model(0), _bank("fallback"))
    vae, cond = tiny_models.tiny_taesd_vae(1), tiny_models.random_conditioning("sd15", 1)
    frames = torch.rand(3, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    outputs = {}
    with caplog.at_level(logging.WARNING, logger="streamv2v"):
        # An old workflow's boolean; the second compiled run meets its call layouts again and compiles.
        for compiled in (True, True, False):
            outputs[compiled] = StreamV2VSampler.execute(model, cond, cond, vae, frames, seed=1,
                                                         compile=compiled).args[0]
    # A compiled run pads the stream batch's filling and draining calls to its full rows (one graph): the
    # same frames up to float32 rounding of a larger batch (the float32 bound of test_sampler.py).
    torch.testing.assert_close(outputs[True], outputs[False], rtol=0, atol=1e-4)
    assert "compiling the UNet failed" in caplog.text and "InvalidBackend" in caplog.text
    compiled_unet.forget_compiled()
