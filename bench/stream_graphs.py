"""Compiled graphs and UNet calls per stream (issue 30): does a show ever stall on a compile?

Every configuration runs two fresh streams of ``--frames`` frames through ``run_stream`` with
``compile`` "default", traced by dynamo's ``eager`` backend (the same guards, graphs and recompiles
as inductor, without generating code), on the micro SD1.5-shaped test UNet at 32x32 (``--model tiny``:
the 8.6M-parameter one at 64x64; tracing it takes minutes per graph on a shared CPU). Counted with
``torch._dynamo.utils.counters``: *graphs* (``stats.unique_graphs``) and *compiles*
(``frames.total``: first compiles and recompiles) in each stream, and the UNet calls per stream
(an APPLY_MODEL probe: outside the compiled region, which a counter inside would recompile on every call). A stream of N frames drains with ``S - 1`` extra calls (N in, N out).

Configurations (4 steps, EA on every block + FF defaults unless said):
* DyMe(1) interval 4 (the paper); queue(4) interval 4 (fills over 13 frames);
* cfg 2 (full CFG: cond and uncond rows in one call), DyMe(1);
* per-frame ControlNet: a tiny ControlNet, each frame its own hint, DyMe(1);
* live changes: DyMe(1) + ControlNet, the frames' prompt, hint, control scale and fusion alpha
  changed every 10 frames (what the loop's live panel does);
* residual one-time negative (cfg 2), DyMe(1).

Usage: ``python bench/stream_graphs.py --frames 100`` (CPU only; about a minute per configuration).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

sys.path.insert(0, __import__("os").path.dirname(__file__))

from bank_overhead import command_line, controlnet, moving_texture, setup, table, write_report  # noqa: E402

SIZES = {"micro": 32, "tiny": 64}
CONFIGS = ("DyMe(1)", "queue(4)", "cfg 2", "per-frame ControlNet", "live changes", "residual one-time negative")


class Calls:
    """APPLY_MODEL wrapper: counts UNet calls (runs outside the compiled UNet)."""

    def __init__(self):
        self.count = 0

    def __call__(self, executor, *args, **kwargs):
        self.count += 1
        return executor(*args, **kwargs)


def build(name: str, torch, frames: int, kind: str):
    """(model, positive, negative, vae, settings kwargs, per-frame conditioning or None) for a configuration."""
    import comfy.patcher_extension
    from nodes import ControlNetApplyAdvanced

    from host import tiny_models as tm
    from streamv2v.nodes.bank_nodes import ExtendedAttentionPatch, FeatureBankNode, FeatureFusionPatch
    from streamv2v.streamv2v_core import BANKS
    from streamv2v.streamv2v_core.stream.conditioning import FrameConditioning

    mode, size = ("queue", 4) if name == "queue(4)" else ("dyme", 1)
    BANKS.remove(f"graphs {name}")
    handle = FeatureBankNode.execute(f"graphs {name}", mode, size, 4, 0).args[0]
    unet = tm.micro_sd15_model(0) if kind == "micro" else tm.tiny_sd15_model(0)
    model = ExtendedAttentionPatch.execute(unet, handle, "all").args[0]
    model = FeatureFusionPatch.execute(model, handle, 0.75, 0.9, "low-res decoder").args[0]
    probe = Calls()
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "bench.calls", probe)
    cond = tm.random_conditioning("sd15", 1)
    negative = tm.random_conditioning("sd15", 2)
    settings = {"steps": 4}
    if name in ("cfg 2", "residual one-time negative"):
        settings["cfg"] = 2.0
    if name == "residual one-time negative":
        settings["guidance"] = "residual one-time negative"
    if name not in ("per-frame ControlNet", "live changes"):
        return model, cond, negative, probe, settings, None
    hints = list(moving_texture(SIZES[kind], frames, seed=5))
    net = controlnet(unet, torch, torch.float32, "cpu")
    cond, negative = ControlNetApplyAdvanced().apply_controlnet(cond, negative, net, hints[0][None], 1.0, 0.0, 1.0)

    def frame_conditioning(frame):
        index = frame.index
        change = index // 10 if name == "live changes" else 0
        return FrameConditioning(positive=[[cond[0][0] + 0.01 * change, dict(cond[0][1])]] if change else None,
                                 hint=hints[index][None], control_scale=1.0 - 0.05 * change,
                                 fusion_alpha=0.75 - 0.02 * change if change else None)
    return model, cond, negative, probe, settings, frame_conditioning


def measure(name: str, torch, frames: int, model: str) -> dict:
    import torch._dynamo
    from torch._dynamo.utils import counters

    from streamv2v.nodes.engine import FRESH, StreamSettings, run_stream

    unet, positive, negative, probe, settings, provider = build(name, torch, frames, model)
    from host import tiny_models as tm
    vae = tm.tiny_taesd_vae(1)
    images = list(moving_texture(SIZES[model], frames, seed=2))
    torch._dynamo.reset()
    counters.clear()
    out = {}
    for stream in (1, 2):
        before_graphs, before_compiles, probe.count = counters["stats"]["unique_graphs"], counters["frames"]["total"], 0
        started = time.perf_counter()
        run_stream(unet, positive, negative, vae, iter(images),
                   StreamSettings(bank_start=FRESH, compile="default", seed=1, **settings), lambda out: None,
                   stream_key=f"graphs {name}", conditioning=provider)
        out[stream] = {"graphs": counters["stats"]["unique_graphs"] - before_graphs,
                       "compiles": counters["frames"]["total"] - before_compiles, "calls": probe.count,
                       "seconds": time.perf_counter() - started}
    out["breaks"] = sum(counters["graph_break"].values())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--configs", default="all", help="configurations, separated by ';'")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", choices=tuple(SIZES), default="micro")
    parser.add_argument("--out", default="", help="also write the table to this file")
    args = parser.parse_args()
    args.device, args.dtype, args.size = "cpu", "fp32", 64
    torch, _ = setup(args)
    logging.getLogger("torch.__trace").setLevel(logging.WARNING)
    from streamv2v.nodes.engine import compiled_unet

    compiled_unet.COMPILE_BACKEND = "eager"
    names = CONFIGS if args.configs == "all" else [c for c in CONFIGS if c in args.configs.split(";")]
    rows = []
    for name in names:
        rows.append((name, measure(name, torch, args.frames, args.model)))
        print(f"  measured {name}", flush=True)
    header = ["configuration"] + [f"{what}, stream {n}" for n in (1, 2) for what in ("graphs", "compiles", "UNet calls")]
    title = (f"# Compiled graphs per stream — {args.model} SD1.5 UNet, {SIZES[args.model]}x{SIZES[args.model]}, 4 steps, "
             f"dynamo eager backend, {args.frames} frames a stream, two fresh streams in one process\n\n"
             f"`{command_line()}`\n\n")
    write_report(title + table(header + ["graph breaks"], [
        [name] + [r[n][what] for n in (1, 2) for what in ("graphs", "compiles", "calls")] + [r["breaks"]]
        for name, r in rows]), args.out)

if __name__ == "__main__":
    main()
