"""StreamV2V's Table 2 (and Fig. 8) at toy scale, on the pack's own trained toy model and held-out clips.

The model is ``scripts/toy_model/`` (trained on this CPU by ``scripts/train_toy_model.py``: a
TAESD-shaped VAE, a 2.5M-parameter SD1.5-shaped UNet, 128x128 frames). It is a toy: what it shows
is whether the bank steadies a *trained* denoiser's video, not what SD1.5 at 512x512 does.

Sections (each printed as a markdown table and written to ``--out``):

1. Quality on held-out frames: PSNR of the autoencoder, of SDEdit at strength 0.4 with the photo
   prompt, and the fidelity to each frame's OpenCV style (PSNR against ``stylize(frame)``) with the
   style prompt vs with the photo prompt.
2. Table 2 / Fig. 8 proxy, style prompt, 4 steps, cfg 1, over the held-out segments: warp error
   (DIS flow from the source clip, 0..255 MSE scale) and change between consecutive outputs, their
   std over frame pairs, and style fidelity. Rows with fresh noise every frame (where there is
   flicker for a bank to remove): no bank, queue (1/2/4), DyMe (1), EA only, FF only; rows with
   the stream batch's fixed noise at strength 0.4 and 0.6; per-frame img2img; the input clip
   itself. Each bank row is compared with the no-bank row of its group frame pair by frame pair
   (same noise): mean paired difference, its 95% interval, paired t-test and Wilcoxon p-values.
3. Flicker on a static clip (one held-out frame repeated): mean absolute change between consecutive
   outputs (in 1/255), at bank updates and elsewhere, with fixed and with fresh noise, compared
   with no bank in the same way.
4. DyMe's matching on the attention input n (this pack) vs on the keys to_k(n) (the authors'
   code), with the trained UNet and with its untrained initialisation.

Usage::

    python bench/toy_table2.py --threads 1 --out bench/results/toy_table2-cpu.md
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import math
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


@dataclasses.dataclass(frozen=True)
class Row:
    """One measured configuration: a bank (mode None: no bank) and the stream's noise and strength."""

    label: str
    mode: str | None = None
    size: int = 1
    interval: int = INTERVAL
    ea: bool = True
    ff: bool = True
    fixed_noise: bool = True
    strength: float = 0.4
    stream_batch: bool = True
    paper: str = ""

    @property
    def group(self) -> str:
        """Rows of one group differ only in the bank: each is compared with its group's no-bank row."""
        if not self.stream_batch:
            return "per-frame img2img (no stream batch), fresh noise, strength 0.4"
        noise = "fixed noise (stream batch)" if self.fixed_noise else "fresh noise every frame"
        return f"{noise}, strength {self.strength}"


def bank_rows(**stream) -> list[Row]:
    """No bank and the paper's bank rows (Table 2: queue, DyMe; Fig. 8: EA only, FF only) for one noise/strength."""
    return [Row("no bank", paper="85.2", **stream),
            Row("queue (1)", "queue", 1, paper="76.4", **stream), Row("queue (2)", "queue", 2, paper="74.8", **stream),
            Row("queue (4)", "queue", 4, paper="72.4", **stream),
            Row("DyMe (1), EA+FF", "dyme", paper="73.4", **stream),
            Row("DyMe (1), EA only", "dyme", ff=False, paper="74.0 (Fig. 8)", **stream),
            Row("DyMe (1), FF only", "dyme", ea=False, paper="80.4 (Fig. 8)", **stream)]


ROWS = [*bank_rows(fixed_noise=False),
        Row("no bank", fixed_noise=True, strength=0.4), Row("queue (4)", "queue", 4, fixed_noise=True, strength=0.4),
        Row("DyMe (1), EA+FF", "dyme", fixed_noise=True, strength=0.4),
        Row("no bank", fixed_noise=True, strength=0.6), Row("queue (4)", "queue", 4, fixed_noise=True, strength=0.6),
        Row("DyMe (1), EA+FF", "dyme", fixed_noise=True, strength=0.6),
        Row("no bank", fixed_noise=False, stream_batch=False)]
STATIC_ROWS = [Row("no bank"), Row("DyMe (1), EA+FF", "dyme"), Row("DyMe (1), EA+FF, interval 1", "dyme", interval=1),
               Row("queue (1)", "queue"),
               *[dataclasses.replace(row, fixed_noise=False) for row in bank_rows() if "queue (2)" not in row.label]]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=32, help="frames per held-out segment (at most 32)")
    p.add_argument("--static-frames", type=int, default=24)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model-dir", default=None, help="toy model folder (default scripts/toy_model)")
    p.add_argument("--sections", default="1234", help="which sections to run, e.g. 23")
    p.add_argument("--groups", default="",
                   help="section 2: only the row groups whose name holds one of these comma-separated words "
                        "(e.g. 'fresh' or 'fixed,img2img'), to measure a table in several processes")
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

    def run(self, frames, prompt="style", row: Row = Row("no bank"), seed=0):
        """``[T, H, W, 3]`` outputs of ``run_stream`` on ``frames`` for ``row`` (its bank on a fresh bank)."""
        import torch

        from streamv2v.nodes.engine import StreamSettings, run_stream

        model = banked(self, row, seed)
        outputs = [None] * frames.shape[0]

        def keep(out):
            outputs[out.index] = out.image.float().cpu().clamp(0, 1)

        settings = StreamSettings(seed=seed, steps=STEPS, strength=row.strength, stream_batch=row.stream_batch,
                                  fixed_noise=row.fixed_noise)
        with torch.inference_mode():
            run_stream(model, self.prompts[prompt], self.prompts["negative"], self.vae, iter(frames), settings, keep)
        return torch.stack(outputs)


def banked(toy, row: Row, seed=0):
    """The toy model with ``row``'s bank patches on a fresh bank (the model itself for no bank)."""
    from streamv2v.nodes.bank_nodes import ExtendedAttentionPatch, FeatureBankNode, FeatureFusionPatch

    if row.mode is None:
        return toy.model
    handle = FeatureBankNode.execute(name=f"toy {row.label}", mode=row.mode, size=row.size, interval=row.interval,
                                     seed=seed).args[0]
    handle.open().reset("toy_table2: new row")
    model = toy.model
    if row.ea:
        model = ExtendedAttentionPatch.execute(model, handle, "all").args[0]
    if row.ff:
        model = FeatureFusionPatch.execute(model, handle, 0.75, 0.9, "low-res decoder").args[0]
    return model


def changes(video) -> list[float]:
    """Mean absolute change between consecutive frames of ``video`` ``[T, H, W, 3]``, in 1/255, per pair."""
    return [float((video[i] - video[i - 1]).abs().mean()) * 255 for i in range(1, video.shape[0])]


def paired(values, baseline) -> dict:
    """``values`` against ``baseline`` pair by pair (same frames, same noise): mean difference, its 95% interval
    (t), paired t-test and Wilcoxon signed-rank p-values (two-sided), and the relative change of the means."""
    import numpy as np
    from scipy import stats

    v, b = np.asarray(values, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    keep = np.isfinite(v) & np.isfinite(b)
    d = v[keep] - b[keep]
    if not d.size or not np.any(d):
        return {"diff": 0.0, "half": 0.0, "p_t": 1.0, "p_w": 1.0, "rel": 0.0, "n": int(d.size)}
    half = float(stats.t.ppf(0.975, d.size - 1) * d.std(ddof=1) / np.sqrt(d.size))
    return {"diff": float(d.mean()), "half": half, "p_t": float(stats.ttest_rel(v[keep], b[keep]).pvalue),
            "p_w": float(stats.wilcoxon(d).pvalue), "rel": float(d.mean() / b[keep].mean()), "n": int(d.size)}


def verdict(stats_row: dict, what: str = "warp error") -> str:
    """A sentence on a paired comparison: direction, size and whether both tests put p below 0.05."""
    if stats_row["n"] == 0 or stats_row["diff"] == 0:
        return f"{what} identical to no bank"
    direction = "lower" if stats_row["diff"] < 0 else "higher"
    sure = max(stats_row["p_t"], stats_row["p_w"]) < 0.05
    return (f"{what} {direction} by {abs(stats_row['diff']):.3g} ({abs(stats_row['rel']):.1%}; 95% interval "
            f"{stats_row['diff'] - stats_row['half']:+.3g}..{stats_row['diff'] + stats_row['half']:+.3g}), "
            f"{'significant' if sure else 'not significant'} at 0.05 (paired t p={stats_row['p_t']:.2g}, "
            f"Wilcoxon p={stats_row['p_w']:.2g}, {stats_row['n']} frame pairs)")


# --------------------------------------------------------------------------- sections

def quality(toy):
    """Section 1 rows: per held-out segment, PSNRs of reconstruction and style fidelity."""
    import torch

    from toy_world import correlation, psnr

    lines = ["| held-out segment | autoencoder PSNR | SDEdit 0.4, photo prompt: PSNR to the frame | "
             "input vs its style | photo prompt vs style | style prompt vs style | style gain (dB) | "
             "style prompt: correlation to the input |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
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
                     f"{psnr(photo, target):.2f} | {psnr(style, target):.2f} | {gain:+.2f} | "
                     f"{correlation(style, frames):.3f} |")
        print(lines[-1], file=sys.stderr, flush=True)
    lines.append("")
    lines.append(f"PSNR in dB on 0..1 pixels. Style gain: PSNR to the frame's OpenCV style with the style prompt minus "
                 f"with the photo prompt (mean {statistics.fmean(gains):+.2f} dB); both through the stream engine, "
                 f"stream batch, no bank, 4 steps, strength 0.4, cfg 1. Correlation: Pearson, of the luma of the "
                 f"restyled frames and of the input frames over all pixels (what the demo prints).")
    return lines


def measure_row(toy, row: Row) -> dict:
    """``row`` on every held-out segment: warp error and change per frame pair (segments one after another),
    warp error per segment, style PSNR per segment."""
    from streamv2v.streamv2v_core.metrics import warp_error
    from toy_world import psnr

    result = {"warp": [], "change": [], "per_segment": [], "fidelity": []}
    for name, frames in toy.clips.items():
        out = toy.run(frames, "style", row)
        warp = warp_error(out, source_frames=frames)
        result["warp"] += warp.per_pair
        result["change"] += changes(out)
        result["per_segment"].append(warp.mean)
        result["fidelity"].append(psnr(out, toy.styled[name]))
    return result


def spread(values) -> tuple[float, float]:
    """(mean, std) of the finite ``values``."""
    finite = [v for v in values if math.isfinite(v)]
    return statistics.fmean(finite), statistics.pstdev(finite)


def table2(toy, groups: str = ""):
    """Section 2 rows: warp error and change (mean, std over frame pairs), each bank row against its group's
    no-bank row pair by pair, and style fidelity. ``groups``: comma-separated words, one of which a row's group
    must hold (all rows if empty)."""
    words = [w for w in groups.split(",") if w]
    rows = [row for row in ROWS if not words or any(w in row.group for w in words)]
    lines = ["| row | warp error | std over pairs | vtest / Megamind / tree | vs no bank: paired difference (95%) "
             "| p (t / Wilcoxon) | change (1/255) | std | style PSNR | paper (SD1.5 + LCM, 512 px) | s |",
             "|---|---:|---:|---|---|---|---:|---:|---:|---:|---:|"]
    results, statements, group = {}, [], None
    for row in rows:
        if row.group != group:
            group = row.group
            lines.append(f"| ***{group}*** | | | | | | | | | | |")
        start = time.perf_counter()
        result = results[(group, row.label)] = measure_row(toy, row)
        base = results.get((group, "no bank")) if row.mode else None
        versus, p_text = "", ""
        if base:
            vs = paired(result["warp"], base["warp"])
            versus, p_text = f"{vs['diff']:+.2f} ({vs['diff'] - vs['half']:+.2f}..{vs['diff'] + vs['half']:+.2f})", \
                f"{vs['p_t']:.2g} / {vs['p_w']:.2g}"
            lower = sum(r < b for r, b in zip(result["per_segment"], base["per_segment"]))
            statements.append(f"- {group}, {row.label}: {verdict(vs)}; lower in {lower} of "
                              f"{len(result['per_segment'])} segments; change: "
                              f"{verdict(paired(result['change'], base['change']), 'change')}.")
        warp, change = spread(result["warp"]), spread(result["change"])
        lines.append(f"| {row.label} | {warp[0]:.2f} | {warp[1]:.2f} | "
                     f"{' / '.join(f'{w:.1f}' for w in result['per_segment'])} | {versus} | {p_text} | "
                     f"{change[0]:.2f} | {change[1]:.2f} | {statistics.fmean(result['fidelity']):.2f} | {row.paper} | "
                     f"{time.perf_counter() - start:.0f} |")
        print(lines[-1], file=sys.stderr, flush=True)
    lines += [*scale_rows(toy), "", *statements, "", table2_note(toy)]
    return lines


def scale_rows(toy) -> list[str]:
    """Warp error and change of the input clip and of its OpenCV style, frame by frame (for scale)."""
    from streamv2v.streamv2v_core.metrics import warp_error

    lines = []
    for label, videos in (("the input clip itself", toy.clips), ("its OpenCV style, frame by frame", toy.styled)):
        warps = [warp_error(videos[name], source_frames=toy.clips[name]) for name in toy.clips]
        warp = spread([v for w in warps for v in w.per_pair])
        change = spread([c for name in toy.clips for c in changes(videos[name])])
        lines.append(f"| *for scale: {label}* | {warp[0]:.2f} | {warp[1]:.2f} | "
                     f"{' / '.join(f'{w.mean:.1f}' for w in warps)} | | | {change[0]:.2f} | {change[1]:.2f} | | | |")
    return lines


def table2_note(toy) -> str:
    frames = next(iter(toy.clips.values())).shape[0]
    return (f"Segments: {', '.join(toy.clips)}; {frames} frames each ({len(toy.clips) * (frames - 1)} frame pairs). "
            f"Style prompt, {STEPS} steps, cfg 1; banks: EA on all blocks, FF alpha 0.75 / threshold 0.9 on the "
            f"low-res decoder, bank interval {INTERVAL}. Warp error: mean over all frame pairs (DIS flow of the "
            f"source clip, 0..255 MSE scale); change: mean |out[t+1] - out[t]| (no warping). Paired difference: "
            f"bank row minus its group's no-bank row, frame pair by frame pair (the same noise: noise depends only "
            f"on seed, frame and step); pairs within a segment are not independent, so p-values are optimistic "
            f"and the per-segment count is given too. Paper column: Table 2 (queue, DyMe) and Fig. 8 (EA, FF) of "
            f"StreamV2V, SD1.5 + LCM, RAFT flow on DAVIS; only the direction of a change can be compared.")


def flicker(toy, frames_count):
    """Section 3 rows: change between consecutive outputs of a static clip, at bank updates and elsewhere, with
    fixed and with fresh noise; each bank row against no bank with the same noise, pair by pair."""
    from toy_world import STATIC_SEGMENT, load_segment

    frame = load_segment(STATIC_SEGMENT, next(iter(toy.clips.values())).shape[1])
    static = frame.expand(frames_count, *frame.shape[1:]).contiguous()
    lines = ["| noise | row | mean change (1/255) | std | largest | after a bank update | otherwise | "
             "vs no bank (95%) | p (t / Wilcoxon) | first 12 changes |", "|---|---|---:|---:|---:|---:|---:|---|---|---|"]
    base = {}
    for row in STATIC_ROWS:
        change = changes(toy.run(static, "style", row))
        # Frame i reads the bank written by frame i-1 when (i-1) % interval == 0: change[i-1] is out[i] - out[i-1].
        update = [bool(row.mode) and (i - 1) % row.interval == 0 for i in range(1, len(change) + 1)]
        after = [c for c, u in zip(change, update) if u]
        other = [c for c, u in zip(change, update) if not u]
        versus = p_text = ""
        if row.mode is None:
            base[row.fixed_noise] = change
        else:
            vs = paired(change, base[row.fixed_noise])
            versus = f"{vs['diff']:+.2f} ({vs['diff'] - vs['half']:+.2f}..{vs['diff'] + vs['half']:+.2f})"
            p_text = f"{vs['p_t']:.2g} / {vs['p_w']:.2g}"
        lines.append(f"| {'fixed' if row.fixed_noise else 'fresh'} | {row.label} | {statistics.fmean(change):.2f} | "
                     f"{statistics.pstdev(change):.2f} | {max(change):.2f} | "
                     f"{statistics.fmean(after) if after else float('nan'):.2f} | "
                     f"{statistics.fmean(other) if other else float('nan'):.2f} | {versus} | {p_text} | "
                     f"{' '.join(f'{c:.1f}' for c in change[:12])} |")
        print(lines[-1], file=sys.stderr, flush=True)
    lines.append("| | *the input itself* | 0.00 | 0.00 | 0.00 | | | | | |")
    lines.append("")
    lines.append(f"{frames_count} copies of one held-out frame (vtest.avi frame {STATIC_SEGMENT.start}), style prompt, "
                 f"stream batch, strength 0.4, bank interval {INTERVAL} unless stated. Change: mean |out[i] - out[i-1]| "
                 f"over pixels, in 1/255. 'After a bank update': frames that are the first to read a newly written bank. "
                 f"Fixed noise: the stream batch's one noise per step; fresh: new noise every frame.")
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

    untrained = unet_from_state_dict(untrained_unet_state(toy.model))
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


def untrained_unet_state(trained):
    """The state dict of the ``trained`` toy UNet's shape at initialisation (the training script's seeded init,
    before any step)."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "scripts"))
    import train_toy_model

    _, model, _ = train_toy_model.build_models(0, trained.model.diffusion_model.input_blocks[0][0].out_channels)
    # Its output conv is zero (the training's start); that conv comes after every attention layer, so the
    # attention inputs compared here are those of the random-weight network.
    return model.diffusion_model.state_dict()


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_host("cpu", threads=args.threads)
    toy = Toy(args)
    sections = {"1": ("1. Quality on held-out frames", lambda: quality(toy)),
                "2": ("2. Table 2 / Fig. 8 at toy scale", lambda: table2(toy, args.groups)),
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
