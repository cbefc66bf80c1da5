"""What the small image-conditioned emoji models (scripts/train_concat.py) do on emoji they never
saw (every 20th of the dataset), measured against the truth in one run, with a picture.

- instruct-pix2pix: each edit of `concat_jobs.EDITS` on each held-out emoji; PSNR of the result
  against the exact edit, beside the PSNR of the unedited source against it (what doing nothing
  scores).
- x4-upscaler: the emoji made 4x smaller (16x16) and upscaled back with its name as the prompt;
  PSNR against the original 64x64 emoji, and sharpness (neighbour differences) against the
  original's, beside bicubic and Lanczos.
- depth: the emoji's stand-in depth (`concat_jobs.silhouette_depth`) and its name, from noise (a
  white init image, strength 1); IoU of the result's drawn shape (its non-white pixels) with the
  depth's shape, beside the built-in text model given the name alone, and the depth model given
  another emoji's depth (IoU with the named emoji's shape, and with the shape it was given).

Usage: python benchmarks/concat.py KIND MODEL.safetensors [--data DIR] [--limit N] [--cfg S] [--picture PATH]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import sdtorch
from sdtorch.editing.pictures import row
from sdtorch.generate import GenerationRequest
from sdtorch.generate.images import image_tensor
from sdtorch.training.concat_jobs import EDITS, apply_edit, silhouette_depth
from sdtorch.training.data import held_out_items

COMMON = dict(steps=20, sampler="dpmpp_2m", scheduler="karras", cfg_scale=5.0, seed_mode="a1111")
SHORT = {"flip it": "flip", "turn it upside down": "upside down", "make it black and white": "b&w",
         "swap red and blue": "swap r/b", "make it a negative": "negative"}


def psnr(a: Image.Image, b: Image.Image) -> float:
    x, y = (np.asarray(im.convert("RGB"), dtype=np.float64) / 255 for im in (a, b))
    return 10 * math.log10(1 / max(((x - y) ** 2).mean(), 1e-12))


def to_image(x: torch.Tensor) -> Image.Image:
    return Image.fromarray(((x.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8))


def shape(image: Image.Image) -> np.ndarray:
    return (np.asarray(image.convert("RGB")) < 230).any(axis=-1)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def edits(pipe, items, image_cfg: float):
    scores = {e: ([], []) for e in EDITS}
    for n, (i, image, _) in enumerate(items):
        for edit in EDITS:
            truth = to_image(apply_edit(image_tensor(image), [edit])[0])
            out = pipe.run(GenerationRequest(edit, init_image=image, strength=1.0, image_cfg_scale=image_cfg,
                                             seed=i, **COMMON)).images[0]
            scores[edit][0].append(psnr(out, truth))
            scores[edit][1].append(psnr(image, truth))
    print("| edit | PSNR of the result vs the exact edit | PSNR of the unedited source vs it |\n|---|---|---|")
    for edit, (got, none) in scores.items():
        print(f"| {edit} | {statistics.mean(got):.2f} dB | {statistics.mean(none):.2f} dB |")


def edit_picture(pipe, items, image_cfg: float) -> Image.Image:
    tiles, labels = [], []
    for i, image, _ in items:
        tiles.append(image)
        labels.append("source")
        for edit in EDITS:
            tiles.append(pipe.run(GenerationRequest(edit, init_image=image, strength=1.0, image_cfg_scale=image_cfg,
                                                    seed=i, **COMMON)).images[0])
            labels.append(SHORT[edit])
    return row(tiles, labels, cols=1 + len(EDITS))


def upscaled(pipe, image: Image.Image, text: str, seed: int) -> Image.Image:
    low = image.resize((16, 16), Image.BOX)
    return pipe.run(GenerationRequest(text, init_image=low, noise_level=20, seed=seed, **COMMON)).images[0]


def sharpness(image: Image.Image) -> float:
    """Mean absolute difference between neighbouring pixels (what blurring takes away)."""
    x = np.asarray(image.convert("L"), dtype=np.float64)
    return float(np.abs(np.diff(x, axis=0)).mean() + np.abs(np.diff(x, axis=1)).mean())


def upscales(pipe, items):
    scores = {"x4 upscaler model": ([], []), "bicubic": ([], []), "Lanczos": ([], [])}
    for i, image, text in items:
        low = image.resize((16, 16), Image.BOX)
        outs = (upscaled(pipe, image, text, i), low.resize((64, 64), Image.BICUBIC), low.resize((64, 64), Image.LANCZOS))
        for (quality, sharp), out in zip(scores.values(), outs):
            quality.append(psnr(out, image))
            sharp.append(sharpness(out) / sharpness(image))
    print("| 16x16 -> 64x64 | PSNR vs the original | sharpness / the original's |\n|---|---|---|")
    for name, (quality, sharp) in scores.items():
        print(f"| {name} | {statistics.mean(quality):.2f} dB | {statistics.mean(sharp):.2f} |")


def upscale_picture(pipe, items) -> Image.Image:
    tiles, labels = [], []
    for i, image, text in items:
        low = image.resize((16, 16), Image.BOX)
        tiles += [low.resize((64, 64), Image.NEAREST), low.resize((64, 64), Image.BICUBIC),
                  upscaled(pipe, image, text, i), image]
        labels += ["16x16 input", "bicubic", "x4 model", "original"]
    return row(tiles, labels, cols=4)


def depth_of(image: Image.Image) -> torch.Tensor:
    return silhouette_depth(image_tensor(image))


def from_depth(pipe, depth: torch.Tensor, text: str, seed: int) -> Image.Image:
    white = Image.new("RGB", (64, 64), "white")
    return pipe.run(GenerationRequest(text, init_image=white, depth_map=depth, strength=1.0, seed=seed,
                                      **COMMON)).images[0]


def depths(pipe, items):
    text_model = sdtorch.load()
    own, text_only, pulled, followed = [], [], [], []
    for n, (i, image, text) in enumerate(items):
        other = items[(n + len(items) // 2) % len(items)][1]
        target = shape(image)
        own.append(iou(shape(from_depth(pipe, depth_of(image), text, i)), target))
        plain = text_model.run(GenerationRequest(text, seed=i, width=64, height=64, **COMMON)).images[0]
        text_only.append(iou(shape(plain), target))
        wrong = shape(from_depth(pipe, depth_of(other), text, i))
        pulled.append(iou(wrong, target))
        followed.append(iou(wrong, shape(other)))
    print("| | IoU with the named emoji's shape | IoU with the depth's shape |\n|---|---|---|")
    print(f"| depth model, the emoji's depth and name | {statistics.mean(own):.3f} | (the same) |")
    print(f"| built-in text model, the name only | {statistics.mean(text_only):.3f} | |")
    print(f"| depth model, another emoji's depth | {statistics.mean(pulled):.3f} | {statistics.mean(followed):.3f} |")


def depth_picture(pipe, items, prompts=("red apple", "blue heart", "sun")) -> Image.Image:
    tiles, labels = [], []
    for i, image, text in items:
        d = depth_of(image)
        tiles += [image, Image.fromarray((d[0].numpy() * 255).astype(np.uint8)).convert("RGB")]
        labels += ["source", "depth"]
        for prompt in (text, *prompts):
            tiles.append(from_depth(pipe, d, prompt, i))
            labels.append(prompt)
    return row(tiles, labels, cols=2 + 1 + len(prompts))


KINDS = {"instruct-pix2pix": (edits, edit_picture), "x4-upscaler": (upscales, upscale_picture),
         "depth": (depths, depth_picture)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=sorted(KINDS))
    p.add_argument("model", type=Path)
    p.add_argument("--data", type=Path, default=Path("runs/emoji64"), help="the emoji dataset (RUN/emoji64)")
    p.add_argument("--limit", type=int, default=0, help="held-out emoji to measure (0: all 190)")
    p.add_argument("--image-cfg", type=float, default=1.5, help="instruct-pix2pix's image guidance")
    p.add_argument("--cfg", type=float, default=COMMON["cfg_scale"], help="text guidance")
    p.add_argument("--picture", type=Path, default=None)
    args = p.parse_args()
    COMMON["cfg_scale"] = args.cfg
    torch.set_grad_enabled(False)
    pipe = sdtorch.load(args.model)
    items = held_out_items(args.data)
    measured = items[: args.limit] if args.limit else items
    measure, draw = KINDS[args.kind]
    extra = (args.image_cfg,) if args.kind == "instruct-pix2pix" else ()
    t0 = time.perf_counter()
    measure(pipe, measured, *extra)
    print(f"{len(measured)} held-out emoji, {COMMON['sampler']} {COMMON['scheduler']} {COMMON['steps']} steps, "
          f"CFG {COMMON['cfg_scale']}; {time.perf_counter() - t0:.0f} s")
    if args.picture:
        picked = [items[k] for k in (3, 17, 42, 77, 120, 160) if k < len(items)]
        draw(pipe, picked, *extra).save(args.picture)
        print(f"wrote {args.picture}")


if __name__ == "__main__":
    main()
