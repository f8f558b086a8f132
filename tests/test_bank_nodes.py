"""The bank nodes on ComfyUI's real UNet, ModelPatcher and KSampler (in-process, CPU)."""
import copy
import logging

import pytest
import torch

import nodes as comfy_nodes  # ComfyUI's nodes.py
from comfy_extras.nodes_tomesd import TomePatchModel
from host import tiny_models
from streamv2v.nodes.bank_nodes import ExtendedAttentionPatch, FeatureBankNode, FeatureFusionPatch
from streamv2v.streamv2v_core import BANKS
from streamv2v.streamv2v_core.patches import step_of

LATENT = 16  # 128x128 images: 256 tokens at full resolution


def _bank(name, **kw):
    BANKS.remove(name)
    args = dict(mode="dyme", size=1, interval=1, reset=False, seed=0) | kw
    return FeatureBankNode.execute(name, args["mode"], args["size"], args["interval"], args["reset"],
                                   args["seed"]).args[0]


def _patch(model, handle, ea=True, ff=True):
    if ea:
        model = ExtendedAttentionPatch.execute(model, handle, "all").args[0]
    if ff:
        model = FeatureFusionPatch.execute(model, handle, 0.75, 0.9, "low-res decoder").args[0]
    return model


def _sample(model, pos, neg, seed=0, cfg=1.0, size=LATENT, steps=4, batch=1):
    latent = {"samples": torch.zeros(batch, 4, size, size)}
    return comfy_nodes.common_ksampler(model, seed, steps, cfg, "lcm", "sgm_uniform", pos, neg, latent)[0]["samples"]


class Recorder:
    """An attn1_patch of 'another pack' that records what it sees: (layer, step, flag) -> context rows."""

    def __init__(self):
        self.seen = {}

    def __deepcopy__(self, memo):  # ModelPatcher.clone() deep-copies model options; keep one record
        return self

    def __call__(self, n, context, value, extra_options):
        flags = extra_options["cond_or_uncond"]
        per_chunk = context.shape[0] // len(flags)
        sigmas = extra_options["sigmas"]
        block = extra_options["block"]
        layer = (block[0], block[1], extra_options["block_index"])
        for chunk, flag in enumerate(flags):
            for r in range(per_chunk):
                step = step_of(float(sigmas[r]), extra_options["sample_sigmas"])
                self.seen[(layer, step, flag)] = context[chunk * per_chunk + r].clone()
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
    assert handle.bank.frames_seen == 2


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


def test_frame_counting_and_resets_on_latent_or_model_change(caplog):
    model = tiny_models.tiny_sd15_model(0)
    pos = tiny_models.random_conditioning("sd15", 1)
    handle = _bank("resets", interval=4)
    m = _patch(model, handle)
    for seed in range(3):
        _sample(m, pos, pos, seed=seed)
    bank = handle.bank
    assert bank.frames_seen == 3 and bank.nbytes() > 0
    with caplog.at_level(logging.INFO, logger="streamv2v"):
        _sample(m, pos, pos, size=LATENT + 8)
    assert "latent size changed from 16x16" in caplog.text and bank.frames_seen == 1
    caplog.clear()
    other = _patch(tiny_models.tiny_sd15_model(1), handle)
    with caplog.at_level(logging.INFO, logger="streamv2v"):
        _sample(other, pos, pos, size=LATENT + 8)
    assert "model changed" in caplog.text
    FeatureBankNode.execute("resets", "dyme", 1, 4, True, 0)
    assert bank.nbytes() == 0 and bank.frames_seen == 0


def test_bank_changes_the_next_frame_and_reset_restores_it():
    model = tiny_models.tiny_sd15_model(0)
    pos = tiny_models.random_conditioning("sd15", 1)
    handle = _bank("effect", interval=1)
    m = _patch(model, handle)
    first = _sample(m, pos, pos, seed=1)
    assert torch.equal(first, _sample(model, pos, pos, seed=1)), "an empty bank changes nothing"
    with_past = _sample(m, pos, pos, seed=2)
    FeatureBankNode.execute("effect", "dyme", 1, 1, True, 0)
    fresh = _sample(m, pos, pos, seed=2)
    assert not torch.allclose(with_past, fresh)
    assert torch.equal(fresh, _sample(model, pos, pos, seed=2))


@pytest.mark.parametrize("alpha,threshold", [(1.5, 0.9), (0.75, -2.0)])
def test_bad_fusion_input_is_refused_before_sampling(alpha, threshold):
    model = tiny_models.tiny_sd15_model(0)
    with pytest.raises(ValueError, match="alpha|threshold"):
        FeatureFusionPatch.execute(model, _bank("bad"), alpha, threshold, "low-res decoder")
    with pytest.raises(ValueError, match="blocks"):
        ExtendedAttentionPatch.execute(model, _bank("bad"), "everything")
