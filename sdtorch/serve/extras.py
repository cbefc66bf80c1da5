"""A1111's Extras tab over HTTP (/sdapi/v1/extra-single-image, /sdapi/v1/extra-batch-images): the
upscale step of its postprocessing, with A1111's field names and sizes.

- `upscaler_1` / `upscaler_2`: "None" (no upscaling: the image comes back as it was),
  "Lanczos", "Nearest", or an SD x4 upscaler model the server offers (`/sdapi/v1/upscalers`),
  applied up to three times until the image is large enough, as A1111 applies its model upscalers.
- Size: `resize_mode` 0 scales by `upscaling_resize`; 1 scales to cover `upscaling_resize_w` x
  `upscaling_resize_h` and, with `upscaling_crop`, crops the middle. Like A1111, the scaled size
  is rounded down to a multiple of 8 and reached with Lanczos.
- `upscaler_2` at `extras_upscaler_2_visibility` is blended over the first upscaler's result.
- Face restoration (GFPGAN, CodeFormer) needs downloaded weights, which this server does not
  have: a request that asks for it is refused naming the field.
The result carries the source's `parameters` and A1111's `postprocessing` text
("Postprocess upscale by: 2, Postprocess upscaler: Lanczos").
"""

from __future__ import annotations

import html
from typing import Callable, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from sdtorch.generate import RequestError

BUILT_IN = {"None": None, "Lanczos": Image.LANCZOS, "Nearest": Image.NEAREST}


class _Extras(BaseModel):
    model_config = ConfigDict(extra="forbid")
    resize_mode: Literal[0, 1] = 0
    show_extras_results: bool = True
    gfpgan_visibility: float = Field(0, ge=0, le=1)
    codeformer_visibility: float = Field(0, ge=0, le=1)
    codeformer_weight: float = Field(0, ge=0, le=1)
    upscaling_resize: float = Field(2, gt=0, le=8)
    upscaling_resize_w: int = Field(512, ge=1, le=8192)
    upscaling_resize_h: int = Field(512, ge=1, le=8192)
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = Field(0, ge=0, le=1)
    upscale_first: bool = False


class ExtrasSingle(_Extras):
    image: str = ""


class FileData(BaseModel):
    data: str
    name: str = ""


class ExtrasBatch(_Extras):
    imageList: list[FileData] = Field(min_length=1)  # noqa: N815  A1111's field name


KINDS = {"extra-single-image": ExtrasSingle, "extra-batch-images": ExtrasBatch}


def parse(kind: str, body: dict) -> _Extras:
    return KINDS[kind].model_validate(body)


def used(req: _Extras) -> list[str]:
    """The upscalers a request runs (none when upscaler_1 is "None", as in A1111)."""
    if req.upscaler_1 == "None":
        return []
    second = req.upscaler_2 != "None" and req.extras_upscaler_2_visibility > 0
    return [req.upscaler_1] + ([req.upscaler_2] if second else [])


def check(req: _Extras, find_model: Callable[[str], object]) -> None:
    """RequestError naming the first field this server cannot honour; `find_model(name)` raises
    KeyError for a name that is no x4 upscaler it offers."""
    for field in ("gfpgan_visibility", "codeformer_visibility"):
        if getattr(req, field) > 0:
            raise RequestError(field, f"{field}: face restoration (GFPGAN, CodeFormer) needs downloaded weights, "
                                      "which this server does not have; send 0")
    for field in ("upscaler_1", "upscaler_2"):
        name = getattr(req, field)
        if name not in BUILT_IN:
            try:
                find_model(name)
            except KeyError as e:
                raise RequestError(field, f"{field}: {e.args[0]} (built in: {', '.join(BUILT_IN)})") from None


def inputs(req: _Extras, decode: Callable[[str, str], Image.Image]) -> list[Image.Image]:
    if isinstance(req, ExtrasSingle):
        return [decode(req.image, "image")]
    return [decode(f.data, f"imageList[{n}]") for n, f in enumerate(req.imageList)]


def check_size(req: _Extras, images: list[Image.Image]) -> None:
    """RequestError when a result would be larger than the server decodes (`MAX_IMAGE_PIXELS`)."""
    from sdtorch.serve.images import MAX_IMAGE_PIXELS

    if not used(req):
        return
    for image in images:
        scale = _scale(req, image)
        if image.width * scale * image.height * scale > MAX_IMAGE_PIXELS:
            field = "upscaling_resize_w" if req.resize_mode == 1 else "upscaling_resize"
            raise RequestError(field, f"{field}: the result would have more than {MAX_IMAGE_PIXELS} pixels "
                                      f"({image.width}x{image.height} scaled {scale:g}x)")


def _scale(req: _Extras, image: Image.Image) -> float:
    if req.resize_mode == 1:
        return max(req.upscaling_resize_w / image.width, req.upscaling_resize_h / image.height)
    return req.upscaling_resize


def upscale(image: Image.Image, name: str, scale: float, model=None) -> Image.Image:
    """A1111's Upscaler.upscale: `model` (a function image -> image, 4x larger) up to three times
    until the target is reached, or one resize with a built-in filter; then Lanczos to the target
    (the scaled size rounded down to a multiple of 8)."""
    dest = (max(8, int(image.width * scale) // 8 * 8), max(8, int(image.height * scale) // 8 * 8))
    if model is not None:
        for i in range(3):
            if image.width >= dest[0] and image.height >= dest[1] and (i > 0 or scale != 1):
                break
            image = model(image)
    else:
        image = image.resize((max(1, int(image.width * scale)), max(1, int(image.height * scale))), BUILT_IN[name])
    return image if image.size == dest else image.resize(dest, Image.LANCZOS)


def process(image: Image.Image, req: _Extras, models: dict[str, Callable]) -> tuple[Image.Image, dict]:
    """One image through the request's upscalers -> (result, A1111's postprocessing fields);
    `models`: the model upscalers' functions by name."""
    names = used(req)
    if not names:
        return image, {}
    scale = _scale(req, image)
    info = ({"Postprocess upscale to": f"{req.upscaling_resize_w}x{req.upscaling_resize_h}"} if req.resize_mode == 1
            else {"Postprocess upscale by": req.upscaling_resize})
    out = upscale(image, names[0], scale, models.get(names[0]))
    info["Postprocess upscaler"] = names[0]
    if len(names) > 1:
        second = upscale(image, names[1], scale, models.get(names[1])).convert(out.mode)
        out = Image.blend(out, second, req.extras_upscaler_2_visibility)
        info["Postprocess upscaler 2"] = names[1]
    if req.resize_mode == 1 and req.upscaling_crop:
        w, h = req.upscaling_resize_w, req.upscaling_resize_h
        canvas = Image.new("RGB", (w, h))
        canvas.paste(out, (w // 2 - out.width // 2, h // 2 - out.height // 2))
        out = canvas
        info["Postprocess crop to"] = f"{w}x{h}"
    return out, info


def infotext(info: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in info.items())


def finish(out: Image.Image, source: Image.Image, info: dict) -> Image.Image:
    """The result with the source's `parameters` and the `postprocessing` text."""
    out.info = {k: v for k, v in source.info.items() if k == "parameters"}
    if info:
        out.info["postprocessing"] = infotext(info)
    return out


def html_info(infos: list[dict]) -> str:
    """A1111's html_info: the postprocessing text as HTML."""
    text = infotext(infos[0]) if infos else ""
    return "<p>" + "<br>\n".join(html.escape(line) for line in text.split("\n")) + "</p>"
