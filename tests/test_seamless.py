"""Seamless tiling: circular padding makes the UNet and the VAE decoder commute with circular
shifts, and the generated image wraps around without a seam; nothing stays changed afterwards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sdtorch
from sdtorch.adapters.seamless import seamless
from sdtorch.config import TINY
from sdtorch.generate import GenerationRequest


@pytest.fixture(scope="module", params=["builtin", "tiny"])
def pipe(request):
    if request.param == "builtin":
        return sdtorch.load()
    return sdtorch.load(request.getfixturevalue("tiny_reference").checkpoint, config=TINY)


@torch.no_grad()
def test_unet_and_decoder_commute_with_circular_shifts(pipe):
    g = torch.Generator().manual_seed(0)
    n = 2 ** (len(pipe.config.unet.channel_mult) - 1)  # the UNet's total downsampling
    x = torch.randn(1, pipe.config.unet.in_channels, 8 * n, 8 * n, generator=g)
    t = torch.tensor([500.0])
    ctx = pipe.encode_prompt(["a cat"])
    shift = 2 * n
    with seamless(pipe.unet, pipe.vae):
        out, out_shifted = pipe.unet(x, t, ctx), pipe.unet(torch.roll(x, shift, dims=-1), t, ctx)
        assert torch.allclose(torch.roll(out, shift, dims=-1), out_shifted, atol=1e-4)
        z = torch.randn(1, pipe.config.vae.z_channels, 8, 8, generator=g)
        f = pipe.vae.downscale
        dec, dec_shifted = pipe.vae.decode(z), pipe.vae.decode(torch.roll(z, 3, dims=-2))
        assert torch.allclose(torch.roll(dec, 3 * f, dims=-2), dec_shifted, atol=1e-4)
    out_plain = pipe.unet(torch.roll(x, shift, dims=-1), t, ctx)  # restored: zero padding again
    assert not torch.allclose(torch.roll(out, shift, dims=-1), out_plain, atol=1e-4)
    assert all(m.padding_mode == "zeros" for m in pipe.unet.modules() if isinstance(m, torch.nn.Conv2d))


@torch.no_grad()
def test_a_tiled_generation_wraps_around(pipe):
    """With circular padding the whole sampling run commutes with a circular shift of the noise:
    the image of the shifted noise is the shifted image, so the picture has no edges."""
    from sdtorch.sampling import samplers

    f, n = pipe.vae.downscale, 2 ** (len(pipe.config.unet.channel_mult) - 1)
    noise = torch.randn(1, pipe.config.unet.in_channels, 8 * n, 8 * n, generator=torch.Generator().manual_seed(4))
    cond, uncond = pipe.encode_prompt(["a red apple"]), pipe.encode_prompt([""])

    def image(x):
        latents = samplers.sample("euler", lambda q: pipe.denoiser(7.0, q), x, 6, pipe.config.schedule,
                                  extra_args={"cond": cond, "uncond": uncond}, disable=True,
                                  prediction=pipe.config.prediction, scheduler="automatic")
        return pipe.decode(latents)

    with seamless(pipe.unet, pipe.vae):
        a, b = image(noise), image(torch.roll(noise, (n, 3 * n), dims=(-2, -1)))
    assert torch.allclose(torch.roll(a, (n * f, 3 * n * f), dims=(-2, -1)), b, atol=2e-3)
    plain = image(torch.roll(noise, (n, 3 * n), dims=(-2, -1)))
    assert (torch.roll(image(noise), (n * f, 3 * n * f), dims=(-2, -1)) - plain).abs().max() > 1e-2


def test_tiling_through_run_and_infotext(pipe):
    size = min(pipe.config.sample_size, 64)
    kw = dict(steps=3, seed=4, sampler="euler", scheduler="automatic", width=size, height=size)
    tiled = pipe.run(GenerationRequest("a red apple", tiling=True, **kw))
    plain = pipe.run(GenerationRequest("a red apple", **kw))
    assert "Tiling: True" in tiled.infotexts[0] and "Tiling" not in plain.infotexts[0]
    assert not np.array_equal(np.asarray(tiled.images[0]), np.asarray(plain.images[0]))
    assert all(m.padding_mode == "zeros" for m in pipe.vae.modules() if isinstance(m, torch.nn.Conv2d))
