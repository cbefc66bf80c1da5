"""Seed modes and variation seeds (A1111's semantics), on the built-in model and a tiny random one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sdtorch
from sdtorch.config import TINY
from sdtorch.generate import GenerationRequest
from sdtorch.sampling.noise import ImageNoise, initial_noise, slerp


@pytest.fixture(scope="module", params=["builtin", "tiny"])
def pipe(request):
    if request.param == "builtin":
        return sdtorch.load()
    return sdtorch.load(request.getfixturevalue("tiny_reference").checkpoint, config=TINY)


def images(pipe, **kw) -> list[np.ndarray]:
    size = min(pipe.config.sample_size, 64)
    r = GenerationRequest("a red apple", steps=kw.pop("steps", 5), sampler=kw.pop("sampler", "euler"),
                          scheduler="automatic", width=size, height=size, **kw)
    return [np.asarray(im, dtype=np.int16) for im in pipe.run(r).images]


@pytest.mark.parametrize("mode", ["diffusers", "a1111"])
def test_subseed_strength_zero_is_no_subseed_and_one_is_the_subseed(pipe, mode):
    plain = images(pipe, seed=3, seed_mode=mode)
    assert np.array_equal(images(pipe, seed=3, subseed=99, subseed_strength=0.0, seed_mode=mode)[0], plain[0])
    full = images(pipe, seed=3, subseed=99, subseed_strength=1.0, seed_mode=mode)[0]
    assert np.abs(full - images(pipe, seed=99, seed_mode=mode)[0]).max() <= 1  # a deterministic sampler
    half = images(pipe, seed=3, subseed=99, subseed_strength=0.5, seed_mode=mode)[0]
    assert np.abs(half - plain[0]).mean() > 0.5 and np.abs(half - full).mean() > 0.5


def test_a1111_mode_batch_image_i_is_seed_plus_i_alone(pipe):
    batch = images(pipe, seed=10, batch_size=3, seed_mode="a1111", sampler="euler_a")
    for i, image in enumerate(batch):
        alone = images(pipe, seed=10 + i, seed_mode="a1111", sampler="euler_a")[0]
        assert np.abs(image - alone).max() <= 2, i
    # diffusers mode: one generator for the batch, so image 1 is not seed 11's image
    diff = images(pipe, seed=10, batch_size=2, seed_mode="diffusers", sampler="euler_a")
    assert np.abs(diff[1] - images(pipe, seed=11, seed_mode="diffusers", sampler="euler_a")[0]).mean() > 0.5


def test_one_image_draws_the_same_noise_in_both_modes():
    g_d, n_d = initial_noise((1, 4, 8, 8), 5, mode="diffusers")
    g_a, n_a = initial_noise((1, 4, 8, 8), 5, mode="a1111")
    assert torch.equal(n_d, n_a)
    assert torch.equal(torch.randn((1, 4, 8, 8), generator=g_d), g_a.randn_like(n_a))


def test_seed_resize_pastes_the_smaller_noise_in_the_middle():
    small = ImageNoise((4, 4, 4), [7]).first()[0]
    big = ImageNoise((4, 8, 8), [7], resize_from=(32, 32)).first()[0]  # 32 px = 4 latent cells
    assert torch.equal(big[:, 2:6, 2:6], small)
    assert not torch.equal(big[:, :2], torch.zeros_like(big[:, :2]))


def test_slerp_ends():
    a, b = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.randn(4, 8, 8)
    assert torch.allclose(slerp(0.0, a, b), a, atol=1e-5) and torch.allclose(slerp(1.0, a, b), b, atol=1e-5)


def test_infotext_and_seeds_say_which():
    pipe = sdtorch.load()
    r = pipe.run(GenerationRequest("a cat", steps=2, seed=20, subseed=30, subseed_strength=0.25, batch_size=2,
                                   seed_mode="a1111"))
    assert r.seeds == [20, 21]
    assert "Seed: 21" in r.infotexts[1] and "Variation seed: 31, Variation seed strength: 0.25" in r.infotexts[1]
