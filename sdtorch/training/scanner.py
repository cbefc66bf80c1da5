"""A simulated scanner: a fixed, random, lossy and noisy map from an image to a coarse 3-D
"voxel" tensor, standing in for a brain scan of a subject looking at the image.

No real measurements exist here, so this is what the vision-decoding demo decodes from. Per
subject (a seed) the scanner fixes, once:
- what it responds to: the image pooled to the voxel grid, as colour channels and an edge
  (gradient-magnitude) channel;
- how each slice mixes those features (a random matrix per slice) after a smooth random warp of
  the image plane (every slice sees the scene slightly displaced, differently per subject);
- a saturating response (tanh), a 3-D Gaussian blur (the point-spread of the measurement) and a
  set of dead voxels that carry no signal at all;
and every scan adds measurement noise drawn from the scan's own seed. The same subject and scan
seed always give the same tensor; another subject gives another map of the same image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ScannerConfig:
    depth: int = 8  # slices
    size: int = 16  # voxels per side of a slice
    warp: float = 0.15  # displacement of the warp, in image widths
    blur: float = 1.0  # std of the 3-D Gaussian point-spread, in voxels
    dead: float = 0.2  # fraction of voxels with no signal
    noise: float = 0.5  # measurement noise std, relative to the signal's std over voxels
    subject: int = 0


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(round(2 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def blur3d(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, D, H, W) separable Gaussian blur along all three axes (replicate padding)."""
    if sigma <= 0:
        return x
    k = _gaussian_kernel(sigma)
    r = len(k) // 2
    v = x.unsqueeze(1)  # (B, 1, D, H, W)
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = len(k)
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
        v = F.conv3d(F.pad(v, pad, mode="replicate"), k.view(shape))
    return v.squeeze(1)


class SimulatedScanner:
    """images (B, 3, H, W) in [-1, 1] + scan seeds (B,) -> measurements (B, depth, size, size)."""

    def __init__(self, cfg: ScannerConfig = ScannerConfig()):
        self.cfg = cfg
        g = torch.Generator().manual_seed(1_000_003 * cfg.subject + 17)
        n = cfg.size
        coarse = torch.randn(cfg.depth, 2, 3, 3, generator=g) * cfg.warp * 2  # grid_sample units: 2 = a width
        field = F.interpolate(coarse, size=(n, n), mode="bicubic", align_corners=True)  # (D, 2, n, n)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, n), torch.linspace(-1, 1, n), indexing="ij")
        self.grid = (torch.stack([xs, ys], -1) + field.permute(0, 2, 3, 1)).clamp(-1, 1)  # (D, n, n, 2)
        self.mix = torch.randn(cfg.depth, 4, generator=g) / 2  # features (R, G, B, edges) -> each slice
        self.bias = torch.randn(cfg.depth, 1, 1, generator=g) * 0.2
        self.alive = (torch.rand(cfg.depth, n, n, generator=g) >= cfg.dead).float()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 4, n, n): colour pooled to the voxel grid, and the pooled gradient magnitude."""
        grey = images.mean(1, keepdim=True)
        gx = F.pad(grey[..., :, 1:] - grey[..., :, :-1], (0, 1, 0, 0))
        gy = F.pad(grey[..., 1:, :] - grey[..., :-1, :], (0, 0, 0, 1))
        edges = (gx.pow(2) + gy.pow(2)).sqrt() * 4 - 1
        return F.adaptive_avg_pool2d(torch.cat([images, edges], 1), self.cfg.size)

    def signal(self, images: torch.Tensor) -> torch.Tensor:
        """The noise-free response (B, depth, n, n)."""
        feats = self.features(images.float())
        b, d = feats.shape[0], self.cfg.depth
        warped = F.grid_sample(feats.repeat_interleave(d, 0), self.grid.repeat(b, 1, 1, 1),
                               mode="bilinear", padding_mode="border", align_corners=True)  # (B*D, 4, n, n)
        warped = warped.view(b, d, 4, self.cfg.size, self.cfg.size)
        response = torch.tanh((warped * self.mix.view(1, d, 4, 1, 1)).sum(2) + self.bias)
        return blur3d(response, self.cfg.blur) * self.alive

    def _seed(self, scan: int) -> int:
        """The noise seed of scan `scan` of this subject."""
        return int(np.random.SeedSequence([self.cfg.subject, int(scan)]).generate_state(1, dtype=np.uint64)[0] >> 1)

    def __call__(self, images: torch.Tensor, seeds: torch.Tensor | list[int]) -> torch.Tensor:
        clean = self.signal(images)
        scale = clean.flatten(1).std(1).clamp(min=1e-6).view(-1, 1, 1, 1)
        noise = torch.stack([torch.randn(clean.shape[1:], generator=torch.Generator().manual_seed(self._seed(s)))
                             for s in seeds])
        return clean + self.cfg.noise * scale * noise
