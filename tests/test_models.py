"""Unit tests of the models on the tiny preset, and the key contract of the full presets."""

from pathlib import Path

import pytest
import torch

from sdtorch.config import SD15, SD21, TINY
from sdtorch.formats import checkpoint
from sdtorch.models.clip import ClipTextModel
from sdtorch.models.unet import UNetModel, timestep_embedding
from sdtorch.models.vae import AutoencoderKL

DATA = Path(__file__).parent / "data"


def _keys(path: Path) -> dict[str, tuple[int, ...]]:
    out = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            name, shape = line.split("\t")
            out[name] = tuple(int(s) for s in shape.split(",")) if shape else ()
    return out


@pytest.mark.parametrize("preset,file", [(SD15, "keys_sd15.txt"), (SD21, "keys_sd21.txt")])
def test_full_presets_have_the_real_checkpoint_keys(preset, file):
    with torch.device("meta"):
        unet, vae, clip = UNetModel(preset.unet), AutoencoderKL(preset.vae), ClipTextModel(preset.clip)
    ours = {k: tuple(v.shape) for k, v in checkpoint.original_state_dict(unet, vae, clip, preset).items()}
    # Real files also carry tensors SD never uses (OpenCLIP's text_projection and logit_scale):
    # the loader skips exactly the documented `checkpoint.IGNORED` set, and nothing else.
    real = {k: v for k, v in _keys(DATA / file).items() if not checkpoint.IGNORED.match(k)}
    assert len(real) >= len(_keys(DATA / file)) - 2
    assert sorted(set(real) - set(ours)) == []  # missing in ours
    assert sorted(set(ours) - set(real)) == []  # extra in ours
    assert {k: v for k, v in ours.items() if real[k] != v} == {}


def test_shapes_and_determinism():
    torch.manual_seed(0)
    unet, vae, clip = UNetModel(TINY.unet), AutoencoderKL(TINY.vae), ClipTextModel(TINY.clip)
    tokens = torch.randint(0, 49408, (2, 77))
    ctx = clip(tokens)
    assert ctx.shape == (2, 77, TINY.clip.width)
    x = torch.randn(2, 4, 8, 8)
    out = unet(x, torch.tensor([3.0, 999.0]), ctx)
    assert out.shape == x.shape
    assert torch.equal(out, unet(x, torch.tensor([3.0, 999.0]), ctx))
    assert not torch.allclose(out, unet(x, torch.tensor([4.0, 999.0]), ctx))  # the timestep matters
    assert not torch.allclose(out, unet(x, torch.tensor([3.0, 999.0]), ctx.flip(0)))  # the text matters
    img = vae.decode(x)
    assert img.shape == (2, 3, 16, 16) and vae.downscale == 2
    post = vae.encode(img)
    assert post.mean.shape == (2, 4, 8, 8)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(post.sample(g1), post.sample(g2))


def test_unet_odd_latent_size():
    unet = UNetModel(TINY.unet)
    x = torch.randn(1, 4, 7, 9)
    assert unet(x, torch.tensor([10.0]), torch.randn(1, 77, 32)).shape == x.shape


def test_timestep_embedding_is_cos_then_sin():
    emb = timestep_embedding(torch.tensor([0.0, 5.0]), 8)
    assert emb.shape == (2, 8)
    assert torch.allclose(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    assert torch.isclose(emb[1, 0], torch.cos(torch.tensor(5.0)))


def test_clip_skip_takes_an_earlier_layer():
    torch.manual_seed(0)
    clip = ClipTextModel(TINY.clip)
    tokens = torch.randint(0, 49408, (1, 77))
    last, penult = clip(tokens, 1), clip(tokens, 2)
    assert not torch.allclose(last, penult)
    with pytest.raises(ValueError, match="clip_skip"):
        clip(tokens, 3)


def test_strict_load_names_missing_unexpected_and_misshaped_keys():
    unet = UNetModel(TINY.unet)
    sd = dict(unet.state_dict())
    sd.pop("out.2.bias")
    sd["input_blocks.99.weight"] = torch.zeros(1)
    sd["time_embed.0.weight"] = torch.zeros(3, 3)
    with torch.device("meta"):
        target = UNetModel(TINY.unet)
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.load_strict(target, sd, "UNet", torch.float32)
    msg = str(e.value)
    assert "missing (1): out.2.bias" in msg
    assert "unexpected (1): input_blocks.99.weight" in msg
    assert "wrong shape (1): time_embed.0.weight (3, 3) != (128, 32)" in msg
    assert "\n" not in msg


def test_strict_load_round_trip_and_dtype():
    torch.manual_seed(0)
    vae = AutoencoderKL(TINY.vae)
    with torch.device("meta"):
        target = AutoencoderKL(TINY.vae)
    checkpoint.load_strict(target, vae.state_dict(), "VAE", torch.bfloat16)
    for (k, a), b in zip(vae.state_dict().items(), target.state_dict().values()):
        assert b.dtype == torch.bfloat16 and torch.equal(a.to(torch.bfloat16), b), k


def test_emoji_preset_fits_the_builtin_budget():
    """The built-in model ships in fp16 in at most 60 MB."""
    from sdtorch.config import EMOJI

    with torch.device("meta"):
        parts = UNetModel(EMOJI.unet), AutoencoderKL(EMOJI.vae), ClipTextModel(EMOJI.clip)
    n = sum(p.numel() for m in parts for p in m.parameters())
    assert 2 * n <= 60e6, f"{2 * n / 1e6:.1f} MB"
    assert parts[1].downscale == 4 and EMOJI.sample_size // 4 == 16


def test_strict_load_reshapes_only_linear_stored_1x1_convs():
    torch.manual_seed(0)
    vae = AutoencoderKL(TINY.vae)
    sd = dict(vae.state_dict())
    sd["encoder.mid.attn_1.q.weight"] = sd["encoder.mid.attn_1.q.weight"][:, :, 0, 0]  # Linear layout: accepted
    with torch.device("meta"):
        target = AutoencoderKL(TINY.vae)
    checkpoint.load_strict(target, sd, "VAE", torch.float32)
    assert torch.equal(target.encoder.mid.attn_1.q.weight, vae.encoder.mid.attn_1.q.weight)
    w = sd["encoder.conv_in.weight"]  # (32, 3, 3, 3): same element count, another shape: refused
    sd["encoder.conv_in.weight"] = w.reshape(3, 32, 3, 3)
    with torch.device("meta"):
        target = AutoencoderKL(TINY.vae)
    with pytest.raises(checkpoint.CheckpointError, match=r"wrong shape \(1\): encoder.conv_in.weight"):
        checkpoint.load_strict(target, sd, "VAE", torch.float32)
