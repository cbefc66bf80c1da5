"""Pixels in and out: images and masks as tensors the way the reference prepares them, and the
canvas extension that turns outpainting into inpainting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

ImageLike = Image.Image | str | Path | torch.Tensor


def open_image(image: ImageLike, mode: str = "RGB") -> Image.Image:
    if isinstance(image, (str, Path)):
        if not Path(image).exists():
            raise FileNotFoundError(f"image not found: {image}")
        image = Image.open(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image or a path, got {type(image).__name__}")
    return image.convert(mode)


def image_tensor(image: ImageLike, width: int | None = None, height: int | None = None) -> torch.Tensor:
    """-> (1, 3, H, W) in [-1, 1]. A tensor passes through (it must already be in [-1, 1]); a
    picture is resized (Lanczos) when a size is given, as diffusers' VaeImageProcessor does."""
    if isinstance(image, torch.Tensor):
        return image if image.ndim == 4 else image[None]
    pil = open_image(image)
    if width and height and pil.size != (width, height):
        pil = pil.resize((width, height), Image.LANCZOS)
    arr = np.asarray(pil, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None] * 2 - 1


def mask_tensor(mask: ImageLike, width: int, height: int) -> torch.Tensor:
    """-> (1, 1, H, W) with 1 = repaint, 0 = keep: grey-scale, resized, binarised at 0.5."""
    if isinstance(mask, torch.Tensor):
        m = mask.float()
        while m.ndim < 4:
            m = m[None]
    else:
        pil = open_image(mask, "L")
        if pil.size != (width, height):
            pil = pil.resize((width, height), Image.LANCZOS)
        m = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0)[None, None]
    if m.shape[-2:] != (height, width):
        raise ValueError(f"mask is {m.shape[-1]}x{m.shape[-2]} but the image is {width}x{height}")
    return (m >= 0.5).float()


def extend_canvas(image: ImageLike, *, left: int = 0, right: int = 0, top: int = 0,
                  bottom: int = 0) -> tuple[Image.Image, Image.Image]:
    """Outpainting as inpainting: a larger canvas with the image placed inside, the new border
    filled with the image's edge pixels stretched outwards, and a mask that is white (repaint)
    exactly on the new area."""
    pil = open_image(image)
    if min(left, right, top, bottom) < 0:
        raise ValueError("outpainting margins must be >= 0")
    w, h = pil.size
    size = (w + left + right, h + top + bottom)
    if size[0] % 8 or size[1] % 8:
        raise ValueError(f"the extended canvas must be a multiple of 8, got {size[0]}x{size[1]}")
    arr = np.pad(np.asarray(pil), ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.full((size[1], size[0]), 255, dtype=np.uint8)
    mask[top : top + h, left : left + w] = 0
    return Image.fromarray(arr), Image.fromarray(mask)


def sampled_steps(request) -> int:
    """How many sampler steps a request without hires fix runs: all of them, or img2img's share."""
    if request.init_image is None:
        return request.steps
    return request.steps - img2img_start(request.steps, request.strength)


def img2img_start(steps: int, strength: float) -> int:
    """How many of the `steps` grid steps img2img skips: diffusers' `get_timesteps` arithmetic."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    return steps - min(int(steps * strength), steps)
