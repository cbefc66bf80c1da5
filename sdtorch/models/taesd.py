"""A tiny latent decoder with TAESD's architecture and file layout (Ollin Boer Bohan's "Tiny
AutoEncoder for Stable Diffusion"): sampler-space latents -> an image in [0, 1], in a few percent
of the VAE decoder's time, for previews and fast drafts (`--decoder tiny`).

The module is one nn.Sequential, so its parameter names are the file's keys as they are
(`1.weight`, `3.conv.0.weight`, ...: taesd_decoder.safetensors and taesdxl_decoder.safetensors
load unchanged); diffusers' AutoencoderTiny files (`decoder.layers.N.*`, shifted by the Clamp that
diffusers applies outside its layer list) are renamed on load. TAESD upsamples 3 times (SD's 8x
VAE); `upsamples` makes the same design for other VAEs (the built-in model's is 4x).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TinyDecoderConfig:
    latent_channels: int = 4
    upsamples: int = 3  # log2 of the VAE's downscale factor
    width: int = 64


class Clamp(nn.Module):
    """Soft clamp of the latents to (-3, 3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


def conv(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class Block(nn.Module):
    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.conv = nn.Sequential(conv(n_in, n_out), nn.ReLU(), conv(n_out, n_out), nn.ReLU(), conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


class TinyDecoder(nn.Sequential):
    def __init__(self, cfg: TinyDecoderConfig = TinyDecoderConfig()):
        w = cfg.width
        layers: list[nn.Module] = [Clamp(), conv(cfg.latent_channels, w), nn.ReLU()]
        for _ in range(cfg.upsamples):
            layers += [Block(w, w), Block(w, w), Block(w, w), nn.Upsample(scale_factor=2), conv(w, w, bias=False)]
        layers += [Block(w, w), conv(w, 3)]
        super().__init__(*layers)
        self.cfg = cfg

    @property
    def upscale(self) -> int:
        return 2**self.cfg.upsamples

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) sampler-space latents -> (B, 3, h*f, w*f) in [0, 1]."""
        return self(latents).clamp(0, 1)


_DIFFUSERS = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def taesd_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A decoder's tensors under TAESD's own keys: as they are, or renamed from diffusers'
    AutoencoderTiny (its encoder's tensors dropped)."""
    if not any(k.startswith("decoder.") for k in state):
        return dict(state)
    out = {}
    for key, value in state.items():
        m = _DIFFUSERS.match(key)
        if m:
            out[f"{int(m.group(1)) + 1}.{m.group(2)}"] = value
        elif not key.startswith("encoder."):
            out[key] = value  # left for strict loading to name
    return out


def config_from_keys(state: dict[str, torch.Tensor]) -> TinyDecoderConfig:
    """The architecture from TAESD-layout keys: the first convolution's shape and the number of
    bias-free 3x3 convolutions (one after each upsampling)."""
    if "1.weight" not in state:
        raise ValueError("not a TAESD decoder: no '1.weight' (the first convolution)")
    first = state["1.weight"]
    upsamples = sum(1 for k, v in state.items() if re.fullmatch(r"\d+\.weight", k) and v.ndim == 4
                    and v.shape[-1] == 3 and k.replace("weight", "bias") not in state)
    return TinyDecoderConfig(latent_channels=first.shape[1], upsamples=upsamples, width=first.shape[0])
