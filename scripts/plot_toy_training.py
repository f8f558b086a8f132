"""Draw the toy model's training curves from its ``train_log.json`` into one PNG (for the README).

Left: the autoencoder's PSNR on held-out frames (and on training frames) against its steps. Right: the
UNet's EPS loss against its steps (training loss averaged into bins, and the fixed-noise evaluation on
held-out and on training latents). A run started from an earlier model (``--init-from``) is drawn after
that model's own curve, its steps counted on from the earlier run's last.

Usage::

    python scripts/plot_toy_training.py                       # scripts/toy_model/train_log.json -> docs/toy_training.png
    python scripts/plot_toy_training.py --log L --out P.png
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib

from PIL import Image, ImageDraw, ImageFont

REPO = pathlib.Path(__file__).resolve().parent.parent
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (127, 127, 127)]
MSE_TO_PSNR = "training crops (1/MSE, dB)"


def series_of(log: dict) -> tuple[dict, dict]:
    """({name: [(step, PSNR dB)]} of the autoencoder, {name: [(step, loss)]} of the UNet), the earlier run first."""
    earlier = (log.get("initialised_from") or {}).get("its_log") or {}
    ae_offset = earlier.get("curves", {}).get("ae", [[0]])[-1][0] if earlier else 0
    unet_offset = earlier.get("curves", {}).get("unet", [[0]])[-1][0] if earlier else 0
    ae, unet = {}, {}
    for run, offset_ae, offset_unet in ((earlier, 0, 0), (log, ae_offset, unet_offset)):
        for step, mse, _ in run.get("curves", {}).get("ae", []):
            ae.setdefault(MSE_TO_PSNR, []).append((step + offset_ae, 10 * math.log10(1 / max(mse, 1e-12))))
        for step, loss, _ in run.get("curves", {}).get("unet", []):
            unet.setdefault("training loss (bins)", []).append((step + offset_unet, loss))
        for step, values, _ in run.get("evaluations", {}).get("ae", []):
            for name, value in values.items():
                ae.setdefault(name, []).append((step + offset_ae, value))
        for step, values, _ in run.get("evaluations", {}).get("unet", []):
            for name, value in values.items():
                unet.setdefault(f"{name} (fixed noise)", []).append((step + offset_unet, value))
    return ae, unet


def panel(draw: ImageDraw.ImageDraw, box, series: dict, title: str, y_label: str, start=None, log=False) -> None:
    """Axes, ticks and one line per series inside ``box`` (x0, y0, x1, y1); ``start`` marks a step with a line;
    ``log``: a logarithmic y axis."""
    font = ImageFont.load_default()
    x0, y0, x1, y1 = box
    if log:
        series = {name: [(x, math.log10(max(y, 1e-9))) for x, y in line] for name, line in series.items()}
    points = [p for line in series.values() for p in line]
    if not points:
        return
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    lo_x, hi_x, lo_y, hi_y = 0, max(xs) or 1, min(ys), max(ys)
    pad = (hi_y - lo_y) * 0.05 or 1.0
    lo_y, hi_y = lo_y - pad, hi_y + pad

    def to_xy(x, y):
        return x0 + (x - lo_x) / (hi_x - lo_x) * (x1 - x0), y1 - (y - lo_y) / (hi_y - lo_y) * (y1 - y0)

    draw.rectangle(box, outline=(0, 0, 0))
    draw.text((x0, y0 - 28), title, fill=(0, 0, 0), font=font)
    draw.text((x0, y1 + 18), f"steps; {y_label}", fill=(0, 0, 0), font=font)
    for i in range(5):
        y = lo_y + (hi_y - lo_y) * i / 4
        draw.text((x0 - 42, to_xy(0, y)[1] - 5), f"{10 ** y if log else y:.3g}", fill=(0, 0, 0), font=font)
        x = lo_x + (hi_x - lo_x) * i / 4
        draw.text((to_xy(x, lo_y)[0] - 10, y1 + 4), f"{x:.0f}", fill=(0, 0, 0), font=font)
    if start:
        sx = to_xy(start, lo_y)[0]
        draw.line([(sx, y0), (sx, y1)], fill=(190, 190, 190), width=1)
        draw.text((sx + 3, y0 + 3), "this run", fill=(120, 120, 120), font=font)
    for i, (name, line) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        if len(line) > 1:
            draw.line([to_xy(x, y) for x, y in line], fill=colour, width=2)
        draw.text((x0 + 6, y0 + 16 + 12 * i), name, fill=colour, font=font)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log", default=str(REPO / "scripts" / "toy_model" / "train_log.json"))
    parser.add_argument("--out", default=str(REPO / "docs" / "toy_training.png"))
    args = parser.parse_args(argv)
    log = json.loads(pathlib.Path(args.log).read_text())
    ae, unet = series_of(log)
    earlier = (log.get("initialised_from") or {}).get("its_log") or {}
    image = Image.new("RGB", (1000, 380), "white")
    draw = ImageDraw.Draw(image)
    panel(draw, (60, 40, 480, 330), ae, "Autoencoder: PSNR of encode -> decode", "dB (higher is better)",
          earlier.get("curves", {}).get("ae", [[0]])[-1][0] if earlier else None)
    panel(draw, (560, 40, 980, 330), unet, "UNet: EPS loss (noise-prediction MSE)", "loss, log scale (lower is better)",
          earlier.get("curves", {}).get("unet", [[0]])[-1][0] if earlier else None, log=True)
    image.save(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
