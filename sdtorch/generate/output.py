"""Images out: tensors to PIL images, and PNG files carrying their A1111 `parameters` chunk."""

from __future__ import annotations

import io
import re
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
    """The PNG file of an image, with its `parameters` chunk."""
    info = PngInfo()
    if "parameters" in image.info:
        info.add_text("parameters", image.info["parameters"])
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def parse_infotext(text: str) -> dict:
    """AUTOMATIC1111's `parameters` text -> a dict ("Prompt", "Negative prompt", then the
    "Key: value" fields of the last line; "Size" also as "Size-1" / "Size-2", as A1111 reports)."""
    lines = text.strip().split("\n")
    last = lines[-1] if lines and _FIELD.match(lines[-1]) and ":" in lines[-1] else ""
    body = lines[:-1] if last else lines
    prompt, negative, into_negative = [], [], False
    for line in body:
        if line.startswith("Negative prompt:"):
            into_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if into_negative else prompt).append(line)
    out: dict = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _FIELDS.findall(last):
        value = value.strip()
        if value.startswith('"') and value.endswith('"') and len(value) > 1:
            value = value[1:-1].replace('\\"', '"')
        out[key.strip()] = value
    if "Size" in out and "x" in out["Size"]:
        out["Size-1"], out["Size-2"] = out["Size"].split("x", 1)
    return out


_FIELD = re.compile(r"^(\s*[\w \-/+]+:\s*(\"(?:\\.|[^\\\"])+\"|[^,]*)(?:,|$))+$")
_FIELDS = re.compile(r"\s*([\w \-/+]+):\s*(\"(?:\\.|[^\\\"])+\"|[^,]*)(?:,|$)")
