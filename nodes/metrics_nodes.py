"""StreamV2VMetrics: temporal-consistency numbers for a restyled video, plus a per-frame plot.

Inputs: ``images`` (the output video, IMAGE ``[T, H, W, 3]`` in 0..1, ``T >= 2``), optionally
``source_images`` (the input video, same ``T, H, W``: the optical flow is then taken from it, as
in the StreamV2V paper) and ``clip_vision`` (a CLIP vision model, for the CLIP frame consistency).

Outputs: warp error (0..255 MSE scale, lower is steadier), flow score (OFS, px^2 per frame pair,
of the video the flow comes from), MAWE (warp error / flow score), scene cuts (PySceneDetect
AdaptiveDetector on the output), CLIP consistency (mean cosine of consecutive frames' CLIP image
embeddings x100; NaN when no CLIP vision model is connected), a plot of the per-pair warp error
(IMAGE ``[1, 320, 640, 3]``), a text summary (also shown on the node), the std of the output's flow
magnitude across frames (StreamingT2V appendix 9.3), and a ``report``: every number as JSON (a value
that was not measured is ``null``, never a stand-in number), with MAWE, scene cuts and flow std at
chunk seams only under ``"seams"`` when ``chunk_length`` gives the layout the video was sampled with
(``StreamV2V Long-Video Chunks``).
"""
from __future__ import annotations

import json
import math

import numpy as np
import torch
from comfy_api.latest import io, ui

from ..streamv2v_core.metrics import (
    chunk_boundary_pairs,
    clip_frame_consistency,
    compute_flows,
    flow_magnitudes,
    mawe,
    plot_per_frame,
    scene_cut_frames,
    seam_stats,
)
from ._schema import METRICS_CATEGORY, advanced

CLIP_BATCH = 16  # frames per CLIP vision call


def check_videos(images, source_images) -> None:
    """Raise ValueError with the fix when the videos cannot be compared."""
    if images is None or images.ndim != 4 or images.shape[0] < 2:
        got = "nothing" if images is None else f"{images.shape[0] if images.ndim == 4 else 1} frame(s)"
        raise ValueError(f"StreamV2V Temporal Consistency needs a video of at least 2 frames in `images`, got "
                         f"{got}: connect the whole restyled clip as one IMAGE batch")
    if source_images is None:
        return
    if source_images.ndim != 4 or source_images.shape[0] != images.shape[0]:
        count = source_images.shape[0] if source_images.ndim == 4 else 1
        raise ValueError(f"`source_images` has {count} frame(s) but `images` has {images.shape[0]}: connect the "
                         f"source clip that produced these outputs, frame for frame")
    if tuple(source_images.shape[1:3]) != tuple(images.shape[1:3]):
        raise ValueError(f"`source_images` are {source_images.shape[2]}x{source_images.shape[1]} but `images` are "
                         f"{images.shape[2]}x{images.shape[1]}: resize one to the other's size first "
                         f"(core 'Upscale Image' node)")


def clip_embeddings(clip_vision, images: torch.Tensor, batch: int = CLIP_BATCH) -> torch.Tensor:
    """``[T, D]`` image embeddings from ``clip_vision.encode_image(chunk).image_embeds``, in chunks."""
    chunks = [clip_vision.encode_image(images[i:i + batch][..., :3]).image_embeds.float().cpu()
              for i in range(0, images.shape[0], batch)]
    return torch.cat(chunks).reshape(images.shape[0], -1)


def summary_text(warp, flow_from, ofs, value, cuts, clip_score, flow_std=None, seams=None) -> str:
    clip_line = "not measured (connect a CLIP vision model)" if math.isnan(clip_score) else f"{clip_score:.2f}"
    lines = [
        f"warp error: {warp:.3f}  (0..255 MSE, flow from {flow_from}; lower is steadier)",
        f"flow score (OFS): {ofs:.3f} px^2",
        f"MAWE: {value:.4g}",
        f"scene cuts: {cuts}",
        f"CLIP frame consistency: {clip_line}",
    ]
    if flow_std is not None:
        lines.append(f"flow magnitude std: {flow_std:.3f} px  (output's own flow; lower is smoother)")
    if seams is not None:
        lines.append(f"at chunk seams ({len(seams.pairs)} frame pairs): MAWE {seams.mawe:.4g}, scene cuts "
                     f"{seams.scene_cuts}, flow magnitude std {seams.flow_std:.3f} px")
    return "\n".join(lines)


def check_chunks(frames: int, chunk_length: int, chunk_overlap: int, frames_per_latent: int) -> None:
    """Raise ValueError with the fix when the chunk layout cannot describe this video."""
    if chunk_length and chunk_overlap >= chunk_length:
        raise ValueError(f"chunk_overlap ({chunk_overlap}) must be smaller than chunk_length ({chunk_length}): use "
                         f"the values set on the StreamV2V Long-Video Chunks node")
    if chunk_length and (frames - 1) % frames_per_latent:
        raise ValueError(f"{frames} frames cannot come from latents of {frames_per_latent} frames each (a video "
                         f"model decodes 1 + {frames_per_latent}k frames): set frames_per_latent to 1 for image "
                         f"models, or measure the VAE Decode output before any trimming")


class StreamV2VMetrics(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StreamV2VMetrics",
            display_name="StreamV2V Temporal Consistency",
            category=METRICS_CATEGORY,
            description="Measures how steady a restyled video is: warp error, optical-flow score, MAWE, scene "
                        "cuts and (with a CLIP vision model) CLIP frame consistency, plus a per-frame plot. "
                        "Flow is OpenCV DIS (the papers used RAFT), so numbers compare with each other, "
                        "not with the papers' tables.",
            inputs=[
                io.Image.Input("images", tooltip="The output video (restyled frames, in order, at least 2)."),
                io.Image.Input("source_images", optional=True,
                               tooltip="The input video the outputs were made from, same length and size. The "
                                       "motion is measured on it (as in the StreamV2V paper); without it, on "
                                       "the output itself."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="A CLIP vision model (Load CLIP Vision) for CLIP frame consistency; "
                                            "left out, that output is NaN."),
                advanced(io.Int.Input("flow_size", default=0, min=0, max=4096, step=8, optional=True,
                                      tooltip="Resize both videos to this square size before measuring flow "
                                              "metrics (StreamingT2V used 720); 16 or more. 0 keeps the frames' "
                                              "own size.")),
                io.Int.Input("chunk_length", default=0, min=0, max=16384, optional=True,
                             tooltip="The chunk length the video was sampled with (StreamV2V Long-Video Chunks), "
                                     "to measure the chunk seams on their own. 0: whole video only."),
                io.Int.Input("chunk_overlap", default=8, min=0, max=16383, optional=True,
                             tooltip="The overlap the video was sampled with (same units as chunk_length)."),
                advanced(io.Int.Input("frames_per_latent", default=1, min=1, max=64, optional=True,
                                      tooltip="Video frames per latent frame when the chunks counted latent "
                                              "frames: 1 for image models, 4 for Wan 2.1/2.2 and HunyuanVideo, "
                                              "8 for LTX-Video.")),
            ],
            outputs=[
                io.Float.Output(display_name="warp_error",
                                tooltip="Mean warp error over consecutive pairs (0..255 MSE scale, lower is "
                                        "steadier)."),
                io.Float.Output(display_name="flow_score",
                                tooltip="Optical-flow score: mean squared flow magnitude (px^2) of the video the "
                                        "flow comes from (the source when connected)."),
                io.Float.Output(display_name="mawe", tooltip="Motion-aware warp error = warp error / flow score "
                                                             "(inf for a video without motion)."),
                io.Int.Output(display_name="scene_cuts", tooltip="Scene cuts PySceneDetect finds in the output "
                                                                 "(0 for one continuous shot)."),
                io.Float.Output(display_name="clip_consistency",
                                tooltip="Mean CLIP cosine similarity of consecutive frames x100 (NaN when no "
                                        "CLIP vision model is connected)."),
                io.Image.Output(display_name="plot", tooltip="Warp error per consecutive frame pair, as an image "
                                                             "(chunk seams shaded)."),
                io.String.Output(display_name="summary", tooltip="All numbers as text."),
                io.Float.Output(display_name="flow_std",
                                tooltip="Std across frame pairs of the output's mean optical-flow magnitude (px; "
                                        "StreamingT2V appendix 9.3): seams and jerks raise it, steady motion is 0."),
                io.String.Output(display_name="report",
                                 tooltip="Every number as JSON (for text nodes and scripts): warp_error, flow_score, "
                                         "mawe, scene_cuts, clip_consistency, flow_std, flow_from, and 'seams' (mawe, "
                                         "scene_cuts, flow_std and frame pairs at chunk seams) when chunk_length is "
                                         "set. A value that was not measured is null."),
            ],
        )

    @classmethod
    def execute(cls, images, source_images=None, clip_vision=None, flow_size=0, chunk_length=0, chunk_overlap=8,
                frames_per_latent=1) -> io.NodeOutput:
        check_videos(images, source_images)
        check_chunks(images.shape[0], chunk_length, chunk_overlap, frames_per_latent)
        numbers = measure(images, source_images, clip_vision, flow_size, chunk_length, chunk_overlap,
                          frames_per_latent)
        motion, seams = numbers.pop("motion"), numbers.pop("seams")
        warp = motion.warp
        title = f"warp error per frame pair (flow from {warp.flow_from})"
        plot = torch.from_numpy(plot_per_frame(warp.per_pair, title=title, marks=seams.pairs if seams else ()))[None]
        text = summary_text(warp.mean, warp.flow_from, motion.flow_score, motion.mawe, numbers["scene_cuts"],
                            numbers["clip_consistency"], numbers["flow_std"], seams)
        return io.NodeOutput(float(warp.mean), float(motion.flow_score), float(motion.mawe), numbers["scene_cuts"],
                             numbers["clip_consistency"], plot, text, numbers["flow_std"],
                             report_json(motion, numbers, seams), ui=ui.PreviewText(text))


def measure(images, source_images, clip_vision, flow_size, chunk_length, chunk_overlap, frames_per_latent) -> dict:
    """Every metric of the node: ``{"motion": MaweResult, "seams": SeamStats | None, "scene_cuts", ...}``."""
    size = (int(flow_size), int(flow_size)) if flow_size else None
    motion = mawe(images, source_images, size=size)  # its warp error's flows serve both numbers
    # Smoothness is the output's own motion: with a source the flows above are the source's.
    magnitudes = motion.magnitude_per_pair if source_images is None else \
        flow_magnitudes(compute_flows(images, size=size, backward=False))
    cut_frames = scene_cut_frames(images)
    seams = None
    if chunk_length:
        pairs = chunk_boundary_pairs(images.shape[0], chunk_length, chunk_overlap, frames_per_latent)
        seams = seam_stats(motion, magnitudes, cut_frames, pairs)
    clip_score = float("nan")
    if clip_vision is not None:
        clip_score = clip_frame_consistency(clip_embeddings(clip_vision, images))
    return {"motion": motion, "seams": seams, "scene_cuts": len(cut_frames), "clip_consistency": clip_score,
            "flow_std": float(np.std(magnitudes))}


def _number(value):
    """A JSON number, or None for a value that is not a finite number (not measured, or infinite)."""
    value = float(value)
    return value if math.isfinite(value) else None


def report_json(motion, numbers: dict, seams) -> str:
    """The node's ``report`` output: every number, ``null`` where nothing was measured."""
    report = {"warp_error": _number(motion.warp.mean), "flow_score": _number(motion.flow_score),
              "mawe": _number(motion.mawe), "scene_cuts": int(numbers["scene_cuts"]),
              "clip_consistency": _number(numbers["clip_consistency"]), "flow_std": _number(numbers["flow_std"]),
              "flow_from": motion.warp.flow_from, "seams": None}
    if seams is not None:
        report["seams"] = {"frame_pairs": len(seams.pairs), "mawe": _number(seams.mawe),
                           "scene_cuts": int(seams.scene_cuts), "flow_std": _number(seams.flow_std)}
    return json.dumps(report, allow_nan=False)


NODES = [StreamV2VMetrics]
