"""Latent Consistency Model sampling (Luo et al. 2023), as diffusers' `LCMScheduler` does it: the
timesteps are `steps` of the distillation schedule's 50 (999, 979, ..., 19), evenly spaced by
index; each step takes the model's x0, applies the consistency boundary condition
(c_skip, c_out with sigma_data 0.5 and timesteps scaled by 10) and, except after the last step,
noises it afresh to the next timestep. For LCM-distilled models and LCM-LoRAs: 2-8 steps, CFG 1-2.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import trange

from sdtorch.sampling.noise import step_noise

ORIGINAL_STEPS = 50  # diffusers' original_inference_steps (the distillation schedule)
TIMESTEP_SCALING = 10.0
SIGMA_DATA = 0.5


def lcm_timesteps(n: int, train_steps: int = 1000, original: int = ORIGINAL_STEPS) -> np.ndarray:
    """The n integer timesteps, descending (LCMScheduler.set_timesteps, strength 1)."""
    if not 0 < n <= original:
        raise ValueError(f"LCM takes 1..{original} steps, got {n}")
    origin = (np.arange(1, original + 1) * (train_steps // original) - 1)[::-1]
    return origin[np.floor(np.linspace(0, original, num=n, endpoint=False)).astype(np.int64)]


def boundary(t: float) -> tuple[float, float]:
    """(c_skip, c_out) of the consistency parameterisation at timestep t."""
    s = t * TIMESTEP_SCALING
    return SIGMA_DATA**2 / (s**2 + SIGMA_DATA**2), s / (s**2 + SIGMA_DATA**2) ** 0.5


def sample_lcm(model, x, sigmas, extra_args=None, callback=None, disable=None, *, generator=None, timesteps=None):
    """`timesteps`: the grid's integer timesteps, for the boundary condition (`sample` passes them;
    None: c_skip = 0, c_out = 1, as k-diffusion-style LCM samplers take it). In VE space the VP
    sample the boundary condition mixes in is x / sqrt(1 + sigma^2)."""
    extra_args, s_in = extra_args or {}, x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma = sigmas[i].item()
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:  # the samplers' step report
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        c_skip, c_out = (0.0, 1.0) if timesteps is None else boundary(float(timesteps[i]))
        x = c_out * denoised + c_skip * x / (1 + sigma**2) ** 0.5
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * step_noise(x, generator)
    return x
