"""How well the emoji canny ControlNet (scripts/train_controlnet.py) steers the built-in model, on
emoji it never saw.

For each held-out emoji (every 20th of the dataset), its canny edge map and its name go to the
built-in model with the ControlNet; the generated image's own edges are compared with the control
edges: F1 of edge pixels matched within 2 pixels. Beside it, in the same run: the same prompts and
seeds without the ControlNet, and with another emoji's edges (chance). Also draws docs/controlnet.png:
control images and three results each.

Usage: python benchmarks/controlnet.py CONTROLNET [--data DIR] [--limit N] [--picture docs/controlnet.png]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

import sdtorch
from sdtorch.adapters.control import ControlUnit
from sdtorch.conditioning.preprocess import preprocess
from sdtorch.formats import controlnet
from sdtorch.generate import GenerationRequest
from sdtorch.training.data import held_out_items

COMMON = dict(steps=20, sampler="dpmpp_2m", scheduler="karras", cfg_scale=5.0, width=64, height=64)


def edges(image: Image.Image) -> np.ndarray:
    return np.asarray(preprocess("canny", image).convert("L")) > 127


def edge_f1(target: np.ndarray, result: np.ndarray, tolerance: int = 2) -> float:
    """F1 of edge pixels: a pixel of one map counts as matched when the other has an edge within `tolerance`."""
    def near(m: np.ndarray) -> np.ndarray:
        im = Image.fromarray(m.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(2 * tolerance + 1))
        return np.asarray(im) > 127

    if not target.any() or not result.any():
        return 0.0
    precision = (result & near(target)).sum() / result.sum()
    recall = (target & near(result)).sum() / target.sum()
    return 0.0 if precision + recall == 0 else float(2 * precision * recall / (precision + recall))


def drawn() -> list[tuple[Image.Image, str]]:
    """Two control images drawn here, not taken from any emoji (white lines on black)."""
    ring = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(ring).ellipse((10, 10, 54, 54), outline="white", width=1)
    house = Image.new("RGB", (64, 64), "black")
    d = ImageDraw.Draw(house)
    d.polygon([(12, 30), (32, 10), (52, 30)], outline="white")
    d.rectangle((16, 30, 48, 56), outline="white")
    return [(ring, "red apple"), (house, "house")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("controlnet", type=Path)
    p.add_argument("--data", type=Path, default=Path("runs/controlnet/emoji64"))
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--picture", type=Path, default=None)
    p.add_argument("--picture-only", action="store_true", help="draw the picture, skip the scores")
    args = p.parse_args()
    if not (args.data / "metadata.jsonl").exists():
        from sdtorch.training.data import build_emoji_dataset

        build_emoji_dataset(args.data, 64)
    torch.set_grad_enabled(False)
    pipe = sdtorch.load()
    net = controlnet.load(args.controlnet, pipe.config.unet)
    items = held_out_items(args.data)[: args.limit]
    scores = {"with the ControlNet": [], "without it": [], "with another emoji's edges": []}
    t0 = time.perf_counter()
    for n, (i, image, text) in enumerate([] if args.picture_only else items):
        control = preprocess("canny", image)
        other = preprocess("canny", items[(n + len(items) // 2) % len(items)][1])
        target = edges(image)
        for name, hint in (("with the ControlNet", control), ("without it", None), ("with another emoji's edges", other)):
            units = () if hint is None else (ControlUnit(net, hint, module="canny"),)
            out = pipe.run(GenerationRequest(text, seed=i, controls=units, **COMMON)).images[0]
            scores[name].append(edge_f1(target, edges(out)))
    for name, values in scores.items() if not args.picture_only else ():
        if name == "with the ControlNet":
            print(f"{len(items)} held-out emoji, {time.perf_counter() - t0:.0f} s; edge F1 (2-px tolerance) against "
                  "the emoji's own canny edges:")
        print(f"  {name:30s} {statistics.mean(values):.3f}  (median {statistics.median(values):.3f})")
    if args.picture:
        rows = [(preprocess("canny", img), text) for _, img, text in items[:6]] + drawn()
        cell, pad = 64, 4
        sheet = Image.new("RGB", (pad + 4 * (cell + pad), pad + len(rows) * (cell + pad)), "white")
        for r, (hint, text) in enumerate(rows):
            y = pad + r * (cell + pad)
            sheet.paste(hint, (pad, y))
            out = pipe.run(GenerationRequest(text, seed=r, batch_size=3, seed_mode="a1111",
                                             controls=(ControlUnit(net, hint, module="canny"),), **COMMON))
            for c, im in enumerate(out.images):
                sheet.paste(im, (pad + (c + 1) * (cell + pad), y))
        sheet.save(args.picture)
        print(f"wrote {args.picture} (rows: {', '.join(t for _, t in rows)})")


if __name__ == "__main__":
    main()
