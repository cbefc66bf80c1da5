"""Image-conditioned UNets: what each kind (`sdtorch.families.CONCAT`) takes beside its latents
(`Condition.concat`), made from the request's images, in the reference's order of random draws.

- inpainting (9 channels): the mask and the masked image's latents (diffusers'
  StableDiffusionInpaintPipeline); ordinary UNets inpaint by blending the known region instead.
- instruct-pix2pix (8; Brooks et al. 2023): the source image's latents (the posterior's mean,
  unscaled), with guidance on text and image: x0 = x0(∅, ∅) + s_img (x0(∅, I) - x0(∅, ∅))
  + s_txt (x0(T, I) - x0(∅, I)) (diffusers' StableDiffusionInstructPix2PixPipeline, A1111's
  image CFG scale).
- depth (5; SD 2 depth-to-image): a depth map at latent size, scaled to [-1, 1] (diffusers'
  StableDiffusionDepth2ImgPipeline with a given depth_map). Depth estimators need downloaded
  weights, which this package does not have: the depth map is the caller's.
- layout (7, no class labels; sdtorch's semantic synthesis): a colour-segment map at latent size
  (`sdtorch.conditioning.layout`), made from any picture of coloured regions; txt2img otherwise.
- x4-upscaler (7; the SD x4 upscaler): the low-resolution image itself at latent size, noised to
  `noise_level` on its own DDPM schedule, that level also given to the UNet as a class label;
  its VAE decodes 4x larger (diffusers' StableDiffusionUpscalePipeline).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sdtorch.config import ScheduleConfig
from sdtorch.families import concat_kind
from sdtorch.generate.images import img2img_start
from sdtorch.generate.params import GenerationParams, validate
from sdtorch.models.condition import Condition
from sdtorch.sampling.denoisers import MaskBlend, ScheduledCFG
from sdtorch.sampling.schedule import alphas_cumprod


@torch.no_grad()
def inpaint_latents(pipe, image: torch.Tensor, mask: torch.Tensor, params: GenerationParams, strength: float = 1.0,
                    callback: Callable | None = None, progress: bool = True) -> torch.Tensor:
    """Repaint where mask == 1. image: (1, 3, H, W) in [-1, 1]; mask: (1, 1, H, W) in {0, 1}."""
    validate(params, pipe.vae.downscale)
    start = img2img_start(params.steps, strength)
    generator = torch.Generator("cpu").manual_seed(params.seed)
    small = F.interpolate(mask, size=pipe.latent_shape(params)[-2:]).to(pipe.device)  # nearest
    if concat_kind(pipe.config) == "inpainting":  # the UNet takes mask + masked image
        init = pipe.encode_image(image, generator, params.batch_size) if strength < 1 else None
        source, noise = pipe._noise(params, pipe.latent_shape(params), generator)
        masked = pipe.encode_image(image * (mask < 0.5), generator, params.batch_size)
        concat = torch.cat([small.repeat(params.batch_size, 1, 1, 1), masked], dim=1)  # (B, 5, h, w)
        return pipe._sample(params, source, noise, callback, progress, init=init, start=start, concat=concat)
    known = pipe.encode_image(image, generator, params.batch_size)
    source, noise = pipe._noise(params, known.shape, generator)
    init = known if strength < 1 else None
    x = pipe._sample(params, source, noise, callback, progress, init=init, start=start,
                     wrap=lambda model: MaskBlend(model, known, small))
    return small * x + (1 - small) * known  # exact outside the mask (in latent space)


class ImageCFG(nn.Module):
    """instruct-pix2pix's guidance around a guided denoiser: one batch of three (text and image,
    image alone, neither), each through `model` unguided (uncond=None). `image_scale` < 1 or a
    text scale <= 1: one unguided pass with the image, as diffusers does."""

    def __init__(self, model: nn.Module, scale: float, image_scale: float):
        super().__init__()
        if isinstance(model, ScheduledCFG):
            raise ValueError("prompt editing, alternation and AND are not supported with instruct-pix2pix models")
        self.model, self.scale, self.image_scale = model, scale, image_scale

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Condition, uncond: Condition | None = None):
        if self.scale <= 1 or self.image_scale < 1 or uncond is None:
            return self.model(x, sigma, cond)
        neither = Condition(uncond.crossattn, uncond.vector, torch.zeros_like(uncond.concat))
        x0_text, x0_image, x0_none = self.model(torch.cat([x] * 3), torch.cat([sigma] * 3),
                                                cond.cat(uncond).cat(neither)).chunk(3)
        return x0_none + self.image_scale * (x0_image - x0_none) + self.scale * (x0_text - x0_image)


def _start(pipe, image: torch.Tensor, params: GenerationParams, strength: float, generator: torch.Generator):
    """(init latents or None, grid start, noise source, noise): strength 1 starts from pure noise
    (diffusers' pix2pix); below 1 from the image's noised latents (A1111's img2img with it)."""
    if strength >= 1:
        source, noise = pipe._noise(params, pipe.latent_shape(params), generator)
        return None, 0, source, noise
    init = pipe.encode_image(image, generator, params.batch_size)
    source, noise = pipe._noise(params, init.shape, generator)
    return init, img2img_start(params.steps, strength), source, noise


@torch.no_grad()
def edit_latents(pipe, image: torch.Tensor, params: GenerationParams, strength: float = 1.0,
                 image_cfg_scale: float = 1.5, callback: Callable | None = None, progress: bool = True) -> torch.Tensor:
    """instruct-pix2pix: edit `image` ((1, 3, H, W) in [-1, 1]) as the prompt says."""
    validate(params, pipe.vae.downscale)
    generator = torch.Generator("cpu").manual_seed(params.seed)
    source_latents = pipe.vae.encode(image.to(pipe.device)).mean.repeat(params.batch_size, 1, 1, 1)
    init, start, source, noise = _start(pipe, image, params, strength, generator)
    return pipe._sample(params, source, noise, callback, progress, init=init, start=start, concat=source_latents,
                        wrap=lambda model: ImageCFG(model, params.cfg_scale, image_cfg_scale))


def depth_condition(depth: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A depth map (1 or B, H, W), any range (larger = nearer, as MiDaS gives it) -> (1 or B, 1, h, w)
    at latent size in [-1, 1] (bicubic, then each map's min and max to -1 and 1)."""
    d = F.interpolate(depth.float()[:, None], size=size, mode="bicubic", align_corners=False)
    lo, hi = d.amin(dim=(1, 2, 3), keepdim=True), d.amax(dim=(1, 2, 3), keepdim=True)
    return 2.0 * (d - lo) / (hi - lo).clamp_min(1e-12) - 1.0


@torch.no_grad()
def depth_latents(pipe, image: torch.Tensor, depth: torch.Tensor, params: GenerationParams, strength: float = 0.8,
                  callback: Callable | None = None, progress: bool = True) -> torch.Tensor:
    """Depth-to-image: img2img of `image` ((1, 3, H, W) in [-1, 1]) that keeps the shapes of
    `depth` ((1, H', W'))."""
    validate(params, pipe.vae.downscale)
    generator = torch.Generator("cpu").manual_seed(params.seed)
    init = pipe.encode_image(image, generator, params.batch_size)
    source, noise = pipe._noise(params, init.shape, generator)
    d = depth_condition(depth.to(pipe.device), init.shape[-2:])
    concat = d.repeat(params.batch_size // d.shape[0], 1, 1, 1)
    return pipe._sample(params, source, noise, callback, progress, init=init,
                        start=img2img_start(params.steps, strength), concat=concat)


# The x4 upscaler's noise augmentation of its input (its `low_res_scheduler`; levels above 350 untrained).
LOW_RES_SCHEDULE = ScheduleConfig(beta_start=0.0001, beta_end=0.02)
MAX_NOISE_LEVEL = 350


class WithLabels(nn.Module):
    """The class labels of every UNet call (the x4 upscaler's noise level) as the conditions' vector."""

    def __init__(self, model: nn.Module, labels: torch.Tensor):
        super().__init__()
        if isinstance(model, ScheduledCFG):
            raise ValueError("prompt editing, alternation and AND are not supported with the x4 upscaler")
        self.model, self.labels = model, labels

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Condition, uncond: Condition | None = None):
        labels = self.labels.to(x.device)
        return self.model(x, sigma, replace(cond, vector=labels),
                          None if uncond is None else replace(uncond, vector=labels))


@torch.no_grad()
def upscale_latents(pipe, image: torch.Tensor, params: GenerationParams, noise_level: int = 20,
                    callback: Callable | None = None, progress: bool = True) -> torch.Tensor:
    """The x4 upscaler: `image` (1, 3, h, w) in [-1, 1] -> latents (B, 4, h, w) that decode to
    (B, 3, f h, f w); `params` has the output size."""
    validate(params, pipe.vae.downscale)
    generator = torch.Generator("cpu").manual_seed(params.seed)
    a = alphas_cumprod(LOW_RES_SCHEDULE)[noise_level]
    low = a.sqrt() * image + (1 - a).sqrt() * torch.randn(image.shape, generator=generator)  # drawn first
    source, noise = pipe._noise(params, pipe.latent_shape(params), generator)
    labels = torch.full((params.batch_size,), noise_level, dtype=torch.long)
    concat = low.to(pipe.device).repeat(params.batch_size, 1, 1, 1)
    return pipe._sample(params, source, noise, callback, progress, concat=concat,
                        wrap=lambda model: WithLabels(model, labels))


def layout_tensor(layout) -> torch.Tensor:
    """A layout picture (transparent parts white, as the emoji were drawn) or a (1, 3, H, W) tensor in
    [-1, 1] -> (1, 3, H, W) in [-1, 1]."""
    if isinstance(layout, torch.Tensor):
        return layout.float()
    from PIL import Image

    from sdtorch.generate.images import image_tensor

    if layout.mode in ("RGBA", "LA", "P"):
        layout = Image.alpha_composite(Image.new("RGBA", layout.size, "white"), layout.convert("RGBA"))
    return image_tensor(layout.convert("RGB"))


@torch.no_grad()
def layout_latents(pipe, layout, params: GenerationParams, callback: Callable | None = None,
                   progress: bool = True) -> torch.Tensor:
    """A layout model's txt2img: its colour-segment map (from `layout`, any size) beside the latents."""
    from sdtorch.conditioning.layout import colour_layout

    validate(params, pipe.vae.downscale)
    source, noise = pipe._noise(params, pipe.latent_shape(params))
    grid = colour_layout(layout_tensor(layout), tuple(pipe.latent_shape(params)[-2:]))
    concat = grid.to(pipe.device).repeat(params.batch_size, 1, 1, 1)
    return pipe._sample(params, source, noise, callback, progress, concat=concat)


def depth_tensor(depth) -> torch.Tensor:
    """A depth map given as a PIL image (any mode: "L", "I", "F") or an (H, W) / (1, H, W) tensor -> (1, H, W)."""
    if isinstance(depth, torch.Tensor):
        return depth.float() if depth.dim() == 3 else depth.float()[None]
    import numpy as np

    image = depth.convert("F") if depth.mode not in ("F", "I") else depth
    return torch.from_numpy(np.asarray(image, dtype=np.float32).copy())[None]


WHAT = {"instruct-pix2pix": "edits an image", "depth": "transforms an image along a depth map",
        "x4-upscaler": "upscales an image"}


def check_inputs(cfg, request) -> None:
    """Refuse a request without the images its model's kind needs (or with ones it cannot use)."""
    from sdtorch.generate.request import RequestError

    kind = concat_kind(cfg)
    if kind in WHAT and request.init_image is None:
        raise RequestError("init_image", f"this {kind} model {WHAT[kind]}: give an init image")
    if kind in WHAT and request.mask is not None:
        raise RequestError("mask", f"a {kind} model does not inpaint (no mask)")
    if kind == "depth" and request.depth_map is None:
        raise RequestError("depth_map", "this depth-to-image model needs a depth map (depth_map, --depth MAP.png): "
                                        "no depth estimator weights are available here to make one from the image")
    if kind == "layout" and (request.layout is None or request.init_image is not None):
        raise RequestError("layout", "this layout model generates from a colour layout: give a layout (--layout "
                                     "MAP.png) and no init image")
    if kind != "layout" and request.layout is not None:
        raise RequestError("layout", f"a layout is for layout models (sdtorch's semantic synthesis); this model is "
                                     f"{kind or 'a plain text-to-image model'}")
    if kind != "depth" and request.depth_map is not None:
        raise RequestError("depth_map", "a depth map is for depth-to-image models (5-channel UNets); this model "
                                        f"is {kind or 'a plain text-to-image model'}")
