"""Hires fix: txt2img, upscale, img2img with the same parameters; on the built-in model and a
tiny random model; A1111's size rules and infotext fields."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import sdtorch
from sdtorch.config import TINY
from sdtorch.generate import GenerationRequest, to_pil
from sdtorch.generate.hires import HiresFix
from sdtorch.generate.images import img2img_start
from sdtorch.sampling import samplers


@pytest.fixture(scope="module", params=["builtin", "tiny"])
def pipe(request):
    if request.param == "builtin":
        return sdtorch.load()
    return sdtorch.load(request.getfixturevalue("tiny_reference").checkpoint, config=TINY)


def base(pipe, **kw) -> GenerationRequest:
    size = min(pipe.config.sample_size, 64)
    return GenerationRequest("a red apple", steps=6, seed=21, sampler="euler", scheduler="automatic", cfg_scale=6.0,
                             width=size, height=size, **kw)


def px(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("upscaler,resample", [("Lanczos", Image.LANCZOS), ("Nearest", Image.NEAREST)])
def test_pixel_hires_is_txt2img_upscale_img2img(pipe, upscaler, resample):
    fix = HiresFix(scale=2.0, upscaler=upscaler, steps=5, strength=0.6)
    r = base(pipe)
    got = pipe.run(replace(r, hires=fix)).images[0]
    first = pipe.run(r).images[0]
    up = first.resize((first.width * 2, first.height * 2), resample)
    want = pipe.run(replace(r, init_image=up, width=up.width, height=up.height, steps=5, strength=0.6)).images[0]
    assert got.size == (2 * r.width, 2 * r.height)
    assert np.array_equal(px(got), px(want))


@torch.no_grad()
def test_latent_hires_denoises_the_upscaled_latents(pipe):
    fix = HiresFix(scale=2.0, upscaler="Latent", steps=4, strength=0.5)
    r = base(pipe)
    got = pipe.run(replace(r, hires=fix))
    first = pipe.run(r)
    latents = F.interpolate(first.latents, scale_factor=2, mode="bilinear", align_corners=False)
    generator = torch.Generator("cpu").manual_seed(r.seed)
    noise = torch.randn(latents.shape, generator=generator)
    cond, uncond = pipe.encode_prompt([r.prompt]), pipe.encode_prompt([""])
    out = samplers.sample("euler", lambda q: pipe.denoiser(r.cfg_scale, q), noise, 4, pipe.config.schedule,
                          extra_args={"cond": cond, "uncond": uncond}, generator=generator, disable=True,
                          prediction=pipe.config.prediction, init=latents, start=img2img_start(4, 0.5),
                          scheduler="automatic")
    want = to_pil(pipe.decode(out))[0]
    assert np.abs(px(got.images[0]) - px(want)).max() <= 1
    text = got.infotexts[0]
    assert f"Size: {r.width}x{r.height}" in text  # the first pass's size, as A1111 writes it
    assert "Denoising strength: 0.5, Hires upscale: 2.0, Hires steps: 4, Hires upscaler: Latent" in text


def test_target_sizes():
    assert HiresFix(scale=1.5).target(64, 48) == (96, 72, 96, 72)
    assert HiresFix(resize=(96, 0)).target(64, 64) == (96, 96, 96, 96)
    assert HiresFix(resize=(128, 64)).target(64, 64) == (128, 128, 128, 64)  # cover, then crop the middle


def test_progress_counts_both_passes():
    pipe = sdtorch.load()
    seen = []
    r = GenerationRequest("a cat", steps=6, seed=1, hires=HiresFix(steps=4, strength=0.5))
    pipe.run(r, on_step=lambda step, total, _: seen.append((step, total)))
    assert seen == [(i, 8) for i in range(1, 9)]
