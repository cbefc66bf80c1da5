"""Hires fix (A1111's enable_hr): a first pass at the request's size, the result upscaled (in
latent space, or as pixels), and a second img2img pass at the large size.

- Upscalers: "Latent" (bilinear), "Latent (antialiased)", "Latent (bicubic)", "Latent (nearest)",
  "Latent (nearest-exact)" resize the first pass's latents; "Lanczos", "Nearest" resize its
  images, and "None" resizes them with Lanczos as A1111 does. A loaded x4 upscaler (`model`, named
  by `upscaler`) makes each image 4x larger with the (hires) prompt, then Lanczos fits the target.
- Size: width x height times `scale`, or `resize` (w, h): one side 0 keeps the aspect ratio, both
  set scales to cover and crops the middle (A1111's hr_resize_x / hr_resize_y).
- The second pass is img2img with the same seed, prompt (or `prompt`), sampler (or `sampler`),
  `steps` (0: the first pass's) and denoising `strength`. Pixel upscalers run it as an ordinary
  img2img request per image; latent ones denoise the upscaled latents directly.
The PNG's infotext is A1111's: the first pass's size plus Hires upscale / resize, Hires steps,
Hires upscaler and Denoising strength.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

LATENT = {"Latent": ("bilinear", False), "Latent (antialiased)": ("bilinear", True),
          "Latent (bicubic)": ("bicubic", False), "Latent (bicubic antialiased)": ("bicubic", True),
          "Latent (nearest)": ("nearest", False), "Latent (nearest-exact)": ("nearest-exact", False)}
PIXEL = {"None": Image.LANCZOS, "Lanczos": Image.LANCZOS, "Nearest": Image.NEAREST}
UPSCALERS = (*LATENT, *PIXEL)


@dataclass(frozen=True)
class HiresFix:
    scale: float = 2.0
    resize: tuple[int, int] = (0, 0)  # (w, h); 0 = from the other side's ratio; both 0: `scale`
    upscaler: str = "Latent"
    steps: int = 0  # second-pass steps; 0: the first pass's
    strength: float = 0.7  # the second pass's denoising strength
    prompt: str = ""  # "": the first pass's
    negative_prompt: str = ""
    sampler: str = ""  # "": the first pass's
    scheduler: str = ""
    model: Any = None  # a loaded x4 upscaler `Pipeline` (its name in `upscaler`), or None
    model_steps: int = 20  # the upscaler's sampler steps

    def validate(self) -> None:
        from sdtorch.generate.request import RequestError

        if self.upscaler not in UPSCALERS and self.model is None:
            raise RequestError("hr_upscaler", f"unknown hires upscaler {self.upscaler!r}; choose from {', '.join(UPSCALERS)}")
        if not 0 <= self.strength <= 1:
            raise RequestError("denoising_strength", f"hires denoising strength must be in [0, 1], got {self.strength}")
        if self.steps < 0 or not (self.scale > 0 or any(self.resize)):
            raise RequestError("hr_scale", f"hires scale must be > 0 and steps >= 0, got {self.scale}, {self.steps}")

    def target(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(cover width, cover height, final width, final height), multiples of 8."""
        rx, ry = self.resize
        if not rx and not ry:
            w, h = _eight(width * self.scale), _eight(height * self.scale)
            return w, h, w, h
        if not ry:
            ry = rx * height / width
        if not rx:
            rx = ry * width / height
        fw, fh = _eight(rx), _eight(ry)
        cover = max(fw / width, fh / height)
        return max(_eight(width * cover), fw), max(_eight(height * cover), fh), fw, fh


def _eight(v: float) -> int:
    return max(8, int(v) // 8 * 8)


def upscale_latents(latents: torch.Tensor, fix: HiresFix, size: tuple[int, int, int, int], f: int) -> torch.Tensor:
    mode, antialias = LATENT[fix.upscaler]
    cw, ch, fw, fh = size
    x = F.interpolate(latents, size=(ch // f, cw // f), mode=mode, antialias=antialias,
                      **({"align_corners": False} if mode in ("bilinear", "bicubic") else {}))
    top, left = (ch - fh) // 2 // f, (cw - fw) // 2 // f
    return x[..., top : top + fh // f, left : left + fw // f]


def upscale_image(image: Image.Image, fix: HiresFix, size: tuple[int, int, int, int], second=None) -> Image.Image:
    """The first pass's image at the target size; `second`: the second pass's request (with this
    image's seed), whose prompt, negative prompt and CFG an upscaler model uses."""
    cw, ch, fw, fh = size
    if fix.model is not None:
        image = model_upscale(fix.model, image, second.prompt, second.negative_prompt, second.cfg_scale, second.seed,
                              fix.model_steps)
        return ImageOps.fit(image.resize((cw, ch), Image.LANCZOS), (fw, fh), Image.LANCZOS)
    return ImageOps.fit(image.convert("RGB").resize((cw, ch), PIXEL[fix.upscaler]), (fw, fh), PIXEL[fix.upscaler])


def model_upscale(model, image: Image.Image, prompt: str = "", negative_prompt: str = "", cfg_scale: float = 7.0,
                  seed: int = 0, steps: int = 20, cancel=None) -> Image.Image:
    """One pass of a loaded x4 upscaler `Pipeline` over `image` (Euler, its default noise level)."""
    from sdtorch.generate.request import GenerationRequest

    request = GenerationRequest(prompt, negative_prompt, steps=steps, sampler="euler", scheduler="automatic",
                                cfg_scale=cfg_scale, seed=seed, init_image=image.convert("RGB"))
    return model.run(request, cancel=cancel).images[0]


def infotext_fields(fix: HiresFix, width: int, height: int) -> dict:
    fields = {"Denoising strength": fix.strength}
    if any(fix.resize):
        _, _, w, h = fix.target(width, height)
        fields["Hires resize"] = f"{w}x{h}"
    else:
        fields["Hires upscale"] = fix.scale
    if fix.steps:
        fields["Hires steps"] = fix.steps
    fields["Hires upscaler"] = fix.upscaler
    return fields


def second_pass(request, fix: HiresFix):
    """The img2img request of the second pass (without its init image)."""
    return replace(request, hires=None, prompt=fix.prompt or request.prompt,
                   negative_prompt=fix.negative_prompt or request.negative_prompt,
                   sampler=fix.sampler or request.sampler, scheduler=fix.scheduler or request.scheduler,
                   steps=fix.steps or request.steps, strength=fix.strength)


def total_steps(request) -> int:
    """Sampler steps of a whole request, both hires passes included (for progress)."""
    from sdtorch.generate.images import img2img_start, sampled_steps

    first = sampled_steps(request)
    if request.hires is None:
        return first
    second = second_pass(request, request.hires)
    per_image = second.steps - img2img_start(second.steps, second.strength)
    return first + per_image * (1 if request.hires.upscaler in LATENT else request.batch_size)
