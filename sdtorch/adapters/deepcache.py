"""DeepCache (Ma et al., 2023): reuse the UNet's deep features across neighbouring steps.

A UNet's high-level features change slowly from one denoising step to the next; its skip
connections carry the fine detail. So every `interval`-th call runs the whole UNet and keeps the
features that enter output block N-1-`branch` (N output blocks); the calls in between run only
input blocks 0..`branch` and output blocks N-1-`branch`..N-1, with the kept features in place
of everything deeper. With branch 0 a cached call costs the first convolution and the last
output block. This changes the output (an approximation): it is off unless asked for, and its
speed-up and difference from the exact path are measured in benchmarks/speed.py and
benchmarks/deepcache.py.
"""

from __future__ import annotations

import torch

from sdtorch.models.unet import UNetModel, timestep_embedding


class DeepCache:
    """unet(x, t, context) with DeepCache; a fresh one per sampling run (it counts calls)."""

    def __init__(self, unet: UNetModel, interval: int = 3, branch: int = 0):
        n = len(unet.output_blocks)
        if interval < 1:
            raise ValueError(f"DeepCache interval must be >= 1, got {interval}")
        if not 0 <= branch < n - 1:
            raise ValueError(f"DeepCache branch must be in [0, {n - 1}), got {branch}")
        self.unet, self.interval, self.branch = unet, interval, branch
        self.calls = 0
        self.cache: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        full = self.calls % self.interval == 0 or self.cache is None or self.cache.shape[0] != x.shape[0]
        self.calls += 1
        u = self.unet
        dtype = u.time_embed[0].weight.dtype
        emb = u.time_embed(timestep_embedding(t.expand(x.shape[0]), u.cfg.model_channels).to(dtype))
        h, context = x.to(dtype), context.to(dtype)
        stop = len(u.input_blocks) if full else self.branch + 1  # input blocks to run
        skips = []
        for block in u.input_blocks[:stop]:
            h = block(h, emb, context)
            skips.append(h)
        keep_at = len(u.output_blocks) - 1 - self.branch  # the output block whose input is cached
        if full:
            h = u.middle_block(h, emb, context)
            first = 0
        else:
            h, first = self.cache, keep_at
        for i in range(first, len(u.output_blocks)):
            if full and i == keep_at:
                self.cache = h
            h = torch.cat([h, skips.pop()], dim=1)
            up_size = skips[-1].shape[-2:] if skips else None
            h = u.output_blocks[i](h, emb, context, up_size)
        return u.out(h)
