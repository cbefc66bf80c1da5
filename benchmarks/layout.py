"""How well the built-in layout model follows a layout, on emoji it never saw.

For each held-out emoji (every 20th of the dataset, never trained on; scripts/train_layout.py),
its colour layout (16 x 16 cells, 4 colours) and its name go to the layout model; the generated
image's own layout is compared with the input's: mean IoU over the input's colour segments (the
result's cells assigned to the nearest input colour). Beside it, in the same run: the built-in
text-only model given the name alone (what text gets without a layout), and the layout model
given another emoji's layout (chance: the IoU against the layout it did not get). Also draws
docs/layout.png: sources (held-out emoji, then two drawings), their layouts and four results each.

Usage: python benchmarks/layout.py [--data DIR] [--limit N] [--picture docs/layout.png]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import sdtorch
from sdtorch.conditioning.layout import colour_layout, layout_iou
from sdtorch.generate import GenerationRequest
from sdtorch.generate.images import image_tensor
from sdtorch.generate.loading import BUILTIN_LAYOUT
from sdtorch.training.data import held_out_items

COMMON = dict(steps=20, sampler="dpmpp_2m", scheduler="karras", cfg_scale=5.0, width=64, height=64)


def grid_of(image: Image.Image) -> torch.Tensor:
    return colour_layout(image_tensor(image), (16, 16))[0]


def show(layout: torch.Tensor, size: int = 64) -> Image.Image:
    arr = ((layout.permute(1, 2, 0).numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)
    return Image.fromarray(arr).resize((size, size), Image.NEAREST)


def hand_drawn() -> list[tuple[Image.Image, str]]:
    """Two layouts drawn here, not taken from any emoji."""
    sun = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(sun).ellipse((12, 12, 52, 52), fill=(250, 200, 30))
    flag = Image.new("RGB", (64, 64), "white")
    d = ImageDraw.Draw(flag)
    d.rectangle((4, 14, 60, 30), fill=(200, 30, 40))
    d.rectangle((4, 30, 60, 46), fill=(30, 60, 180))
    return [(sun, "sun"), (flag, "flag")]


def picture(layout_pipe, items, path: Path) -> None:
    rows = [(img, text) for _, img, text in items[:6]] + hand_drawn()
    cell, pad = 64, 4
    sheet = Image.new("RGB", (pad + 6 * (cell + pad), pad + len(rows) * (cell + pad)), "white")
    for r, (image, text) in enumerate(rows):
        y = pad + r * (cell + pad)
        sheet.paste(image.resize((cell, cell)), (pad, y))
        sheet.paste(show(grid_of(image)), (pad + cell + pad, y))
        out = layout_pipe.run(GenerationRequest(text, layout=image, seed=r, batch_size=4, seed_mode="a1111", **COMMON))
        for c, im in enumerate(out.images):
            sheet.paste(im, (pad + (c + 2) * (cell + pad), y))
    sheet.save(path)
    print(f"wrote {path} (columns: source, its layout, four seeds; rows: {', '.join(t for _, t in rows)})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("runs/layout/emoji64"), help="sdtorch dataset emoji --size 64")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--picture", type=Path, default=None)
    args = p.parse_args()
    if not (args.data / "metadata.jsonl").exists():
        from sdtorch.training.data import build_emoji_dataset

        build_emoji_dataset(args.data, 64)
    torch.set_grad_enabled(False)
    layout_pipe, text_pipe = sdtorch.load(BUILTIN_LAYOUT), sdtorch.load()
    items = held_out_items(args.data)[: args.limit]
    names = ("layout model, its layout", "text-only built-in model", "layout model, another emoji's layout")
    scores = {name: [] for name in names}
    fore = {name: [] for name in names}
    t0 = time.perf_counter()
    for n, (i, image, text) in enumerate(items):
        target = grid_of(image)
        other = items[(n + len(items) // 2) % len(items)][1]
        with_layout = layout_pipe.run(GenerationRequest(text, layout=image, seed=i, **COMMON)).images[0]
        text_only = text_pipe.run(GenerationRequest(text, seed=i, **COMMON)).images[0]
        wrong = layout_pipe.run(GenerationRequest(text, layout=other, seed=i, **COMMON)).images[0]
        for name, out in zip(names, (with_layout, text_only, wrong)):
            scores[name].append(layout_iou(target, grid_of(out)))
            fore[name].append(layout_iou(target, grid_of(out), background=False))
    print(f"{len(items)} held-out emoji, {time.perf_counter() - t0:.0f} s; mean IoU with the emoji's own layout "
          "(16x16 cells, 4 colours), all segments / without the background one:")
    for name in names:
        print(f"  {name:40s} {statistics.mean(scores[name]):.3f} / {statistics.mean(fore[name]):.3f}  "
              f"(medians {statistics.median(scores[name]):.3f} / {statistics.median(fore[name]):.3f})")
    if args.picture:
        picture(layout_pipe, items, args.picture)


if __name__ == "__main__":
    main()
