"""Large images within memory: tiled VAE decoding/encoding and chunked attention (tiny models)."""

import itertools
import math

import numpy as np
import pytest
import torch

from sdtorch.adapters import tiling
from sdtorch.config import TINY
from sdtorch.editing.p2p import AttentionStore, hooked
from sdtorch.generate.pipeline import GenerationParams, Pipeline, to_pil
from sdtorch.models.clip import ClipTextModel
from sdtorch.models.unet import CrossAttention, UNetModel, chunked_attention
from sdtorch.models.vae import AutoencoderKL


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Of images in [-1, 1], as saved: mapped to [0, 1] and clamped, peak 1."""
    mse = float(((a / 2 + 0.5).clamp(0, 1) - (b / 2 + 0.5).clamp(0, 1)).square().mean())
    return 10 * math.log10(1 / mse) if mse else math.inf


def picture(h: int, w: int) -> torch.Tensor:
    """(1, 3, h, w) in [-1, 1]: a smooth, non-uniform synthetic picture (rings, gradients, a disc)."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    r = ((xx - 0.3) ** 2 + (yy + 0.2) ** 2).sqrt()
    disc = (r < 0.4).float()
    return torch.stack([torch.sin(9 * r) * 0.8, xx * 0.9 - disc * 0.5, torch.cos(5 * yy + 2 * xx) * 0.7 + disc * 0.2])[None]


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(TINY.vae).eval()


@pytest.mark.parametrize("size,tile,overlap", [(5, 8, 2), (8, 8, 2), (9, 8, 2), (37, 16, 4), (100, 32, 8), (64, 16, 0)])
def test_spans_cover_with_overlap(size, tile, overlap):
    spans = tiling.spans(size, tile, overlap)
    assert spans[0][0] == 0 and spans[-1][0] + spans[-1][1] == size
    assert all(length <= tile for _, length in spans)
    assert all(a + la - b >= overlap for (a, la), (b, _) in itertools.pairwise(spans))
    covered = torch.zeros(size)
    for start, length in spans:
        covered[start : start + length] = 1
    assert covered.all()


@pytest.mark.parametrize("h,w,scale", [(37, 23, 1), (37, 23, 2), (20, 50, 4), (6, 6, 2)])
def test_blending_weights_sum_to_one(h, w, scale):
    total = torch.zeros(h * scale, w * scale)
    for t in tiling.tiles(h, w, 16, 4):
        total[t.region(scale)] += t.weight(scale)
    assert torch.allclose(total, torch.ones_like(total), atol=1e-6)


def test_bad_tiles_raise():
    with pytest.raises(ValueError, match="overlap"):
        tiling.tiles(10, 10, 8, 8)
    with pytest.raises(ValueError, match="multiples of 2"):
        tiling.tiled_encode(AutoencoderKL(TINY.vae), torch.zeros(1, 3, 33, 32))


@torch.no_grad()
def test_one_tile_is_exactly_untiled(vae):
    x = picture(40, 24)
    z = vae.encode(x).mean  # (1, 4, 20, 12): smaller than a tile
    assert torch.equal(tiling.tiled_decode(vae, z, tile=32, overlap=8), vae.decode(z))
    assert torch.equal(tiling.tiled_encode(vae, x, tile=32, overlap=8).mean, vae.encode(x).mean)


@torch.no_grad()
@pytest.mark.parametrize("h,w,tile", [(192, 192, 48), (150, 94, 32)])  # latents 96x96, 75x47 (non-multiples)
def test_tiled_decode_close_to_untiled(vae, h, w, tile):
    z = vae.encode(picture(h, w)).mean
    ref = vae.decode(z)
    assert len(tiling.tiles(*z.shape[-2:], tile, 8)) > 1
    out = tiling.tiled_decode(vae, z, tile=tile, overlap=8)  # statistics of the whole (<= STATS cells)
    assert out.shape == ref.shape
    own = tiling.tiled_decode(vae, z, tile=tile, overlap=8, norm="tile")  # each tile's GroupNorm statistics
    assert psnr(out, ref) > 40 > psnr(own, ref) + 10


@torch.no_grad()
def test_estimated_statistics_beat_per_tile_ones(vae):
    """An image larger than `stats`: its statistics come from a scaled-down copy."""
    z = vae.encode(picture(192, 192)).mean  # 96x96 cells
    ref = vae.decode(z)
    quality = [psnr(tiling.tiled_decode(vae, z, tile=32, overlap=8, stats=s), ref) for s in (24, 48, 96)]
    own = psnr(tiling.tiled_decode(vae, z, tile=32, overlap=8, norm="tile"), ref)
    assert own + 5 < quality[0] < quality[1] < quality[2] and quality[2] > 40
    with pytest.raises(ValueError, match="stats"):
        tiling.tiled_decode(vae, z, tile=32, stats=0)


@torch.no_grad()
def test_tiled_encode_close_to_untiled(vae):
    x = picture(192, 160)
    post, ref = tiling.tiled_encode(vae, x, tile=32, overlap=8), vae.encode(x)
    assert post.mean.shape == ref.mean.shape == (1, 4, 96, 80)
    assert float((post.mean - ref.mean).abs().max() / ref.mean.abs().max()) < 0.05
    assert psnr(vae.decode(post.mean), vae.decode(ref.mean)) > 40


@pytest.mark.parametrize("n,chunk", [(100, 7), (64, 64), (64, 16), (33, 1000)])
def test_chunked_attention_equals_whole(n, chunk):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, m, 8, generator=g) for m in (n, 77, 77))
    whole = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    out = chunked_attention(q, k, v, chunk)
    assert float((out - whole).abs().max() / whole.abs().max()) <= 1e-6


@torch.no_grad()
def test_cross_attention_chunks_and_keeps_hooks():
    torch.manual_seed(0)
    attn = CrossAttention(16, None, 2, 8)
    x = torch.randn(2, 50, 16)
    whole = attn(x)
    attn.chunk = 7
    assert float((attn(x) - whole).abs().max() / whole.abs().max()) <= 1e-6
    seen = []

    def hook(module, q, k, v):  # a hook sees the whole layer, chunked or not
        seen.append(q.shape[2])
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    attn.hook = hook
    assert torch.allclose(attn(x), whole, atol=1e-6) and seen == [50]


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    torch.manual_seed(0)
    return Pipeline(TINY, UNetModel(TINY.unet), AutoencoderKL(TINY.vae), ClipTextModel(TINY.clip))


def test_generate_with_chunked_attention_gives_the_same_image(pipe):
    params = GenerationParams("a red apple", steps=3, sampler="euler", seed=1, width=64, height=64)
    pipe.attention_chunk = 0
    plain = pipe.generate_latents(params, progress=False)
    pipe.attention_chunk = 48  # the attention layers see 16x16 = 256 positions: 6 calls each
    try:
        chunked = pipe.generate_latents(params, progress=False)
        store = AttentionStore()  # attention maps, as `pipe.attention` records them
        with hooked(pipe.unet, store):
            pipe.generate_latents(params, progress=False)
    finally:
        pipe.attention_chunk = 0
    assert float((chunked - plain).abs().max() / plain.abs().max()) <= 1e-6
    a, b = (np.asarray(image, dtype=np.int16) for image in (to_pil(pipe.decode(plain))[0], to_pil(pipe.decode(chunked))[0]))
    assert np.abs(a - b).max() <= 1 and (a == b).mean() > 0.999
    assert store.maps((32, 32)).shape == (1, 77, 16, 16)
    with pytest.raises(ValueError, match="attention chunk"):
        pipe.attention_chunk = -1


@torch.no_grad()
def test_pipeline_decode_tiles_when_asked(pipe):
    latents = pipe.vae.encode(picture(160, 128)).mean * TINY.vae.scaling_factor  # 80x64 cells
    whole = pipe.decode(latents)
    assert torch.equal(pipe.decode(latents, tiled=False), whole)
    assert torch.equal(pipe.decode(latents), whole)  # auto: below tiling.AUTO_CELLS
    pipe.vae_tile = (32, 8)
    try:
        tiled = pipe.decode(latents, tiled=True)
        pipe.tile_vae = True
        assert torch.equal(pipe.decode(latents), tiled)
    finally:
        pipe.tile_vae, pipe.vae_tile = None, (tiling.TILE, tiling.OVERLAP)
    assert not torch.equal(tiled, whole) and psnr(tiled * 2 - 1, whole * 2 - 1) > 40
