"""The toy model the pack trains itself: the training script runs, the committed weights load and work.

* The training script runs a few steps on a tiny crop (so it cannot rot), writes loadable files and
  resumes from its state.
* The committed weights (``scripts/toy_model/``) load: the VAE through core Load VAE, all three
  through the StreamV2V Toy Model node (why not core Load Checkpoint: asserted below), and restyle
  held-out frames through the stream engine.
* ``scripts/demo.py --checkpoint PATH --lora PATH`` runs a single-file checkpoint with a LoRA.
"""
from __future__ import annotations

import importlib.util
import json
import re
import pathlib

import pytest
import torch

import comfy.model_detection
import comfy.utils
import folder_paths
import nodes as comfy_nodes  # ComfyUI's nodes.py
from host import tiny_models
from streamv2v.nodes.engine import StreamSettings, run_stream
from streamv2v.nodes.toy_model import (TOY_DIR, UNET_FILE, VAE_FILE, StreamV2VToyModel, load_toy_model,
                                       save_as_checkpoint, toy_files)

REPO = pathlib.Path(__file__).resolve().parent.parent


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"streamv2v_script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _restyle(model, clip, vae, frames, prompt):
    outputs = [None] * frames.shape[0]

    def keep(out):
        outputs[out.index] = out.image.float()

    cond = comfy_nodes.CLIPTextEncode().encode(clip, prompt)[0]
    neg = comfy_nodes.CLIPTextEncode().encode(clip, "")[0]
    with torch.inference_mode():
        run_stream(model, cond, neg, vae, iter(frames), StreamSettings(seed=0), keep)
    return torch.stack(outputs)


def _psnr(a, b):
    return float(10 * torch.log10(1 / ((a - b) ** 2).mean()))


def test_training_script_runs_resumes_and_splits_its_phases(tmp_path, capsys):
    train = _script("train_toy_model")
    base = ["--synthetic", "--frames", "4", "--size", "64", "--crop", "32", "--ae-steps", "2", "--unet-steps", "2",
            "--ae-batch", "2", "--unet-batch", "4", "--save-every", "1"]

    def run(name, *extra):
        return train.main([*base, *extra, "--work", str(tmp_path / name), "--out", str(tmp_path / f"{name}_out")])

    assert run("a") == 0
    log = json.loads((tmp_path / "a_out" / "train_log.json").read_text())
    assert [len(log["curves"]["ae"]), len(log["curves"]["unet"])] == [2, 2]
    assert "--synthetic" in log["command"]
    model, clip, vae = load_toy_model(tmp_path / "a_out")
    frames = torch.rand(3, 64, 64, 3)
    out = _restyle(model, clip, vae, frames, "a photo")
    assert out.shape == frames.shape and torch.isfinite(out).all()
    capsys.readouterr()
    assert run("a") == 0  # everything done: resumes and only rewrites the files
    assert "resumed" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="other settings"):  # past its decay a phase cannot be lengthened
        train.main([*base, "--unet-steps", "3", "--work", str(tmp_path / "a"), "--out", str(tmp_path / "a_out")])
    # Before its decay the learning rate does not depend on the step count: a run may be lengthened then.
    assert [train.learning_rate(s, 100, 1e-3) for s in range(81)] == [train.learning_rate(s, 900, 1e-3) for s in range(81)]

    # Started from the first model with its encoder kept, the phases give the same weights in one process
    # or in two (UNet first), and the log keeps the earlier model's.
    frozen = ["--init-from", str(tmp_path / "a_out"), "--freeze-encoder"]
    assert run("b", *frozen) == 0
    assert run("c", *frozen, "--phase", "unet") == 0 and run("c", *frozen, "--phase", "ae") == 0
    files = {(run_name, name): comfy.utils.load_torch_file(str(tmp_path / f"{run_name}_out" / name))
             for run_name in "abc" for name in (UNET_FILE, VAE_FILE)}
    for name in (UNET_FILE, VAE_FILE):
        one, two = files["b", name], files["c", name]
        assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    first, kept = files["a", VAE_FILE], files["c", VAE_FILE]
    assert all(torch.equal(first[k], kept[k]) for k in first if k.startswith("taesd_encoder"))
    assert not torch.equal(first["taesd_decoder.1.weight"], kept["taesd_decoder.1.weight"])
    earlier = json.loads((tmp_path / "c_out" / "train_log.json").read_text())["initialised_from"]["its_log"]
    assert earlier["command"] == log["command"]


def test_committed_weights_load_and_restyle_held_out_frames():
    files = toy_files()
    assert all(p.is_file() for p in files.values()), "run scripts/train_toy_model.py (README) and commit its files"
    assert sum(p.stat().st_size for p in files.values()) < 16 * 2**20, "keep the committed weights small"
    # Why the UNet needs the pack's node: core detection recognises SD1.5 by its full width only.
    unet_sd = comfy.utils.load_torch_file(str(TOY_DIR / UNET_FILE))
    assert comfy.model_detection.model_config_from_unet(unet_sd, "") is None

    folder_paths.add_model_folder_path("vae", str(TOY_DIR))
    core_vae = comfy_nodes.VAELoader().load_vae(VAE_FILE)[0]
    model, clip, vae = StreamV2VToyModel.execute().args
    assert model.model.latent_format.scale_factor == 0.18215  # built as ComfyUI's SD15
    try:
        from toy_world import HELD_OUT, load_segment

        frames = load_segment(HELD_OUT["vtest (frames 600+)"], 128)[:6]
    except SystemExit:
        pytest.skip("vtest.avi unavailable (scripts/setup_host.sh fetches it)")
    with torch.inference_mode():
        assert torch.equal(core_vae.encode(frames), vae.encode(frames))
        recon = vae.decode(vae.encode(frames)).float()
    assert _psnr(recon, frames) > 23  # 24.0 dB with the committed weights
    photo = _restyle(model, clip, vae, frames, "a photo")
    assert torch.isfinite(photo).all() and _psnr(photo, frames) > 18.5  # 19.6 dB


def test_demo_runs_a_checkpoint_file_with_a_lora(tmp_path, capsys):
    checkpoint = tmp_path / "toy_checkpoint.safetensors"
    save_as_checkpoint(checkpoint)
    from safetensors.torch import save_file

    toy_unet = load_toy_model()[0]
    lora = tmp_path / "lora.safetensors"
    save_file({k: v * 0.01 for k, v in tiny_models.random_self_attention_lora(toy_unet).items()}, str(lora))
    demo = _script("demo")
    demo.main(["--frames", "5", "--size", "64", "--checkpoint", str(checkpoint), "--lora", str(lora),
               "--out", str(tmp_path / "demo")])
    text = capsys.readouterr().out
    assert "LoRA lora.safetensors" in text
    assert "[demo] the DyMe bank changed warp error" in text.splitlines()[-2]
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert [m["frames"] for m in metrics] == [5, 5]
    assert (tmp_path / "demo" / "side_by_side.mp4").stat().st_size > 0


def test_checkpoint_metadata_cannot_make_the_demo_allocate_more_than_the_file_holds(tmp_path):
    """A checkpoint whose metadata declares a text encoder 100,000 wide (about 20 GB to build) is refused before
    anything is built, naming the file and what its weights hold; so is metadata with other keys or types."""
    import resource

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from streamv2v.nodes.toy_model import CLIP_CONFIG_KEY

    checkpoint = tmp_path / "toy_checkpoint.safetensors"
    save_as_checkpoint(checkpoint)
    with safe_open(str(checkpoint), "pt") as opened:
        metadata = opened.metadata()
    weights = load_file(str(checkpoint))
    demo = _script("demo")
    args = demo.parse_args(["--checkpoint", str(tmp_path / "wide.safetensors")])
    for config, message in (({"hidden_size": 100_000}, "hidden_size 100000 (the weights hold 32)"),
                            ({"vocab_size": 10**9}, "must be a JSON object of the whole numbers"),
                            ({"num_hidden_layers": 2.0}, "must be a JSON object of the whole numbers")):
        declared = {**json.loads(metadata[CLIP_CONFIG_KEY]), **config}
        save_file(weights, str(tmp_path / "wide.safetensors"), metadata={CLIP_CONFIG_KEY: json.dumps(declared)})
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with pytest.raises(ValueError, match=re.escape(message)):
            demo.load_models(args)
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 200 * 1024  # KiB: nothing large built
