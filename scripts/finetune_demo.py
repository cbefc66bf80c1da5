"""DreamBooth and LoRA teach the built-in 64x64 emoji model a subject it has never seen: a purple
five-pointed star with a yellow outline.

    python scripts/finetune_demo.py OUT_DIR [--picture docs/finetune.png]

Draws 6 instance images (OUT_DIR/instance), runs `sdtorch train dreambooth` twice through the CLI
entry (full fine-tuning, then DreamBooth-LoRA on the same images and class images), and renders a
before/after grid (rows: built-in model, after DreamBooth, after LoRA; columns: seeds) to
--picture. Prints the training times and the LoRA file size. OUT_DIR's run folders are replaced.
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

import sdtorch
from sdtorch.cli import main as sdtorch_cli
from sdtorch.generate.loading import BUILTIN
from sdtorch.training.dreambooth import class_images

INSTANCE_PROMPT = "a sks emoji"
CLASS_PROMPT = "an emoji"
PROMPTS = [INSTANCE_PROMPT]  # --context adds "a sks emoji on a red heart"
# (rotation in degrees, outer radius, centre x, centre y) at 64 px
VARIATIONS = [(0, 26, 32, 33), (12, 23, 30, 32), (-10, 25, 34, 34), (25, 21, 31, 30), (-22, 24, 33, 31), (5, 27, 32, 32)]


def star(rotation: float, radius: float, cx: float, cy: float, size: int = 64, scale: int = 4) -> Image.Image:
    """A purple five-pointed star with a thick yellow outline on white, drawn at `scale`x and
    downsampled (antialiased)."""
    big = Image.new("RGB", (size * scale, size * scale), "white")
    points = []
    for k in range(10):
        r = radius if k % 2 == 0 else radius * 0.45
        a = math.radians(rotation - 90 + 36 * k)
        points.append(((cx + r * math.cos(a)) * scale, (cy + r * math.sin(a)) * scale))
    ImageDraw.Draw(big).polygon(points, fill=(128, 40, 200), outline=(255, 210, 0), width=3 * scale)
    return big.resize((size, size), Image.LANCZOS)


def draw_instances(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, v in enumerate(VARIATIONS):
        star(*v).save(folder / f"star_{i}.png")


def train(args: argparse.Namespace, out: Path, extra: list[str]) -> float:
    shutil.rmtree(out, ignore_errors=True)  # a leftover run folder would be resumed
    argv = ["train", "dreambooth", "--checkpoint", str(BUILTIN),
            "--instance-data", str(args.out / "instance"), "--instance-prompt", INSTANCE_PROMPT,
            "--class-prompt", CLASS_PROMPT, "--class-data", str(args.out / "class"),
            "--num-class-images", str(args.class_images), "--class-steps", "20",
            "--out", str(out), "--batch-size", "4", "--seed", "0",
            "--save-every", "100000", "--log-every", "10"] + (["--bf16"] if args.bf16 else []) + extra
    start = time.perf_counter()
    if sdtorch_cli(argv) != 0:
        raise SystemExit(f"training failed: sdtorch {' '.join(argv)}")
    return time.perf_counter() - start


def label(text: str, size: tuple[int, int], font) -> Image.Image:
    tile = Image.new("RGB", size, "white")
    ImageDraw.Draw(tile).text((6, size[1] // 2), text, fill="black", font=font, anchor="lm")
    return tile


def grid(rows: dict[str, dict[str, list[Image.Image]]], seeds: list[int], zoom: int = 2) -> Image.Image:
    """One block per prompt: a title line, then a row per model, a column per seed."""
    font = ImageFont.load_default(size=13)
    cell, label_w, title_h, pad = 64 * zoom, 130, 22, 4
    names = list(rows)
    width = label_w + len(seeds) * (cell + pad)
    height = len(PROMPTS) * (title_h + len(names) * (cell + pad)) + title_h
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((label_w, title_h // 2), f"seed 0, batch of {len(seeds)}", fill="gray", font=font, anchor="lm")
    y = title_h
    for prompt in PROMPTS:
        draw.text((6, y + title_h // 2), f'"{prompt}"', fill="black", font=font, anchor="lm")
        y += title_h
        for name in names:
            canvas.paste(label(name, (label_w, cell), font), (0, y))
            for j, image in enumerate(rows[name][prompt]):
                canvas.paste(image.resize((cell, cell), Image.NEAREST), (label_w + j * (cell + pad), y))
            y += cell + pad
    return canvas


def render(pipe, n: int, steps: int) -> dict[str, list[Image.Image]]:
    """n images per prompt in one batch from seed 0 (one generator fills the batch, as diffusers does)."""
    return {p: pipe.generate(p, steps=steps, seed=0, batch_size=n, progress=False) for p in PROMPTS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="work folder (instance/class images, run folders)")
    parser.add_argument("--picture", type=Path, default=Path("docs/finetune.png"))
    parser.add_argument("--dreambooth-steps", type=int, default=150)
    parser.add_argument("--dreambooth-lr", type=float, default=1e-4)
    parser.add_argument("--lora-steps", type=int, default=150)
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--class-images", type=int, default=12)
    parser.add_argument("--sample-steps", type=int, default=15)
    parser.add_argument("--images", type=int, default=4, help="images per row (one batch, seed 0)")
    parser.add_argument("--context", action="store_true", help='also render "a sks emoji on a red heart"')
    parser.add_argument("--no-bf16", dest="bf16", action="store_false")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is far faster on a shared 2-core box)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shutil.rmtree(args.out / "class", ignore_errors=True)  # made afresh, so their time is measured

    if args.context:
        PROMPTS.append("a sks emoji on a red heart")
    args.seeds = list(range(args.images))
    draw_instances(args.out / "instance")
    t0 = time.perf_counter()
    base = sdtorch.load()
    before = render(base, args.images, args.sample_steps)
    t_base = time.perf_counter() - t0
    t0 = time.perf_counter()  # the class images, shared by both runs (the CLI would make them too)
    class_images(base, args.out / "class", CLASS_PROMPT, args.class_images, steps=20, progress=False)
    t_class = time.perf_counter() - t0

    db_out, lora_out = args.out / "dreambooth", args.out / "lora"
    t_db = train(args, db_out, ["--steps", str(args.dreambooth_steps), "--lr", str(args.dreambooth_lr)])
    t_lora = train(args, lora_out, ["--steps", str(args.lora_steps), "--lr", str(args.lora_lr),
                                    "--lora", str(args.lora_rank), "--layers", "attn,ff"])

    t0 = time.perf_counter()
    after_db = render(sdtorch.load(db_out / "model.safetensors"), args.images, args.sample_steps)
    base.load_lora(lora_out / "lora.safetensors")
    after_lora = render(base, args.images, args.sample_steps)
    t_render = t_base + time.perf_counter() - t0

    args.picture.parent.mkdir(parents=True, exist_ok=True)
    rows = {"built-in model": before, "after DreamBooth": after_db, "after LoRA": after_lora}
    grid(rows, args.seeds).save(args.picture, optimize=True)
    lora_bytes = (lora_out / "lora.safetensors").stat().st_size
    print(f"{args.class_images} class images: {t_class:.1f} s")
    print(f"DreamBooth (full, {args.dreambooth_steps} steps, lr {args.dreambooth_lr}): {t_db:.1f} s")
    print(f"DreamBooth-LoRA (rank {args.lora_rank}, attn+ff, {args.lora_steps} steps, lr {args.lora_lr}): {t_lora:.1f} s")
    print(f"rendering {3 * len(PROMPTS) * len(args.seeds)} images: {t_render:.1f} s")
    print(f"LoRA file: {lora_out / 'lora.safetensors'} {lora_bytes / 1024:.1f} KiB")
    print(f"grid: {args.picture} {args.picture.stat().st_size / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
