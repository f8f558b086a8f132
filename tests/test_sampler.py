"""StreamV2VSampler and the stream engine with ComfyUI's real model, guider and VAE (in-process, CPU)."""
import pytest
import torch

import comfy.model_management
from host import tiny_models
from streamv2v.nodes.bank_nodes import ExtendedAttentionPatch, FeatureBankNode, FeatureFusionPatch
from streamv2v.nodes.sampler_nodes import StreamV2VSampler
from streamv2v.streamv2v_core import BANKS
from streamv2v.streamv2v_core.stream import NoiseSource, stream_denoise

SIZE = 64


@pytest.fixture(scope="module")
def parts():
    model = tiny_models.tiny_sd15_model(0)
    vae = tiny_models.tiny_taesd_vae(1)
    pos, neg = tiny_models.random_conditioning("sd15", 1), tiny_models.random_conditioning("sd15", 2)
    return model, vae, pos, neg


def moving_frames(n, size=SIZE, seed=0):
    """A smooth random texture sliding 2 px per frame: ``[n, size, size, 3]`` in 0..1."""
    g = torch.Generator().manual_seed(seed)
    canvas = torch.nn.functional.interpolate(torch.rand(1, 3, 16, 16 + n, generator=g), scale_factor=size / 16,
                                             mode="bilinear")[0].permute(1, 2, 0)
    return torch.stack([canvas[:, 2 * i: 2 * i + size] for i in range(n)]).contiguous()


def run(parts, images, model=None, **kw):
    m, vae, pos, neg = parts
    args = dict(seed=1, steps=4, strength=0.4, cfg=1.0, stream_batch=True, fixed_noise=True) | kw
    return StreamV2VSampler.execute(model or m, pos, neg, vae, images, **args).args[0]


def patched(parts, name, interval=1, mode="dyme"):
    BANKS.remove(name)
    handle = FeatureBankNode.execute(name, mode, 1, interval, False, 0).args[0]
    model = ExtendedAttentionPatch.execute(parts[0], handle, "all").args[0]
    return FeatureFusionPatch.execute(model, handle, 0.75, 0.9, "low-res decoder").args[0], handle


def test_stream_batch_reorders_but_does_not_change_the_frames(parts):
    frames = moving_frames(6)
    stream = run(parts, frames, stream_batch=True)
    sequential = run(parts, frames, stream_batch=False)
    torch.testing.assert_close(stream, sequential, rtol=0, atol=1e-4)
    # With the bank on too: each (layer, step) key is read and written in frame order either way.
    model, handle = patched(parts, "stream-eq")
    stream_bank = run(parts, frames, model=model, stream_batch=True, cfg=2.0)
    handle.bank.reset()
    sequential_bank = run(parts, frames, model=model, stream_batch=False, cfg=2.0)
    torch.testing.assert_close(stream_bank, sequential_bank, rtol=0, atol=1e-4)
    assert not torch.allclose(stream_bank, run(parts, frames, cfg=2.0), atol=1e-3), "the bank changed nothing"


@pytest.mark.parametrize("n", [1, 2, 3, 50])
def test_n_frames_in_n_frames_out_none_blank(parts, n):
    frames = moving_frames(n)
    out = run(parts, frames)
    assert out.shape == frames.shape and torch.isfinite(out).all()
    per_frame_std = out.reshape(n, -1, 3).std(dim=1).mean(dim=1)
    assert (per_frame_std > 0.02).all(), f"blank frames at {torch.nonzero(per_frame_std <= 0.02).flatten().tolist()}"
    # Output i belongs to input i: restyling frame i alone gives the same picture (no bank, fixed noise).
    for i in {0, n // 2, n - 1}:
        torch.testing.assert_close(run(parts, frames[i:i + 1])[0], out[i], rtol=0, atol=1e-4)


def test_cfg_keeps_cond_and_uncond_apart_in_the_bank(parts):
    model, handle = patched(parts, "cfg", interval=1)
    run(parts, moving_frames(3), model=model, cfg=2.5)
    keys = [k for k in handle.bank._entries]
    flags = {k[2] for k in keys}
    steps = {k[1] for k in keys}
    assert flags == {0, 1} and steps == {0, 1, 2, 3}
    layer = keys[0][0]
    assert not torch.equal(handle.bank.read((layer, 2, 0), "n"), handle.bank.read((layer, 2, 1), "n"))
    assert handle.bank.frames_seen == 3


def test_bank_continues_across_calls_and_counts_frames(parts):
    model, handle = patched(parts, "continue", interval=2)
    run(parts, moving_frames(3), model=model)
    assert handle.bank.frames_seen == 3
    run(parts, moving_frames(2, seed=1), model=model)
    assert handle.bank.frames_seen == 5


def test_similarity_filter_reuses_output_of_still_frames(parts):
    still = moving_frames(1).repeat(8, 1, 1, 1)
    model, handle = patched(parts, "still")
    out = run(parts, still, model=model, similarity_filter=True, similarity_threshold=0.5, max_skips=3)
    assert out.shape == still.shape
    # Identical frames are always skipped, at most 3 in a row: frames 0 and 4 are processed.
    assert handle.bank.frames_seen == 2
    assert all(torch.equal(out[i], out[0]) for i in (1, 2, 3))
    assert all(torch.equal(out[i], out[4]) for i in (5, 6, 7))


@pytest.mark.parametrize("kwargs,message", [
    (dict(strength=0.0), "strength"), (dict(strength=1.5), "strength"),
    (dict(steps=0), "steps"), (dict(steps=51), "steps"),
])
def test_bad_settings_are_refused_before_sampling(parts, kwargs, message):
    with pytest.raises(ValueError, match=message):
        run(parts, moving_frames(2), **kwargs)
    assert isinstance(StreamV2VSampler.validate_inputs(**({"steps": 4, "strength": 0.4} | kwargs)), str)


def test_bad_frames_are_refused_with_what_to_do(parts):
    with pytest.raises(ValueError, match="empty|no input frames"):
        run(parts, torch.zeros(0, SIZE, SIZE, 3))
    with pytest.raises(ValueError, match=r"not divisible by 8.*resize"):
        run(parts, torch.rand(2, 60, 64, 3))


def test_cancel_stops_promptly(parts):
    frames = moving_frames(40)
    seen = []
    model, vae, pos, neg = parts
    from streamv2v.nodes.stream_engine import StreamSettings, run_stream

    def on_output(i, image):
        seen.append(i)
        if i == 2:
            comfy.model_management.interrupt_current_processing(True)

    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            run_stream(model, pos, neg, vae, iter(frames), StreamSettings(), on_output)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert seen == [0, 1, 2]


def test_full_kl_vae_and_sdxl_model_work():
    model = tiny_models.tiny_sdxl_model(0)
    vae = tiny_models.tiny_full_vae(1)
    cond = tiny_models.random_conditioning("sdxl", 1)
    out = StreamV2VSampler.execute(model, cond, cond, vae, moving_frames(3), seed=0).args[0]
    assert out.shape == (3, SIZE, SIZE, 3) and torch.isfinite(out).all()


def test_stream_denoise_schedule_is_pure_reordering():
    """The pure scheduler: one call per frame plus the drain, each call holding up to S frames."""
    calls = []

    def denoise(x, sigma, offsets):
        calls.append(list(offsets))
        return x * 0.5

    sigmas = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    latents = [torch.full((1, 1, 2, 2), float(i)) for i in range(5)]
    out = list(stream_denoise(iter(latents), sigmas, denoise, lambda s, n, x: x + 0 * n, NoiseSource(0)))
    assert [i for i, _ in out] == [0, 1, 2, 3, 4]
    assert calls[:4] == [[0], [1, 0], [2, 1, 0], [3, 2, 1, 0]] and len(calls) == 5 + 3
    assert all(torch.equal(x, latents[i] / 16) for i, x in out)


def test_after_core_lora_and_lcm_model_sampling_nodes(parts):
    """The sampler runs a bank-patched model that ComfyUI's own LoRA loader and ModelSamplingDiscrete changed."""
    import comfy.sd
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    model, vae, pos, neg = parts
    g = torch.Generator().manual_seed(3)
    lora = {}
    for name, weight in model.model.diffusion_model.named_parameters():
        if name.endswith("attn1.to_q.weight"):
            key = "lora_unet_" + name[: -len(".weight")].replace(".", "_")
            lora[f"{key}.lora_up.weight"] = torch.randn(weight.shape[0], 4, generator=g)
            lora[f"{key}.lora_down.weight"] = torch.randn(4, weight.shape[1], generator=g)
    lora_model, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
    assert lora_model.patches, "the LoRA applied to no weight"
    lcm_model = ModelSamplingDiscrete().patch(lora_model, "lcm", False)[0]
    bank_model, handle = patched((lcm_model, vae, pos, neg), "lora")
    frames = moving_frames(4)
    out = run(parts, frames, model=bank_model)
    assert out.shape == frames.shape and torch.isfinite(out).all()
    assert handle.bank.frames_seen == 4
    assert not torch.allclose(out, run(parts, frames), atol=1e-3)


def tiny_controlnet(model, seed=5):
    """A ComfyUI ControlNet with the tiny UNet's encoder layout and random weights (pixel hint, no VAE)."""
    import inspect

    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops

    accepted = inspect.signature(comfy.cldm.cldm.ControlNet.__init__).parameters
    config = {k: v for k, v in model.model.model_config.unet_config.items() if k in accepted and k != "out_channels"}
    config.update(hint_channels=3, operations=comfy.ops.disable_weight_init, dtype=torch.float32, device="cpu")
    net = tiny_models.init_params_(comfy.cldm.cldm.ControlNet(**config), seed)
    return comfy.controlnet.ControlNet(net, load_device=torch.device("cpu"))


def test_after_core_controlnet_apply(parts):
    """Core ControlNetApplyAdvanced on the conditioning: it steers every frame, stream batch or not."""
    from nodes import ControlNetApplyAdvanced

    model, vae, pos, neg = parts
    hint = moving_frames(1, seed=7)
    c_pos, c_neg = ControlNetApplyAdvanced().apply_controlnet(pos, neg, tiny_controlnet(model), hint, 1.0, 0.0, 1.0)
    bank_model, _ = patched(parts, "controlnet")
    frames = moving_frames(4)
    stream = StreamV2VSampler.execute(bank_model, c_pos, c_neg, vae, frames, seed=1, stream_batch=True).args[0]
    BANKS.get("controlnet").reset()
    sequential = StreamV2VSampler.execute(bank_model, c_pos, c_neg, vae, frames, seed=1, stream_batch=False).args[0]
    assert torch.isfinite(stream).all()
    torch.testing.assert_close(stream, sequential, rtol=0, atol=1e-4)
    BANKS.get("controlnet").reset()
    plain = StreamV2VSampler.execute(bank_model, pos, neg, vae, frames, seed=1).args[0]
    assert not torch.allclose(stream, plain, atol=1e-3), "the ControlNet changed nothing"
