"""Train the pack's own toy model on the CPU: a TAESD-shaped autoencoder and a small SD1.5-shaped UNet.

No trained weights can be downloaded on the machines this pack is developed on, so image quality
and temporal consistency could not be measured. This script makes a model small enough to train
here (about 15-20 minutes on one CPU thread) and real enough to measure: ComfyUI's own classes,
trained on frames of real clips (``bench/toy_world.py``: what is trained on, what is held out).

1. Autoencoder (``comfy.taesd.taesd.TAESD``, the real TAESD layout): random crops of training
   frames and of their OpenCV style, pixel MSE, latents kept near the range its decoder takes.
   Afterwards ``vae_scale``/``vae_shift`` are set so the latents the UNet sees have mean 0, std 1
   (what SD1.5's 0.18215 scaling gives real SD latents).
2. Text encoder: a small CLIP-L-shaped model (hidden 32, 2 layers, the real SD1 tokenizer), random
   weights from a seed, never trained: a deterministic map from prompt to embedding.
3. UNet (``comfy.supported_models.SD15``: SD1.5's block layout, 4 levels, 2 res blocks each,
   attention on levels 0-2 and the middle; model_channels 32, channel_mult 1,1,2,2): an EPS
   denoiser of the latents, conditioned on the embedding of ``PHOTO_PROMPT`` for frames as they
   are and of ``STYLE_PROMPT`` for their style (10% of rows on the empty prompt, for cfg > 1),
   timesteps weighted toward t < 500 (SDEdit at strength <= 0.5 never sees more noise).

Resumable: ``--work`` keeps the state (weights, optimiser, step, losses); rerunning continues.
Seeded: the same command gives the same weights (one thread). Writes the three files that
``nodes/toy_model.py`` loads, plus ``train_log.json`` (loss curve, wall time, command).

Usage::

    python scripts/train_toy_model.py                    # the committed model (defaults)
    python scripts/train_toy_model.py --ae-steps 2 --unet-steps 2 --size 64 --frames 4 --synthetic \
        --work /tmp/w --out /tmp/o                          # smoke test (tests/test_toy_model.py)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import shlex
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

CLIP_CONFIG = {"hidden_size": 32, "intermediate_size": 128, "num_attention_heads": 4,
               "num_hidden_layers": 2, "projection_dim": 32}
UNET_CHANNELS, UNET_MULT = 32, (1, 1, 2, 2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / "scripts" / "toy_model"), help="where the three model files go")
    p.add_argument("--work", default=str(REPO / "out" / "toy_train"), help="resumable training state")
    p.add_argument("--size", type=int, default=128, help="frame size (square, multiple of 64)")
    p.add_argument("--crop", type=int, default=48, help="autoencoder training crop (multiple of 8)")
    p.add_argument("--ae-steps", type=int, default=300)
    p.add_argument("--unet-steps", type=int, default=400)
    p.add_argument("--ae-batch", type=int, default=8)
    p.add_argument("--unet-batch", type=int, default=16)
    p.add_argument("--frames", type=int, default=0, help="use only this many training frames (0: all)")
    p.add_argument("--synthetic", action="store_true", help="train on a generated texture instead of the clips")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--save-every", type=int, default=100, help="checkpoint the state every this many steps")
    args = p.parse_args(argv)
    if args.size % 64 or args.crop % 8 or args.crop > args.size:
        p.error("--size must be a multiple of 64 and --crop a multiple of 8 no larger than --size")
    return args


# --------------------------------------------------------------------------- data

def training_frames(args):
    """(photo, style): float32 ``[N, size, size, 3]`` training frames and their OpenCV style."""
    import torch

    from toy_world import TRAIN, load_segment, stylize, synthetic_frames

    if args.synthetic:
        photo = synthetic_frames(max(args.frames, 4), args.size, args.seed)
    else:
        photo = torch.cat([load_segment(segment, args.size) for segment in TRAIN])
    if args.frames:
        photo = photo[torch.linspace(0, photo.shape[0] - 1, args.frames).round().long()]
    return photo, stylize(photo)


def build_models(seed: int):
    """(taesd, unet_model, clip): freshly initialised, seeded. ``unet_model`` is a ComfyUI BaseModel."""
    import torch

    import comfy.supported_models
    import comfy.taesd.taesd
    from host.tiny_models import init_params_
    from streamv2v.nodes.toy_model import clip_from_config

    taesd = comfy.taesd.taesd.TAESD()
    init_params_(taesd, seed)
    clip = clip_from_config(CLIP_CONFIG)
    init_params_(clip.cond_stage_model, seed + 1)
    with torch.no_grad():  # the file stores fp16: embed the prompts with exactly the weights that will be loaded
        for p in clip.cond_stage_model.parameters():
            p.copy_(p.half().float())
    config = comfy.supported_models.SD15(unet_config(CLIP_CONFIG["hidden_size"]))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, "", device=torch.device("cpu"))
    init_params_(model.diffusion_model, seed + 2)
    with torch.no_grad():  # start as "predict no noise": the usual zero-initialised output conv
        for p in model.diffusion_model.out[-1].parameters():
            p.zero_()
    return taesd, model, clip


def unet_config(context_dim: int) -> dict:
    """SD1.5's UNet layout (the dict comfy.model_detection would produce) at a small width."""
    levels = len(UNET_MULT)
    depth = [1, 1, 1, 0]
    return {"use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
            "model_channels": UNET_CHANNELS, "num_res_blocks": [2] * levels, "channel_mult": list(UNET_MULT),
            "transformer_depth": [d for d in depth for _ in range(2)],
            "transformer_depth_output": [d for d in depth for _ in range(3)],
            "transformer_depth_middle": 1, "use_spatial_transformer": True, "legacy": False,
            "context_dim": context_dim, "adm_in_channels": None, "use_linear_in_transformer": False,
            "use_temporal_attention": False, "use_temporal_resblock": False}


def prompt_embeddings(clip):
    """``float32 [3, 77, C]``: the embeddings of the photo, style and empty prompts (core CLIPTextEncode's)."""
    import torch

    from toy_world import NEGATIVE_PROMPT, PHOTO_PROMPT, STYLE_PROMPT

    with torch.no_grad():
        return torch.cat([clip.encode_from_tokens_scheduled(clip.tokenize(text))[0][0]
                          for text in (PHOTO_PROMPT, STYLE_PROMPT, NEGATIVE_PROMPT)]).float()


# --------------------------------------------------------------------------- phase 1: autoencoder

def random_crops(images, crop: int, batch: int, gen):
    """``[batch, 3, crop, crop]`` random crops (random horizontal flips) of ``images`` ``[N, H, W, 3]``."""
    import torch

    n, h, w, _ = images.shape
    pick = torch.randint(0, n, (batch,), generator=gen)
    tops = torch.randint(0, h - crop + 1, (batch,), generator=gen)
    lefts = torch.randint(0, w - crop + 1, (batch,), generator=gen)
    flips = torch.rand(batch, generator=gen) < 0.5
    out = []
    for i, t, l, f in zip(pick.tolist(), tops.tolist(), lefts.tolist(), flips.tolist()):
        patch = images[i, t:t + crop, l:l + crop].permute(2, 0, 1)
        out.append(patch.flip(-1) if f else patch)
    return torch.stack(out)


def autoencoder_loss(taesd, pixels):
    """Pixel MSE of encode->decode, plus a small pull of the latents toward mean 0 / std 1 (inside the
    decoder's +-3 clamp, and a scale the UNet's noise schedule suits). ``pixels`` ``[B, 3, H, W]`` in 0..1."""
    latent = taesd.taesd_encoder(pixels)
    recon = taesd.taesd_decoder(latent)
    mse = torch_mse(recon, pixels)
    spread = (latent.mean() ** 2) + (latent.std() - 1.0) ** 2
    return mse + 0.01 * spread, mse


def torch_mse(a, b):
    return ((a - b) ** 2).mean()


def cosine_lr(step: int, total: int, peak: float, warmup: int = 20) -> float:
    """Linear warm-up then cosine decay to peak / 20."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


# --------------------------------------------------------------------------- phase 2: UNet

def encode_latents(taesd, images, batch: int = 16):
    """UNet-space latents ``[N, 4, size/8, size/8]`` of ``images`` ``[N, H, W, 3]`` (raw encoder output)."""
    import torch

    with torch.no_grad():
        return torch.cat([taesd.taesd_encoder(images[i:i + batch].permute(0, 3, 1, 2))
                          for i in range(0, images.shape[0], batch)])


def unet_loss(model, latents, labels, embeddings, gen):
    """EPS loss of the SD15 BaseModel ``model`` on UNet-space ``latents`` ``[B, 4, h, w]``.

    ``labels`` ``[B]`` index ``embeddings`` ``[3, 77, C]`` (photo, style, empty). Timesteps: 75% of rows
    uniform in [0, 500), the rest in [0, 1000). The input is scaled as ComfyUI's EPS sampling does
    (x / sqrt(sigma^2 + 1)), so the trained net is used by ComfyUI exactly as it was trained.
    """
    import torch

    b = latents.shape[0]
    low = torch.rand(b, generator=gen) < 0.75
    t = torch.where(low, torch.randint(0, 500, (b,), generator=gen), torch.randint(0, 1000, (b,), generator=gen))
    sampling = model.model_sampling
    sigma = sampling.sigmas[t].view(b, 1, 1, 1)
    noise = torch.randn(latents.shape, generator=gen)
    x_in = sampling.calculate_input(sigma.view(b), latents + sigma * noise)
    pred = model.diffusion_model(x_in, timesteps=sampling.timestep(sigma.view(b)).float(),
                                 context=embeddings[labels])
    return torch_mse(pred, noise)


# --------------------------------------------------------------------------- state, loop, output

class Trainer:
    """Both phases with one resumable state: ``state.pt`` in ``--work`` (written every ``--save-every`` steps)."""

    def __init__(self, args):
        import torch

        self.args = args
        self.work = pathlib.Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.taesd, self.model, self.clip = build_models(args.seed)
        self.photo, self.style = training_frames(args)
        self.embeddings = prompt_embeddings(self.clip)
        self.ae_opt = torch.optim.Adam(self.taesd.parameters(), lr=1e-3)
        self.unet_opt = torch.optim.AdamW(self.model.diffusion_model.parameters(), lr=1e-3, weight_decay=0.0)
        self.gen = torch.Generator().manual_seed(args.seed + 10)
        self.log = {"ae": [], "unet": []}
        self.ae_step = self.unet_step = 0
        self.seconds = 0.0
        self.latents = None
        self._resume()

    def _settings(self):
        keys = ("size", "crop", "ae_steps", "unet_steps", "ae_batch", "unet_batch", "frames", "synthetic", "seed")
        return {k: getattr(self.args, k) for k in keys}

    def _resume(self):
        import torch

        path = self.work / "state.pt"
        if not path.is_file():
            return
        state = torch.load(path, weights_only=False)
        now, then = self._settings(), state["settings"]
        unet_keys = ("unet_steps", "unet_batch")
        # The UNet's settings may change until its first step (e.g. a shorter UNet phase after the autoencoder).
        changed = [k for k in now if now[k] != then.get(k) and not (k in unet_keys and state["unet_step"] == 0)]
        if changed:
            raise SystemExit(f"{path} was made with other settings ({', '.join(f'{k}={then.get(k)}' for k in changed)}); "
                             f"remove it or pass another --work")
        self.taesd.load_state_dict(state["taesd"])
        self.model.diffusion_model.load_state_dict(state["unet"])
        self.ae_opt.load_state_dict(state["ae_opt"])
        self.unet_opt.load_state_dict(state["unet_opt"])
        self.gen.set_state(state["gen"])
        self.log, self.ae_step, self.unet_step = state["log"], state["ae_step"], state["unet_step"]
        self.seconds, self.latents = state["seconds"], state["latents"]
        print(f"[train] resumed from {path}: autoencoder step {self.ae_step}, UNet step {self.unet_step}, "
              f"{self.seconds:.0f} s so far", flush=True)

    def save_state(self):
        import torch

        state = {"settings": self._settings(), "taesd": self.taesd.state_dict(),
                 "unet": self.model.diffusion_model.state_dict(), "ae_opt": self.ae_opt.state_dict(),
                 "unet_opt": self.unet_opt.state_dict(), "gen": self.gen.get_state(), "log": self.log,
                 "ae_step": self.ae_step, "unet_step": self.unet_step, "seconds": self.seconds,
                 "latents": self.latents}
        torch.save(state, self.work / "state.pt.tmp")
        os.replace(self.work / "state.pt.tmp", self.work / "state.pt")  # never a half-written state

    def _step(self, optimizer, params, loss, lr):
        import torch

        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    def _record(self, phase, step, total, value, every=25):
        curve = self.log[phase]
        curve.append([step, value, round(self.seconds, 1)])
        if step % every == 0 or step == total:
            window = [v for _, v, _ in curve[-every:]]
            print(f"[train] {phase} step {step}/{total}: loss {sum(window) / len(window):.5f} "
                  f"({self.seconds:.0f} s)", flush=True)
        if step % self.args.save_every == 0:
            self.save_state()

    def train_autoencoder(self):
        images = __import__("torch").cat([self.photo, self.style])
        total = self.args.ae_steps
        while self.ae_step < total:
            start = time.perf_counter()
            pixels = random_crops(images, self.args.crop, self.args.ae_batch, self.gen)
            loss, mse = autoencoder_loss(self.taesd, pixels)
            self._step(self.ae_opt, self.taesd.parameters(), loss, cosine_lr(self.ae_step, total, 1e-3))
            self.ae_step += 1
            self.seconds += time.perf_counter() - start
            self._record("ae", self.ae_step, total, float(mse.detach()))

    def train_unet(self):
        import torch

        if self.latents is None:
            start = time.perf_counter()
            self.latents = torch.cat([encode_latents(self.taesd, self.photo), encode_latents(self.taesd, self.style)])
            self.seconds += time.perf_counter() - start
            self.save_state()
        n = self.photo.shape[0]
        labels_all = torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)])
        mean, std = self.latents.mean(), self.latents.std()
        total = self.args.unet_steps
        self.model.diffusion_model.train()
        while self.unet_step < total:
            start = time.perf_counter()
            pick = torch.randint(0, self.latents.shape[0], (self.args.unet_batch,), generator=self.gen)
            labels = torch.where(torch.rand(pick.shape[0], generator=self.gen) < 0.1, 2, labels_all[pick])
            # The UNet sees latents normalised as the saved vae_scale/vae_shift will make them (mean 0, std 1).
            loss = unet_loss(self.model, (self.latents[pick] - mean) / std, labels, self.embeddings, self.gen)
            params = self.model.diffusion_model.parameters()
            self._step(self.unet_opt, params, loss, cosine_lr(self.unet_step, total, 1e-3))
            self.unet_step += 1
            self.seconds += time.perf_counter() - start
            self._record("unet", self.unet_step, total, float(loss.detach()))
        self.save_state()

    def write_outputs(self, command: str):
        """The three model files (fp16) and ``train_log.json`` into ``--out``."""
        import torch
        from safetensors.torch import save_file

        from streamv2v.nodes.toy_model import CLIP_CONFIG_KEY, toy_files

        files = toy_files(self.args.out)
        files["unet"].parent.mkdir(parents=True, exist_ok=True)
        mean, std = float(self.latents.mean()), float(self.latents.std())
        # ComfyUI: raw = encoder / vae_scale + vae_shift, UNet input = raw * 0.18215 (SD15 latent format).
        # These two make the UNet input (encoder - mean) / std, as trained; the decoder still gets the encoder's.
        vae_sd = {k: v.detach().half().contiguous() for k, v in self.taesd.state_dict().items()}
        vae_sd["vae_scale"] = torch.tensor(0.18215 * std)
        vae_sd["vae_shift"] = torch.tensor(-mean / (0.18215 * std))
        info = {"trained_by": "scripts/train_toy_model.py", "command": command}
        save_file(vae_sd, str(files["vae"]), metadata=info)
        unet_sd = {k: v.detach().half().contiguous() for k, v in self.model.diffusion_model.state_dict().items()}
        save_file(unet_sd, str(files["unet"]), metadata=info)
        clip_sd = {k: v.detach().half().contiguous()
                   for k, v in self.clip.cond_stage_model.clip_l.transformer.state_dict().items()}
        save_file(clip_sd, str(files["clip"]), metadata={**info, CLIP_CONFIG_KEY: json.dumps(CLIP_CONFIG)})
        log = {"command": command, "train_seconds": round(self.seconds, 1),
               "frames": int(self.photo.shape[0]), "latent_mean": mean, "latent_std": std,
               "curves": {phase: thin(curve) for phase, curve in self.log.items()}}
        (files["unet"].parent / "train_log.json").write_text(json.dumps(log, indent=1))
        for path in files.values():
            print(f"[train] wrote {path} ({path.stat().st_size / 2**20:.2f} MiB)", flush=True)


def thin(curve, points: int = 40):
    """``[[step, mean loss over the bin, seconds at its end], ...]``: the curve averaged into ``points`` bins."""
    if not curve:
        return []
    size = max(1, len(curve) // points)
    out = []
    for i in range(0, len(curve), size):
        chunk = curve[i:i + size]
        out.append([chunk[-1][0], round(sum(v for _, v, _ in chunk) / len(chunk), 6), chunk[-1][2]])
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    from _host import setup_host

    setup_host("cpu", threads=args.threads)
    import torch

    torch.manual_seed(args.seed)  # ComfyUI's layer constructors draw nothing we keep, but be certain
    command = "python " + " ".join(shlex.quote(a) for a in ["scripts/train_toy_model.py", *(argv or sys.argv[1:])])
    trainer = Trainer(args)
    print(f"[train] {trainer.photo.shape[0]} training frames at {args.size}x{args.size} (+ their style); "
          f"UNet {sum(p.numel() for p in trainer.model.diffusion_model.parameters()) / 1e6:.2f}M params, "
          f"TAESD {sum(p.numel() for p in trainer.taesd.parameters()) / 1e6:.2f}M", flush=True)
    trainer.train_autoencoder()
    trainer.save_state()
    trainer.train_unet()
    trainer.write_outputs(command)
    print(f"[train] done: {trainer.seconds:.0f} s of training ({trainer.seconds / 60:.1f} min)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
