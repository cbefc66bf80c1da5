"""ControlNet (Zhang et al. 2023, `cldm.cldm.ControlNet`): a trainable copy of a UNet's encoder
half that reads a control image and returns one residual per skip connection plus one for the
middle block, each through a zero-initialised 1x1 convolution.

Module paths equal the original file's keys minus `control_model.` (`input_hint_block.14`,
`zero_convs.3.0`, `middle_block_out.0`), and the encoder blocks are the UNet's own
(`sdtorch.models.unet.input_blocks`), so the copy has exactly the UNet's key names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from sdtorch.config import UNetConfig
from sdtorch.models.unet import TimestepEmbedSequential, embed, input_blocks, middle_block, time_embedding


@dataclass(frozen=True)
class ControlNetConfig:
    """unet: the encoder's hyper-parameters (those of the UNet it controls; `out_channels` unused);
    hint_channels: the control image's channels; embed_channels: the hint encoder's widths, one
    stride-2 convolution between each (the original's 16, 32, 96, 256: 8x down to the latents)."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    hint_channels: int = 3
    embed_channels: tuple[int, ...] = (16, 32, 96, 256)

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.embed_channels) - 1)


def hint_block(cfg: ControlNetConfig) -> TimestepEmbedSequential:
    """Control image (B, hint_channels, H, W) -> features (B, model_channels, H/f, W/f): convs with
    SiLU between them, every other one of stride 2, the last zero-initialised in training."""
    c = cfg.embed_channels
    layers: list[nn.Module] = [nn.Conv2d(cfg.hint_channels, c[0], 3, padding=1), nn.SiLU()]
    for a, b in zip(c, c[1:]):
        layers += [nn.Conv2d(a, a, 3, padding=1), nn.SiLU(), nn.Conv2d(a, b, 3, padding=1, stride=2), nn.SiLU()]
    layers.append(nn.Conv2d(c[-1], cfg.unet.model_channels, 3, padding=1))
    return TimestepEmbedSequential(*layers)


class ControlNet(nn.Module):
    """forward(x, hint, t, context, y=None) -> residuals: one (B, C_i, h_i, w_i) per UNet input block
    (shallowest first) and, last, one for the middle block's output."""

    def __init__(self, cfg: ControlNetConfig):
        super().__init__()
        self.cfg = cfg
        self.title = ""  # its name in infotexts ("control_v11p_sd15_canny [d14c016b]"), set by the loader
        self.time_embed, label_emb = time_embedding(cfg.unet)
        if label_emb is not None:
            self.label_emb = label_emb
        self.input_hint_block = hint_block(cfg)
        self.input_blocks, skip_channels = input_blocks(cfg.unet)
        self.zero_convs = nn.ModuleList(TimestepEmbedSequential(nn.Conv2d(c, c, 1)) for c in skip_channels)
        self.middle_block = middle_block(cfg.unet, skip_channels[-1])
        self.middle_block_out = TimestepEmbedSequential(nn.Conv2d(skip_channels[-1], skip_channels[-1], 1))

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype

    @classmethod
    def from_unet(cls, unet: nn.Module, cfg: ControlNetConfig) -> ControlNet:
        """A ControlNet to train for `unet` (Zhang et al.): its encoder and middle block copied, the
        hint encoder's last convolution and every zero convolution zero (it starts as no change)."""
        net = cls(cfg)
        own = net.state_dict()
        net.load_state_dict({k: v for k, v in unet.state_dict().items() if k in own} | {
            k: v for k, v in own.items() if k.startswith(("input_hint_block", "zero_convs", "middle_block_out"))})
        last = net.input_hint_block[-1]
        zeros = [last, *(z[0] for z in net.zero_convs), net.middle_block_out[0]]
        with torch.no_grad():
            for conv in zeros:
                conv.weight.zero_()
                conv.bias.zero_()
        return net

    def forward(self, x: torch.Tensor, hint: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor | None = None) -> list[torch.Tensor]:
        """x: (B, in_channels, h, w) the UNet's input latents; hint: (B, hint_channels, h*f, w*f) in
        [0, 1]; t: (B,); context: (B, L, D); y: (B, adm) for SDXL ControlNets."""
        f = self.cfg.downscale
        if hint.shape[-2:] != (x.shape[-2] * f, x.shape[-1] * f):
            raise ValueError(f"the control image is {hint.shape[-1]}x{hint.shape[-2]} but the latents need "
                             f"{x.shape[-1] * f}x{x.shape[-2] * f}")
        emb = embed(self, self.cfg.unet, t, x.shape[0], y)  # as the UNet's, with its own weights
        dtype = emb.dtype
        h, context = x.to(dtype), context.to(dtype)
        guided = self.input_hint_block(hint.to(dtype), emb, context)
        out = []
        for i, (block, zero) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context)
            if i == 0:
                h = h + guided
            out.append(zero(h, emb, context))
        h = self.middle_block(h, emb, context)
        out.append(self.middle_block_out(h, emb, context))
        return out
