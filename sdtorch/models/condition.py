"""What a denoising UNet is conditioned on, in one value (stable-diffusion.cpp's `SDCondition`,
SGM's `c_crossattn` / `vector` / `concat`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Condition:
    """crossattn: (B, L, D) tokens the UNet cross-attends to (text states, or any encoder's);
    vector: (B, adm) a pooled vector for the UNet's added embedding (SDXL: pooled text + sizes),
    None for SD 1/2; concat: (B, C', h, w) image channels appended to the UNet's input after its
    input scaling (inpainting: mask + masked-image latents), None for a plain UNet."""

    crossattn: torch.Tensor | None
    vector: torch.Tensor | None = None
    concat: torch.Tensor | None = None

    @staticmethod
    def of(c: Condition | torch.Tensor | None) -> Condition:
        """A bare tensor is cross-attention states alone."""
        return c if isinstance(c, Condition) else Condition(c)

    def cat(self, other: Condition) -> Condition:
        """The batch of `self` followed by `other` (guidance batches [uncond, cond])."""
        return Condition(*(None if a is None else torch.cat([a, b]) for a, b in
                           ((self.crossattn, other.crossattn), (self.vector, other.vector),
                            (self.concat, other.concat))))
