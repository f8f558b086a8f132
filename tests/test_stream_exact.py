"""The stream batch gives the frames sequential sampling gives, in every bank setting, in the real server.

One prompt per guidance setting runs, for every bank (queue and DyMe of size 1, 2, 3, updated
every frame or every 4th), the StreamV2V Sampler twice on the same clip, stream batch on and
off, and a test node reports the largest difference. The UNet is a float64 tiny model: the
paper's hard decisions (FF's threshold and nearest neighbour, DyMe's best match) would turn
float32 rounding differences between a batched and a single-row call into occasional flips
(see test_sampler.py for the float32 bound); in float64 the frames must agree.
"""
import itertools

import pytest

FRAMES, SIZE = 14, 32  # 14 frames: a queue of 3 updated every 4th frame fills at frame 8 and then turns over
BANKS = [(mode, size, interval) for mode in ("queue", "dyme") for size in (1, 2, 3) for interval in (1, 4)]


def grid_prompt(cfg: float, video_cfg: bool) -> tuple[dict, dict]:
    """One prompt: every bank setting, stream vs sequential; returns (prompt, compare node id -> label)."""
    prompt = {
        "model": {"class_type": "TinyCheckpointLoader",
                  "inputs": {"kind": "sd15_micro", "seed": 0, "vae": "taesd", "dtype": "float64"}},
        "pos": {"class_type": "TinyConditioning", "inputs": {"kind": "sd15", "seed": 1}},
        "neg": {"class_type": "TinyConditioning", "inputs": {"kind": "sd15", "seed": 2}},
        "clip": {"class_type": "TinyTestImage", "inputs": {"width": SIZE, "height": SIZE, "frames": FRAMES, "seed": 3}},
    }
    labels = {}
    for i, (mode, size, interval) in enumerate(BANKS):
        name = f"exact-{mode}{size}-{interval}-{cfg}-{video_cfg}"
        prompt[f"bank{i}"] = {"class_type": "FeatureBank", "inputs": {
            "name": name, "mode": mode, "size": size, "interval": interval, "seed": 0}}
        prompt[f"ea{i}"] = {"class_type": "ExtendedAttentionPatch", "inputs": {
            "model": ["model", 0], "bank": [f"bank{i}", 0], "blocks": "all"}}
        prompt[f"ff{i}"] = {"class_type": "FeatureFusionPatch", "inputs": {
            "model": [f"ea{i}", 0], "bank": [f"bank{i}", 0], "alpha": 0.75, "threshold": 0.9,
            "blocks": "low-res decoder"}}
        model = [f"ff{i}", 0]
        if video_cfg:
            prompt[f"vlcfg{i}"] = {"class_type": "VideoLinearCFGGuidance", "inputs": {"model": model, "min_cfg": 1.0}}
            model = [f"vlcfg{i}", 0]
        for batch in (True, False):
            prompt[f"sampler{i}{batch}"] = {"class_type": "StreamV2VSampler", "inputs": {
                "model": model, "positive": ["pos", 0], "negative": ["neg", 0], "vae": ["model", 2],
                "images": ["clip", 0], "seed": 5, "steps": 4, "strength": 0.4, "cfg": cfg,
                "stream_batch": batch, "fixed_noise": True, "bank_start": "fresh"}}
        prompt[f"compare{i}"] = {"class_type": "TinyMaxDifference", "inputs": {
            "a": [f"sampler{i}True", 0], "b": [f"sampler{i}False", 0], "label": name}}
        labels[f"compare{i}"] = name
    return prompt, labels


@pytest.mark.parametrize("cfg,video_cfg", list(itertools.product([1.0, 2.0], [False, True])),
                         ids=lambda v: str(v))
def test_stream_batch_equals_sequential_for_every_bank_setting(comfy_server, cfg, video_cfg):
    prompt, labels = grid_prompt(cfg, video_cfg)
    entry = comfy_server.run(prompt, timeout=600)
    differences = {labels[node]: entry["outputs"][node]["max_abs_diff"][0] for node in labels}
    assert all(entry["outputs"][node]["frames"][0] == FRAMES for node in labels)
    worst = max(differences, key=differences.get)
    assert differences[worst] <= 1e-4, f"{worst}: {differences[worst]:.2e} (all: {differences})"
