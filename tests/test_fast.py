"""The fast CPU path: bfloat16 with channels-last weights, and torch.compile with its fallback."""

import logging
import math
import shutil

import pytest
import torch

import sdtorch
from sdtorch.config import TINY
from sdtorch.generate.pipeline import GenerationParams

PARAMS = GenerationParams("a red apple on a table", "blurry", steps=10, sampler="dpmpp_2m_karras", seed=3,
                          width=64, height=64, batch_size=2)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Of decoded images in [0, 1], peak 1."""
    mse = float((a.float() - b.float()).square().mean())
    return 10 * math.log10(1 / mse) if mse else math.inf


@pytest.fixture(scope="module")
def fp32(tiny_reference):
    return sdtorch.load(tiny_reference.checkpoint, config=TINY)


@pytest.fixture(scope="module")
def fp32_image(fp32):
    return fp32.decode(fp32.generate_latents(PARAMS, progress=False))


def test_bf16_path_is_close_to_fp32(tiny_reference, fp32_image):
    pipe = sdtorch.load(tiny_reference.checkpoint, config=TINY, dtype="bf16")
    conv = pipe.unet.input_blocks[0][0].weight
    assert conv.dtype == torch.bfloat16 and conv.is_contiguous(memory_format=torch.channels_last)
    assert pipe.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    latents = pipe.generate_latents(PARAMS, progress=False)
    assert latents.dtype == torch.float32  # the sampler's state stays float32
    image = pipe.decode(latents)
    assert image.dtype == torch.float32 and image.shape == fp32_image.shape
    assert psnr(image, fp32_image) >= 35.0


def test_compile_falls_back_to_eager(fp32, fp32_image, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", lambda module, **kw: broken)
    fp32.compile()
    try:
        with caplog.at_level(logging.WARNING, logger="sdtorch.adapters.fast"):
            image = fp32.decode(fp32.generate_latents(PARAMS, progress=False))
    finally:
        fp32._compiled = None
    assert torch.equal(image, fp32_image)
    assert [r.message for r in caplog.records if "running eagerly" in r.message][:1] == [
        "torch.compile failed (RuntimeError: no C++ compiler found); running eagerly"]


def test_compile_unavailable_warns(fp32, monkeypatch, caplog):
    def unavailable(module, **kwargs):
        raise RuntimeError("Python 3.99 not yet supported")

    monkeypatch.setattr(torch, "compile", unavailable)
    with caplog.at_level(logging.WARNING, logger="sdtorch.adapters.fast"):
        fp32.compile()
    fp32._compiled = None
    assert any("torch.compile is unavailable" in r.message for r in caplog.records)


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="inductor needs a C++ compiler")
@torch.no_grad()
def test_compiled_unet_matches_eager(fp32):
    """A real inductor compile (needs a C++ compiler) of the tiny UNet."""
    from sdtorch.adapters.fast import CompiledModule

    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, TINY.unet.context_dim, generator=g)
    t = torch.tensor([500.0, 20.0])
    compiled = CompiledModule(fp32.unet)
    out = compiled(x, t, context)
    assert compiled.compiled is not None  # it compiled, no fallback
    ref = fp32.unet(x, t, context)
    assert float((out - ref).abs().max() / ref.abs().max()) <= 1e-4


@torch.no_grad()
def test_deep_cache_interval_one_is_exact_and_cached_calls_reuse_deep_features(fp32):
    from sdtorch.adapters.deepcache import DeepCache

    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, TINY.unet.context_dim, generator=g)
    t = torch.tensor([700.0])
    exact = fp32.unet(x, t, context)
    assert torch.equal(DeepCache(fp32.unet, interval=1)(x, t, context), exact)
    for branch in range(len(fp32.unet.output_blocks) - 1):
        cache = DeepCache(fp32.unet, interval=2, branch=branch)
        assert torch.equal(cache(x, t, context), exact)  # first call: the whole UNet
        # A cached call with the same inputs rebuilds the same output from the kept features.
        assert torch.allclose(cache(x, t, context), exact, atol=1e-5)
        x2 = x + 0.1 * torch.randn(x.shape, generator=g)
        approx, full = cache(x2, t, context), fp32.unet(x2, t, context)  # third call: whole again
        assert torch.equal(approx, full)
        near = cache(x2 + 0.01, t, context)  # fourth: cached, close to the exact output
        assert 0 < float((near - fp32.unet(x2 + 0.01, t, context)).abs().max())
    with pytest.raises(ValueError, match="branch"):
        DeepCache(fp32.unet, branch=len(fp32.unet.output_blocks) - 1)
    with pytest.raises(ValueError, match="interval"):
        DeepCache(fp32.unet, interval=0)


def test_deep_cache_in_generation_is_off_by_default_and_close_when_on(fp32, fp32_image):
    assert fp32.deep_cache is None
    fp32.deep_cache = (2, 0)
    try:
        image = fp32.decode(fp32.generate_latents(PARAMS, progress=False))
    finally:
        fp32.deep_cache = None
    assert not torch.equal(image, fp32_image) and psnr(image, fp32_image) > 15
