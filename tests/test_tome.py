"""Token merging (ToMe for SD): the merge/unmerge pair on known tokens, the same images as the
`tomesd` package applied to diffusers' pipeline on the same random weights (same random
destinations), and the request's options and infotext."""

from __future__ import annotations

import pytest
import torch
from test_parity import psnr, rel_err

import sdtorch
from sdtorch.adapters.tome import TokenMerger, bipartite_merge
from sdtorch.generate.request import GenerationRequest, RequestError


def test_merge_then_unmerge_restores_cell_constant_tokens():
    """Tokens equal within each 2x2 cell merge into their cell's destination exactly, so
    unmerging gives them back; the merged count is N - r."""
    g = torch.Generator().manual_seed(0)
    cells = torch.randn(2, 4, 5, 6, generator=g)  # (B, h/2, w/2, C)
    x = cells.repeat_interleave(2, 1).repeat_interleave(2, 2).reshape(2, 8 * 10, 6)
    merge, unmerge = bipartite_merge(x, 8, 10, r=40, generator=g)
    merged = merge(x)
    assert merged.shape == (2, 40, 6)
    assert torch.allclose(unmerge(merged), x, atol=1e-6)
    merge, unmerge = bipartite_merge(x, 8, 10, r=0, generator=g)
    assert torch.equal(unmerge(merge(x)), x)


def test_merger_picks_levels():
    m = TokenMerger(0.5, (64, 48), max_downsample=1)
    assert m(torch.zeros(1, 64 * 48, 8)) is not None
    assert m(torch.zeros(1, 32 * 24, 8)) is None  # half resolution: not merged with max_downsample 1
    assert TokenMerger(0.5, (64, 48), max_downsample=2)(torch.zeros(1, 32 * 24, 8)) is not None
    with pytest.raises(ValueError):
        TokenMerger(1.0, (8, 8))


@pytest.fixture(scope="module")
def pair(tiny_reference):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    theirs = StableDiffusionPipeline.from_pretrained(tiny_reference.folder, safety_checker=None,
                                                     requires_safety_checker=False)
    theirs.scheduler = EulerDiscreteScheduler.from_config(theirs.scheduler.config)
    theirs.set_progress_bar_config(disable=True)
    return sdtorch.load(tiny_reference.checkpoint, config=tiny_reference.preset), theirs


@pytest.mark.parametrize("ratio", [0.3, 0.5])
@torch.no_grad()
def test_same_images_as_tomesd(pair, ratio):
    tomesd = pytest.importorskip("tomesd")
    ours, theirs = pair
    # TINY has attention at half resolution only: merge there (max_downsample 2).
    tomesd.apply_patch(theirs, ratio=ratio, max_downsample=2, sx=2, sy=2)
    try:
        for block in theirs.unet.modules():  # tomesd 0.1.3 reads two flags newer diffusers renamed
            if hasattr(block, "_tome_info"):
                block.use_ada_layer_norm = block.use_ada_layer_norm_zero = False
        theirs.unet._tome_info["args"]["generator"] = torch.Generator().manual_seed(9)
        b = theirs("a red apple", num_inference_steps=5, guidance_scale=7.5, height=64, width=64,
                   num_images_per_prompt=2, generator=torch.Generator().manual_seed(9), output_type="latent").images
    finally:
        tomesd.remove_patch(theirs)
    request = GenerationRequest("a red apple", steps=5, sampler="euler", scheduler="automatic", cfg_scale=7.5,
                                seed=9, width=64, height=64, batch_size=2, token_merging_ratio=ratio,
                                tome_options=(2, 2, 2))
    result = ours.run(request)
    assert rel_err(result.latents, b) <= 1e-4
    image_b = (theirs.vae.decode(b / theirs.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    assert psnr(ours.decode(result.latents), image_b) >= 45
    assert f"Token merging ratio: {ratio}" in result.infotexts[0]
    exact = ours.run(GenerationRequest("a red apple", steps=5, sampler="euler", scheduler="automatic",
                                       cfg_scale=7.5, seed=9, width=64, height=64, batch_size=2))
    assert rel_err(exact.latents, result.latents) > 1e-3  # merging changed the result
    assert all(getattr(m, "tome", None) is None for m in ours.unet.modules())  # and nothing stayed behind


def test_bad_ratio_refused(pair):
    with pytest.raises(RequestError, match="token merging"):
        pair[0].run(GenerationRequest("x", steps=2, token_merging_ratio=1.5))
