"""The sd-webui-controlnet extension's API: `alwayson_scripts: {"controlnet": {"args": [unit, ...]}}`
in txt2img / img2img requests, and /controlnet/model_list, /controlnet/module_list,
/controlnet/version, /controlnet/detect.

ControlNet files are offered from `--controlnet-dir` (default MODELS_DIR/ControlNet, the
extension's folder), each titled as the extension titles them: "name [hash]", the hash being
A1111's legacy one (8 hex digits of the SHA-256 of the 64 KiB at offset 1 MiB). A unit names its
model by that title or by its name alone.

Unit fields are the extension's. Honoured: enabled, image (or input_image; a base64 string or
{"image": ..., "mask": ...}), mask, module, model, weight, resize_mode, processor_res,
threshold_a, threshold_b, guidance_start, guidance_end, control_mode (or the old guessmode),
pixel_perfect, save_detected_map (the preprocessed map is appended to the images, as the extension
does). low_vram is accepted and means nothing on this server. hr_option other than "Both" with a
hires fix is refused.

Masks are for the inpaint modules (inpaint ControlNets): "inpaint" / "inpaint_global_harmonious"
takes the unit's mask or, in an img2img inpainting request, that request's mask; "inpaint_only"
only within an inpainting request (which keeps the unmasked pixels). A mask on another module is
refused.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from PIL import Image
from pydantic import BaseModel, ConfigDict, ValidationError

from sdtorch.conditioning.preprocess import INPAINT, PREPROCESSORS, preprocess
from sdtorch.generate import RequestError
from sdtorch.serve import images as imgs

SUFFIXES = (".safetensors", ".pth", ".ckpt", ".pt", ".bin")
SCRIPT = "controlnet"  # the always-on script's name (matched case-insensitively, as A1111 does)
RESIZE = {0: "just", 1: "crop", 2: "fill", "Just Resize": "just", "Crop and Resize": "crop", "Resize and Fill": "fill",
          "Scale to Fit (Inner Fit)": "crop", "Envelope (Outer Fit)": "fill"}
CONTROL = {0: "balanced", 1: "prompt", 2: "control", "Balanced": "balanced",
           "My prompt is more important": "prompt", "ControlNet is more important": "control"}
# The extension's sliders per module: (label, default, min, max) for processor_res, threshold_a, threshold_b.
RES = ("Preprocessor Resolution", 512, 64, 2048)
SLIDERS = {
    "none": (),
    "canny": (RES, ("Canny Low Threshold", 100, 1, 255), ("Canny High Threshold", 200, 1, 255)),
    "invert": (RES,),
    "blur_gaussian": (RES, ("Sigma", 9.0, 0.01, 64.0)),
    "tile_resample": (("Down Sampling Rate", 1.0, 1.0, 8.0),),
}


class UnitArgs(BaseModel):
    """One ControlNet unit as the extension's API takes it (its defaults)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    enabled: bool = True
    image: str | dict | None = None
    input_image: str | None = None
    mask: str | None = None
    module: str = "none"
    model: str = "None"
    weight: float = 1.0
    resize_mode: int | str = "Crop and Resize"
    low_vram: bool = False
    processor_res: int = -1
    threshold_a: float = -1
    threshold_b: float = -1
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    control_mode: int | str = "Balanced"
    guessmode: bool | None = None
    pixel_perfect: bool = False
    hr_option: str = "Both"
    save_detected_map: bool = True


@dataclass(frozen=True)
class ControlNetFile:
    name: str  # the file's stem (or the folder's name)
    path: Path
    hash: str  # A1111's legacy hash

    @property
    def title(self) -> str:
        return f"{self.name} [{self.hash}]"


def legacy_hash(path: Path) -> str:
    """A1111's old model hash (what the extension shows): SHA-256 of 64 KiB from offset 1 MiB."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def _weights(folder: Path) -> Path | None:
    return next((folder / n for n in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
                 if (folder / n).is_file()), None)


class ControlNets:
    """The offered ControlNet files, and the few most recently used loaded for a model."""

    def __init__(self, directory: str | Path | None, keep: int = 2):
        self.directory = Path(directory) if directory else None
        self.keep = keep
        self._loaded: OrderedDict[tuple, Any] = OrderedDict()
        self._hashes: dict[tuple, str] = {}  # (path, size, mtime) -> legacy hash
        self._lock = threading.Lock()

    def entries(self) -> list[ControlNetFile]:
        """Read from the folder each time (files added while serving are offered at once); each file's
        hash is read once while its size and modification time stay the same."""
        if self.directory is None or not self.directory.is_dir():
            return []
        found = []
        for path in sorted(self.directory.rglob("*")):
            if path.is_file() and path.suffix in SUFFIXES and not (path.parent / "config.json").is_file():
                found.append(ControlNetFile(path.stem, path, self._hash(path)))
            elif path.is_dir() and (path / "config.json").is_file() and (weights := _weights(path)):
                found.append(ControlNetFile(path.name, path, self._hash(weights)))
        return found

    def _hash(self, path: Path) -> str:
        st = path.stat()
        key = (path, st.st_size, st.st_mtime_ns)
        if key not in self._hashes:
            self._hashes[key] = legacy_hash(path)
        return self._hashes[key]

    def find(self, name: str) -> ControlNetFile:
        bare = name.rsplit(" [", 1)[0] if name.endswith("]") else name
        entries = self.entries()
        for entry in entries:
            if name == entry.title or bare == entry.name:
                return entry
        offered = ", ".join(e.title for e in entries) or "none (put ControlNet files in --controlnet-dir)"
        raise KeyError(f"unknown ControlNet model {name!r}; this server offers: {offered}")

    def load(self, name: str, pipe) -> Any:
        """The ControlNet `name` loaded for `pipe`'s UNet (its dtype and device), from cache if it was
        used recently; a ControlNet of another family raises CheckpointError."""
        from sdtorch.formats import controlnet

        entry = self.find(name)
        key = (entry.path, entry.hash, pipe.config.unet, pipe.dtype, str(pipe.device))
        with self._lock:
            if key not in self._loaded:
                model = controlnet.load(entry.path, pipe.config.unet, dtype=pipe.dtype, device=pipe.device)
                model.title = entry.title
                self._loaded[key] = model
                while len(self._loaded) > self.keep:
                    self._loaded.popitem(last=False)
            self._loaded.move_to_end(key)
            return self._loaded[key]


def script_args(scripts: dict) -> list | None:
    """The units list of a request's alwayson_scripts (None: no ControlNet entry); other
    always-on scripts are refused by name."""
    found = None
    for name, value in scripts.items():
        if name.lower() != SCRIPT:
            raise RequestError("alwayson_scripts", f"alwayson_scripts: no always-on script named {name!r} "
                                                   f"(this server has: {SCRIPT})")
        args = value.get("args", []) if isinstance(value, dict) else None
        if not isinstance(args, list):
            raise RequestError("alwayson_scripts", 'alwayson_scripts: controlnet takes {"args": [unit, ...]}')
        found = args
    return found


@dataclass
class Units:
    units: list  # ControlUnits
    maps: list[Image.Image]  # the preprocessed maps to append to the images


def _validated(raw, field: str) -> UnitArgs:
    if not isinstance(raw, dict):
        raise RequestError(field, f"{field}: a unit is an object of the extension's fields")
    try:
        return UnitArgs.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise RequestError(field, f"{field}.{where}: {err['msg']}") from None


def detect(fields: dict, image: Image.Image) -> Image.Image:
    """/controlnet/detect: a module applied to one image at its own size."""
    unit = _validated(fields, "controlnet")
    return _preprocess(unit, image, image.width, image.height, "crop", "controlnet")


def units(args: list, width: int, height: int, resolve: Callable[[str], Any], *, init_image: Image.Image | None = None,
          init_mask: Image.Image | None = None, hires: bool = False) -> Units:
    """The request's enabled units as `ControlUnit`s; `resolve(model name)` gives the loaded
    ControlNet (or, when only checking a request, raises KeyError for an unknown name);
    `init_image` / `init_mask`: an img2img request's (inpainting) image and mask."""
    from sdtorch.adapters.control import ControlUnit

    out = Units([], [])
    for i, raw in enumerate(args):
        field = f"alwayson_scripts.controlnet.args[{i}]"
        unit = _validated(raw, field)
        if not unit.enabled:
            continue
        image = _unit_image(unit, field, init_image)
        mask = _unit_mask(unit, field, init_mask)
        if hires and unit.hr_option != "Both":
            raise RequestError(field, f"{field}.hr_option: only 'Both' (control in both passes) is supported")
        mode = _choice(CONTROL, 2 if unit.guessmode else unit.control_mode, f"{field}.control_mode")
        resize = _choice(RESIZE, unit.resize_mode, f"{field}.resize_mode")
        detected = _preprocess(unit, image, width, height, resize, field)
        if unit.model in ("", "None"):
            raise RequestError(field, f"{field}.model: name a ControlNet from /controlnet/model_list")
        try:
            model = resolve(unit.model)
        except KeyError as e:
            raise RequestError(field, f"{field}.model: {e.args[0]}") from None
        out.units.append(ControlUnit(model, detected, unit.weight, unit.guidance_start, unit.guidance_end, mode,
                                     resize, module=unit.module, mask=mask))
        if unit.save_detected_map and unit.module != "none":
            out.maps.append(detected if mask is None else _masked_view(detected, mask))
    return out


def _unit_mask(unit: UnitArgs, field: str, init_mask: Image.Image | None) -> Image.Image | None:
    """The unit's mask (its own, or an inpainting request's for the inpaint modules); None for others."""
    data = unit.mask or (unit.image.get("mask") if isinstance(unit.image, dict) else None)
    if unit.module not in INPAINT:
        if data:
            raise RequestError(field, f"{field}.mask: masks are for the inpaint modules ({', '.join(INPAINT)}), "
                                      f"not {unit.module!r}")
        return None
    if unit.module == "inpaint_only" and init_mask is None:
        raise RequestError(field, f"{field}.module: inpaint_only keeps the unmasked pixels, which needs an img2img "
                                  "inpainting request (init_images and mask); in txt2img use 'inpaint'")
    if data:
        return imgs.decode_image(data, f"{field}.mask").convert("L")
    if init_mask is None:
        raise RequestError(field, f"{field}.mask: the {unit.module} module needs a mask (white = to repaint)")
    return init_mask.convert("L")


def _masked_view(image: Image.Image, mask: Image.Image) -> Image.Image:
    """The detected map of an inpaint unit as a picture: the masked part black."""
    view = image.convert("RGB").copy()
    view.paste((0, 0, 0), mask=mask.resize(view.size).point(lambda v: 255 if v > 127 else 0))
    return view


def _unit_image(unit: UnitArgs, field: str, init_image: Image.Image | None) -> Image.Image:
    data = unit.image.get("image") if isinstance(unit.image, dict) else (unit.image or unit.input_image)
    if not data:
        if init_image is not None:  # img2img: the extension controls with the init image
            return init_image
        raise RequestError(field, f"{field}.image: a txt2img ControlNet unit needs an image")
    return imgs.decode_image(data, f"{field}.image")


def _choice(table: dict, value, field: str) -> str:
    if value not in table:
        raise RequestError(field, f"{field}: must be one of {', '.join(repr(k) for k in table)}, got {value!r}")
    return table[value]


def _preprocess(unit: UnitArgs, image: Image.Image, width: int, height: int, resize: str, field: str) -> Image.Image:
    """The module applied at processor_res (the image's shorter side scaled to it first, as the
    extension does; pixel_perfect: the resolution the image has once resized to the output)."""
    if unit.module not in PREPROCESSORS:
        raise RequestError(field, f"{field}.module: unknown module {unit.module!r}; this server has "
                                  f"{', '.join(PREPROCESSORS)} (modules that need downloaded weights are not available)")
    image = image.convert("RGB")
    if unit.module in ("none", "tile_resample", *INPAINT):
        return preprocess(unit.module, image, *_thresholds(unit))
    res = unit.processor_res if unit.processor_res > 0 else RES[1]
    if unit.pixel_perfect:
        k = (min if resize == "fill" else max)(width / image.width, height / image.height)
        res = round(min(image.width, image.height) * k)
    if not 64 <= res <= 4096:
        raise RequestError(field, f"{field}.processor_res: must be in 64..4096, got {res}")
    scale = res / min(image.size)
    if scale != 1:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.LANCZOS)
    try:
        return preprocess(unit.module, image, *_thresholds(unit))
    except ValueError as e:
        raise RequestError(field, f"{field}: {e}") from None


def _thresholds(unit: UnitArgs) -> tuple[float | None, float | None]:
    """threshold_a / threshold_b, -1 (the API's "unset") as None: the module's own default."""
    return (None if unit.threshold_a == -1 else unit.threshold_a, None if unit.threshold_b == -1 else unit.threshold_b)


def module_detail(name: str) -> dict:
    sliders = [{"name": label, "value": value, "min": lo, "max": hi} for label, value, lo, hi in SLIDERS.get(name, ())]
    return {"model_free": False, "sliders": sliders}  # model-free: works without a ControlNet (none here)
