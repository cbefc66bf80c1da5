"""Tiled VAE decoding and encoding: large images in bounded memory.

Only the layers above latent resolution need much memory (at 2048x2048 the decoder's full-size
activations take 2-4 GB each; at latent resolution 134 MB). So the latent-resolution layers,
among them the mid block's attention over all positions, run on the whole image as usual, and
only the rest is tiled: the grid of latent cells is covered by overlapping tiles of at most
`tile` cells a side (evenly spaced, neighbours sharing at least `overlap` cells), each tile goes
through the decoder's upsampling path (or its pixels through the encoder's downsampling path) on
its own, and the overlaps are blended with cos^2 ramps that fall to zero at a tile's inner edges,
where its convolutions saw zero padding instead of neighbours.

What still differs from the untiled result: the receptive field of pixels near a tile's edge is
cut (the blending hides that), and each GroupNorm normalises with the statistics of its input,
which for a tile are not the image's. `norm` chooses the statistics:
  "tile":     each tile's own: tiles of a non-uniform image shift in colour against each other;
  "estimate": every layer's statistics measured once on the whole image scaled down to at most
              `stats` cells a side (nearest-neighbour subsampling for latents, area averaging for
              pixels), then used for all tiles, so they agree (the multidiffusion tiled VAE's
              "fast decoder" does this on a downscaled image). Images of at most `stats` cells get
              their exact statistics; larger ones an estimate that improves with `stats`, whose
              pass costs as much memory as an untiled image of that size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from sdtorch.models.vae import AutoencoderKL, DiagonalGaussian, Norm

NormMode = Literal["tile", "estimate"]

# Defaults, in latent cells (8 pixels for SD): tiles of at most 64 cells sharing at least 16, used
# automatically for images of more than AUTO_CELLS cells (1024x1024 pixels for SD).
TILE, OVERLAP = 64, 16
AUTO_CELLS = 128 * 128
STATS = 128  # the statistics pass of norm="estimate" sees at most 128 x 128 cells
CHUNK = 4  # groups normalised at a time (float32 copies of only that part of a layer's input)


@dataclass(frozen=True)
class Tile:
    """A tile on the grid of latent cells: where it is, its size, and how many cells it shares
    with its neighbours above, below, left and right (where its blending ramps lie)."""

    y: int
    x: int
    h: int
    w: int
    top: int = 0
    bottom: int = 0
    left: int = 0
    right: int = 0

    def region(self, scale: int) -> tuple[slice, slice]:
        """Its rows and columns at `scale` pixels per cell."""
        return slice(self.y * scale, (self.y + self.h) * scale), slice(self.x * scale, (self.x + self.w) * scale)

    def weight(self, scale: int) -> torch.Tensor:
        """(h*scale, w*scale) blending weights; where two tiles share cells their ramps sum to 1."""
        wy = _ramp(self.h * scale, self.top * scale, self.bottom * scale)
        wx = _ramp(self.w * scale, self.left * scale, self.right * scale)
        return wy[:, None] * wx[None]


def _ramp(length: int, before: int, after: int) -> torch.Tensor:
    """(length,): cos^2 ramps up over the first `before` and down over the last `after` entries."""
    w = torch.ones(length)
    if before:
        w[:before] = torch.sin(0.5 * math.pi * (torch.arange(before) + 0.5) / before) ** 2
    if after:
        w[length - after :] = torch.cos(0.5 * math.pi * (torch.arange(after) + 0.5) / after) ** 2
    return w


def spans(size: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """(start, length) of the fewest equal tiles of at most `tile` cells covering [0, size),
    evenly spaced, consecutive ones sharing at least `overlap` cells."""
    if size <= tile:
        return [(0, size)]
    n = math.ceil((size - overlap) / (tile - overlap))
    length = math.ceil((size + (n - 1) * overlap) / n)  # the smallest tiles that still overlap enough
    return [(i * (size - length) // (n - 1), length) for i in range(n)]


def tiles(h: int, w: int, tile: int, overlap: int) -> list[Tile]:
    """Cover an h x w grid of latent cells with overlapping tiles (row by row)."""
    if tile < 1 or not 0 <= overlap < tile:
        raise ValueError(f"need tile size >= 1 and 0 <= overlap < tile size, got tile {tile}, overlap {overlap}")
    rows, cols = spans(h, tile, overlap), spans(w, tile, overlap)

    def shared(sp: list[tuple[int, int]], i: int, j: int) -> int:  # cells tile i shares with tile j
        return max(0, min(sp[i][0] + sp[i][1], sp[j][0] + sp[j][1]) - max(sp[i][0], sp[j][0])) if 0 <= j < len(sp) else 0

    return [Tile(y, x, th, tw, shared(rows, i, i - 1), shared(rows, i, i + 1), shared(cols, j, j - 1), shared(cols, j, j + 1))
            for i, (y, th) in enumerate(rows) for j, (x, tw) in enumerate(cols)]


def tiled_map(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grid: list[Tile], *,
              scale_in: int, scale_out: int) -> torch.Tensor:
    """fn over the tiles of x, blended: x (B, C, h*scale_in, w*scale_in) -> (B, C', h*scale_out,
    w*scale_out), where fn maps a tile of `scale_in` pixels per cell to `scale_out` per cell."""
    out, total = None, None
    for t in grid:
        part = fn(x[(..., *t.region(scale_in))]).float()
        if out is None:
            out = torch.zeros(*part.shape[:2], *(s // scale_in * scale_out for s in x.shape[-2:]), device=part.device)
            total = torch.zeros(out.shape[-2:], device=part.device)
        weight = t.weight(scale_out).to(part.device)
        out[(..., *t.region(scale_out))] += part * weight
        total[t.region(scale_out)] += weight
    return out / total


class NormStats:
    """A `Norm.hook` that normalises every layer with fixed statistics (mean and variance per
    batch item and group): while `recording`, each layer's own, stored; after that, the stored."""

    def __init__(self):
        self.stats: dict[Norm, tuple[torch.Tensor, torch.Tensor]] = {}
        self.recording = True

    def __call__(self, m: Norm, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        per = c // m.num_groups
        if self.recording:  # in float32, a few groups at a time (no float32 copy of the whole input)
            g = x.reshape(b, m.num_groups, -1)
            parts = [torch.var_mean(g[:, i : i + CHUNK].float(), dim=-1, unbiased=False)
                     for i in range(0, m.num_groups, CHUNK)]
            self.stats[m] = (torch.cat([p[1] for p in parts], 1), torch.cat([p[0] for p in parts], 1))
        mean, var = self.stats[m]
        # y = (x - mean) / sqrt(var + eps) * weight + bias = x * scale + shift, per channel
        scale = torch.rsqrt(var + m.eps).repeat_interleave(per, 1) * m.weight.float()
        shift = m.bias.float() - mean.repeat_interleave(per, 1) * scale
        y = torch.empty_like(x)
        for i in range(0, c, CHUNK * per):
            j = slice(i, i + CHUNK * per)
            y[:, j] = torch.addcmul(shift[:, j, None, None], x[:, j].float(), scale[:, j, None, None])
        return y


def _shrunk(x: torch.Tensor, side: int, scale: int, mode: str) -> torch.Tensor:
    """x (a grid of cells, `scale` pixels each) scaled down to at most `side` cells a side."""
    cells = (x.shape[-2] // scale, x.shape[-1] // scale)
    k = max(cells) / side
    if k <= 1:
        return x
    return F.interpolate(x, size=tuple(max(1, round(c / k)) * scale for c in cells), mode=mode)


def _run_tiled(vae: AutoencoderKL, fn: Callable, x: torch.Tensor, grid: list[Tile], norm: NormMode, *,
               scale_in: int, scale_out: int, stats: int, shrink: str) -> torch.Tensor:
    if norm not in ("tile", "estimate"):
        raise ValueError(f"norm must be 'tile' or 'estimate', got {norm!r}")
    if stats < 1:
        raise ValueError(f"stats must be >= 1 cell, got {stats}")
    if norm == "tile" or len(grid) == 1:
        return tiled_map(fn, x, grid, scale_in=scale_in, scale_out=scale_out)
    hook = NormStats()
    norms = [m for m in vae.modules() if isinstance(m, Norm)]
    for m in norms:
        m.hook = hook
    try:
        fn(_shrunk(x, stats, scale_in, shrink))  # records every layer's statistics
        hook.recording = False
        return tiled_map(fn, x, grid, scale_in=scale_in, scale_out=scale_out)
    finally:
        for m in norms:
            m.hook = None


@torch.no_grad()
def tiled_decode(vae: AutoencoderKL, z: torch.Tensor, *, tile: int = 64, overlap: int = 16,
                 norm: NormMode = "estimate", stats: int = STATS) -> torch.Tensor:
    """vae.decode in tiles of at most `tile` latent cells a side, sharing at least `overlap`:
    unscaled latents (B, 4, h, w) -> image (B, 3, h*f, w*f) in about [-1, 1]. A latent that fits
    in one tile is decoded exactly as vae.decode does."""
    h = vae.decoder.latent_part(vae.post_quant_conv(z.to(vae.quant_conv.weight.dtype)))
    grid = tiles(h.shape[-2], h.shape[-1], tile, overlap)
    return _run_tiled(vae, vae.decoder.pixel_part, h, grid, norm, scale_in=1, scale_out=vae.downscale, stats=stats,
                      shrink="nearest-exact")


@torch.no_grad()
def tiled_encode(vae: AutoencoderKL, x: torch.Tensor, *, tile: int = 64, overlap: int = 16,
                 norm: NormMode = "estimate", stats: int = STATS) -> DiagonalGaussian:
    """vae.encode in tiles of at most `tile` latent cells a side (tile * f pixels), sharing at
    least `overlap` cells: x (B, 3, H, W) in [-1, 1], H and W multiples of f -> the posterior
    over unscaled latents (B, 4, H/f, W/f)."""
    f = vae.downscale
    if x.shape[-2] % f or x.shape[-1] % f:
        raise ValueError(f"tiled encoding needs sides that are multiples of {f}, got {tuple(x.shape[-2:])}")
    grid = tiles(x.shape[-2] // f, x.shape[-1] // f, tile, overlap)
    x = x.to(vae.quant_conv.weight.dtype)
    h = _run_tiled(vae, vae.encoder.pixel_part, x, grid, norm, scale_in=f, scale_out=1, stats=stats, shrink="area")
    return DiagonalGaussian(vae.quant_conv(vae.encoder.latent_part(h.to(x.dtype))).float())
