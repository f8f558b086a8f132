"""Sanity checks of the test host itself: tiny models, in-process sampling, the real server."""
import pytest
import torch

import nodes  # ComfyUI's nodes.py (the pack's nodes/ must never shadow it)
from host import tiny_models


def test_comfy_nodes_module_is_comfyui():
    assert hasattr(nodes, "common_ksampler") and hasattr(nodes, "NODE_CLASS_MAPPINGS")
    import comfy.model_management as mm
    assert mm.get_torch_device().type == "cpu"


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_tiny_model_samples_with_ksampler(kind):
    model, clip, vae = tiny_models.tiny_checkpoint(kind, seed=0)
    pos = tiny_models.encode_prompt(clip, "a photo of a cat")
    neg = tiny_models.encode_prompt(clip, "")
    assert pos[0][0].shape == (1, 77, tiny_models.CONTEXT_DIM[kind])
    assert pos[0][1]["pooled_output"].shape == (1, tiny_models.POOLED_DIM[kind])
    latent = {"samples": torch.zeros(1, 4, 32, 32)}
    out = nodes.common_ksampler(model, 0, 4, 1.5, "euler", "normal", pos, neg, latent)[0]["samples"]
    assert out.shape == (1, 4, 32, 32)
    assert torch.isfinite(out).all()
    again = nodes.common_ksampler(model, 0, 4, 1.5, "euler", "normal", pos, neg, latent)[0]["samples"]
    assert torch.equal(out, again)
    img = vae.decode(out)
    assert img.shape == (1, 256, 256, 3) and torch.isfinite(img).all()


def test_random_conditioning_and_lcm():
    model = tiny_models.tiny_sd15_model(seed=1)
    cond = tiny_models.random_conditioning("sd15", seed=1)
    latent = {"samples": torch.zeros(1, 4, 32, 32)}
    out = nodes.common_ksampler(model, 0, 4, 1.0, "lcm", "sgm_uniform", cond, cond, latent)[0]["samples"]
    assert torch.isfinite(out).all()


def test_models_are_deterministic():
    a = tiny_models.tiny_sd15_model(seed=5).model.diffusion_model.state_dict()
    b = tiny_models.tiny_sd15_model(seed=5).model.diffusion_model.state_dict()
    c = tiny_models.tiny_sd15_model(seed=6).model.diffusion_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert all(torch.isfinite(v).all() for v in a.values())


@pytest.mark.parametrize("builder", ["tiny_taesd_vae", "tiny_full_vae"])
def test_vae_round_trip(builder):
    vae = getattr(tiny_models, builder)(seed=0)
    img = torch.rand(2, 64, 96, 3)
    lat = vae.encode(img)
    assert lat.shape == (2, 4, 8, 12) and torch.isfinite(lat).all()
    dec = vae.decode(lat)
    assert dec.shape == (2, 64, 96, 3) and torch.isfinite(dec).all()
    assert 0.0 <= dec.min() and dec.max() <= 1.0


def test_server_lists_nodes(comfy_server):
    info = comfy_server.object_info()
    assert "KSampler" in info
    assert "TinyCheckpointLoader" in info
    assert info["TinyCheckpointLoader"]["output"] == ["MODEL", "CLIP", "VAE"]
    assert not any("streamv2v_test_nodes" in f for f in comfy_server.import_failures())


def test_server_runs_txt2img_prompt(comfy_server):
    prompt = {
        "1": {"class_type": "TinyCheckpointLoader", "inputs": {"kind": "sd15", "seed": 0, "vae": "taesd"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a cat"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": 0, "steps": 4, "cfg": 1.5, "sampler_name": "lcm", "scheduler": "sgm_uniform",
            "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "host_test"}},
    }
    entry = comfy_server.run(prompt, timeout=120)
    files = comfy_server.output_files(entry)
    assert len(files) == 1 and files[0].suffix == ".png" and files[0].exists()
    from PIL import Image
    with Image.open(files[0]) as im:
        assert im.size == (64, 64)
    assert "Prompt executed" in comfy_server.log_text()


def test_server_reports_execution_errors(comfy_server):
    from host.server import PromptFailed, PromptRejected
    # SDXL model with SD1.5-shaped conditioning: passes validation, fails while sampling.
    prompt = {
        "1": {"class_type": "TinyCheckpointLoader", "inputs": {"kind": "sdxl", "seed": 0, "vae": "taesd"}},
        "2": {"class_type": "TinyConditioning", "inputs": {"kind": "sd15", "seed": 0}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["2", 0], "latent_image": ["4", 0],
            "seed": 0, "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }
    with pytest.raises(PromptFailed) as exc:
        comfy_server.run(prompt, timeout=120)
    assert "KSampler" in str(exc.value)
    with pytest.raises(PromptRejected):
        comfy_server.queue_prompt({"1": {"class_type": "NoSuchNode", "inputs": {}}})
