"""Control-image preprocessors that need no downloaded weights (sd-webui-controlnet's module names):
"none", "canny" (OpenCV's Canny edges; thresholds A1111's defaults 100 / 200), "invert" (white
lines on black from black on white), "blur_gaussian" (for tile / blur ControlNets; sigma in
pixels), "tile_resample" (for tile ControlNets: the image made threshold_a times smaller), and the
inpaint modules "inpaint" (the extension's inpaint_global_harmonious: the whole image is made
anew, guided by the unmasked part) and "inpaint_only" (within an inpainting request, which keeps
the unmasked pixels): the image as it is, marked -1 under the unit's mask when it is applied
(`sdtorch.adapters.control.control_hint`). Each maps a PIL image to the RGB control image its
ControlNet was trained on."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter, ImageOps


def _canny(image: Image.Image, low: float = 100, high: float = 200) -> Image.Image:
    try:
        import cv2
    except ImportError:
        raise RuntimeError("the canny preprocessor needs OpenCV: pip install opencv-python-headless") from None
    edges = cv2.Canny(np.asarray(image.convert("RGB")), int(low), int(high))
    return Image.fromarray(edges).convert("RGB")


def _tile_resample(image: Image.Image, rate: float = 1.0) -> Image.Image:
    """sd-webui-controlnet's tile_resample: the image made `rate` times smaller (none below 1.1)."""
    image = image.convert("RGB")
    if rate < 1.1:
        return image
    size = (max(1, int(image.width / rate)), max(1, int(image.height / rate)))
    return image.resize(size, Image.BOX)


def _as_is(image: Image.Image, a=None, b=None) -> Image.Image:
    return image.convert("RGB")


PREPROCESSORS = {
    "none": _as_is,
    "canny": lambda image, a=None, b=None: _canny(image, 100 if a is None else a, 200 if b is None else b),
    "invert": lambda image, a=None, b=None: ImageOps.invert(image.convert("RGB")),
    "blur_gaussian": lambda image, a=None, b=None: image.convert("RGB").filter(ImageFilter.GaussianBlur(9 if a is None else a)),
    "tile_resample": lambda image, a=None, b=None: _tile_resample(image, 1.0 if a is None else a),
    "inpaint": _as_is,
    "inpaint_global_harmonious": _as_is,  # "inpaint", by the label the extension shows
    "inpaint_only": _as_is,
}
INPAINT = ("inpaint", "inpaint_global_harmonious", "inpaint_only")  # the modules that need a mask


def preprocess(name: str, image: Image.Image, threshold_a: float | None = None,
               threshold_b: float | None = None) -> Image.Image:
    """Apply preprocessor `name` (A1111's threshold_a / threshold_b are its two parameters)."""
    if name not in PREPROCESSORS:
        raise ValueError(f"unknown control preprocessor {name!r}; choose from {', '.join(PREPROCESSORS)} "
                         "(preprocessors that need downloaded weights, such as depth estimators, are not available)")
    return PREPROCESSORS[name](image, threshold_a, threshold_b)
