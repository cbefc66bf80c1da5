"""The TAESD-style tiny decoder: TAESD's file layout, parity with diffusers' AutoencoderTiny on
the same random weights, the built-in model's own tiny decoder, and the requests it refuses."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import sdtorch
from sdtorch.formats.files import CheckpointError
from sdtorch.generate.loading import BUILTIN_LAYOUT, BUILTIN_TINY, load_tiny_decoder
from sdtorch.generate.request import GenerationRequest, RequestError
from sdtorch.models.taesd import TinyDecoder, TinyDecoderConfig, config_from_keys, taesd_keys


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.float() - b.float()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def test_module_paths_are_taesd_file_keys():
    """taesd_decoder.safetensors: index 0 is the clamp, 1 the first convolution, 3-5 blocks, 6 an
    upsampling, 7 a bias-free convolution, ..., 18 the last block, 19 the RGB convolution."""
    keys = TinyDecoder().state_dict().keys()
    for key in ["1.weight", "1.bias", "3.conv.0.weight", "3.conv.4.bias", "7.weight", "12.weight", "17.weight",
                "18.conv.2.weight", "19.weight", "19.bias"]:
        assert key in keys
    assert "7.bias" not in keys and not any(k.startswith(("0.", "6.", "11.", "16.")) for k in keys)
    assert config_from_keys(TinyDecoder().state_dict()) == TinyDecoderConfig()
    assert config_from_keys(TinyDecoder(TinyDecoderConfig(16, 2)).state_dict()) == TinyDecoderConfig(16, 2)


def test_parity_with_diffusers_autoencoder_tiny():
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    ref = AutoencoderTiny().eval()
    for p in ref.decoder.parameters():  # random weights with a visible spread of outputs
        p.data.normal_(0, 0.08)
    sd = taesd_keys({k: v for k, v in ref.state_dict().items()})  # its encoder's tensors dropped
    assert set(sd) == set(TinyDecoder().state_dict())
    ours = TinyDecoder(config_from_keys(sd)).eval()
    ours.load_state_dict(sd, strict=True)
    latents = torch.randn(2, 4, 16, 12) * 2
    with torch.no_grad():
        expected = (ref.decode(latents).sample / 2 + 0.5).clamp(0, 1)
        got = ours.decode(latents)
    assert got.shape == (2, 3, 128, 96)
    assert expected.std() > 0.05
    assert psnr(got, expected) > 100


@pytest.fixture(scope="module")
def builtin():
    pipe = sdtorch.load()
    pipe.tiny_decoder = load_tiny_decoder(None, pipe)
    return pipe


def test_builtin_tiny_decoder_ships_and_follows_the_vae(builtin):
    assert BUILTIN_TINY.exists() and BUILTIN_TINY.stat().st_size < 4_000_000
    assert builtin.tiny_decoder.cfg == TinyDecoderConfig(4, 2, 32)
    base = GenerationRequest("red apple", steps=12, seed=3, batch_size=2)
    vae = builtin.run(base)
    tiny = builtin.run(GenerationRequest("red apple", steps=12, seed=3, batch_size=2, decoder="tiny"))
    scores = [psnr(*(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255) for im in pair))
              for pair in zip(vae.images, tiny.images)]
    assert min(scores) > 18 and sum(scores) / len(scores) > 21  # the same picture, a little softer
    assert "Decoder: tiny" in tiny.infotexts[0] and "Decoder" not in vae.infotexts[0]
    assert builtin.decoder == "vae"  # the request's setting did not stay on the pipeline


def test_refusals(tmp_path, builtin):
    pipe = sdtorch.load()
    with pytest.raises(RequestError, match="tiny decoder"):
        pipe.run(GenerationRequest("red apple", steps=2, seed=1, decoder="tiny"))
    with pytest.raises(RequestError, match="decoder"):
        builtin.run(GenerationRequest("red apple", steps=2, seed=1, decoder="taesd"))
    wrong = tmp_path / "taesd_decoder.safetensors"  # SD's 8x design: the built-in VAE is 4x
    save_file(TinyDecoder().state_dict(), str(wrong))
    with pytest.raises(CheckpointError, match="upscaling 8x.*upscales 4x"):
        load_tiny_decoder(wrong, pipe)
    not_taesd = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(3)}, str(not_taesd))
    with pytest.raises(CheckpointError, match="not a TAESD decoder"):
        load_tiny_decoder(not_taesd, pipe)
    bad = dict(TinyDecoder(TinyDecoderConfig(4, 2)).state_dict())
    bad["3.conv.0.weight"] = torch.zeros(64, 64, 1, 1)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_tiny_decoder(tmp_path / "bad.safetensors", pipe)
    with pytest.raises(FileNotFoundError, match="--tiny-decoder"):
        other = sdtorch.load(BUILTIN_LAYOUT)
        load_tiny_decoder(None, other)


def test_cli_decoder_tiny(tmp_path):
    out = tmp_path / "out"
    subprocess.run([sys.executable, "-m", "sdtorch.cli", "generate", "red apple", "--steps", "4", "--seed", "5",
                    "--decoder", "tiny", "--out", str(out)], check=True, capture_output=True)
    (png,) = out.glob("*.png")
    image = Image.open(png)
    assert image.size == (64, 64) and "Decoder: tiny" in image.info["parameters"]


def test_tiny_live_previews(builtin):
    from sdtorch.serve.preview import make_previewer

    latents = builtin.run(GenerationRequest("red apple", steps=12, seed=2)).latents
    tiny = make_previewer(sdtorch.load(), "tiny")(latents)  # the built-in model finds its own
    assert tiny.size == (64, 64)
    full = make_previewer(builtin, "full")(latents)
    cheap = make_previewer(builtin, "cheap")(latents).resize((64, 64), Image.BILINEAR)
    a, b, c = (torch.from_numpy(np.asarray(im, dtype=np.float32) / 255) for im in (tiny, full, cheap))
    assert psnr(a, b) > max(18, psnr(c, b) + 3)  # nearer the VAE's picture than the cheap map
    cheap = make_previewer(sdtorch.load(BUILTIN_LAYOUT), "tiny")  # no tiny decoder: the cheap map
    assert cheap(torch.zeros(1, 4, 16, 16)).size == (16, 16)
