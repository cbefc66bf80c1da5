"""Render the README's pictures from a checkpoint: samples, img2img, inpainting, a word-swap edit,
an attention-map grid and a denoising strip.

    python scripts/docs_pictures.py CHECKPOINT OUT_DIR [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

import sdtorch
from sdtorch.editing import inspect, p2p  # noqa: F401
from sdtorch.editing.pictures import attention_grid, process_strip, row

PROMPTS = ["woman running facing right", "grinning face", "man pilot", "waving hand", "red heart", "flag of Italy",
           "person lifting weights", "snowman"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    pipe = sdtorch.load(args.checkpoint)
    opts = dict(steps=args.steps, seed=args.seed, progress=False)

    samples = [pipe.generate(p, sampler="dpmpp_2m", **opts)[0] for p in PROMPTS]
    row(samples, PROMPTS, cols=8).save(args.out / "samples.png")

    source = samples[0]
    outs = [pipe.img2img(source, "man running facing right", strength=s, sampler="ddim", **opts)[0]
            for s in (0.3, 0.5, 0.7)]
    row([source] + outs, ["input", "0.3", "0.5", "0.7"]).save(args.out / "img2img.png")

    mask = Image.new("L", source.size, 0)
    w, h = source.size
    ImageDraw.Draw(mask).rectangle((w // 2, 0, w - 1, h - 1), fill=255)
    painted = pipe.inpaint(samples[1], mask, "grinning face", sampler="ddim", **opts)[0]
    row([samples[1], mask.convert("RGB"), painted], ["input", "mask", "inpainted"]).save(args.out / "inpaint.png")

    src, edited = p2p.edit(pipe, "woman running facing right", "man running facing right", sampler="ddim", **opts)
    fresh = pipe.generate("man running facing right", sampler="ddim", **opts)[0]
    row([src, edited, fresh], ["woman", "edit: man", "man, no edit"]).save(args.out / "edit.png")

    images, maps, labels = inspect.attention(pipe, "woman running facing right", sampler="ddim", **opts)
    attention_grid(images[0], maps[0], labels).save(args.out / "attention.png")

    _, frames, sigmas = inspect.process(pipe, "grinning face", sampler="dpmpp_2m", **opts)
    process_strip(frames, sigmas).save(args.out / "process.png")
    print("\n".join(str(p) for p in sorted(args.out.glob("*.png"))))


if __name__ == "__main__":
    main()
