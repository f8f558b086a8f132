"""The toy world the pack trains its own small model in: real clips, their OpenCV "style", two prompts.

Shared by ``scripts/train_toy_model.py`` (training), ``bench/toy_table2.py`` (measurements) and
``scripts/demo.py`` (the demo), so all three agree on what is trained on and what is held out.

* Clips: Debian's ``opencv-doc`` sample videos (``bench/clips.py`` finds or fetches them).
  ``vtest.avi`` (people walking, static camera), ``Megamind.avi`` (animation), ``tree.avi``
  (a tree in the wind, static camera). Training uses the first frames of vtest and Megamind;
  their later frames and the whole of ``tree.avi`` are held out (``HELD_OUT``).
* Style: ``stylize`` is a deterministic OpenCV "watercolour": ``cv2.stylization`` (edge-aware
  smoothing that flattens regions and keeps edges) followed by a fixed warm colour remap, so the
  style is visible at 128x128 and can be measured per frame.
* Prompts: ``PHOTO_PROMPT`` is trained on the frames as they are, ``STYLE_PROMPT`` on their style.

Frames are ``float32 [T, H, W, 3]`` RGB in 0..1 everywhere (ComfyUI's IMAGE layout).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

PHOTO_PROMPT = "a photo"
STYLE_PROMPT = "a watercolor painting"
NEGATIVE_PROMPT = ""

# A warm palette remap (RGB rows): keeps luminance order, pulls blues toward teal and skin toward ochre,
# so "watercolour" differs from "photo" in colour as well as in texture.
_PALETTE = np.array([[0.80, 0.25, 0.05],
                     [0.15, 0.75, 0.10],
                     [0.05, 0.30, 0.55]], dtype=np.float32)
_PALETTE_OFFSET = np.array([0.06, 0.03, 0.02], dtype=np.float32)


@dataclasses.dataclass(frozen=True)
class Segment:
    """Frames ``start, start + step, ...`` (``count`` of them) of one opencv-doc clip."""

    clip: str
    start: int
    count: int
    step: int = 1


# Training frames (subsampled: consecutive frames add little) and the held-out ones.
TRAIN = (Segment("vtest.avi", 0, 125, 4), Segment("Megamind.avi", 0, 100, 2))
HELD_OUT = {
    "vtest (frames 600+)": Segment("vtest.avi", 600, 32),
    "Megamind (frames 220+)": Segment("Megamind.avi", 220, 32),
    "tree (unseen clip)": Segment("tree.avi", 20, 32),  # only its first 68 frames decode (cinepak)
}
STATIC_SEGMENT = Segment("vtest.avi", 640, 1)  # one held-out frame, repeated: a static clip


def stylize(frames: torch.Tensor) -> torch.Tensor:
    """The OpenCV style of each frame. ``frames``: float32 ``[T, H, W, 3]`` in 0..1 -> same shape."""
    import cv2

    out = []
    for frame in frames:
        rgb8 = (frame.clamp(0, 1).numpy() * 255.0 + 0.5).astype(np.uint8)
        bgr = cv2.cvtColor(rgb8, cv2.COLOR_RGB2BGR)
        # sigma_s is in pixels: scale it with the frame so 64 px and 512 px frames get the same look.
        smooth = cv2.stylization(bgr, sigma_s=max(10.0, 0.4 * bgr.shape[0]), sigma_r=0.45)
        rgb = cv2.cvtColor(smooth, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0
        out.append(np.clip(rgb @ _PALETTE.T + _PALETTE_OFFSET, 0.0, 1.0))
    return torch.from_numpy(np.stack(out).astype(np.float32))


def load_segment(segment: Segment, size: int) -> torch.Tensor:
    """``float32 [count, size, size, 3]``: the segment's frames, centre-cropped square and resized."""
    from clips import find_clip, load_clip

    span = (segment.count - 1) * segment.step + 1
    frames = load_clip(find_clip(segment.clip), span, size, segment.start)
    return frames[::segment.step][:segment.count]


def synthetic_frames(count: int, size: int, seed: int = 0) -> torch.Tensor:
    """A smooth random texture panning 2 px a frame: ``float32 [count, size, size, 3]`` (no clip needed)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, 3, 8, 8 + count, generator=g)
    canvas = torch.nn.functional.interpolate(base, scale_factor=size / 8, mode="bicubic", align_corners=False)
    canvas = canvas[0].clamp(0, 1).permute(1, 2, 0)
    return torch.stack([canvas[:, 2 * i: 2 * i + size] for i in range(count)])


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB between two image batches ``[..., 3]`` in 0..1 (mean squared error over everything)."""
    mse = torch.mean((a.float() - b.float()) ** 2).item()
    return float("inf") if mse == 0 else 10.0 * math.log10(1.0 / mse)


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of the luma (Rec. 601) of two image batches ``[..., 3]`` over all their pixels:
    1 when one follows the other up to brightness and contrast, 0 when unrelated."""
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64)
    x, y = (a.double() @ weights).flatten(), (b.double() @ weights).flatten()
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x.norm() * y.norm()).clamp_min(1e-12))
