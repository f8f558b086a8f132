"""End-to-end demo on a fresh machine: generated clip -> StreamV2V loop node -> MP4 + metrics.

No weights are downloaded: the model is the SD1.5 UNet layout at a tiny width with random
weights, so the pictures are noise-like; what the demo shows is the pipeline working end to
end (frames streamed one by one into an MP4 with the source's frame rate) and the metrics.
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

setup_host("cpu")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import folder_paths  # noqa: E402
from host import tiny_models  # noqa: E402
from streamv2v.nodes.bank_nodes import ExtendedAttentionPatch, FeatureBankNode, FeatureFusionPatch  # noqa: E402
from streamv2v.nodes.loop_node import StreamV2VLoop  # noqa: E402
from streamv2v.streamv2v_core.metrics import mawe, scene_cuts, warp_error  # noqa: E402
from streamv2v.streamv2v_core.media.mp4_writer import Mp4Writer  # noqa: E402
from streamv2v.streamv2v_core.media.video_io import VideoFileSource  # noqa: E402


def make_clip(path: pathlib.Path, frames: int, size: int, fps: int = 12) -> None:
    """A smooth random texture panning 2 px per frame."""
    g = torch.Generator().manual_seed(0)
    canvas = torch.nn.functional.interpolate(torch.rand(1, 3, 12, 12 + frames, generator=g), scale_factor=size / 12,
                                             mode="bicubic", align_corners=False)[0].clamp(0, 1).permute(1, 2, 0)
    writer = Mp4Writer(str(path), size, size, fps)
    try:
        for i in range(frames):
            writer.write(canvas[:, 2 * i: 2 * i + size])
    finally:
        writer.close()


def read_frames(path: str) -> torch.Tensor:
    reader = VideoFileSource(path)
    try:
        return torch.stack(list(reader))
    finally:
        reader.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--out", default=str(REPO / "out" / "demo"))
    args = parser.parse_args()
    out = pathlib.Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    folder_paths.set_output_directory(str(out))
    folder_paths.set_input_directory(str(out))  # the loop reads only from ComfyUI's input folder

    clip = out / "input.mp4"
    make_clip(clip, args.frames, args.size)
    print(f"[demo] generated {clip} ({args.frames} frames, {args.size}x{args.size})")
    model, clip_model, vae = tiny_models.tiny_checkpoint("sd15", seed=0, vae="taesd")
    positive = tiny_models.encode_prompt(clip_model, "a watercolor painting of a landscape")
    negative = tiny_models.encode_prompt(clip_model, "")
    source = read_frames(str(clip))

    handle = FeatureBankNode.execute("demo", "dyme", 1, 4, 0).args[0]
    banked = ExtendedAttentionPatch.execute(model, handle, "all").args[0]
    banked = FeatureFusionPatch.execute(banked, handle, 0.75, 0.9, "low-res decoder").args[0]

    rows = []
    for name, m in (("no bank", model), ("DyMe bank", banked)):
        handle.bank.reset("demo run")
        start = time.perf_counter()
        result = StreamV2VLoop.execute(m, positive, negative, vae, source="video file", file=clip.name,
                                       filename_prefix=f"demo_{name.split()[0].lower()}", seed=0)
        seconds = time.perf_counter() - start
        path, frames = result.args[0], result.args[2]
        output = read_frames(path)
        warp = warp_error(output, source)
        motion = mawe(output, source)
        rows.append({"run": name, "mp4": path, "frames": frames, "seconds": round(seconds, 2),
                     "fps": round(frames / seconds, 2), "warp_error": round(warp.mean, 3),
                     "flow_score": round(motion.flow_score, 3), "mawe": round(motion.mawe, 4),
                     "scene_cuts": int(scene_cuts(output))})
        print(f"[demo] {name}: wrote {path}")

    print("\n| run | frames | fps (CPU) | warp error | OFS | MAWE | scene cuts |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['frames']} | {r['fps']} | {r['warp_error']} | {r['flow_score']} | "
              f"{r['mawe']} | {r['scene_cuts']} |")
    (out / "metrics.json").write_text(json.dumps(rows, indent=2))
    print(f"\n[demo] metrics: {out / 'metrics.json'}")
    print("[demo] random weights: the numbers show the pipeline works, not image quality.")
    assert all(r["frames"] == args.frames for r in rows), "every input frame must give one output frame"
    assert np.isfinite([r["warp_error"] for r in rows]).all()


if __name__ == "__main__":
    main()
