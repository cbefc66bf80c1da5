"""Live previews of the denoised estimate while a job runs.

The cheap preview is a linear map of each latent cell to one RGB colour, a 4x3 matrix plus a bias
(the "latent2rgb" trick of ComfyUI and AUTOMATIC1111's "Approx cheap"): microseconds per step
instead of a VAE decode. SD 1.x / 2.x latents have published coefficients; for every other
latent space (the built-in emoji model, whose VAE sdtorch trained) the map is fitted once by least
squares on pairs of latents and their VAE decodes, and cached per model.

Which map a model gets is decided by its config through `PUBLISHED` (one table), and a published
map is only trusted after a one-time check that it actually describes this VAE (a random-weight
file with the SD 1.5 architecture gets a fitted map instead).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sdtorch.config import ModelConfig, VAEConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LatentRGB:
    """rgb = latents · weight + bias, per latent cell; latents in the model's scaled latent space,
    rgb in [-1, 1] like the VAE's output."""

    weight: torch.Tensor  # (C, 3)
    bias: torch.Tensor  # (3,)
    source: str  # "published: ..." or "fitted"

    def apply(self, latents: torch.Tensor) -> torch.Tensor:
        """(C, h, w) -> (h, w, 3) in [-1, 1] (not clamped)."""
        x = latents.detach().to("cpu", torch.float32)
        return torch.einsum("chw,cr->hwr", x, self.weight) + self.bias


def vae_signature(vae: VAEConfig) -> tuple:
    """What identifies a latent space from the config alone: the VAE's architecture and scale."""
    return (vae.ch, tuple(vae.ch_mult), vae.num_res_blocks, vae.z_channels, round(vae.scaling_factor, 5))


# Published latent -> RGB coefficients, by VAE signature. SD 1.x and 2.x share one VAE
# (ch 128, ch_mult 1 2 4 4, 4 latent channels, scaling factor 0.18215). Rows are latent channels,
# columns R G B; applied to scaled latents, output in [-1, 1] (ComfyUI comfy/latent_formats.py,
# class SD15; SD 2.x uses the same class). Every signature not listed here gets a fitted map.
PUBLISHED: dict[tuple, tuple[str, tuple, tuple]] = {
    (128, (1, 2, 4, 4), 2, 4, 0.18215): (
        "SD 1.x/2.x (ComfyUI latent_formats.SD15)",
        ((0.3512, 0.2297, 0.3227),
         (0.3250, 0.4974, 0.2350),
         (-0.2829, 0.1762, 0.2721),
         (-0.2120, -0.2616, -0.7177)),
        (0.0, 0.0, 0.0),
    ),
}


def published_rgb(config: ModelConfig) -> LatentRGB | None:
    """The published map for this config's latent space, or None."""
    entry = PUBLISHED.get(vae_signature(config.vae))
    if entry is None:
        return None
    name, weight, bias = entry
    return LatentRGB(torch.tensor(weight), torch.tensor(bias), f"published: {name}")


# ---------------------------------------------------------------------------- fitting


def _colour_images(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """n images (n, 3, size, size) in [-1, 1]: flat colours, gradients and blobs in random colours,
    so that their latents lie where real images' latents do."""
    images = []
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    for i in range(n):
        a, b = torch.rand(2, 3, 1, 1, generator=generator) * 2 - 1
        kind = i % 3
        if kind == 0:  # two halves
            t = (xx > 0.5).float()
        elif kind == 1:  # diagonal gradient
            t = (xx + yy) / 2
        else:  # a disc
            cx, cy = torch.rand(2, generator=generator) * 0.6 + 0.2
            t = (((xx - cx) ** 2 + (yy - cy) ** 2) < 0.08).float()
        images.append(a * (1 - t) + b * t)
    return torch.stack(images).clamp(-1, 1)


def _pairs(vae, config: ModelConfig, samples: int, cells: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C) scaled latent cells and (N, 3) the decode's colour averaged over each cell."""
    f = 2 ** (len(config.vae.ch_mult) - 1)
    g = torch.Generator("cpu").manual_seed(seed)
    param = next(vae.parameters())
    images = _colour_images(samples, cells * f, g).to(param.device)
    with torch.no_grad():
        z = vae.encode(images).mean  # on-manifold latents (unscaled)
        # ... and as many smooth random ones, at the scaled latents' unit variance
        coarse = torch.randn(samples, config.vae.z_channels, 4, 4, generator=g)
        smooth = F.interpolate(coarse, size=(cells, cells), mode="bilinear", align_corners=False)
        z = torch.cat([z.float().cpu(), smooth / config.vae.scaling_factor])
        decoded = vae.decode(z.to(param.device)).float().cpu().clamp(-1, 1)
    target = F.avg_pool2d(decoded, f)  # (2·samples, 3, cells, cells)
    x = (z * config.vae.scaling_factor).permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    y = target.permute(0, 2, 3, 1).reshape(-1, 3)
    return x, y


def fit_latent_rgb(vae, config: ModelConfig, *, samples: int = 6, cells: int = 8, seed: int = 0) -> LatentRGB:
    """Fit rgb = latents · W + b by least squares on `samples` encoded colour images and as many
    smooth random latents (cells x cells latent cells each) decoded by `vae`."""
    x, y = _pairs(vae, config, samples, cells, seed)
    return _least_squares(x, y)


def _least_squares(x: torch.Tensor, y: torch.Tensor) -> LatentRGB:
    a = torch.cat([x, torch.ones(len(x), 1)], dim=1).double()
    solution = torch.linalg.lstsq(a, y.double()).solution.float()  # (C + 1, 3)
    return LatentRGB(solution[:-1].contiguous(), solution[-1].contiguous(), "fitted")


def _mse(rgb: LatentRGB, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(((x @ rgb.weight + rgb.bias).clamp(-1, 1) - y).pow(2).mean())


def choose_rgb(vae, config: ModelConfig, *, samples: int = 6, cells: int = 8) -> LatentRGB:
    """The published map where the table has one for this config and it describes this VAE (its
    error on a few decodes is at most twice a fitted map's), otherwise a map fitted to the VAE."""
    x, y = _pairs(vae, config, samples, cells, seed=0)
    fitted = _least_squares(x, y)
    published = published_rgb(config)
    if published is not None and _mse(published, x, y) <= 2 * _mse(fitted, x, y) + 1e-4:
        return published
    return fitted


_CACHE: dict[str, LatentRGB] = {}
_LOCK = threading.Lock()


def _model_key(pipe) -> str:
    digest = pipe.model_hash() if hasattr(pipe, "model_hash") else ""
    return f"{pipe.config.name}:{digest}" if digest else f"{pipe.config.name}:id{id(pipe.vae)}"


def latent_rgb_map(pipe) -> LatentRGB:
    """The cheap-preview map for a loaded pipeline, chosen (and fitted if needed) once per model."""
    key = _model_key(pipe)
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = choose_rgb(pipe.vae, pipe.config)
        return _CACHE[key]


# ---------------------------------------------------------------------------- previews


def _to_image(rgb: torch.Tensor) -> Image.Image:
    """(h, w, 3) in [-1, 1] -> PIL image."""
    arr = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    return Image.fromarray(np.ascontiguousarray(arr))


def latent_preview(latents: torch.Tensor, config: ModelConfig, rgb: LatentRGB | None = None, *,
                   scale: int = 1) -> Image.Image:
    """The cheap preview of the first image of a batch of denoised estimates (B, C, h, w) in the
    model's scaled latent space: one pixel per latent cell (times `scale`, bilinear).

    rgb: the map (`latent_rgb_map(pipe)`); None = the published one for this config, which exists
    only for SD 1.x/2.x latents (ValueError otherwise)."""
    if rgb is None:
        rgb = published_rgb(config)
        if rgb is None:
            raise ValueError(f"no published latent->RGB map for model {config.name!r}; "
                             "pass rgb=latent_rgb_map(pipe) (fitted from its VAE)")
    if latents.ndim != 4 or latents.shape[1] != rgb.weight.shape[0]:
        raise ValueError(f"latents must be (B, {rgb.weight.shape[0]}, h, w), got {tuple(latents.shape)}")
    image = _to_image(rgb.apply(latents[0]))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.BILINEAR)
    return image


def full_preview(pipe, latents: torch.Tensor) -> Image.Image:
    """The exact preview: the first image's denoised estimate decoded by the VAE (`pipe.decode`)."""
    image = pipe.decode(latents[:1])[0]  # (3, H, W) in [0, 1]
    arr = (image.permute(1, 2, 0).float().cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(arr)


def tiny_preview(decoder, latents: torch.Tensor) -> Image.Image:
    """The first image's denoised estimate through a TAESD-style tiny decoder."""
    with torch.no_grad():
        image = decoder.decode(latents[:1].to(next(decoder.parameters()).dtype))[0].float()
    return Image.fromarray((image.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8))


def _tiny_decoder(pipe):
    """The pipeline's tiny decoder, or the built-in model's own for it; None where there is none."""
    if pipe.tiny_decoder is not None:
        return pipe.tiny_decoder
    from sdtorch.generate.loading import load_tiny_decoder

    try:
        return load_tiny_decoder(None, pipe)
    except FileNotFoundError as e:
        log.warning("tiny previews: %s; using the cheap preview", e)
        return None


def make_previewer(pipe, mode: str = "cheap") -> Callable[[torch.Tensor], Image.Image]:
    """latents -> preview image, for `--preview cheap|tiny|full`. The cheap map (or the tiny
    decoder) is chosen here, once; without a tiny decoder, "tiny" falls back to "cheap"."""
    if mode == "full":
        return lambda latents: full_preview(pipe, latents)
    if mode not in ("cheap", "tiny"):
        raise ValueError(f"preview mode must be 'cheap', 'tiny' or 'full', got {mode!r}")
    decoder = _tiny_decoder(pipe) if mode == "tiny" else None
    if decoder is not None:
        return lambda latents: tiny_preview(decoder, latents)
    rgb = latent_rgb_map(pipe)
    return lambda latents: latent_preview(latents, pipe.config, rgb)
