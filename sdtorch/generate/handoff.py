"""Two models in turn on one sampling grid (SDXL base -> refiner).

diffusers' way is two runs: the base stops at `denoising_end` and hands over its still-noisy
latents (`Pipeline.generate_latents(stop=...)`), the refiner continues them from the same grid
index (`finish_latents`). AUTOMATIC1111's way is one run whose model changes at
`refiner_switch_at` (`refine_latents`). The grid index comes from
`sdtorch.sampling.schedulers.handoff_index`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch

from sdtorch.generate.params import GenerationParams, validate


@torch.no_grad()
def finish_latents(pipe, latents: torch.Tensor, params: GenerationParams, start: int,
                   callback: Callable | None = None, progress: bool = True) -> torch.Tensor:
    """Denoise another model's noisy latents from grid index `start` to the end (diffusers'
    denoising_start): no noise is added, and the step noise of ancestral samplers is drawn from a
    generator seeded with the request's seed (diffusers draws no initial noise here)."""
    validate(params, pipe.vae.downscale)
    if params.seed_mode == "diffusers":
        source = torch.Generator("cpu").manual_seed(params.seed)
    else:
        source, _ = pipe._noise(params, latents.shape)
    return pipe._sample(params, source, latents, callback, progress, init=latents.to(pipe.device), start=start,
                        noised=True)


@torch.no_grad()
def refine_latents(pipe, refiner, params: GenerationParams, switch: int, callback: Callable | None = None,
                   progress: bool = True) -> torch.Tensor:
    """AUTOMATIC1111's refiner: one sampler run whose model becomes `refiner` at grid index `switch`
    (with its own text encoder and micro-conditioning), one noise source throughout. ControlNets
    guide the base model's steps only (they are made for its UNet, not the refiner's)."""
    validate(params, pipe.vae.downscale)
    source, noise = pipe._noise(params, pipe.latent_shape(params))
    x = pipe._sample(params, source, noise, callback, progress, stop=switch)
    return refiner._sample(replace(params, controls=()), source, x, callback, progress, init=x.to(refiner.device),
                           start=switch, noised=True)
