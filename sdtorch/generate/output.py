"""Images out: tensors to PIL images, and PNG files carrying their A1111 `parameters` chunk."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [0, 1] -> PIL images, rounded as the reference does."""
    arr = (images.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Save with the generation parameters in a `parameters` tEXt chunk (A1111's format)."""
    info = PngInfo()
    if "parameters" in image.info:
        info.add_text("parameters", image.info["parameters"])
    path = Path(path)
    image.save(path, pnginfo=info)
    return path


def png_bytes(image) -> bytes:
    """The PNG file of an image, with its `parameters` chunk (and A1111's `postprocessing` one)."""
    info = PngInfo()
    for key in ("parameters", "postprocessing"):
        if key in image.info:
            info.add_text(key, image.info[key])
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()

