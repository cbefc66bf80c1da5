"""Live previews (sdtorch.serve.preview): the cheap latent->RGB map and the full VAE decode."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sdtorch
from sdtorch.config import EMOJI, SD15, SD21, SD21_BASE, TINY
from sdtorch.serve import preview


@pytest.fixture(scope="module")
def pipe():
    return sdtorch.load(None)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (as on a [0, 1] scale)."""
    mse = float(((a - b) / 2).pow(2).mean())
    return 10 * math.log10(1 / mse)


def test_latent_preview_shapes_and_range():
    latents = torch.randn(3, 4, 16, 12) * 3  # saturates: the preview must clamp, not wrap
    image = preview.latent_preview(latents, SD15)
    assert image.mode == "RGB" and image.size == (12, 16)
    arr = np.asarray(image)
    assert arr.min() == 0 and arr.max() == 255
    big = preview.latent_preview(latents, SD15, scale=8)
    assert big.size == (96, 128)
    # the first image of the batch only
    other = latents.clone()
    other[1:] = 0
    assert np.array_equal(np.asarray(preview.latent_preview(other, SD15)), arr)
    with pytest.raises(ValueError, match="latents must be"):
        preview.latent_preview(torch.randn(1, 9, 8, 8), SD15)
    with pytest.raises(ValueError, match="emoji"):
        preview.latent_preview(torch.randn(1, 4, 8, 8), EMOJI)  # no published map: needs rgb=


def test_table_decides_by_config():
    for cfg in (SD15, SD21, SD21_BASE):
        rgb = preview.published_rgb(cfg)
        assert rgb is not None and rgb.weight.shape == (4, 3) and rgb.source.startswith("published")
    assert preview.published_rgb(EMOJI) is None and preview.published_rgb(TINY) is None
    # the published SD map on a mid-grey-ish latent: channel 4 negative -> more blue than red
    rgb = preview.published_rgb(SD15)
    out = rgb.apply(torch.tensor([0.0, 0.0, 0.0, -1.0]).view(4, 1, 1))[0, 0]
    assert out[2] > out[0] > 0


def test_fitted_map_reproduces_decoded_colours(pipe):
    rgb = preview.fit_latent_rgb(pipe.vae, pipe.config, seed=0)
    assert rgb.weight.shape == (4, 3) and rgb.bias.shape == (3,) and rgb.source == "fitted"
    # held-out latents (another seed): encoded colour images and smooth random latents
    x, y = preview._pairs(pipe.vae, pipe.config, samples=6, cells=8, seed=7)
    mapped = (x @ rgb.weight + rgb.bias).clamp(-1, 1)
    baseline = y.mean(0, keepdim=True).expand_as(y)  # the best constant image
    fitted_db, constant_db = psnr(mapped, y), psnr(baseline, y)
    assert fitted_db > constant_db + 5, (fitted_db, constant_db)
    # the published SD map does not describe the built-in VAE: worse than the fit
    assert psnr((x @ preview.published_rgb(SD15).weight).clamp(-1, 1), y) < fitted_db - 5


def test_cheap_preview_follows_the_full_decode(pipe):
    """On a real latent (an encoded image), the cheap preview matches the full preview's colours
    downsampled to one pixel per latent cell, clearly better than the mean colour does."""
    f = pipe.vae.downscale
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    image = torch.stack([xx, yy, -xx * yy]).unsqueeze(0).clamp(-1, 1)  # a colourful gradient
    with torch.no_grad():
        latents = pipe.vae.encode(image).mean * pipe.config.vae.scaling_factor
    cheap = preview.latent_preview(latents, pipe.config, preview.latent_rgb_map(pipe))
    full = preview.full_preview(pipe, latents)
    assert full.size == (64, 64) and cheap.size == (64 // f, 64 // f)

    def to_t(im):
        return torch.from_numpy(np.asarray(im).astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]

    target = F.avg_pool2d(to_t(full), f)
    cheap_t = to_t(cheap)
    baseline = target.mean(dim=(2, 3), keepdim=True).expand_as(target)
    assert psnr(cheap_t, target) > psnr(baseline, target) + 5


def test_map_cached_per_model_and_random_sd_vae_gets_fitted(pipe):
    assert preview.latent_rgb_map(pipe) is preview.latent_rgb_map(pipe)
    # a random-weight VAE of the SD architecture: the config says "published", the check says no
    torch.manual_seed(0)
    vae = type(pipe.vae)(SD15.vae).eval()
    assert preview.choose_rgb(vae, SD15, samples=2, cells=8).source == "fitted"


def test_make_previewer(pipe):
    latents = torch.randn(2, 4, 16, 16)
    cheap = preview.make_previewer(pipe, "cheap")(latents)
    full = preview.make_previewer(pipe, "full")(latents)
    assert cheap.size == (16, 16) and full.size == (64, 64)
    with pytest.raises(ValueError, match="preview mode"):
        preview.make_previewer(pipe, "fancy")


def test_previews_of_a_real_run_approach_the_result(pipe):
    """Through Pipeline.run's on_step: the last step's cheap preview has the final image's coarse
    colours (clearly better than its mean colour); the first step's is further from them."""
    from sdtorch.generate import GenerationRequest

    rgb = preview.latent_rgb_map(pipe)
    seen = []
    result = pipe.run(GenerationRequest("a red apple", steps=8, seed=3, sampler="euler"),
                      on_step=lambda step, total, latents: seen.append(preview.latent_preview(latents, pipe.config, rgb)))
    assert len(seen) == 8 and all(im.size == (16, 16) for im in seen)

    def to_t(im):
        return torch.from_numpy(np.asarray(im.convert("RGB")).astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]

    target = F.avg_pool2d(to_t(result.images[0]), pipe.vae.downscale)
    baseline = target.mean(dim=(2, 3), keepdim=True).expand_as(target)
    last, first = psnr(to_t(seen[-1]), target), psnr(to_t(seen[0]), target)
    assert last > psnr(baseline, target) + 3 and last > first, (last, first, psnr(baseline, target))
