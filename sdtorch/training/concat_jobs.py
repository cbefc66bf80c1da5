"""Training jobs for image-conditioned UNets (`sdtorch.families.CONCAT`) on the built-in emoji data,
each starting from a text-to-image UNet widened with zero weights for its extra inputs (so it
starts as that model): what `scripts/train_concat.py` trains for the README's pictures.

- `EditJob`: instruct-pix2pix (8 channels): the source image's latents beside the noisy latents of
  the edited image; the prompt is the edit (`EDITS`, exact pixel operations, so results can be
  scored against the true edit). Text and image are each dropped for 10 % of the samples, as
  the paper does, so both guidance scales work.
- `DepthJob`: depth-to-image (5 channels): a depth map at latent size. Emoji have no depth, and no
  estimator weights exist here: `silhouette_depth` stands in (the shape, domed: nearer towards
  its middle).
- `UpscaleJob`: the x4 upscaler (7 channels + class labels): the 4x smaller image, noised to a
  random level on the upscaler's own schedule, that level as the class label (diffusers'
  StableDiffusionUpscalePipeline's inputs). The emoji VAE's latents are already 4x smaller than
  the image, so the low-resolution image sits beside them at their size, as in the real one.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sdtorch.config import ModelConfig
from sdtorch.formats import checkpoint
from sdtorch.models.condition import Condition
from sdtorch.models.unet import UNetModel
from sdtorch.sampling.schedule import alphas_cumprod
from sdtorch.training.jobs import UNetJob, widen_input
from sdtorch.training.train import rand_per_sample, randn_per_sample


def _grey(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).expand(3, -1, -1)


# The edits EditJob learns, on (3, H, W) images in [-1, 1].
EDITS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "flip it": lambda x: x.flip(-1),
    "turn it upside down": lambda x: x.flip(-2),
    "make it black and white": _grey,
    "swap red and blue": lambda x: x[[2, 1, 0]],
    "make it a negative": lambda x: -x,
}


def apply_edit(images: torch.Tensor, edits: list[str]) -> torch.Tensor:
    """(B, 3, H, W) images, one edit name (`EDITS`) per image -> the edited images."""
    return torch.stack([EDITS[e](x) for x, e in zip(images, edits)])


def silhouette_depth(images: torch.Tensor, blur: float = 0.08) -> torch.Tensor:
    """A stand-in depth map for pictures on white (B, 3, H, W) in [-1, 1] -> (B, H, W) in [0, 1]:
    1 on the drawn shape, blurred by `blur` of the width (a dome: nearer towards the middle of
    large parts), times the shape (the background is farthest, 0)."""
    shape = ((images < 0.9).any(dim=1, keepdim=True)).float()
    sigma = blur * images.shape[-1]
    r = int(3 * sigma)
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sigma) ** 2)
    k = (k / k.sum()).to(images)
    dome = F.conv2d(F.pad(shape, (r, r, 0, 0)), k.view(1, 1, 1, -1))
    dome = F.conv2d(F.pad(dome, (0, 0, r, r)), k.view(1, 1, -1, 1))
    return (0.5 + 0.5 * dome / dome.amax(dim=(2, 3), keepdim=True).clamp_min(1e-6)).mul(shape)[:, 0]


class _ConcatJob(UNetJob):
    """UNetJob for a UNet with `extra` more input channels (and `classes` class labels), widened
    from `unet`; a subclass's `inputs` says what goes beside the latents."""

    extra: int = 0
    classes: int = 0

    @classmethod
    def config(cls, base: ModelConfig, name: str) -> ModelConfig:
        unet = replace(base.unet, in_channels=base.unet.in_channels + cls.extra, num_classes=cls.classes)
        return replace(base, name=name, unet=unet)

    def __init__(self, cfg: ModelConfig, vae, clip, *, unet: UNetModel, base: str = "emoji.safetensors", **kw):
        if unet.cfg.in_channels != cfg.unet.in_channels:
            unet = widen_input(unet, cfg.unet)
        super().__init__(cfg, vae, clip, unet=unet, **kw)
        self.base = base  # the file whose VAE and text encoder the exported UNet shares

    def samples(self, ema: dict[str, nn.Module], step: int):
        return None  # previews need input images: benchmarks/concat.py draws and scores them

    def export(self, ema: dict[str, nn.Module], path, dtype: torch.dtype | None = torch.float16):
        return checkpoint.save_unet(path, ema["unet"], self.cfg, base=self.base, dtype=dtype)


class EditJob(_ConcatJob):
    extra = 4
    image_dropout = 0.1

    def loss(self, batch: dict, seeds: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        images = batch["image"]
        edits = [list(EDITS)[int(u * len(EDITS))] for u in rand_per_sample(seeds, 5).tolist()]
        models = batch["models"]
        z0, context = self.condition(apply_edit(images, edits), edits, seeds, None, models.get("clip"))
        with torch.no_grad():
            source = self.vae.encode(images).mean  # unscaled, as the pipeline gives it
        keep = (rand_per_sample(seeds, 6) >= self.image_dropout).float().view(-1, 1, 1, 1)
        return self.denoising_loss(models["unet"], z0, context, seeds, concat=source * keep), {}


class DepthJob(_ConcatJob):
    extra = 1

    def loss(self, batch: dict, seeds: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        from sdtorch.generate.concat import depth_condition

        models = batch["models"]
        z0, context = self.condition(batch["image"], batch["text"], seeds, batch.get("index"), models.get("clip"))
        depth = depth_condition(silhouette_depth(batch["image"]), tuple(z0.shape[-2:]))
        return self.denoising_loss(models["unet"], z0, context, seeds, concat=depth), {}


class UpscaleJob(_ConcatJob):
    extra = 3
    classes = 1000

    def loss(self, batch: dict, seeds: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        from sdtorch.generate.concat import LOW_RES_SCHEDULE, MAX_NOISE_LEVEL

        models = batch["models"]
        z0, context = self.condition(batch["image"], batch["text"], seeds, batch.get("index"), models.get("clip"))
        low = F.interpolate(batch["image"], size=z0.shape[-2:], mode="area")
        level = (rand_per_sample(seeds, 5) * (MAX_NOISE_LEVEL + 1)).long().clamp(max=MAX_NOISE_LEVEL)
        a = alphas_cumprod(LOW_RES_SCHEDULE)[level].view(-1, 1, 1, 1)
        low = a.sqrt() * low + (1 - a).sqrt() * randn_per_sample(low.shape[1:], seeds, 6)
        return self.denoising_loss(models["unet"], z0, Condition(context, level), seeds, concat=low), {}


JOBS: dict[str, type[_ConcatJob]] = {"instruct-pix2pix": EditJob, "depth": DepthJob, "x4-upscaler": UpscaleJob}
