"""SDXL's micro-conditioning (Podell et al., 2023, sec. 2.2): the pooled text and the image's
size, crop and (refiner) aesthetic score, as the vector the UNet's `label_emb` takes.

Each number is embedded by `micro_dim` sinusoidal features (the timestep embedding, cos first) and
the embeddings follow the pooled text in the order the config lists them, as SGM's conditioner
and diffusers' `add_time_ids` concatenate them: base (h, w, top, left, target h, target w),
refiner (h, w, top, left, aesthetic score).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdtorch.config import ModelConfig
from sdtorch.models.unet import timestep_embedding

SIZES = ("original_size", "crop", "target_size")


@dataclass(frozen=True)
class Micro:
    """One side's (prompt's or negative prompt's) micro-conditioning values."""

    original_size: tuple[int, int]  # (h, w) the training image had
    crop: tuple[int, int] = (0, 0)  # (top, left) of the crop taken from it
    target_size: tuple[int, int] | None = None  # (h, w); None: the generated image's (`GenerationParams.micro_of`)
    aesthetic_score: float = 6.0  # refiner only

    def values(self, names: tuple[str, ...]) -> list[float]:
        if "target_size" in names and self.target_size is None:
            raise ValueError("target_size is not set (GenerationParams.micro_of fills in the image's size)")
        table = {"original_size": self.original_size, "crop": self.crop,
                 "target_size": self.target_size, "aesthetic_score": (self.aesthetic_score,)}
        unknown = [n for n in names if n not in table]
        if unknown:
            raise ValueError(f"unknown micro-conditioning {unknown[0]!r}; known: {', '.join(table)}")
        return [float(v) for n in names for v in table[n]]


def micro_vector(cfg: ModelConfig, pooled: torch.Tensor, micro: Micro) -> torch.Tensor:
    """pooled text (B, P) and one side's values -> the UNet's vector (B, P + n * micro_dim)."""
    values = torch.tensor(micro.values(cfg.micro), dtype=torch.float32)
    features = timestep_embedding(values, cfg.micro_dim).reshape(1, -1)  # (1, n * micro_dim)
    vector = torch.cat([pooled.float().cpu(), features.expand(pooled.shape[0], -1)], dim=1)
    if vector.shape[1] != cfg.unet.adm_in_channels:
        raise ValueError(f"the vector has {vector.shape[1]} values but the UNet takes {cfg.unet.adm_in_channels}")
    return vector.to(pooled.device)
