"""The pipeline's VAE: latents to images and images to latents, whole or in tiles
(`sdtorch.adapters.tiling`), with the float32 retry of a decode that overflowed."""

from __future__ import annotations

import copy
import logging

import torch

from sdtorch.adapters import tiling
from sdtorch.generate.offload import release_memory
from sdtorch.models.vae import AutoencoderKL

log = logging.getLogger(__name__)


def decode(pipe, latents: torch.Tensor, tiled: bool | None = None) -> torch.Tensor:
    """`Pipeline.decode`: latents -> images (B, 3, H, W) in [0, 1], one image at a time."""
    if pipe.decoder == "tiny":
        return torch.cat([pipe.tiny_decoder.decode(z[None].to(pipe.dtype)) for z in latents]).float()
    z = latents / pipe.config.vae.scaling_factor
    if pipe.low_memory:
        release_memory()  # the sampler's freed activations
    image = _decode(pipe, pipe.vae, z, tiled)
    dtype = next(pipe.vae.parameters()).dtype
    if dtype != torch.float32 and not bool(torch.isfinite(image).all()):
        # The SDXL VAE overflows in float16: redo this decode in float32 with a copy (the loaded
        # VAE is shared by every request and stays as it is), never a black image.
        log.warning("the VAE's %s decode overflowed (NaN/inf); decoding again in float32", dtype)
        image = _decode(pipe, copy.deepcopy(pipe.vae).float(), z.float(), tiled)
    return (image.float() / 2 + 0.5).clamp(0, 1)


def _decode(pipe, vae: AutoencoderKL, z: torch.Tensor, tiled: bool | None) -> torch.Tensor:
    if is_tiled(pipe, tiled, z.shape[-2] * z.shape[-1]):
        tile, overlap = pipe.vae_tile

        def decode(x):
            return tiling.tiled_decode(vae, x, tile=tile, overlap=overlap, stats=_stats(pipe))
    else:
        decode = pipe._vae_decode if pipe._vae_decode is not None and vae is pipe.vae else vae.decode
    return torch.cat([decode(z[i : i + 1]) for i in range(z.shape[0])])


def encode(pipe, image: torch.Tensor):
    """(1, 3, H, W) in [-1, 1] on the pipeline's device -> the VAE's posterior."""
    if is_tiled(pipe, None, image.shape[-2] * image.shape[-1] // pipe.vae.downscale**2):
        tile, overlap = pipe.vae_tile
        return tiling.tiled_encode(pipe.vae, image, tile=tile, overlap=overlap, stats=_stats(pipe))
    return pipe.vae.encode(image)


def is_tiled(pipe, tiled: bool | None, cells: int) -> bool:
    """tiled as given, else as `pipe.tile_vae` says, else for images of more than AUTO_CELLS
    latent cells (low memory: from AUTO_CELLS, i.e. 1024x1024 for SD)."""
    tiled = pipe.tile_vae if tiled is None else tiled
    if tiled is None:
        return cells >= tiling.AUTO_CELLS if pipe.low_memory else cells > tiling.AUTO_CELLS
    return tiled


def _stats(pipe) -> int:
    """The side of the statistics pass: low memory halves it (at 1024x1024 a quarter of an untiled decode)."""
    return tiling.STATS // 2 if pipe.low_memory else tiling.STATS
