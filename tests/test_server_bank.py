"""The pack in a real headless ComfyUI server: listing, prompts, bank life across prompts, validation."""
import pytest
import safetensors.torch

from host.server import PromptRejected

PACK_NODES = ["FeatureBank", "ExtendedAttentionPatch", "FeatureFusionPatch", "StreamV2VSampler"]


def bank_prompt(bank_name="srv", reset=False, seed=0, size=64, model_seed=0, alpha=0.75, prefix="bank"):
    return {
        "1": {"class_type": "TinyCheckpointLoader", "inputs": {"kind": "sd15", "seed": model_seed, "vae": "taesd"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a watercolor painting"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "10": {"class_type": "FeatureBank", "inputs": {"name": bank_name, "mode": "dyme", "size": 1, "interval": 1,
                                                       "reset": reset, "seed": 0}},
        "11": {"class_type": "ExtendedAttentionPatch", "inputs": {"model": ["1", 0], "bank": ["10", 0],
                                                                  "blocks": "all"}},
        "12": {"class_type": "FeatureFusionPatch", "inputs": {"model": ["11", 0], "bank": ["10", 0], "alpha": alpha,
                                                              "threshold": 0.9, "blocks": "low-res decoder"}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["12", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": seed, "steps": 4, "cfg": 2.0, "sampler_name": "lcm", "scheduler": "sgm_uniform",
            "denoise": 1.0}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": f"latents/{prefix}"}},
    }


def latent_of(server, entry):
    (path,) = [p for p in server.output_files(entry) if p.suffix == ".latent"]
    return safetensors.torch.load_file(str(path))["latent_tensor"]


def test_pack_loads_and_lists_its_nodes(comfy_server):
    info = comfy_server.object_info()
    missing = [n for n in PACK_NODES if n not in info]
    assert not missing, f"not listed: {missing}; log:\n{comfy_server.log_tail()}"
    assert not [f for f in comfy_server.import_failures() if "streamv2v" in f]
    for node in PACK_NODES:
        for section in info[node]["input"].values():
            for name, spec in section.items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node}.{name} has no tooltip"


def test_bank_lives_across_prompts_and_reset_clears_it(comfy_server):
    first = latent_of(comfy_server, comfy_server.run(bank_prompt(reset=True, seed=1, prefix="a")))
    with_past = latent_of(comfy_server, comfy_server.run(bank_prompt(reset=False, seed=2, prefix="b")))
    fresh = latent_of(comfy_server, comfy_server.run(bank_prompt(reset=True, seed=2, prefix="c")))
    again = latent_of(comfy_server, comfy_server.run(bank_prompt(reset=True, seed=2, prefix="d")))
    assert first.shape == with_past.shape == fresh.shape
    assert (with_past - fresh).abs().max() > 1e-3, "the second prompt did not see the first prompt's bank"
    assert (fresh - again).abs().max() == 0, "reset did not clear the bank"


def test_latent_size_or_model_change_clears_the_bank_with_a_log_line(comfy_server):
    comfy_server.run(bank_prompt(bank_name="chg", reset=True, size=64, prefix="e"))
    comfy_server.run(bank_prompt(bank_name="chg", size=96, prefix="f"))
    comfy_server.run(bank_prompt(bank_name="chg", size=96, model_seed=7, prefix="g"))
    log = comfy_server.log_text()
    assert "StreamV2V bank 'chg' cleared: latent size changed from 8x8" in log
    assert "StreamV2V bank 'chg' cleared: model changed" in log


def test_out_of_range_input_is_refused_before_anything_runs(comfy_server):
    with pytest.raises(PromptRejected) as error:
        comfy_server.queue_prompt(bank_prompt(bank_name="bad", alpha=1.5))
    assert "alpha" in str(error.value)
