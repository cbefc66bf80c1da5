"""Pictures of what the model does: per-token attention heat maps over the image, and the
predicted clean image at every step (the denoising process) as a strip or an animated GIF."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

LABEL_H = 14  # pixels under each tile for its caption


def _heat(values: np.ndarray) -> np.ndarray:
    """[0, 1] -> RGB (a blue-yellow-red ramp without external colour maps)."""
    v = np.clip(values, 0, 1)[..., None]
    blue, yellow, red = np.array([40, 40, 200]), np.array([250, 220, 40]), np.array([220, 30, 30])
    low = blue + (yellow - blue) * np.clip(v * 2, 0, 1)
    return np.where(v < 0.5, low, yellow + (red - yellow) * np.clip(v * 2 - 1, 0, 1)).astype(np.uint8)


def _tile(image: Image.Image, label: str) -> Image.Image:
    tile = Image.new("RGB", (image.width, image.height + LABEL_H), "white")
    tile.paste(image, (0, 0))
    ImageDraw.Draw(tile).text((2, image.height + 1), label[: max(4, image.width // 6)], fill="black")
    return tile


def row(images: list[Image.Image], labels: list[str], cols: int | None = None) -> Image.Image:
    """Labelled tiles on a white sheet, `cols` per row (default: all in one row)."""
    tiles = [_tile(im, lab) for im, lab in zip(images, labels)]
    cols = cols or len(tiles)
    w, h = tiles[0].size
    sheet = Image.new("RGB", (w * cols, h * ((len(tiles) + cols - 1) // cols)), "white")
    for i, t in enumerate(tiles):
        sheet.paste(t, ((i % cols) * w, (i // cols) * h))
    return sheet


def attention_grid(image: Image.Image, maps: torch.Tensor, labels: list[str], cols: int = 8) -> Image.Image:
    """The image, then each token's map (h, w) upsampled to the image and blended over it, each
    normalised to its own maximum (so weak and strong tokens are both visible)."""
    size = (image.height, image.width)
    up = F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    tiles, base = [image], np.asarray(image.convert("RGB"), dtype=np.float32)
    for m in up:
        heat = _heat((m / m.max().clamp(min=1e-8)).numpy())
        tiles.append(Image.fromarray((0.45 * base + 0.55 * heat).astype(np.uint8)))
    return row(tiles, ["image"] + labels, cols=min(cols, len(tiles)))


def process_strip(frames: list[Image.Image], sigmas: list[float], max_frames: int = 10) -> Image.Image:
    """Every k-th predicted clean image (always the last), labelled with its noise level."""
    idx = sorted({round(i * (len(frames) - 1) / max(1, max_frames - 1)) for i in range(min(max_frames, len(frames)))})
    return row([frames[i] for i in idx], [f"s={sigmas[i]:.2f}" for i in idx])


def save_process(frames: list[Image.Image], sigmas: list[float], path: str | Path) -> Path:
    """A .gif animates every frame (the last held longer); anything else is a strip picture."""
    path = Path(path)
    if path.suffix.lower() == ".gif":
        durations = [120] * (len(frames) - 1) + [1200]
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations, loop=0)
    else:
        process_strip(frames, sigmas).save(path)
    return path
