"""Looking into (and later steering) the UNet's attention: hooks on `CrossAttention.hook`.

`AttentionStore` records the cross-attention probabilities between image positions and prompt
tokens, averaged over heads, layers and steps, at one resolution (the 16x16-ish layers where
Hertz et al. 2022 found the maps most meaningful). For every image position the maps over all
77 token positions sum to 1 (they are softmax rows); `token_maps` returns them per token.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn

from .unet import CrossAttention


def attention_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) in float32: (B, heads, N, L)."""
    scale = q.shape[-1] ** -0.5
    return torch.softmax((q.float() @ k.float().transpose(-1, -2)) * scale, dim=-1)


@contextmanager
def hooked(unet: nn.Module, hook, *, cross: bool = True, self_attn: bool = False):
    """Install `hook` on the UNet's cross- (and/or self-) attention layers for a `with` block."""
    layers = [m for m in unet.modules() if isinstance(m, CrossAttention) and (cross if m.is_cross else self_attn)]
    for m in layers:
        m.hook = hook
    try:
        yield layers
    finally:
        for m in layers:
            m.hook = None


class AttentionStore:
    """Accumulates cross-attention maps of the conditional half of each guided UNet batch, per
    resolution (number of image positions N). Call it as a `CrossAttention.hook`."""

    def __init__(self, batch: int = 1):
        self.batch = batch
        self.sums: dict[int, torch.Tensor] = {}  # N -> (B, N, L) summed over heads/layers/steps
        self.counts: dict[int, int] = {}

    def __call__(self, module: CrossAttention, q, k, v) -> torch.Tensor:
        probs = attention_probs(q, k)  # (B', heads, N, L)
        cond = probs[-self.batch :].mean(dim=1)  # guidance batches are [uncond, cond]
        n = probs.shape[2]
        self.sums[n] = self.sums.get(n, 0) + cond.detach().cpu()
        self.counts[n] = self.counts.get(n, 0) + 1
        return probs.to(v.dtype) @ v

    def maps(self, latent_hw: tuple[int, int], side: int = 16) -> torch.Tensor:
        """(B, L, h, w): mean attention of each image position to each token position, at the
        recorded resolution whose shorter side is closest to `side`; sums to 1 over L."""
        if not self.sums:
            raise RuntimeError("no attention was recorded")
        h, w = latent_hw

        def shape(n: int) -> tuple[int, int]:
            f = math.sqrt(h * w / n)  # every level halves both sides
            return round(h / f), round(w / f)

        n = min(self.sums, key=lambda n: (abs(min(shape(n)) - side), -n))
        mean = self.sums[n] / self.counts[n]  # (B, N, L)
        return mean.transpose(1, 2).reshape(mean.shape[0], -1, *shape(n))
