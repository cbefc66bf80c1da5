"""Token merging for Stable Diffusion (ToMe for SD, Bolya & Hoffman 2023), per request.

Before each self-attention at the highest resolutions, the image tokens are split into
destinations (one random position in each sx x sy cell) and sources (the rest); the `ratio` of
all tokens that are sources most similar (cosine) to some destination are averaged into it.
Self-attention then runs on the fewer tokens, and its output is copied back to every merged
token ("unmerge"). Cross-attention and the feed-forward see all tokens (the paper's defaults:
merge_attn only). `max_downsample` 1 merges only at full latent resolution (the blocks where
self-attention costs most), 2 also at half, and so on. An approximation: the infotext says
"Token merging ratio" as AUTOMATIC1111 does.

`token_merging(unet, ...)` sets each chosen transformer block's `tome` for the length of a run
(`BasicTransformerBlock.forward` asks it for merge/unmerge) and clears it afterwards.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable

import torch

Merge = Callable[[torch.Tensor], torch.Tensor]


def _dst_mask(h: int, w: int, sx: int, sy: int, generator: torch.Generator | None) -> torch.Tensor:
    """(h * w,) bool: True where a token is a destination, one random position per sy x sx cell
    (cells cut off by the image border hold only sources)."""
    hs, ws = h // sy, w // sx
    pick = torch.randint(sy * sx, (hs, ws, 1), generator=generator)
    cells = torch.zeros(hs, ws, sy * sx, dtype=torch.bool).scatter_(2, pick, True)
    cells = cells.view(hs, ws, sy, sx).transpose(1, 2).reshape(hs * sy, ws * sx)
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[: hs * sy, : ws * sx] = cells
    return mask.flatten()


def bipartite_merge(metric: torch.Tensor, h: int, w: int, r: int, sx: int = 2, sy: int = 2,
                    generator: torch.Generator | None = None) -> tuple[Merge, Merge]:
    """merge: (B, N, C) -> (B, N - r, C), unmerge: back to (B, N, C); N = h * w tokens in
    row-major order, `metric` (B, N, C) the features whose cosine similarity decides."""
    b, n, _ = metric.shape
    dst_mask = _dst_mask(h, w, sx, sy, generator).to(metric.device)
    a_idx = torch.nonzero(~dst_mask).squeeze(1)  # sources
    b_idx = torch.nonzero(dst_mask).squeeze(1)  # destinations
    r = min(r, len(a_idx))
    with torch.no_grad():
        m = metric / metric.norm(dim=-1, keepdim=True)
        scores = m[:, a_idx] @ m[:, b_idx].transpose(1, 2)  # (B, Na, Nb)
        best, best_dst = scores.max(dim=-1)
        order = best.argsort(dim=-1, descending=True)
        merged, kept = order[:, :r], order[:, r:]  # source positions within a_idx
        into = best_dst.gather(1, merged)  # their destinations within b_idx

    def merge(x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-1]
        src, dst = x[:, a_idx], x[:, b_idx]
        unm = src.gather(1, kept[..., None].expand(-1, -1, c))
        moved = src.gather(1, merged[..., None].expand(-1, -1, c))
        dst = dst.scatter_reduce(1, into[..., None].expand(-1, -1, c), moved, reduce="mean")
        return torch.cat([unm, dst], dim=1)

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        c, n_unm = x.shape[-1], kept.shape[1]
        unm, dst = x[:, :n_unm], x[:, n_unm:]
        out = x.new_zeros(b, n, c)
        out[:, b_idx] = dst
        out.scatter_(1, a_idx[kept][..., None].expand(-1, -1, c), unm)
        out.scatter_(1, a_idx[merged][..., None].expand(-1, -1, c), dst.gather(1, into[..., None].expand(-1, -1, c)))
        return out

    return merge, unmerge


class TokenMerger:
    """What a transformer block asks for: merge/unmerge for its tokens, or None to skip."""

    def __init__(self, ratio: float, latent_hw: tuple[int, int], *, max_downsample: int = 1, sx: int = 2,
                 sy: int = 2, generator: torch.Generator | None = None):
        if not 0 <= ratio < 1:
            raise ValueError(f"token merging ratio must be in [0, 1), got {ratio}")
        self.ratio, (self.h0, self.w0) = ratio, latent_hw
        self.max_downsample, self.sx, self.sy, self.generator = max_downsample, sx, sy, generator

    def __call__(self, x: torch.Tensor) -> tuple[Merge, Merge] | None:
        n = x.shape[1]
        d = math.ceil(math.sqrt(self.h0 * self.w0 // n))  # this level's downsampling (as tomesd reckons it)
        if d > self.max_downsample or self.ratio == 0:
            return None
        h, w = -(-self.h0 // d), -(-self.w0 // d)  # the UNet's stride-2 convolutions round up
        if h * w != n:
            return None
        return bipartite_merge(x, h, w, int(n * self.ratio), self.sx, self.sy, self.generator)


@contextmanager
def token_merging(unet: torch.nn.Module, merger: TokenMerger | None):
    """Give every transformer block of `unet` the merger for the length of the block; None: off."""
    blocks = [m for m in unet.modules() if hasattr(m, "tome")]
    for block in blocks:
        block.tome = merger
    try:
        yield
    finally:
        for block in blocks:
            block.tome = None
