"""Images over HTTP: base64 / data-URL decoding that refuses broken data and decompression bombs,
A1111's resize modes, and its inpainting preparation (mask blur and invert, "fill", "only masked"
crops) with the result pasted back over the original."""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from sdtorch.generate import RequestError

MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # decoded images larger than this are refused (Pillow's bomb check)
RESIZE_MODES = {0: "just resize", 1: "crop and resize", 2: "resize and fill"}


def decode_image(data: str, name: str) -> Image.Image:
    """A base64 string or data URL -> a loaded PIL image; RequestError(name) for anything else."""
    if not isinstance(data, str) or not data:
        raise RequestError(name, f"{name}: expected a base64-encoded image")
    if data.startswith("data:"):
        head, _, data = data.partition(",")
        if ";base64" not in head:
            raise RequestError(name, f"{name}: a data URL must be base64-encoded")
    try:
        raw = base64.b64decode(data, validate=False)
    except (binascii.Error, ValueError):
        raise RequestError(name, f"{name}: not valid base64") from None
    bomb = RequestError(name, f"{name}: image too large (more than {MAX_IMAGE_PIXELS} pixels: refused as a "
                              "possible decompression bomb)")
    try:
        image = Image.open(io.BytesIO(raw))  # reads the header only
        if image.width * image.height > MAX_IMAGE_PIXELS:  # checked before any pixel is decoded
            raise bomb
        image.load()
    except RequestError:
        raise
    except Image.DecompressionBombError:
        raise bomb from None
    except (OSError, SyntaxError, ValueError):
        raise RequestError(name, f"{name}: not an image Pillow can read") from None
    return image


def encode_png(png: bytes) -> str:
    return base64.b64encode(png).decode("ascii")


def resize(image: Image.Image, size: tuple[int, int], mode: int) -> Image.Image:
    """A1111's resize modes: 0 stretch to size; 1 scale to cover, centre-crop; 2 scale to fit,
    fill the borders with the stretched edge of the image."""
    w, h = size
    if image.size == (w, h):
        return image
    if mode == 0:
        return image.resize((w, h), Image.LANCZOS)
    if mode == 1:
        return ImageOps.fit(image, (w, h), Image.LANCZOS)
    ratio = min(w / image.width, h / image.height)
    inner = image.resize((max(1, round(image.width * ratio)), max(1, round(image.height * ratio))), Image.LANCZOS)
    canvas = image.resize((w, h), Image.LANCZOS).filter(ImageFilter.GaussianBlur(max(w, h) / 32))
    canvas.paste(inner, ((w - inner.width) // 2, (h - inner.height) // 2))
    return canvas


def _blur(mask: Image.Image, blur: tuple[int, int]) -> Image.Image:
    """Gaussian blur of the mask by A1111's mask_blur_x / mask_blur_y (0: none)."""
    bx, by = max(blur[0], 0), max(blur[1], 0)
    if bx == 0 and by == 0:
        return mask
    return mask.filter(ImageFilter.GaussianBlur((bx, by)))


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's inpainting_fill 0 ("fill"): the masked area painted with the colours around it,
    by blurring the unmasked pixels at decreasing radii (normalised by the blurred coverage)
    and keeping the known ones."""
    keep = np.asarray(mask.convert("L")) < 128
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    out = arr.copy()
    known = Image.fromarray((keep * 255).astype(np.uint8))
    premultiplied = Image.fromarray((arr * keep[..., None]).astype(np.uint8))
    for radius in (64, 16, 4, 1):
        weight = np.asarray(known.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32)[..., None] / 255
        blurred = np.asarray(premultiplied.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32)
        estimate = blurred / np.maximum(weight, 1e-3)
        out = np.where(keep[..., None], arr, np.where(weight > 0.02, estimate, out))
    return Image.fromarray(out.clip(0, 255).round().astype(np.uint8))


def crop_region(mask: Image.Image, padding: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """A1111's "only masked" crop: the mask's bounding box plus padding, grown to the aspect
    ratio of the target size, kept inside the image."""
    box = mask.point(lambda v: 255 if v >= 128 else 0).getbbox()
    W, H = mask.size
    if box is None:
        return 0, 0, W, H
    x1, y1, x2, y2 = max(box[0] - padding, 0), max(box[1] - padding, 0), min(box[2] + padding, W), min(box[3] + padding, H)
    want = size[0] / size[1]
    w, h = x2 - x1, y2 - y1
    if w / h < want:
        grow = min(round(h * want), W) - w
        x1 = max(0, x1 - grow // 2)
        x2 = min(W, x1 + w + grow)
        x1 = max(0, x2 - (w + grow))
    else:
        grow = min(round(w / want), H) - h
        y1 = max(0, y1 - grow // 2)
        y2 = min(H, y1 + h + grow)
        y1 = max(0, y2 - (h + grow))
    return x1, y1, x2, y2


@dataclass
class Inpaint:
    """One inpainting request prepared: the `image` and `mask` the model sees, and `paste(result)`
    that puts a result back: resized into its crop, and the unmasked pixels the original's."""

    image: Image.Image
    mask: Image.Image
    original: Image.Image
    alpha: Image.Image  # the blurred mask at the original's size: where the result shows
    box: tuple[int, int, int, int] | None  # "only masked": the crop in the original

    @classmethod
    def prepare(cls, image: Image.Image, mask: Image.Image, *, size: tuple[int, int], resize_mode: int,
                blur: tuple[int, int], invert: bool, fill: bool, only_masked: bool, padding: int) -> Inpaint:
        mask = mask.convert("L") if mask.mode != "RGBA" else mask.getchannel("A")
        if mask.size != image.size:
            mask = mask.resize(image.size, Image.LANCZOS)
        if invert:
            mask = ImageOps.invert(mask)
        alpha = _blur(mask, blur)
        if only_masked:
            box = crop_region(mask, padding, size)
            original = image
            crop, crop_mask = image.crop(box), alpha.crop(box)
            model_image, model_mask = crop.resize(size, Image.LANCZOS), crop_mask.resize(size, Image.LANCZOS)
        else:
            box = None
            original = resize(image, size, resize_mode)
            alpha = resize(alpha, size, resize_mode)
            model_image, model_mask = original, alpha
        if fill:
            model_image = fill_masked(model_image, model_mask)
        return cls(model_image, model_mask, original, alpha, box)

    def paste(self, result: Image.Image) -> Image.Image:
        info = dict(result.info)
        base = self.original.convert("RGB").copy()
        if self.box is not None:
            x1, y1, x2, y2 = self.box
            placed = base.copy()
            placed.paste(result.convert("RGB").resize((x2 - x1, y2 - y1), Image.LANCZOS), (x1, y1))
            result = placed
        out = Image.composite(result.convert("RGB"), base, self.alpha)
        out.info.update(info)
        return out
