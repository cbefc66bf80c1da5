"""A small 3-D convolutional autoencoder for voxel measurements (D, H, W), e.g. a brain scan.

The encoder halves every axis `len(channels)` times and ends in `code_channels`; its output
(B, code_channels, D', H', W') is the code that conditions the UNet (each of the D'·H'·W' cells
becomes one cross-attention token, see `sdtorch.conditioning.encoders`). The decoder mirrors it;
the pair is trained on reconstruction alone (`sdtorch.training.decoding.VoxelAEJob`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class VoxelAEConfig:
    depth: int = 8  # D: slices
    size: int = 16  # H = W
    channels: tuple[int, ...] = (32, 64)  # one stride-2 stage each
    code_channels: int = 32

    @property
    def code_shape(self) -> tuple[int, int, int, int]:
        f = 2 ** len(self.channels)
        return self.code_channels, self.depth // f, self.size // f, self.size // f

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> VoxelAEConfig:
        return cls(**{**d, "channels": tuple(d["channels"])})


def _block(cin: int, cout: int, transpose: bool = False) -> nn.Sequential:
    conv = nn.ConvTranspose3d(cin, cout, 4, stride=2, padding=1) if transpose else nn.Conv3d(cin, cout, 4, stride=2, padding=1)
    return nn.Sequential(conv, nn.GroupNorm(8, cout), nn.SiLU(), nn.Conv3d(cout, cout, 3, padding=1), nn.SiLU())


class VoxelEncoder(nn.Module):
    """(B, D, H, W) measurements -> (B, code_channels, D', H', W') code."""

    def __init__(self, cfg: VoxelAEConfig):
        super().__init__()
        self.cfg = cfg
        widths = (1, *cfg.channels)
        self.blocks = nn.Sequential(*(_block(a, b) for a, b in zip(widths, widths[1:])))
        self.out = nn.Conv3d(cfg.channels[-1], cfg.code_channels, 3, padding=1)
        shape = (cfg.depth, cfg.size, cfg.size)
        # Per-voxel standardisation of raw measurements (set from the training data, saved with the weights).
        self.register_buffer("shift", torch.zeros(shape))
        self.register_buffer("scale", torch.ones(shape))

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != tuple(self.shift.shape):
            raise ValueError(f"expected measurements of shape (B, {self.cfg.depth}, {self.cfg.size}, {self.cfg.size}), "
                             f"got {tuple(x.shape)}")
        return (x - self.shift) / self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw measurements (B, D, H, W) -> code."""
        return self.out(self.blocks(self.standardize(x).unsqueeze(1)))


class VoxelDecoder(nn.Module):
    def __init__(self, cfg: VoxelAEConfig):
        super().__init__()
        widths = (*reversed(cfg.channels), cfg.channels[0])
        self.inp = nn.Conv3d(cfg.code_channels, widths[0], 3, padding=1)
        self.blocks = nn.Sequential(*(_block(a, b, transpose=True) for a, b in zip(widths, widths[1:])))
        self.out = nn.Conv3d(widths[-1], 1, 3, padding=1)

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        return self.out(self.blocks(self.inp(code))).squeeze(1)


class VoxelAutoencoder(nn.Module):
    def __init__(self, cfg: VoxelAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = VoxelEncoder(cfg), VoxelDecoder(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw measurements -> their reconstruction, standardised (compare with `encoder.standardize(x)`)."""
        return self.decoder(self.encoder(x))
