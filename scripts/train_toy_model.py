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
import os
import pathlib
import shlex
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

CLIP_CONFIG = {"hidden_size": 32, "intermediate_size": 128, "num_attention_heads": 4,
               "num_hidden_layers": 2, "projection_dim": 32}
UNET_MULT = (1, 1, 2, 2)


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
    p.add_argument("--ae-lr", type=float, default=1e-3, help="autoencoder peak learning rate")
    p.add_argument("--unet-lr", type=float, default=1e-3, help="UNet peak learning rate")
    p.add_argument("--unet-channels", type=int, default=32, help="UNet model_channels (SD1.5: 320)")
    p.add_argument("--style-share", type=float, default=0.5,
                   help="share of autoencoder crops taken from the styled frames (the rest from the frames)")
    p.add_argument("--eval-every", type=int, default=100,
                   help="evaluate on held-out frames every this many steps (0: never; none with --synthetic)")
    p.add_argument("--init-from", default=None,
                   help="start from an earlier toy model's autoencoder and UNet instead of the seeded initialisation: "
                        "a folder of its files, or a git revision whose scripts/toy_model/ holds them")
    p.add_argument("--freeze-encoder", action="store_true",
                   help="keep the --init-from encoder: the autoencoder phase trains the decoder alone (on that "
                        "encoder's latents), and the UNet phase, whose latents then never change, can run beside it")
    p.add_argument("--phase", choices=("both", "ae", "unet"), default="both",
                   help="run one phase only (with --freeze-encoder the two can run at once, one process each); "
                        "the model files are written when both are done")
    p.add_argument("--frames", type=int, default=0, help="use only this many training frames (0: all)")
    p.add_argument("--synthetic", action="store_true", help="train on a generated texture instead of the clips")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--save-every", type=int, default=100, help="checkpoint the state every this many steps")
    args = p.parse_args(argv)
    if args.size % 64 or args.crop % 8 or args.crop > args.size:
        p.error("--size must be a multiple of 64 and --crop a multiple of 8 no larger than --size")
    if args.freeze_encoder and not args.init_from:
        p.error("--freeze-encoder keeps the encoder of --init-from: name one")
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


def build_models(seed: int, unet_channels: int = 32):
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
    config = comfy.supported_models.SD15(unet_config(CLIP_CONFIG["hidden_size"], unet_channels))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, "", device=torch.device("cpu"))
    init_params_(model.diffusion_model, seed + 2)
    with torch.no_grad():  # start as "predict no noise": the usual zero-initialised output conv
        for p in model.diffusion_model.out[-1].parameters():
            p.zero_()
    return taesd, model, clip


def unet_config(context_dim: int, channels: int) -> dict:
    """SD1.5's UNet layout (the dict comfy.model_detection would produce) at a small width."""
    levels = len(UNET_MULT)
    depth = [1, 1, 1, 0]
    return {"use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
            "model_channels": channels, "num_res_blocks": [2] * levels, "channel_mult": list(UNET_MULT),
            "transformer_depth": [d for d in depth for _ in range(2)],
            "transformer_depth_output": [d for d in depth for _ in range(3)],
            "transformer_depth_middle": 1, "use_spatial_transformer": True, "legacy": False,
            "context_dim": context_dim, "adm_in_channels": None, "use_linear_in_transformer": False,
            "use_temporal_attention": False, "use_temporal_resblock": False}


def earlier_model(spec: str, work: pathlib.Path) -> pathlib.Path:
    """The folder of the toy model ``--init-from`` names: ``spec`` itself, or its files at git revision ``spec``
    (copied into ``work``)."""
    import subprocess

    from streamv2v.nodes.toy_model import toy_files

    if pathlib.Path(spec).is_dir():
        return pathlib.Path(spec)
    folder = work / f"init-{spec}"
    folder.mkdir(parents=True, exist_ok=True)
    for path in [*toy_files(folder).values(), folder / "train_log.json"]:
        shown = subprocess.run(["git", "-C", str(REPO), "show", f"{spec}:scripts/toy_model/{path.name}"],
                               capture_output=True)
        if shown.returncode:
            raise SystemExit(f"--init-from {spec}: neither a folder nor a git revision with scripts/toy_model/"
                             f"{path.name} ({shown.stderr.decode().strip()})")
        path.write_bytes(shown.stdout)
    return folder


def load_earlier(taesd, model, folder: pathlib.Path) -> dict:
    """Put the earlier model's autoencoder and UNet weights (fp16 files) into ``taesd`` and ``model``; returns
    its ``train_log.json`` ({} if absent)."""
    import comfy.utils
    from streamv2v.nodes.toy_model import toy_files

    files = toy_files(folder)
    vae = comfy.utils.load_torch_file(str(files["vae"]))
    # vae_scale / vae_shift are set from the new latents when the files are written.
    taesd.load_state_dict({k: v.float() for k, v in vae.items() if k not in ("vae_scale", "vae_shift")}, strict=False)
    unet = comfy.utils.load_torch_file(str(files["unet"]))
    try:
        model.diffusion_model.load_state_dict({k: v.float() for k, v in unet.items()})
    except RuntimeError as error:
        raise SystemExit(f"--init-from {folder}: its UNet is not this one's shape (--unet-channels?): {error}")
    log = folder / "train_log.json"
    return json.loads(log.read_text()) if log.is_file() else {}


def prompt_embeddings(clip):
    """``float32 [3, 77, C]``: the embeddings of the photo, style and empty prompts (core CLIPTextEncode's)."""
    import torch

    from toy_world import NEGATIVE_PROMPT, PHOTO_PROMPT, STYLE_PROMPT

    with torch.no_grad():
        return torch.cat([clip.encode_from_tokens_scheduled(clip.tokenize(text))[0][0]
                          for text in (PHOTO_PROMPT, STYLE_PROMPT, NEGATIVE_PROMPT)]).float()


# --------------------------------------------------------------------------- phase 1: autoencoder

def random_crops(photo, style, crop: int, batch: int, style_share: float, gen):
    """``[batch, 3, crop, crop]`` random crops (random horizontal flips) of ``photo`` ``[N, H, W, 3]`` or, for a
    ``style_share`` of them, of ``style`` (same shape)."""
    import torch

    n, h, w, _ = photo.shape
    pick = torch.randint(0, n, (batch,), generator=gen)
    styled = torch.rand(batch, generator=gen) < style_share
    tops = torch.randint(0, h - crop + 1, (batch,), generator=gen)
    lefts = torch.randint(0, w - crop + 1, (batch,), generator=gen)
    flips = torch.rand(batch, generator=gen) < 0.5
    out = []
    for i, s, t, l, f in zip(pick.tolist(), styled.tolist(), tops.tolist(), lefts.tolist(), flips.tolist()):
        patch = (style if s else photo)[i, t:t + crop, l:l + crop].permute(2, 0, 1)
        out.append(patch.flip(-1) if f else patch)
    return torch.stack(out)


def latent_crops(latents, images, crop: int, batch: int, style_share: float, gen):
    """(``[batch, 4, crop/8, crop/8]`` crops of ``latents`` ``[2N, 4, h, w]``, the ``[batch, 3, crop, crop]`` crops of
    ``images`` ``[2N, H, W, 3]`` they stand for): rows 0..N-1 frames, N..2N-1 their style (a ``style_share`` of picks)."""
    import torch

    n = latents.shape[0] // 2
    cell = crop // 8
    pick = torch.randint(0, n, (batch,), generator=gen) + n * (torch.rand(batch, generator=gen) < style_share).long()
    tops = torch.randint(0, latents.shape[2] - cell + 1, (batch,), generator=gen)
    lefts = torch.randint(0, latents.shape[3] - cell + 1, (batch,), generator=gen)
    lat, pix = [], []
    for i, t, l in zip(pick.tolist(), tops.tolist(), lefts.tolist()):
        lat.append(latents[i, :, t:t + cell, l:l + cell])
        pix.append(images[i, 8 * t:8 * (t + cell), 8 * l:8 * (l + cell)].permute(2, 0, 1))
    return torch.stack(lat), torch.stack(pix)


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


DECAY = 0.2  # the share of a phase's steps over which its learning rate decays


def decay_start(total: int) -> int:
    """The first step of a phase of ``total`` steps at which the learning rate decays."""
    return int(total * (1 - DECAY))


def learning_rate(step: int, total: int, peak: float, warmup: int = 20) -> float:
    """Linear warm-up, constant, then linear decay to peak / 20 over the last ``DECAY`` of the steps.

    Until the decay the rate does not depend on ``total``: a run resumed with more (or fewer) steps before
    its decay starts gives the weights that the command with the new count gives from scratch."""
    if step < warmup:
        return peak * (step + 1) / warmup
    start = decay_start(total)
    if step < start:
        return peak
    return peak * (1.0 - 0.95 * (step - start) / max(1, total - start))


# --------------------------------------------------------------------------- phase 2: UNet

def encode_latents(taesd, images, batch: int = 16):
    """UNet-space latents ``[N, 4, size/8, size/8]`` of ``images`` ``[N, H, W, 3]`` (raw encoder output)."""
    import torch

    with torch.no_grad():
        return torch.cat([taesd.taesd_encoder(images[i:i + batch].permute(0, 3, 1, 2))
                          for i in range(0, images.shape[0], batch)])


def draw_timesteps(batch: int, gen):
    """``[batch]`` training timesteps: 75% uniform in [0, 500) (SDEdit at strength <= 0.5), the rest in [0, 1000)."""
    import torch

    low = torch.rand(batch, generator=gen) < 0.75
    return torch.where(low, torch.randint(0, 500, (batch,), generator=gen),
                       torch.randint(0, 1000, (batch,), generator=gen))


def unet_loss(model, latents, labels, embeddings, t, noise):
    """EPS loss of the SD15 BaseModel ``model`` on UNet-space ``latents`` ``[B, 4, h, w]`` at timesteps ``t``
    ``[B]`` with ``noise`` (``latents``' shape).

    ``labels`` ``[B]`` index ``embeddings`` ``[3, 77, C]`` (photo, style, empty). The input is scaled as
    ComfyUI's EPS sampling does (x / sqrt(sigma^2 + 1)), so the trained net is used by ComfyUI exactly as it
    was trained.
    """
    b = latents.shape[0]
    sampling = model.model_sampling
    sigma = sampling.sigmas[t].view(b, 1, 1, 1)
    x_in = sampling.calculate_input(sigma.view(b), latents + sigma * noise)
    pred = model.diffusion_model(x_in, timesteps=sampling.timestep(sigma.view(b)).float(),
                                 context=embeddings[labels])
    return torch_mse(pred, noise)


def last_fifth_gain(values) -> float:
    """How much lower a loss ended than where its last fifth began: 1 - mean(last 5% of ``values``) /
    mean(the 5% just before the 80% mark). 0.03 = 3% better over the last fifth."""
    n = len(values)
    width = max(1, n // 20)
    mark = int(0.8 * n)
    before = values[max(0, mark - width):max(1, mark)]
    return 1.0 - (sum(values[-width:]) / width) / (sum(before) / len(before))


# --------------------------------------------------------------------------- state, loop, output

class Evaluation:
    """Measurements during training on frames never trained on (``toy_world.HELD_OUT``, every 4th frame of
    each segment) and, for the gap, on 8 training frames: the autoencoder's PSNR, and the UNet's EPS loss
    at fixed timesteps and noise. Draws from a generator of its own: evaluating never changes training."""

    def __init__(self, args, train_photo):
        import torch

        from toy_world import HELD_OUT, load_segment, stylize

        self.frames = {name: load_segment(segment, args.size)[::4] for name, segment in HELD_OUT.items()}
        self.frames["training frames"] = train_photo[::max(1, train_photo.shape[0] // 8)][:8]
        self.styles = {name: stylize(frames) for name, frames in self.frames.items()}
        self.gen = torch.Generator().manual_seed(args.seed + 20)
        self.draws = None  # (latents, labels, t, noise) per group, made once the autoencoder is final

    def autoencoder(self, taesd) -> dict:
        """{segment: PSNR in dB of encode -> decode, clamped to 0..1} (frames only, not their style)."""
        import torch

        from toy_world import psnr

        with torch.no_grad():
            return {name: round(psnr(taesd.taesd_decoder(taesd.taesd_encoder(frames.permute(0, 3, 1, 2)))
                                     .clamp(0, 1).permute(0, 2, 3, 1), frames), 3)
                    for name, frames in self.frames.items()}

    def _make_draws(self, taesd, mean, std, repeats: int = 2):
        import torch

        self.draws = {}
        for group, names in (("held-out", [n for n in self.frames if n != "training frames"]),
                             ("training", ["training frames"])):
            images = torch.cat([self.frames[n] for n in names] + [self.styles[n] for n in names])
            latents = (encode_latents(taesd, images) - mean) / std
            half = latents.shape[0] // 2
            labels = torch.cat([torch.zeros(half, dtype=torch.long), torch.ones(half, dtype=torch.long)])
            latents, labels = latents.repeat(repeats, 1, 1, 1), labels.repeat(repeats)
            t = draw_timesteps(latents.shape[0], self.gen)
            self.draws[group] = (latents, labels, t, torch.randn(latents.shape, generator=self.gen))

    def unet(self, model, taesd, embeddings, mean, std) -> dict:
        """{"held-out": EPS loss, "training": EPS loss} with the same timesteps and noise at every call."""
        import torch

        if self.draws is None:
            self._make_draws(taesd, mean, std)
        model.diffusion_model.eval()
        with torch.no_grad():
            out = {group: round(float(unet_loss(model, *draw[:2], embeddings, *draw[2:])), 5)
                   for group, draw in self.draws.items()}
        model.diffusion_model.train()
        return out


SHARED_SETTINGS = ("size", "frames", "synthetic", "seed", "init_from", "freeze_encoder")
AE_SETTINGS = ("crop", "ae_steps", "ae_batch", "ae_lr", "style_share")
UNET_SETTINGS = ("unet_steps", "unet_batch", "unet_lr", "unet_channels")


def phase_settings(args, phase: str) -> dict:
    """The settings a phase's state depends on. The UNet's latents come from the trained encoder unless it is
    frozen, so then the autoencoder's settings are the UNet's too."""
    keys = SHARED_SETTINGS + (AE_SETTINGS if phase == "ae" or not args.freeze_encoder else ()) \
        + (UNET_SETTINGS if phase == "unet" else ())
    return {k: getattr(args, k) for k in keys}


def may_change(key: str, value, state: dict) -> bool:
    """Whether a run resumed from a phase's ``state`` may set ``key`` to another ``value``: the phase's step count
    until its learning rate starts to decay under either count (see ``learning_rate``), the UNet's other
    settings until its first step."""
    if key in ("ae_steps", "unet_steps") and key.startswith(state["phase"]):
        if state["step"] <= min(decay_start(value), decay_start(state["settings"][key])):
            return True
    return key in UNET_SETTINGS and state["phase"] == "unet" and state["step"] == 0


class Trainer:
    """Both phases, each with its resumable state (``ae.pt``, ``unet.pt`` in ``--work``, written every
    ``--save-every`` steps) and its own random generator, so a phase gives the same weights whether the
    other ran before it, beside it or not yet."""

    def __init__(self, args):
        import torch

        self.args = args
        self.work = pathlib.Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.taesd, self.model, self.clip = build_models(args.seed, args.unet_channels)
        self.earlier = load_earlier(self.taesd, self.model, earlier_model(args.init_from, self.work)) \
            if args.init_from else {}
        self.photo, self.style = training_frames(args)
        self.evaluation = Evaluation(args, self.photo) if args.eval_every and not args.synthetic else None
        self.embeddings = prompt_embeddings(self.clip)
        trained = self.taesd.taesd_decoder if args.freeze_encoder else self.taesd
        self.modules = {"ae": trained, "unet": self.model.diffusion_model}
        self.opt = {"ae": torch.optim.Adam(trained.parameters(), lr=args.ae_lr),
                    "unet": torch.optim.AdamW(self.model.diffusion_model.parameters(), lr=args.unet_lr,
                                              weight_decay=0.0)}
        self.gen = {"ae": torch.Generator().manual_seed(args.seed + 10),
                    "unet": torch.Generator().manual_seed(args.seed + 11)}
        self.log = {"ae": [], "unet": [], "ae_eval": [], "unet_eval": []}
        self.step, self.seconds, self.wall = {"ae": 0, "unet": 0}, {"ae": 0.0, "unet": 0.0}, {"ae": 0.0, "unet": 0.0}
        self.data = {"ae": None, "unet": None}  # the encoder's latents each phase trains on (None: not made yet)
        for phase in ("ae", "unet"):
            self._resume(phase)

    def _resume(self, phase: str, only_weights: bool = False):
        import torch

        path = self.work / f"{phase}.pt"
        if not path.is_file():
            return
        state = torch.load(path, weights_only=False)
        now, then = phase_settings(self.args, phase), state["settings"]
        changed = [k for k in now if now[k] != then.get(k) and not may_change(k, now[k], state)]
        if changed:
            raise SystemExit(f"{path} was made with other settings ({', '.join(f'{k}={then.get(k)}' for k in changed)}); "
                             f"remove it or pass another --work")
        if state["step"]:  # before its first step a phase's weights are its starting point (of another width, perhaps)
            self.modules[phase].load_state_dict(state["weights"])
            self.opt[phase].load_state_dict(state["opt"])
        self.gen[phase].set_state(state["gen"])
        self.log[phase], self.log[phase + "_eval"] = state["log"], state["eval"]
        self.step[phase], self.seconds[phase], self.wall[phase] = state["step"], state["seconds"], state["wall"]
        self.data[phase] = state["data"]
        if not only_weights:
            print(f"[train] resumed {phase} from {path}: step {state['step']}, {state['seconds']:.0f} s so far",
                  flush=True)

    def save_state(self, phase: str):
        import torch

        path = self.work / f"{phase}.pt"
        state = {"phase": phase, "settings": phase_settings(self.args, phase),
                 "weights": self.modules[phase].state_dict(), "opt": self.opt[phase].state_dict(),
                 "gen": self.gen[phase].get_state(), "log": self.log[phase], "eval": self.log[phase + "_eval"],
                 "step": self.step[phase], "seconds": self.seconds[phase], "wall": self.wall[phase],
                 "data": self.data[phase]}
        torch.save(state, path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)  # never a half-written state

    def done(self, phase: str) -> bool:
        return self.step[phase] >= getattr(self.args, f"{phase}_steps")

    def _step(self, phase, loss, lr):
        import torch

        optimizer = self.opt[phase]
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.modules[phase].parameters(), 1.0)
        optimizer.step()

    def _timed_step(self, phase, start, loss, evaluate, every=25):
        """Record a step that began at ``start`` (its loss, time), print, evaluate and save when due."""
        self.step[phase] += 1
        step, total = self.step[phase], getattr(self.args, f"{phase}_steps")
        self.seconds[phase] += time.perf_counter() - start
        curve = self.log[phase]
        curve.append([step, loss, round(self.seconds[phase], 1)])
        if step % every == 0 or step == total:
            window = [v for _, v, _ in curve[-every:]]
            print(f"[train] {phase} step {step}/{total}: loss {sum(window) / len(window):.5f} "
                  f"({self.seconds[phase]:.0f} s)", flush=True)
        if self.evaluation is not None and (step % self.args.eval_every == 0 or step == total):
            result = evaluate()
            self.log[phase + "_eval"].append([step, result, round(self.seconds[phase], 1)])
            print(f"[train] {phase} step {step} evaluation: {result}", flush=True)
        if step % self.args.save_every == 0 or step == total:
            self.save_state(phase)

    def encoder_latents(self):
        """Raw encoder latents ``[2N, 4, h, w]`` of the training frames and then their style. With a frozen
        encoder they never change: kept in ``--work`` for the other phase's process."""
        import torch

        cached = self.work / "encoder_latents.pt"
        if self.args.freeze_encoder and cached.is_file():
            return torch.load(cached)
        latents = torch.cat([encode_latents(self.taesd, self.photo), encode_latents(self.taesd, self.style)])
        if self.args.freeze_encoder:
            torch.save(latents, cached.with_suffix(".tmp"))
            os.replace(cached.with_suffix(".tmp"), cached)
        return latents

    def train_autoencoder(self):
        import torch

        args, phase_start = self.args, time.perf_counter()
        if args.freeze_encoder and self.data["ae"] is None:
            self.data["ae"] = self.encoder_latents()
        images = torch.cat([self.photo, self.style])
        while not self.done("ae"):
            start = time.perf_counter()
            if args.freeze_encoder:  # the decoder alone, on the frozen encoder's latents of whole frames
                latents, pixels = latent_crops(self.data["ae"], images, args.crop, args.ae_batch, args.style_share,
                                               self.gen["ae"])
                loss = mse = torch_mse(self.taesd.taesd_decoder(latents), pixels)
            else:
                pixels = random_crops(self.photo, self.style, args.crop, args.ae_batch, args.style_share,
                                      self.gen["ae"])
                loss, mse = autoencoder_loss(self.taesd, pixels)
            self._step("ae", loss, learning_rate(self.step["ae"], args.ae_steps, args.ae_lr))
            self.wall["ae"] += time.perf_counter() - phase_start
            phase_start = time.perf_counter()
            self._timed_step("ae", start, float(mse.detach()), lambda: self.evaluation.autoencoder(self.taesd))
        self.wall["ae"] += time.perf_counter() - phase_start

    def train_unet(self):
        import torch

        args, phase_start = self.args, time.perf_counter()
        if self.data["unet"] is None:
            self.data["unet"] = self.encoder_latents()
            self.save_state("unet")
        latents_all = self.data["unet"]
        n = latents_all.shape[0] // 2
        labels_all = torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)])
        mean, std = latents_all.mean(), latents_all.std()
        gen = self.gen["unet"]
        self.model.diffusion_model.train()
        while not self.done("unet"):
            start = time.perf_counter()
            pick = torch.randint(0, latents_all.shape[0], (args.unet_batch,), generator=gen)
            labels = torch.where(torch.rand(pick.shape[0], generator=gen) < 0.1, 2, labels_all[pick])
            # The UNet sees latents normalised as the saved vae_scale/vae_shift will make them (mean 0, std 1).
            latents = (latents_all[pick] - mean) / std
            t = draw_timesteps(latents.shape[0], gen)
            loss = unet_loss(self.model, latents, labels, self.embeddings, t, torch.randn(latents.shape, generator=gen))
            self._step("unet", loss, learning_rate(self.step["unet"], args.unet_steps, args.unet_lr))
            self.wall["unet"] += time.perf_counter() - phase_start
            phase_start = time.perf_counter()
            self._timed_step("unet", start, float(loss.detach()),
                             lambda: self.evaluation.unet(self.model, self.taesd, self.embeddings, mean, std))
        self.wall["unet"] += time.perf_counter() - phase_start
        self.save_state("unet")

    def write_outputs(self, command: str):
        """The three model files (fp16) and ``train_log.json`` into ``--out``."""
        import torch
        from safetensors.torch import save_file

        from streamv2v.nodes.toy_model import CLIP_CONFIG_KEY, toy_files

        files = toy_files(self.args.out)
        files["unet"].parent.mkdir(parents=True, exist_ok=True)
        if self.data["unet"] is not None:
            mean, std = float(self.data["unet"].mean()), float(self.data["unet"].std())
        elif "latent_mean" in self.earlier:  # the UNet was not trained here: keep the scaling it was trained with
            mean, std = float(self.earlier["latent_mean"]), float(self.earlier["latent_std"])
        else:
            raise SystemExit("no UNet latents to scale by: run the UNet phase, or --init-from a model with a log")
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
        (files["unet"].parent / "train_log.json").write_text(json.dumps(self.summary(command, mean, std), indent=1))
        for path in files.values():
            print(f"[train] wrote {path} ({path.stat().st_size / 2**20:.2f} MiB)", flush=True)

    def summary(self, command: str, mean: float, std: float) -> dict:
        """What ``train_log.json`` holds: the command, times, sizes, loss curves and held-out measurements."""
        unet_losses = [v for _, v, _ in self.log["unet"]]
        evals = self.log["unet_eval"]
        # The evaluation nearest before the last fifth starts (evaluations come every --eval-every steps).
        mark = ([e for e in evals if e[0] <= 0.8 * self.args.unet_steps] or [None])[-1]
        flat = {"training loss": round(last_fifth_gain(unet_losses), 4) if unet_losses else None}
        if mark and evals:
            flat.update({f"{group} eval loss since step {mark[0]}": round(1 - evals[-1][1][group] / mark[1][group], 4)
                         for group in evals[-1][1]})
        return {"command": command, "train_seconds": {k: round(v, 1) for k, v in self.seconds.items()},
                "wall_seconds": {k: round(v, 1) for k, v in self.wall.items()},
                "frames": int(self.photo.shape[0]), "latent_mean": mean, "latent_std": std,
                "unet_params": sum(p.numel() for p in self.model.diffusion_model.parameters()),
                "unet_last_fifth_gain": flat,
                "curves": {phase: thin(self.log[phase]) for phase in ("ae", "unet")},
                "evaluations": {phase: self.log[phase + "_eval"] for phase in ("ae", "unet")},
                "initialised_from": ({"init_from": self.args.init_from, "its_log": self.earlier}
                                     if self.args.init_from else None)}


def thin(curve, points: int = 100):
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
    started = time.perf_counter()
    trainer = Trainer(args)
    print(f"[train] {trainer.photo.shape[0]} training frames at {args.size}x{args.size} (+ their style); "
          f"UNet {sum(p.numel() for p in trainer.model.diffusion_model.parameters()) / 1e6:.2f}M params, "
          f"TAESD {sum(p.numel() for p in trainer.taesd.parameters()) / 1e6:.2f}M", flush=True)
    if args.phase in ("both", "ae"):
        trainer.train_autoencoder()
    if args.phase in ("both", "unet"):
        if not (trainer.done("ae") or args.freeze_encoder):
            raise SystemExit("the UNet trains on the trained encoder's latents: run the autoencoder phase first "
                             "(or keep the encoder: --freeze-encoder)")
        trainer.train_unet()
    for phase in ("ae", "unet"):  # the other phase may have finished in another process since
        if not trainer.done(phase):
            trainer._resume(phase, only_weights=True)
    if not (trainer.done("ae") and trainer.done("unet")):
        print(f"[train] this process: {time.perf_counter() - started:.0f} s; the files are written once both "
              f"phases are done", flush=True)
        return 0
    trainer.write_outputs(command)
    print(f"[train] done: {sum(trainer.seconds.values()):.0f} s of training steps; phases' wall time "
          f"{trainer.wall['ae']:.0f} s (autoencoder) + {trainer.wall['unet']:.0f} s (UNet); this process "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
