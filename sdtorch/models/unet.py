"""The noise-predicting UNet of latent diffusion (`ldm...openaimodel.UNetModel`).

Module paths equal the checkpoint keys minus `model.diffusion_model.`, so
`input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight` loads with no renaming. The
`nn.Sequential` positions (`in_layers.2`, `out_layers.3`, `time_embed.2`) are kept with real
placeholder modules for that reason.

The UNet knows nothing of schedules: it maps (noisy latents, timestep, text states) to the
raw model output (eps or v, as the checkpoint was trained).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sdtorch.config import UNetConfig


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: (B,) -> (B, dim), cos first."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the activations' dtype (as the original).

    PyTorch's CPU kernel accumulates in float32 for bfloat16/float16 inputs given float32
    parameters, so reduced-precision activations are normalised without a float32 copy."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
            return F.group_norm(x, self.num_groups, self.weight.float(), self.bias.float(), self.eps)
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm32(groups, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(groups, out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        same = channels == out_channels
        self.skip_connection = nn.Identity() if same else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None].to(h.dtype)  # (B, C) -> (B, C, 1, 1)
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """Multi-head attention; self-attention when no context is given."""

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))
        # Editing and visualisation (sdtorch.editing.p2p) set this to observe or change attention:
        # hook(module, q, k, v) -> (B, heads, N, d). None: plain scaled-dot-product attention.
        self.hook = None
        self.is_cross = context_dim is not None
        # Query positions per attention call (0: all at once); see `chunked_attention`.
        self.chunk = 0

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        ctx = x if context is None else context  # x: (B, N, C), ctx: (B, L, C')
        b, n, _ = x.shape
        q = self.to_q(x).view(b, n, self.heads, -1).transpose(1, 2)  # (B, heads, N, d)
        k = self.to_k(ctx).view(b, ctx.shape[1], self.heads, -1).transpose(1, 2)
        v = self.to_v(ctx).view(b, ctx.shape[1], self.heads, -1).transpose(1, 2)
        # A hook sees whole layers (prompt-to-prompt matches layers by call order), unchunked.
        out = chunked_attention(q, k, v, self.chunk) if self.hook is None else self.hook(self, q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int = 0) -> torch.Tensor:
    """Scaled-dot-product attention over `chunk` query positions at a time (0: all at once):
    q (B, heads, N, d), k and v (B, heads, L, d) -> (B, heads, N, d). Each query's output depends on
    its own row of scores only, so chunking changes nothing but memory: a kernel that materialises
    the (N, L) scores holds `chunk` rows of them. (PyTorch's fused CPU and CUDA kernels hold only
    small blocks anyway: there chunking saves nothing.)"""
    n = q.shape[-2]
    if not chunk or chunk >= n:
        return F.scaled_dot_product_attention(q, k, v)
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    for i in range(0, n, chunk):
        out[..., i : i + chunk, :] = F.scaled_dot_product_attention(q[..., i : i + chunk, :], k, v)
    return out


class GEGLU(nn.Module):
    """Gated GELU feed-forward input (Shazeer, 2020): one projection, half gates the other."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, cross_only: bool = False):
        super().__init__()
        # self-attention over pixels (cross_only: a second attention to the context, the x4 upscaler's)
        self.cross_only = cross_only
        self.attn1 = CrossAttention(dim, context_dim if cross_only else None, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)  # pixels attend to text tokens
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.tome = None  # token merging for self-attention (`sdtorch.adapters.tome`), set per run

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        merging = self.tome(x) if self.tome is not None else None
        if merging is not None:
            merge, unmerge = merging
            x = x + unmerge(self.attn1(merge(self.norm1(x)), context if self.cross_only else None))
        else:
            x = x + self.attn1(self.norm1(x), context if self.cross_only else None)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Image features (B, C, H, W) as H*W tokens through transformer blocks, with a residual."""

    def __init__(self, channels: int, heads: int, dim_head: int, cfg: UNetConfig, depth: int = 1, level: int = -1):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = cfg.use_linear_in_transformer
        self.norm = GroupNorm32(cfg.norm_groups, channels, eps=1e-6)
        proj = (lambda i, o: nn.Linear(i, o)) if self.use_linear else (lambda i, o: nn.Conv2d(i, o, 1))
        self.proj_in = proj(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, cfg.context_dim, cfg.cross_only(level)) for _ in range(depth)
        )
        self.proj_out = proj(inner, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, -1)  # (B, H*W, C), channels contiguous
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)
        # Back to (B, C, H, W) in the input's memory layout (a free view for channels-last).
        channels_last = x_in.is_contiguous(memory_format=torch.channels_last) and not x_in.is_contiguous()
        x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2)
        x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:  # odd latent sizes: match the skip connection exactly
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


class TimestepEmbedSequential(nn.Sequential):
    """A sequence of layers, each given what it needs: ResBlocks the timestep embedding,
    transformers the text context, an Upsample the size of the next skip connection."""

    def forward(self, x, emb, context, up_size=None):  # noqa: D102  (see class docstring)
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, up_size)
            else:
                x = layer(x)
        return x


def _heads(channels: int, cfg: UNetConfig) -> tuple[int, int]:
    """(heads, dim_head): SD1 fixes the head count, SD2 the head width."""
    if cfg.num_head_channels == -1:
        return cfg.num_heads, channels // cfg.num_heads
    return channels // cfg.num_head_channels, cfg.num_head_channels


def _level(cfg: UNetConfig, ch_in: int, ch_out: int, ds: int, level: int) -> TimestepEmbedSequential:
    layers: list[nn.Module] = [ResBlock(ch_in, cfg.model_channels * 4, ch_out, cfg.norm_groups, cfg.dropout)]
    if ds in cfg.attention_resolutions:
        layers.append(SpatialTransformer(ch_out, *_heads(ch_out, cfg), cfg, cfg.depth(level), level))
    return TimestepEmbedSequential(*layers)


def input_blocks(cfg: UNetConfig) -> tuple[nn.ModuleList, list[int]]:
    """The encoder half's blocks (conv_in, then per level ResBlocks[+attention] and a downsampler)
    and the channels of the skip connection each leaves (a ControlNet has the same blocks)."""
    mc = cfg.model_channels
    blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
    skip_channels, ch, ds = [mc], mc, 1
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            blocks.append(_level(cfg, ch, mult * mc, ds, level))
            ch = mult * mc
            skip_channels.append(ch)
        if level != len(cfg.channel_mult) - 1:
            blocks.append(TimestepEmbedSequential(Downsample(ch)))
            skip_channels.append(ch)
            ds *= 2
    return blocks, skip_channels


def middle_block(cfg: UNetConfig, ch: int) -> TimestepEmbedSequential:
    emb_dim = cfg.model_channels * 4
    return TimestepEmbedSequential(
        ResBlock(ch, emb_dim, ch, cfg.norm_groups, cfg.dropout),
        SpatialTransformer(ch, *_heads(ch, cfg), cfg, cfg.depth(-1)),
        ResBlock(ch, emb_dim, ch, cfg.norm_groups, cfg.dropout),
    )


def time_embedding(cfg: UNetConfig) -> tuple[nn.Sequential, nn.Module | None]:
    """`time_embed` and, for UNets with an added vector (SDXL) or class labels (the x4 upscaler), `label_emb`."""
    mc, emb_dim = cfg.model_channels, cfg.model_channels * 4
    time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
    if cfg.num_classes:
        return time_embed, nn.Embedding(cfg.num_classes, emb_dim)
    if not cfg.adm_in_channels:
        return time_embed, None
    return time_embed, nn.Sequential(nn.Sequential(
        nn.Linear(cfg.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)))


def embed(module: nn.Module, cfg: UNetConfig, t: torch.Tensor, batch: int, y: torch.Tensor | None = None) -> torch.Tensor:
    """The time (and vector) embedding of a module with `time_embed` (and `label_emb`) built by
    `time_embedding(cfg)`: a UNet's or a ControlNet's."""
    dtype = module.time_embed[0].weight.dtype
    emb = module.time_embed(timestep_embedding(t.expand(batch), cfg.model_channels).to(dtype))
    if cfg.num_classes:  # y: (B,) class labels
        if y is None or y.shape != (batch,):
            raise ValueError(f"this UNet takes {batch} class labels (the x4 upscaler: the noise level), got "
                             f"{None if y is None else tuple(y.shape)}")
        return emb + module.label_emb(y.long())
    adm = cfg.adm_in_channels
    if (y is None) != (adm == 0):
        raise ValueError(f"this UNet takes a vector of {adm} values (SDXL's pooled text and sizes)" if adm
                         else "this UNet takes no vector (only SDXL-type UNets do)")
    if y is not None:
        if y.shape != (batch, adm):
            raise ValueError(f"the UNet's vector must be ({batch}, {adm}), got {tuple(y.shape)}")
        emb = emb + module.label_emb(y.to(dtype))
    return emb


class UNetModel(nn.Module):
    """x: (B, in_channels, h, w), t: (B,), context: (B, L, context_dim), y: (B, adm_in_channels) for
    UNets with an added vector embedding (SDXL) -> (B, out_channels, h, w)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        mc = cfg.model_channels
        self.time_embed, label_emb = time_embedding(cfg)
        if label_emb is not None:  # SDXL: a vector (pooled text + size conditions) added to the time embedding
            self.label_emb = label_emb
        self.input_blocks, skip_channels = input_blocks(cfg)
        ch, ds = skip_channels[-1], 2 ** (len(cfg.channel_mult) - 1)
        self.middle_block = middle_block(cfg, ch)
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                block = _level(cfg, ch + skip_channels.pop(), mult * mc, ds, level)
                ch = mult * mc
                if level and i == cfg.num_res_blocks:
                    block.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(block)
        self.out = nn.Sequential(GroupNorm32(cfg.norm_groups, ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.embed(t, x.shape[0], y)
        dtype = emb.dtype
        h, context = x.to(dtype), context.to(dtype)
        h, skips = self.encode(h, emb, context)
        h = self.middle_block(h, emb, context)
        return self.out(self.decode(h, skips, emb, context))

    # The stages of `forward`, public so that adapters (DeepCache) compose them instead of copying.

    def embed(self, t: torch.Tensor, batch: int, y: torch.Tensor | None = None) -> torch.Tensor:
        """Timesteps (B,) or () and the vector y (B, adm) of UNets that take one -> the embedding
        (B, 4 * model_channels) in the weights' dtype."""
        return embed(self, self.cfg, t, batch, y)

    def encode(self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
               stop: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Input blocks [:stop] -> (features, the skip connections they leave, shallowest first)."""
        skips = []
        for block in self.input_blocks[:stop]:
            h = block(h, emb, context)
            skips.append(h)
        return h, skips

    def decode(self, h: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor, context: torch.Tensor,
               start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Output blocks [start:stop], each taking the deepest remaining skip (popped from `skips`)."""
        for block in self.output_blocks[start:stop]:
            h = torch.cat([h, skips.pop()], dim=1)
            up_size = skips[-1].shape[-2:] if skips else None
            h = block(h, emb, context, up_size)
        return h
