"""Colour layouts: the coarse colour-segment map a layout model (semantic synthesis, the seeds'
"concat" conditioning) is conditioned on, made the same way from a training image and from a map
someone draws.

An image is averaged down to the latent grid, its cells are grouped into `colours` clusters by
k-means in RGB (deterministic: farthest-point initialisation from the top-left cell, which is the
background of an emoji), and every cell is painted its cluster's mean colour. The result, in
[-1, 1] at latent size, goes beside the latents as extra UNet input channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

COLOURS = 4  # clusters per layout (the built-in layout model was trained with 4)


def _kmeans(cells: torch.Tensor, k: int, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cells (N, 3) -> (centres (k, 3), assignment (N,))."""
    centres = [cells[0]]
    for _ in range(1, k):
        d = torch.cdist(cells, torch.stack(centres)).amin(dim=1)
        centres.append(cells[int(d.argmax())])
    c = torch.stack(centres)
    for _ in range(iters):
        assign = torch.cdist(cells, c).argmin(dim=1)
        sums = torch.zeros_like(c).index_add_(0, assign, cells)
        counts = torch.bincount(assign, minlength=k).clamp_min(1).unsqueeze(1)
        c = torch.where(torch.bincount(assign, minlength=k).unsqueeze(1) > 0, sums / counts, c)
    return c, torch.cdist(cells, c).argmin(dim=1)


@torch.no_grad()
def colour_layout(images: torch.Tensor, size: tuple[int, int], colours: int = COLOURS, iters: int = 8) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, 3, h, w) in [-1, 1]: each image's colour-segment map on an h x w grid."""
    small = F.adaptive_avg_pool2d(images.float(), size)
    out = torch.empty_like(small)
    for i, image in enumerate(small):
        cells = image.flatten(1).T  # (h*w, 3)
        centres, assign = _kmeans(cells, min(colours, cells.shape[0]), iters)
        out[i] = centres[assign].T.reshape(image.shape)
    return out


def segments(layout: torch.Tensor, palette: torch.Tensor) -> torch.Tensor:
    """(3, h, w) colours -> (h, w) index of the nearest palette colour (palette (k, 3))."""
    return torch.cdist(layout.flatten(1).T, palette).argmin(dim=1).reshape(layout.shape[1:])


def mean_iou(a: torch.Tensor, b: torch.Tensor, k: int, skip: int | None = None) -> float:
    """Mean over the segments present in `a` (but `skip`) of |a = s and b = s| / |a = s or b = s|
    ((h, w) indices); 0 when no segment is left."""
    scores = []
    for s in range(k):
        inside, other = a == s, b == s
        if inside.any() and s != skip:
            scores.append((inside & other).sum().item() / (inside | other).sum().item())
    return sum(scores) / len(scores) if scores else 0.0


def layout_iou(target: torch.Tensor, result: torch.Tensor, background: bool = True) -> float:
    """How well an image follows a layout: both (3, h, w) layouts; the result's cells are assigned to
    the nearest of the target's colours and compared with the target's segments (mean IoU).
    background=False leaves out the segment of the top-left cell (an emoji's white background)."""
    palette = target.flatten(1).T.unique(dim=0)
    a, b = segments(target, palette), segments(result, palette)
    return mean_iou(a, b, len(palette), None if background else int(a[0, 0]))
