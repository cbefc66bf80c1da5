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

from sdtorch.models.unet import UNetModel


class DeepCache:
    """unet(x, t, context) with DeepCache, composed of the UNet's own stages (`embed`, `encode`,
    `decode`); a fresh one per sampling run (it counts calls), so the loaded UNet is never changed."""

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
        emb = u.embed(t, x.shape[0])
        h, context = x.to(emb.dtype), context.to(emb.dtype)
        keep_at = len(u.output_blocks) - 1 - self.branch  # the output block whose input is cached
        if full:
            h, skips = u.encode(h, emb, context)
            h = u.middle_block(h, emb, context)
            self.cache = h = u.decode(h, skips, emb, context, stop=keep_at)
        else:
            _, skips = u.encode(h, emb, context, stop=self.branch + 1)
            h = self.cache
        return u.out(u.decode(h, skips, emb, context, start=keep_at))
