"""A generation request: every parameter of one run, as data.

`GenerationRequest` is frozen: vary it with `dataclasses.replace`. `validate()` raises one
`RequestError` naming the first bad field, so a CLI, a server or a notebook can say exactly what
is wrong before any work starts. txt2img, img2img and inpainting are one request type: an
`init_image` makes it img2img, a `mask` with it makes it inpainting.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from PIL import Image

from sdtorch.sampling import samplers
from sdtorch.sampling.schedulers import SCHEDULERS

PromptSyntax = Literal["a1111", "plain"]


class RequestError(ValueError):
    """A bad request field; `field` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class RequestTypeError(RequestError, TypeError):
    """A request field of the wrong type (also a TypeError, as Python would raise)."""


class Cancelled(Exception):
    """Raised by `Pipeline.run` at the first step after its `CancelToken` was cancelled."""


class CancelToken:
    """Thread-safe flag: `cancel()` from anywhere and the run stops at its next step with
    `Cancelled`; `interrupt()` stops it there too but returns the images of the current denoised
    estimate (AUTOMATIC1111's Interrupt / Skip)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.keep = False  # set by interrupt(): decode what there is instead of raising

    def cancel(self) -> None:
        self._event.set()

    def interrupt(self) -> None:
        self.keep = True
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


@dataclass(frozen=True)
class GenerationRequest:
    """Everything that determines the images of one run."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    sampler: str = "dpmpp_2m"  # sdtorch.sampling.samplers.NAMES (combined "_karras" names too)
    scheduler: str = "karras"  # sdtorch.sampling.schedulers.SCHEDULERS
    cfg_scale: float = 7.5  # <= 1: one unguided pass
    seed: int = -1  # -1: random, resolved by `resolved()`
    width: int | None = None  # None: the model's native size (or the init image's)
    height: int | None = None
    batch_size: int = 1
    eta: float = 0.0  # DDIM only
    clip_skip: int | None = None  # None: the model's (SD1: 1, SD2: 2)
    prompt_syntax: PromptSyntax = "a1111"
    loras: tuple[tuple[str, float], ...] = ()  # (path or name in the pipeline's LoRA folder, strength)
    init_image: Image.Image | None = None  # img2img / inpainting source
    mask: Image.Image | None = None  # white = repaint (with init_image)
    strength: float = 0.75  # denoising strength of img2img (inpainting: 1.0 repaints fully)
    deep_cache: int = 0  # DeepCache interval (0 or 1: off)
    deep_cache_branch: int = 0
    tile_vae: bool | None = None  # None: tiles above 1024x1024
    attention_chunk: int = 0
    # ToMe (`sdtorch.adapters.tome`): the share of tokens merged before self-attention (A1111's setting
    # name), and (max_downsample, sx, sy); 0: off
    token_merging_ratio: float = 0.0
    tome_options: tuple[int, int, int] = (1, 2, 2)
    timestep_spacing: str | None = None  # "leading", "linspace", "trailing" (turbo models); None: the model's
    decoder: str = "vae"  # "tiny": the pipeline's TAESD-style tiny decoder (`load_tiny_decoder`), fast and approximate
    seed_mode: str = "diffusers"  # "a1111": image i from its own seed, seed + i (sdtorch.sampling.noise)
    subseed: int = -1  # variation seed (-1: random, resolved by `resolved()`)
    subseed_strength: float = 0.0  # 0: the seed's noise, 1: the subseed's
    seed_resize_from: tuple[int, int] = (0, 0)  # (w, h) > 0: the seed's noise drawn at that size (a1111 mode)
    tiling: bool = False  # seamless: circular padding in the UNet and VAE convolutions
    hires: Any = None  # a `sdtorch.generate.hires.HiresFix`: txt2img, upscale, img2img (A1111's hires fix)
    condition: torch.Tensor | None = None  # input of the pipeline's condition encoder (one, or (1 or B, ...))
    # SDXL micro-conditioning (`sdtorch.conditioning.micro.Micro`); None: the image's size, no crop,
    # aesthetic score 6 (refiner), the negative side the same with aesthetic score 2.5.
    micro: Any = None
    negative_micro: Any = None
    # Two models in turn (SDXL base -> refiner). diffusers' way: `denoising_end` stops this run there
    # and returns the noisy latents (`RunResult.latents`); another run continues them from
    # `init_latents` with `denoising_start` (the same fraction). A1111's way: `refiner` (a loaded
    # `Pipeline`) takes over at `refiner_switch_at` of the steps within this run.
    denoising_end: float | None = None
    denoising_start: float | None = None
    init_latents: torch.Tensor | None = None
    refiner: Any = None
    refiner_switch_at: float = 0.8
    # ControlNets (`sdtorch.adapters.control.ControlUnit`s), each with its image, weight, window, mode
    controls: tuple = ()
    # Image-conditioned models (`sdtorch.generate.concat`): instruct-pix2pix's image guidance scale
    # (A1111's image_cfg_scale), and a depth-to-image model's depth map (a PIL image or a (1, H, W)
    # tensor, larger = nearer; no estimator can make one here).
    image_cfg_scale: float = 1.5
    depth_map: Any = None
    noise_level: int = 20  # the x4 upscaler's noise on its input (0..350)
    layout: Any = None  # a layout model's colour map: a PIL image of coloured regions, or (1, 3, H, W) in [-1, 1]

    @property
    def kind(self) -> str:
        if self.init_image is None:
            return "txt2img"
        return "inpaint" if self.mask is not None else "img2img"

    def resolved(self) -> GenerationRequest:
        """The same request with a concrete seed (and subseed)."""
        r = self if self.seed >= 0 else replace(self, seed=random.randrange(2**32))
        return r if r.subseed >= 0 else replace(r, subseed=random.randrange(2**32))

    def validate(self, downscale: int = 8) -> GenerationRequest:
        """Raise `RequestError` for the first bad field; returns self."""
        for name in ("prompt", "negative_prompt"):
            if not isinstance(getattr(self, name), str):
                raise RequestTypeError(name, f"{name} must be a string, got {type(getattr(self, name)).__name__}")
        _check_int(self, "steps", 1)
        _check_int(self, "batch_size", 1)
        _check_int(self, "seed", -1)
        for name in ("width", "height"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v <= 0 or v % 8 or v % downscale):
                raise RequestError(name, f"{name} must be a positive multiple of 8, got {v}")
        try:
            base, _ = samplers.resolve(self.sampler, self.scheduler if self.scheduler in SCHEDULERS else "automatic")
        except ValueError as e:
            raise RequestError("sampler", str(e)) from None
        if self.scheduler not in SCHEDULERS:
            raise RequestError("scheduler", f"unknown scheduler {self.scheduler!r}; choose from {', '.join(SCHEDULERS)}")
        if not 0 <= self.token_merging_ratio < 1 or min(self.tome_options) < 1:
            raise RequestError("token_merging_ratio", f"token merging ratio must be in [0, 1) and max_downsample, "
                               f"sx, sy >= 1, got {self.token_merging_ratio}, {self.tome_options}")
        if self.decoder not in ("vae", "tiny"):
            raise RequestError("decoder", f"decoder must be 'vae' or 'tiny', got {self.decoder!r}")
        if self.timestep_spacing not in (None, "leading", "linspace", "trailing"):
            raise RequestError("timestep_spacing", f"timestep spacing must be leading, linspace or trailing, "
                               f"got {self.timestep_spacing!r}")
        if self.eta and not samplers.SAMPLERS[base].eta:
            raise RequestError("eta", f"sampler {self.sampler!r} takes no eta (got eta={self.eta}); only 'ddim' does")
        _check_number(self, "cfg_scale")
        if self.clip_skip is not None and (not _is_int(self.clip_skip) or self.clip_skip < 1):
            raise RequestError("clip_skip", f"clip_skip must be a positive integer, got {self.clip_skip!r}")
        if self.prompt_syntax not in ("a1111", "plain"):
            raise RequestError("prompt_syntax", f"prompt syntax must be 'a1111' or 'plain', got {self.prompt_syntax!r}")
        if not isinstance(self.strength, (int, float)) or not 0 <= self.strength <= 1:
            raise RequestError("strength", f"strength must be in [0, 1], got {self.strength!r}")
        self._validate_images()
        if self.condition is not None and not isinstance(self.condition, torch.Tensor):
            raise RequestTypeError("condition", f"condition must be a tensor, got {type(self.condition).__name__}")
        self._validate_adapters()
        self._validate_controls()
        self._validate_seeds()
        self._validate_handoff()
        if self.hires is not None:
            if self.init_image is not None:
                raise RequestError("hires", "hires fix is for txt2img (no init_image)")
            self.hires.validate()
        return self

    def _validate_handoff(self) -> None:
        for name in ("denoising_end", "denoising_start", "refiner_switch_at"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v < 1):
                raise RequestError(name, f"{name} must be a fraction in (0, 1), got {v!r}")
        if (self.init_latents is None) != (self.denoising_start is None):
            raise RequestError("init_latents", "init_latents and denoising_start go together (another run's "
                                               "latents stopped at denoising_end)")
        if self.init_latents is not None and not isinstance(self.init_latents, torch.Tensor):
            raise RequestTypeError("init_latents", f"init_latents must be a tensor, got {type(self.init_latents).__name__}")
        if self.init_latents is not None and self.init_image is not None:
            raise RequestError("init_latents", "give init_latents or init_image, not both")
        if self.refiner is not None and (self.init_image is not None or self.denoising_end is not None
                                         or self.init_latents is not None):
            raise RequestError("refiner", "a refiner takes over a txt2img run (no init image, no hand-off fractions)")

    def _validate_controls(self) -> None:
        from sdtorch.adapters.control import ControlUnit

        for unit in self.controls:
            if not isinstance(unit, ControlUnit):
                raise RequestTypeError("controls", f"controls must be ControlUnits, got {type(unit).__name__}")
            try:
                unit.validate()
            except ValueError as e:
                raise RequestError("controls", str(e)) from None

    def _validate_seeds(self) -> None:
        from sdtorch.sampling.noise import SEED_MODES

        if self.seed_mode not in SEED_MODES:
            raise RequestError("seed_mode", f"seed mode must be one of {', '.join(SEED_MODES)}, got {self.seed_mode!r}")
        _check_int(self, "subseed", -1)
        if not isinstance(self.subseed_strength, (int, float)) or not 0 <= self.subseed_strength <= 1:
            raise RequestError("subseed_strength", f"subseed strength must be in [0, 1], got {self.subseed_strength!r}")
        w, h = self.seed_resize_from
        if (w > 0 and h > 0) and self.seed_mode != "a1111":
            raise RequestError("seed_resize_from", "seed_resize_from needs seed_mode 'a1111'")

    def _validate_images(self) -> None:
        for name in ("init_image", "mask"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, (Image.Image, torch.Tensor)):
                raise RequestError(name, f"{name} must be a PIL image (or a (1, C, H, W) tensor), got {type(v).__name__}")
        if self.mask is not None and self.init_image is None:
            raise RequestError("mask", "a mask needs an init_image to inpaint")
        if self.mask is not None and _size(self.mask) != _size(self.init_image):
            (mw, mh), (w, h) = _size(self.mask), _size(self.init_image)
            raise RequestError("mask", f"mask is {mw}x{mh} but the image is {w}x{h}")
        _check_number(self, "image_cfg_scale")
        if not _is_int(self.noise_level) or not 0 <= self.noise_level <= 350:
            raise RequestError("noise_level", f"noise_level must be an integer in 0..350, got {self.noise_level!r}")
        d = self.depth_map
        if d is not None and not (isinstance(d, Image.Image) or (isinstance(d, torch.Tensor) and d.dim() in (2, 3))):
            raise RequestTypeError("depth_map", f"depth_map must be a PIL image or a (1, H, W) tensor, got "
                                                f"{type(d).__name__}{tuple(d.shape) if isinstance(d, torch.Tensor) else ''}")
        if self.layout is not None and not isinstance(self.layout, (Image.Image, torch.Tensor)):
            raise RequestTypeError("layout", f"layout must be a PIL image or a (1, 3, H, W) tensor, got "
                                             f"{type(self.layout).__name__}")
        if d is not None and self.init_image is None:
            raise RequestError("depth_map", "a depth map goes with the init_image it describes (depth-to-image)")

    def _validate_adapters(self) -> None:
        for item in self.loras:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                    and isinstance(item[1], (int, float))):
                raise RequestError("loras", f"loras must be (name, strength) pairs, got {item!r}")
        if not _is_int(self.deep_cache) or self.deep_cache < 0:
            raise RequestError("deep_cache", f"deep_cache must be >= 0, got {self.deep_cache!r}")
        if not _is_int(self.deep_cache_branch) or self.deep_cache_branch < 0:
            raise RequestError("deep_cache_branch", f"deep_cache_branch must be >= 0, got {self.deep_cache_branch!r}")
        if not _is_int(self.attention_chunk) or self.attention_chunk < 0:
            raise RequestError("attention_chunk", f"attention chunk must be >= 0 (0 = off), got {self.attention_chunk!r}")


def _size(image) -> tuple[int, int]:
    return image.size if isinstance(image, Image.Image) else (image.shape[-1], image.shape[-2])


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_int(r: GenerationRequest, name: str, low: int) -> None:
    v = getattr(r, name)
    if not _is_int(v) or v < low:
        what = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise RequestError(name, f"{name.replace('_', ' ')} must be {what}, got {v}")


def _check_number(r: GenerationRequest, name: str) -> None:
    v = getattr(r, name)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v != v:
        raise RequestError(name, f"{name} must be a number, got {v!r}")
