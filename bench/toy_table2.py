"""StreamV2V's Table 2 (and Fig. 8) at toy scale, on the pack's own trained toy model and held-out clips.

The model is ``scripts/toy_model/`` (trained on this CPU by ``scripts/train_toy_model.py``: a
TAESD-shaped VAE, a 2.5M-parameter SD1.5-shaped UNet, 128x128 frames). It is a toy: what it shows
is whether the bank steadies a *trained* denoiser's video, not what SD1.5 at 512x512 does.

Sections (each printed as a markdown table and written to ``--out``):

1. Quality on held-out frames: PSNR of the autoencoder, of SDEdit at strength 0.4 with the photo
   prompt, and the fidelity to each frame's OpenCV style (PSNR against ``stylize(frame)``) with the
   style prompt vs with the photo prompt.
2. Table 2 / Fig. 8 proxy, style prompt, 4 steps, strength 0.4, cfg 1, over the held-out
   segments: warp error (flow from the source clip, 0..255 MSE scale), its std over frame pairs,
   and style fidelity, for per-frame img2img, the stream batch without bank, queue(1/2/4), DyMe(1)
   at intervals 4 and 1, EA only, FF only.
3. Flicker on a static clip (one held-out frame repeated): mean absolute change between consecutive
   outputs (in 1/255), at bank updates and elsewhere.
4. DyMe's matching on the attention input n (this pack) vs on the keys to_k(n) (the authors'
   code), with the trained UNet and with its untrained initialisation.

Usage::

    python bench/toy_table2.py --threads 1 --out bench/results/toy_table2-cpu.md
"""
from __future__ import annotations

import argparse
import collections
import os
import pathlib
import shlex
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _host import setup_host  # noqa: E402

STEPS = 4
INTERVAL = 4
# (label, bank mode or None, bank size, interval, EA, FF, stream batch, fixed noise)
ROWS = [
    ("per-frame img2img", None, 0, INTERVAL, False, False, False, False),
    ("stream batch, no bank", None, 0, INTERVAL, False, False, True, True),
    ("queue (1)", "queue", 1, INTERVAL, True, True, True, True),
    ("queue (2)", "queue", 2, INTERVAL, True, True, True, True),
    ("queue (4)", "queue", 4, INTERVAL, True, True, True, True),
    ("DyMe (1), EA+FF, interval 4", "dyme", 1, 4, True, True, True, True),
    ("DyMe (1), EA+FF, interval 1", "dyme", 1, 1, True, True, True, True),
    ("DyMe (1), EA only", "dyme", 1, 4, True, False, True, True),
    ("DyMe (1), FF only", "dyme", 1, 4, False, True, True, True),
]
PAPER = {"per-frame img2img": "", "stream batch, no bank": "85.2", "queue (1)": "76.4", "queue (2)": "74.8",
         "queue (4)": "72.4", "DyMe (1), EA+FF, interval 4": "73.4", "DyMe (1), EA+FF, interval 1": "",
         "DyMe (1), EA only": "74.0", "DyMe (1), FF only": "80.4"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=32, help="frames per held-out segment (at most 32)")
    p.add_argument("--static-frames", type=int, default=24)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model-dir", default=None, help="toy model folder (default scripts/toy_model)")
    p.add_argument("--sections", default="1234", help="which sections to run, e.g. 23")
    p.add_argument("--out", default=None, help="also write the tables to this markdown file")
    return p.parse_args(argv)


class Toy:
    """The loaded toy model, its prompts and the held-out frames."""

    def __init__(self, args):
        from toy_world import HELD_OUT, PHOTO_PROMPT, STYLE_PROMPT, NEGATIVE_PROMPT, load_segment, stylize
        from streamv2v.nodes.toy_model import load_toy_model

        self.model, self.clip, self.vae = load_toy_model(args.model_dir)
        self.prompts = {name: self.encode(text) for name, text in
                        (("photo", PHOTO_PROMPT), ("style", STYLE_PROMPT), ("negative", NEGATIVE_PROMPT))}
        self.clips = {name: load_segment(seg, args.size)[:args.frames] for name, seg in HELD_OUT.items()}
        self.styled = {name: stylize(frames) for name, frames in self.clips.items()}

    def encode(self, text):
        return self.clip.encode_from_tokens_scheduled(self.clip.tokenize(text))

    def run(self, frames, prompt="style", bank=None, stream_batch=True, fixed_noise=True, seed=0):
        """``[T, H, W, 3]`` outputs of ``run_stream`` on ``frames`` with the given bank row (or none)."""
        import torch

        from streamv2v.nodes.engine import StreamSettings, run_stream

        model = self.model if bank is None else bank
        outputs = [None] * frames.shape[0]

        def keep(out):
            outputs[out.index] = out.image.float().cpu().clamp(0, 1)

        settings = StreamSettings(seed=seed, steps=STEPS, stream_batch=stream_batch, fixed_noise=fixed_noise)
        with torch.inference_mode():
            run_stream(model, self.prompts[prompt], self.prompts["negative"], self.vae, iter(frames), settings, keep)
        return torch.stack(outputs)


def banked(toy, label, mode, size, interval, ea, ff, seed=0):
    """The toy model with the row's bank patches on a fresh bank (None for no bank)."""
    from streamv2v.nodes.bank_nodes import ExtendedAttentionPatch, FeatureBankNode, FeatureFusionPatch

    if mode is None:
        return None
    handle = FeatureBankNode.execute(name=f"toy {label}", mode=mode, size=size, interval=interval, seed=seed).args[0]
    handle.open().reset("toy_table2: new row")
    model = toy.model
    if ea:
        model = ExtendedAttentionPatch.execute(model, handle, "all").args[0]
    if ff:
        model = FeatureFusionPatch.execute(model, handle, 0.75, 0.9, "low-res decoder").args[0]
    return model


# --------------------------------------------------------------------------- sections

def quality(toy):
    """Section 1 rows: per held-out segment, PSNRs of reconstruction and style fidelity."""
    import torch

    from toy_world import psnr

    lines = ["| held-out segment | autoencoder PSNR | SDEdit 0.4, photo prompt: PSNR to the frame | "
             "input vs its style | photo prompt vs style | style prompt vs style | style gain (dB) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    gains = []
    for name, frames in toy.clips.items():
        with torch.inference_mode():
            recon = toy.vae.decode(toy.vae.encode(frames)).float().clamp(0, 1)
        photo = toy.run(frames, "photo")
        style = toy.run(frames, "style")
        target = toy.styled[name]
        gain = psnr(style, target) - psnr(photo, target)
        gains.append(gain)
        lines.append(f"| {name} | {psnr(recon, frames):.2f} | {psnr(photo, frames):.2f} | {psnr(frames, target):.2f} | "
                     f"{psnr(photo, target):.2f} | {psnr(style, target):.2f} | {gain:+.2f} |")
        print(lines[-1], file=sys.stderr, flush=True)
    lines.append("")
    lines.append(f"PSNR in dB on 0..1 pixels. Style gain: PSNR to the frame's OpenCV style with the style prompt minus "
                 f"with the photo prompt (mean {statistics.fmean(gains):+.2f} dB); both through the stream engine, "
                 f"stream batch, no bank, 4 steps, strength 0.4, cfg 1.")
    return lines


def table2(toy):
    """Section 2 rows: warp error (mean over segments, std over frame pairs) and style fidelity per row."""
    import math

    from streamv2v.streamv2v_core.metrics import warp_error
    from toy_world import psnr

    lines = ["| row | warp error (mean of segments) | std over frame pairs | per segment | style PSNR | "
             "paper (SD1.5 + LCM, 512 px) | s |", "|---|---:|---:|---|---:|---:|---:|"]
    for label, mode, size, interval, ea, ff, stream_batch, fixed in ROWS:
        start = time.perf_counter()
        per_segment, pairs, fidelity = [], [], []
        for name, frames in toy.clips.items():
            model = banked(toy, label, mode, size, interval, ea, ff)
            out = toy.run(frames, "style", bank=model, stream_batch=stream_batch, fixed_noise=fixed)
            warp = warp_error(out, source_frames=frames)
            per_segment.append(warp.mean)
            pairs += [v for v in warp.per_pair if not math.isnan(v)]
            fidelity.append(psnr(out, toy.styled[name]))
        lines.append(f"| {label} | {statistics.fmean(per_segment):.2f} | {statistics.pstdev(pairs):.2f} | "
                     f"{' / '.join(f'{w:.1f}' for w in per_segment)} | {statistics.fmean(fidelity):.2f} | "
                     f"{PAPER[label]} | {time.perf_counter() - start:.0f} |")
        print(lines[-1], file=sys.stderr, flush=True)
    for label, videos in (("the input clip itself", toy.clips), ("its OpenCV style, frame by frame", toy.styled)):
        values = [warp_error(videos[name], source_frames=toy.clips[name]).mean for name in toy.clips]
        lines.append(f"| *for scale: {label}* | {statistics.fmean(values):.2f} | | "
                     f"{' / '.join(f'{w:.1f}' for w in values)} | | | |")
    lines.append("")
    lines.append(f"Segments (order of 'per segment'): {', '.join(toy.clips)}; {next(iter(toy.clips.values())).shape[0]} "
                 f"frames each. Style prompt, 4 steps, strength 0.4, cfg 1; banks: EA on all blocks, FF alpha 0.75 / "
                 f"threshold 0.9 on the low-res decoder; bank interval {INTERVAL} unless stated. Per-frame img2img: "
                 f"no stream batch, fresh noise every frame. Paper column: Table 2 (queue, DyMe) and Fig. 8 (EA, FF) of "
                 f"StreamV2V, RAFT flow on DAVIS; not comparable in absolute value.")
    return lines


def flicker(toy, frames_count):
    """Section 3 rows: change between consecutive outputs of a static clip, at bank updates and elsewhere."""
    from toy_world import STATIC_SEGMENT, load_segment

    frame = load_segment(STATIC_SEGMENT, next(iter(toy.clips.values())).shape[1])
    static = frame.expand(frames_count, *frame.shape[1:]).contiguous()
    rows = [("no bank (stream batch)", None, 0, INTERVAL, False, False),
            ("DyMe (1), EA+FF, interval 4", "dyme", 1, 4, True, True),
            ("DyMe (1), EA+FF, interval 1", "dyme", 1, 1, True, True),
            ("queue (1), EA+FF, interval 4", "queue", 1, 4, True, True)]
    lines = ["| row | mean change (1/255) | largest | mean after a bank update | mean otherwise | "
             "first 12 changes |", "|---|---:|---:|---:|---:|---|"]
    for label, mode, size, interval, ea, ff in rows:
        out = toy.run(static, "style", bank=banked(toy, label, mode, size, interval, ea, ff))
        change = [(out[i] - out[i - 1]).abs().mean().item() * 255 for i in range(1, out.shape[0])]
        # Frame i reads the bank written by frame i-1 when (i-1) % interval == 0: change[i-1] is out[i] - out[i-1].
        after = [c for i, c in enumerate(change, start=1) if mode and (i - 1) % interval == 0]
        other = [c for i, c in enumerate(change, start=1) if not (mode and (i - 1) % interval == 0)]
        lines.append(f"| {label} | {statistics.fmean(change):.2f} | {max(change):.2f} | "
                     f"{statistics.fmean(after) if after else float('nan'):.2f} | "
                     f"{statistics.fmean(other) if other else float('nan'):.2f} | "
                     f"{' '.join(f'{c:.1f}' for c in change[:12])} |")
        print(lines[-1], file=sys.stderr, flush=True)
    lines.append("")
    lines.append(f"{frames_count} copies of one held-out frame (vtest.avi frame 640), style prompt, stream batch, fixed "
                 f"noise. Change: mean |out[i] - out[i-1]| over pixels, in 1/255. 'After a bank update': frames that "
                 f"are the first to read a newly written bank.")
    return lines


def capture_attention_inputs(model, vae, frames, context, sigma):
    """{attn1 module name: [n of frame 0, n of frame 1]} for two frames noised to ``sigma`` (same noise)."""
    import torch

    base = model.model
    captured = collections.defaultdict(list)
    hooks = [module.register_forward_pre_hook(lambda m, a, name=name: captured[name].append(a[0].detach()))
             for name, module in base.diffusion_model.named_modules() if name.endswith("attn1")]
    try:
        with torch.inference_mode():
            for frame in frames:
                latent = base.process_latent_in(vae.encode(frame[None]))
                noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
                base.apply_model(latent + sigma * noise, torch.tensor([sigma]), c_crossattn=context)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def matching_agreement(model, captured):
    """(same-destination share, mean relative difference of the merged keys) over every self-attention."""
    import torch

    from streamv2v.streamv2v_core.bank.merging import apply_matching, random_bipartite_matching

    modules = dict(model.model.diffusion_model.named_modules())
    g = torch.Generator().manual_seed(1)
    agree = sources = 0
    diffs = []
    with torch.inference_mode():
        for name, (old, new) in captured.items():
            joined = torch.cat([old, new], dim=1).float()  # what DyMe joins: bank (frame 0) + new frame
            keys = torch.rand(1, joined.shape[1], generator=g)
            k_joined = modules[name + ".to_k"](joined)
            on_n = random_bipartite_matching(joined, new.shape[1], keys)
            on_k = random_bipartite_matching(k_joined, new.shape[1], keys)
            agree += int((on_n.dst_of_src == on_k.dst_of_src).sum())
            sources += on_n.dst_of_src.numel()
            merged_n, merged_k = apply_matching(k_joined, on_n), apply_matching(k_joined, on_k)
            diffs.append(float((merged_n - merged_k).norm() / merged_k.norm()))
    return agree / sources, statistics.fmean(diffs)


def dyme_matching(toy):
    """Section 4 rows: n vs to_k(n) matching with the trained UNet and with its untrained initialisation."""
    from streamv2v.nodes.toy_model import unet_from_state_dict

    untrained = unet_from_state_dict(untrained_unet_state())
    lines = ["| UNet | sigma | same destination | merged keys, relative difference |", "|---|---:|---:|---:|"]
    context = toy.prompts["style"][0][0]
    for label, model in (("trained (toy)", toy.model), ("untrained init, same shape", untrained)):
        for sigma in (0.5, 1.5):
            shares, diffs = [], []
            for name, frames in toy.clips.items():
                captured = capture_attention_inputs(model, toy.vae, frames[:2], context, sigma)
                share, diff = matching_agreement(model, captured)
                shares.append(share)
                diffs.append(diff)
            lines.append(f"| {label} | {sigma} | {statistics.fmean(shares):.1%} | {statistics.fmean(diffs):.4f} |")
            print(lines[-1], file=sys.stderr, flush=True)
    lines.append("")
    lines.append("Frames 0 and 1 of each held-out segment, same noise, style prompt; every self-attention layer; "
                 "random split as DyMe draws it. 'Same destination': share of source tokens whose best cosine match "
                 "is the same token whether matched on n or on to_k(n).")
    return lines


def untrained_unet_state():
    """The toy UNet's state dict at initialisation (the training script's seeded init, before any step)."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "scripts"))
    import train_toy_model

    _, model, _ = train_toy_model.build_models(0)
    # Its output conv is zero (the training's start); that conv comes after every attention layer, so the
    # attention inputs compared here are those of the random-weight network.
    return model.diffusion_model.state_dict()


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_host("cpu", threads=args.threads)
    toy = Toy(args)
    sections = {"1": ("1. Quality on held-out frames", lambda: quality(toy)),
                "2": ("2. Table 2 / Fig. 8 at toy scale", lambda: table2(toy)),
                "3": ("3. Flicker on a static clip", lambda: flicker(toy, args.static_frames)),
                "4": ("4. DyMe matching: n vs to_k(n)", lambda: dyme_matching(toy))}
    command = "python " + " ".join(shlex.quote(a) for a in ["bench/toy_table2.py", *(argv or sys.argv[1:])])
    import torch

    text = ["# StreamV2V at toy scale: the pack's own CPU-trained model (not SD1.5)\n",
            f"Command: `{command}`  ",
            f"Machine: {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}, torch {torch.__version__}\n"]
    for key in args.sections:
        title, run = sections[key]
        start = time.perf_counter()
        print(f"[toy_table2] {title} ...", file=sys.stderr, flush=True)
        text += [f"## {title}\n", *run(), f"\n({time.perf_counter() - start:.0f} s)\n"]
    print("\n".join(text))
    if args.out:
        pathlib.Path(args.out).write_text("\n".join(text) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
