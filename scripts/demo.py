"""End-to-end demo: a held-out real clip restyled by the pack's own toy model, with and without the bank.

By default the model is ``scripts/toy_model/`` (trained on this kind of machine by
``scripts/train_toy_model.py``: 128x128 frames, two prompts, "a photo" and "a watercolor painting").
The clip is a held-out segment of OpenCV's ``vtest.avi`` (people walking; frames the model never
saw), or a generated texture where the clip cannot be had. The StreamV2V loop node runs it twice,
without a bank and with a DyMe bank (EA + FF, paper defaults), and the demo writes one side-by-side
MP4 (input | OpenCV style | no bank | bank) plus the metrics, and says what they show.

``--checkpoint PATH`` runs a real SD1.5 checkpoint instead (core ComfyUI loader; ``--lora PATH``
adds a LoRA, e.g. an LCM LoRA), at ``--size`` 512 unless given.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from _host import setup_host  # noqa: E402

# torch's thread count must be set before anything runs: read --threads ahead of the full parser.
_early = argparse.ArgumentParser(add_help=False)
_early.add_argument("--threads", type=int, default=None)
setup_host("cpu", threads=_early.parse_known_args()[0].threads)

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import folder_paths  # noqa: E402
from streamv2v.nodes.bank_nodes import ExtendedAttentionPatch, FeatureBankNode, FeatureFusionPatch  # noqa: E402
from streamv2v.nodes.loop.node import StreamV2VLoop  # noqa: E402
from streamv2v.nodes.toy_model import load_checkpoint_file, load_toy_model  # noqa: E402
from streamv2v.streamv2v_core.metrics import warp_error  # noqa: E402
from streamv2v.streamv2v_core.media.mp4_writer import Mp4Writer  # noqa: E402
from streamv2v.streamv2v_core.media.video_io import VideoFileSource  # noqa: E402
from toy_world import (NEGATIVE_PROMPT, STYLE_PROMPT, Segment, correlation, load_segment, psnr, stylize,  # noqa: E402
                       synthetic_frames)

DEMO_SEGMENT = Segment("vtest.avi", 600, 48)  # held out from training (bench/toy_world.py)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--size", type=int, default=None, help="frame size (default 128; 512 with --checkpoint)")
    parser.add_argument("--out", default=str(REPO / "out" / "demo"))
    parser.add_argument("--prompt", default=STYLE_PROMPT)
    parser.add_argument("--checkpoint", default=None, help="a real SD1.5 checkpoint (.safetensors) instead of the toy model")
    parser.add_argument("--lora", default=None, help="a LoRA for --checkpoint (e.g. an LCM LoRA)")
    parser.add_argument("--lora-strength", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: the cores, at most 8; use 1 on a busy shared machine)")
    parser.add_argument("--toy-model", default=None, help="folder of another toy model (default scripts/toy_model)")
    args = parser.parse_args(argv)
    if args.lora and not args.checkpoint:
        parser.error("--lora needs --checkpoint (the toy model takes no LoRA)")
    args.size = args.size or (512 if args.checkpoint else 128)
    return args


def source_frames(frames: int, size: int):
    """(frames [T, size, size, 3], description): the held-out clip, or a generated one if it cannot be had."""
    try:
        return load_segment(Segment(DEMO_SEGMENT.clip, DEMO_SEGMENT.start, frames), size), \
            f"vtest.avi frames {DEMO_SEGMENT.start}-{DEMO_SEGMENT.start + frames - 1} (held out from training)"
    except (SystemExit, OSError) as error:
        print(f"[demo] real clip unavailable ({error}); using a generated texture", flush=True)
        return synthetic_frames(frames, size), "a generated panning texture"


def load_models(args):
    """(MODEL, CLIP, VAE, label) for the toy model or ``--checkpoint`` (+ ``--lora``)."""
    if not args.checkpoint:
        return (*load_toy_model(args.toy_model), "the pack's toy model (trained here on the CPU; 128 px, toy scale)")
    model, clip, vae = load_checkpoint_file(args.checkpoint)
    label = pathlib.Path(args.checkpoint).name
    if args.lora:
        import comfy.sd
        import comfy.utils

        lora = comfy.utils.load_torch_file(args.lora, safe_load=True)
        model, clip = comfy.sd.load_lora_for_models(model, clip, lora, args.lora_strength, args.lora_strength)
        label += f" + LoRA {pathlib.Path(args.lora).name} ({args.lora_strength})"
    return model, clip, vae, label


def write_video(path: pathlib.Path, frames, fps: int = 10) -> None:
    writer = Mp4Writer(str(path), frames.shape[2], frames.shape[1], fps)
    try:
        for frame in frames:
            writer.write(frame)
    finally:
        writer.close()


def read_frames(path: str) -> torch.Tensor:
    reader = VideoFileSource(path)
    try:
        return torch.stack(list(reader))
    finally:
        reader.close()


def labelled(frames: torch.Tensor, text: str) -> torch.Tensor:
    """``frames`` ``[T, H, W, 3]`` with ``text`` written in their top-left corner (OpenCV)."""
    out = (frames.numpy() * 255).astype(np.uint8).copy()
    scale = frames.shape[1] / 256
    for image in out:
        cv2.putText(image, text, (3, int(14 * scale) + 2), cv2.FONT_HERSHEY_SIMPLEX, 0.4 * scale, (0, 0, 0), 3)
        cv2.putText(image, text, (3, int(14 * scale) + 2), cv2.FONT_HERSHEY_SIMPLEX, 0.4 * scale, (255, 255, 255), 1)
    return torch.from_numpy(out.astype(np.float32) / 255)


def run_loop(model, positive, negative, vae, clip_name: str, prefix: str):
    """One pass of the StreamV2V loop node over ``clip_name`` (in ComfyUI's input folder): (mp4 path, s)."""
    start = time.perf_counter()
    result = StreamV2VLoop.execute(model, positive, negative, vae, source="video file", file=clip_name,
                                   filename_prefix=prefix, seed=0)
    return result.args[0], time.perf_counter() - start


def measure(name, path, seconds, source, styled):
    """One metrics row for an output MP4."""
    output = read_frames(path)
    row = {"run": name, "mp4": path, "frames": int(output.shape[0]), "seconds": round(seconds, 2),
           "fps": round(output.shape[0] / seconds, 2),
           "warp_error": round(warp_error(output, source_frames=source).mean, 2),
           "psnr_to_input": round(psnr(output, source), 2),
           "correlation_to_input": round(correlation(output, source), 3)}
    if styled is not None:
        row["psnr_to_style"] = round(psnr(output, styled), 2)
    return row, output


def conclusion(rows, toy: bool) -> list[str]:
    """The demo's last lines: what the numbers show."""
    plain, bank = rows
    change = 100.0 * (bank["warp_error"] - plain["warp_error"]) / plain["warp_error"]
    lines = [f"[demo] the DyMe bank changed warp error {plain['warp_error']} -> {bank['warp_error']} ({change:+.1f}%; "
             f"lower = steadier along the clip's motion).",
             f"[demo] both runs wrote {plain['frames']} frames for {plain['frames']} in: the stream batch and the loop "
             f"node work end to end; the output follows the input (luma correlation {plain['correlation_to_input']} "
             f"without the bank, {bank['correlation_to_input']} with it)."]
    if toy:
        lines.append(f"[demo] fidelity to the OpenCV style (PSNR): no bank {plain['psnr_to_style']} dB, bank "
                     f"{bank['psnr_to_style']} dB. Toy scale: a 5M-parameter model (UNet + VAE) trained here on a 2-core CPU, 128 px; "
                     f"it shows the mechanism, not SD1.5's quality. Full numbers: bench/results/toy_table2-cpu.md.")
    return lines


def main(argv=None) -> None:
    args = parse_args(argv)
    out = pathlib.Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    folder_paths.set_output_directory(str(out))
    folder_paths.set_input_directory(str(out))  # the loop reads only from ComfyUI's input folder

    source, what = source_frames(args.frames, args.size)
    write_video(out / "input.mp4", source)
    model, clip, vae, label = load_models(args)
    print(f"[demo] {what}, {args.frames} frames at {args.size}x{args.size}; model: {label}; prompt: {args.prompt!r}",
          flush=True)
    positive = clip.encode_from_tokens_scheduled(clip.tokenize(args.prompt))
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(NEGATIVE_PROMPT))
    handle = FeatureBankNode.execute("demo", "dyme", 1, 4, 0).args[0]
    banked = ExtendedAttentionPatch.execute(model, handle, "all").args[0]
    banked = FeatureFusionPatch.execute(banked, handle, 0.75, 0.9, "low-res decoder").args[0]
    styled = stylize(source) if not args.checkpoint else None

    rows, videos = [], []
    for name, m in (("no bank", model), ("DyMe bank", banked)):
        handle.open().reset("demo run")
        path, seconds = run_loop(m, positive, negative, vae, "input.mp4", f"demo_{name.split()[0].lower()}")
        row, frames = measure(name, path, seconds, source, styled)
        rows.append(row)
        videos.append(labelled(frames, name))
        print(f"[demo] {name}: wrote {path}", flush=True)

    panels = [labelled(source, "input")] + ([labelled(styled, "OpenCV style")] if styled is not None else []) + videos
    side = out / "side_by_side.mp4"
    write_video(side, torch.cat(panels, dim=2))
    still = out / "side_by_side.png"  # the middle frame, for a README or a message
    cv2.imwrite(str(still), cv2.cvtColor((torch.cat(panels, dim=2)[args.frames // 2].numpy() * 255).round()
                                         .astype(np.uint8), cv2.COLOR_RGB2BGR))
    print("\n| run | frames | fps (CPU) | warp error | PSNR to input | PSNR to OpenCV style | correlation to input |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['run']} | {r['frames']} | {r['fps']} | {r['warp_error']} | {r['psnr_to_input']} | "
              f"{r.get('psnr_to_style', '-')} | {r['correlation_to_input']} |")
    (out / "metrics.json").write_text(json.dumps(rows, indent=2))
    print(f"\n[demo] side by side ({' | '.join(['input'] + (['OpenCV style'] if styled is not None else []) + ['no bank', 'bank'])}): {side}")
    print(f"[demo] one frame of it: {still}")
    print(f"[demo] metrics: {out / 'metrics.json'}")
    for line in conclusion(rows, styled is not None):
        print(line)
    assert all(r["frames"] == args.frames for r in rows), "every input frame must give one output frame"
    assert np.isfinite([r["warp_error"] for r in rows]).all()


if __name__ == "__main__":
    main()
