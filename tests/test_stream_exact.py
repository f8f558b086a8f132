"""The stream batch gives the frames sequential sampling gives, in every bank setting, in the real server.

One prompt runs, for every bank (queue and DyMe of size 1, 2, 3, updated every frame or every 4th),
the StreamV2V Sampler twice on the same clip, stream batch on and off, and a test node reports the
largest difference. The UNet is a float64 tiny model: the paper's hard decisions (FF's threshold and
nearest neighbour, DyMe's best match) would turn float32 rounding differences between a batched and a
single-row call into occasional flips (see test_sampler.py for the float32 bound); in float64 the
frames must agree.

The guidance settings (cfg 1 or 2, with or without core VideoLinearCFGGuidance) are not crossed with
every bank (48 runs of 14 frames, a third of the suite's time) but spread over the 12 banks so that
every bank setting (mode x size x interval, where the per-row bank length defects were) runs once, and
every value of each bank input meets every guidance setting (cfg x guidance function, where the batched
guidance function defect was): see ``cells`` and the test that checks its coverage.
"""
import itertools

GUIDANCE = [(cfg, video_cfg) for cfg in (1.0, 2.0) for video_cfg in (False, True)]
MODES, SIZES, INTERVALS = ("queue", "dyme"), (1, 2, 3), (1, 4)
FRAMES, SIZE = 14, 32  # 14 frames: a queue of 3 updated every 4th frame fills at frame 8 and then turns over


def cells() -> list[tuple]:
    """(mode, size, interval, cfg, video_cfg) for each of the 12 banks: guidance (2 m + i + s) mod 4 for the
    m-th mode, i-th interval and s-th size, which gives every size all four guidance settings, and every mode
    and every interval all four too."""
    return [(mode, size, interval, *GUIDANCE[(2 * m + i + s) % 4])
            for (m, mode), (s, size), (i, interval) in itertools.product(
                enumerate(MODES), enumerate(SIZES), enumerate(INTERVALS))]


def grid_prompt() -> tuple[dict, dict]:
    """One prompt: every cell, stream vs sequential; returns (prompt, compare node id -> label)."""
    prompt = {
        "model": {"class_type": "TinyCheckpointLoader",
                  "inputs": {"kind": "sd15_micro", "seed": 0, "vae": "taesd", "dtype": "float64"}},
        "pos": {"class_type": "TinyConditioning", "inputs": {"kind": "sd15", "seed": 1}},
        "neg": {"class_type": "TinyConditioning", "inputs": {"kind": "sd15", "seed": 2}},
        "clip": {"class_type": "TinyTestImage", "inputs": {"width": SIZE, "height": SIZE, "frames": FRAMES, "seed": 3}},
    }
    labels = {}
    for i, (mode, size, interval, cfg, video_cfg) in enumerate(cells()):
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


def test_the_grid_runs_every_bank_and_meets_every_guidance_with_every_bank_input():
    grid = cells()
    assert sorted(c[:3] for c in grid) == sorted(itertools.product(MODES, SIZES, INTERVALS))
    for column, values in enumerate((MODES, SIZES, INTERVALS)):
        for value in values:
            assert {c[3:] for c in grid if c[column] == value} == set(GUIDANCE), (column, value)


def test_stream_batch_equals_sequential_for_every_bank_setting(comfy_server):
    prompt, labels = grid_prompt()
    entry = comfy_server.run(prompt, timeout=600)
    differences = {labels[node]: entry["outputs"][node]["max_abs_diff"][0] for node in labels}
    assert all(entry["outputs"][node]["frames"][0] == FRAMES for node in labels)
    worst = max(differences, key=differences.get)
    assert differences[worst] <= 1e-4, f"{worst}: {differences[worst]:.2e} (all: {differences})"
