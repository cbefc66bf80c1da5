"""KL-regularised autoencoder (`ldm.models.autoencoder.AutoencoderKL`): pixels <-> latents.

Module paths equal the checkpoint keys minus `first_stage_model.`. The decoder's `up.i` is
indexed by resolution level, so it runs from the last index to the first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sdtorch.config import VAEConfig
from sdtorch.models.unet import GroupNorm32


class Norm(GroupNorm32):
    """GroupNorm (in float32) whose statistics tiled decoding can record or replace
    (sdtorch.adapters.tiling sets `hook(module, x) -> normalised x`; None: plain GroupNorm)."""

    def __init__(self, channels: int, groups: int):
        super().__init__(groups, channels, eps=1e-6)
        self.hook = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) if self.hook is None else self.hook(self, x)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return Norm(channels, groups)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels; q, k, v, proj_out are 1x1 convolutions."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        # (B, 1, HW, C), contiguous: PyTorch's CPU kernel falls back to one that holds all (HW)^2
        # scores (17 GB at 2048x2048 pixels) when it is given the channels-first layout's view.
        q, k, v = (p(y).flatten(2).transpose(1, 2)[:, None].contiguous() for p in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as trained


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: `block.j` ResnetBlocks, an empty `attn` list (SD uses none), and
    `downsample` / `upsample` unless it is the last level."""

    def __init__(self, blocks: list[nn.Module], resample: nn.Module | None, name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList()
        if resample is not None:
            setattr(self, name, resample)


class Mid(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """(B, 3, H, W) -> (B, 2*z_channels, H/f, W/f): mean and log-variance of the latent."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g, chans = cfg.norm_groups, [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        ch = cfg.ch
        for i, out in enumerate(chans):
            blocks = [ResnetBlock(ch if j == 0 else out, out, g) for j in range(cfg.num_res_blocks)]
            ch = out
            self.down.append(Level(blocks, Downsample(out) if i < len(chans) - 1 else None, "downsample"))
        self.mid = Mid(ch, g)
        self.norm_out = _norm(ch, g)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.latent_part(self.pixel_part(x))

    def pixel_part(self, x: torch.Tensor) -> torch.Tensor:
        """The layers above latent resolution, up to the last downsampling: (B, 3, H, W) ->
        (B, C, H/f, W/f). Their activations grow with the image (tiled encoding tiles these)."""
        h = self.conv_in(x)
        for level in self.down:
            if hasattr(level, "downsample"):
                for block in level.block:
                    h = block(h)
                h = level.downsample(h)
        return h

    def latent_part(self, h: torch.Tensor) -> torch.Tensor:
        """The layers at latent resolution: the last level's blocks, the mid block (attention
        over all positions), the output. Cheap in memory at any image size."""
        for block in self.down[-1].block:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, 3, h*f, w*f) in [-1, 1] (roughly)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g, chans = cfg.norm_groups, [cfg.ch * m for m in cfg.ch_mult]
        ch = chans[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, ch, 3, padding=1)
        self.mid = Mid(ch, g)
        levels = []
        for i in reversed(range(len(chans))):
            blocks = [ResnetBlock(ch if j == 0 else chans[i], chans[i], g) for j in range(cfg.num_res_blocks + 1)]
            ch = chans[i]
            levels.insert(0, Level(blocks, Upsample(ch) if i > 0 else None, "upsample"))
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(ch, g)
        self.conv_out = nn.Conv2d(ch, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.pixel_part(self.latent_part(z))

    def latent_part(self, z: torch.Tensor) -> torch.Tensor:
        """The layers at latent resolution: conv_in, the mid block (attention over all
        positions), the lowest level's blocks. Cheap in memory at any image size."""
        h = self.mid(self.conv_in(z))
        for block in self.up[-1].block:
            h = block(h)
        return h

    def pixel_part(self, h: torch.Tensor) -> torch.Tensor:
        """From the first upsampling on: (B, C, h, w) -> (B, 3, h*f, w*f). Their activations grow
        with the image (tiled decoding tiles these)."""
        *rest, lowest = self.up  # its blocks ran in latent_part
        if hasattr(lowest, "upsample"):
            h = lowest.upsample(h)
        for level in reversed(rest):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """The encoder's posterior q(z|x) = N(mean, exp(logvar))."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype, device=self.mean.device)
        return self.mean + self.std * noise

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over latent elements: (B,)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    @property
    def downscale(self) -> int:
        """Pixels per latent along each side (8 for SD)."""
        return 2 ** (len(self.cfg.ch_mult) - 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x: (B, 3, H, W) in [-1, 1] -> posterior over unscaled latents (B, 4, H/f, W/f)."""
        dtype = self.quant_conv.weight.dtype
        return DiagonalGaussian(self.quant_conv(self.encoder(x.to(dtype))).float())

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: unscaled latents (B, 4, h, w) -> image (B, 3, h*f, w*f) in about [-1, 1]."""
        dtype = self.quant_conv.weight.dtype
        return self.decoder(self.post_quant_conv(z.to(dtype))).float()

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Training pass: x (B, 3, H, W) -> (reconstruction, posterior), decoding mean + std * noise."""
        posterior = self.encode(x)
        return self.decode(posterior.mean + posterior.std * noise), posterior
