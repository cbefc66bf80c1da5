"""The training noise schedule and the sigma grids the samplers walk, as pure functions.

Everything is in the "VE" sigma space of k-diffusion: x = x0 + sigma * eps, with
sigma = sqrt((1 - a) / a) for the cumulative product a = alphas_cumprod[t] of the DDPM schedule.
A VP latent (what diffusers' schedulers hold) is the VE one times sqrt(a) = 1 / sqrt(1 + sigma^2).

`sampling_sigmas` replicates, per sampler, what the matching diffusers scheduler computes in
`set_timesteps` when it is built `from_config` of the SD scheduler config (betas, "leading"
spacing with `steps_offset`, `set_alpha_to_one=False`). The arithmetic follows diffusers step
by step (same dtypes, numpy where it uses numpy) so the grids agree bit for bit.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from sdtorch.config import ScheduleConfig


def betas(cfg: ScheduleConfig) -> torch.Tensor:
    """(T,) float32 betas, computed as diffusers computes them."""
    T = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":
        return torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float32)
    if cfg.beta_schedule == "scaled_linear":  # linear in sqrt(beta): the latent-diffusion schedule
        return torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, T, dtype=torch.float32) ** 2
    raise ValueError(f"unknown beta_schedule {cfg.beta_schedule!r}; use 'linear' or 'scaled_linear'")


def alphas_cumprod(cfg: ScheduleConfig) -> torch.Tensor:
    """(T,) float32 cumulative products of (1 - beta); index t is the noise level of timestep t."""
    return torch.cumprod(1.0 - betas(cfg), dim=0)


def training_sigmas(cfg: ScheduleConfig) -> torch.Tensor:
    """(T,) float32 sigma of every training timestep, increasing with t."""
    a = alphas_cumprod(cfg)
    return ((1 - a) / a) ** 0.5


def sigma_to_t(sigma: torch.Tensor, sigmas: torch.Tensor, quantize: bool = False) -> torch.Tensor:
    """Timestep(s) of noise level(s) `sigma`, interpolating linearly in log sigma between the
    training levels `sigmas` (T,) (diffusers' `_sigma_to_t`, k-diffusion's `DiscreteSchedule`).
    A training sigma maps to exactly its integer timestep. `quantize` rounds to the nearest one.
    """
    sigmas = sigmas.to(sigma)  # device and dtype of the query
    high = torch.searchsorted(sigmas, sigma).clamp(1, len(sigmas) - 1)
    low = high - 1
    # Ratios rather than differences of logs: sigma == sigmas[k] gives w = 1 exactly, t = k.
    w = torch.log(sigma / sigmas[low]) / torch.log(sigmas[high] / sigmas[low])
    t = low + w.clamp(0, 1)
    return t.round() if quantize else t


def t_to_sigma(t: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Noise level(s) of timestep(s) `t` in [0, T-1]: the inverse of `sigma_to_t`."""
    log_sigmas = sigmas.to(t.device).log()
    t = t.to(log_sigmas.dtype)
    low = t.floor().long().clamp(0, len(sigmas) - 2)
    w = t - low
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[low + 1]).exp()


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """(n+1,) float32 noise levels of Karras et al. (2022), eq. 5, followed by a final 0."""
    ramp = np.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))


# --- timesteps as each diffusers scheduler family picks them -----------------------------------


def _timesteps_ddim(n: int, cfg: ScheduleConfig) -> np.ndarray:
    """DDIM, PNDM and DDPM: integer timesteps, descending."""
    T, spacing = cfg.num_train_timesteps, cfg.timestep_spacing
    if spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1].astype(np.int64) + cfg.steps_offset
    if spacing == "linspace":
        return np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
    return np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1  # trailing


def _timesteps_euler(n: int, cfg: ScheduleConfig) -> np.ndarray:
    """Euler, Euler ancestral, Heun, LMS: float timesteps (not rounded for "linspace")."""
    if cfg.timestep_spacing == "linspace":
        return np.linspace(0, cfg.num_train_timesteps - 1, n, dtype=np.float32)[::-1].copy()
    return _timesteps_ddim(n, cfg).astype(np.float32)


def _timesteps_multistep(n: int, cfg: ScheduleConfig) -> np.ndarray:
    """DPMSolverMultistep and UniPC: n+1 points with the last (t = 0) dropped."""
    T, spacing = cfg.num_train_timesteps, cfg.timestep_spacing
    if spacing == "leading":
        ts = (np.arange(0, n + 1) * (T // (n + 1))).round()[::-1][:-1].astype(np.int64)
        return ts + cfg.steps_offset
    if spacing == "linspace":
        return np.linspace(0, T - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    return np.arange(T, 0, -T / n).round().astype(np.int64) - 1  # trailing


def _at(timesteps: np.ndarray, cfg: ScheduleConfig) -> np.ndarray:
    """Training sigmas at (possibly fractional) timesteps, linear in sigma as `np.interp` in diffusers."""
    sigmas = training_sigmas(cfg).numpy()
    return np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)


def _grid(sigmas: np.ndarray, final: float) -> torch.Tensor:
    return torch.from_numpy(np.append(sigmas, final).astype(np.float32))


# --- one grid per scheduler -------------------------------------------------------------------


def _grid_ddim(n: int, cfg: ScheduleConfig) -> torch.Tensor:
    # set_alpha_to_one=False: the last step goes to alphas_cumprod[0], i.e. sigma(t=0) > 0.
    return _grid(_at(_timesteps_ddim(n, cfg), cfg), training_sigmas(cfg)[0].item())


def _grid_ddpm(n: int, cfg: ScheduleConfig) -> torch.Tensor:
    return _grid(_at(_timesteps_ddim(n, cfg), cfg), 0.0)


def _grid_euler(n: int, cfg: ScheduleConfig) -> torch.Tensor:
    return _grid(_at(_timesteps_euler(n, cfg), cfg), 0.0)


def _grid_euler_karras(n: int, cfg: ScheduleConfig) -> torch.Tensor:
    # The Karras ends are the ends of the spaced grid (sigma(t=901) .. sigma(t=1) for 10 leading
    # steps), not of the training schedule: a smaller sigma_max than the multistep solvers use.
    sigmas = _at(_timesteps_euler(n, cfg), cfg)
    return get_sigmas_karras(n, sigmas[-1].item(), sigmas[0].item())


def _grid_multistep(n: int, cfg: ScheduleConfig) -> torch.Tensor:
    return _grid(_at(_timesteps_multistep(n, cfg), cfg), 0.0)


def _grid_multistep_karras(n: int, cfg: ScheduleConfig) -> torch.Tensor:
    # DPMSolver / UniPC take the Karras ends from the whole training schedule.
    sigmas = training_sigmas(cfg)
    return get_sigmas_karras(n, sigmas[0].item(), sigmas[-1].item())


def _grid_lcm(n: int, cfg: ScheduleConfig) -> torch.Tensor:
    from sdtorch.sampling.lcm import lcm_timesteps

    return _grid(_at(lcm_timesteps(n, cfg.num_train_timesteps).astype(np.float64), cfg), 0.0)


GRIDS: dict[str, Callable[[int, ScheduleConfig], torch.Tensor]] = {
    "lcm": _grid_lcm,
    "ddim": _grid_ddim,
    "plms": _grid_ddim,
    "ddpm": _grid_ddpm,
    "euler": _grid_euler,
    "euler_a": _grid_euler,
    "heun": _grid_euler,
    "lms": _grid_euler,
    "euler_karras": _grid_euler_karras,
    "euler_a_karras": _grid_euler_karras,  # diffusers' EulerAncestral has no Karras option
    "heun_karras": _grid_euler_karras,
    "lms_karras": _grid_euler_karras,
    "dpmpp_2m": _grid_multistep,
    "unipc": _grid_multistep,
    "dpmpp_2m_karras": _grid_multistep_karras,
    "unipc_karras": _grid_multistep_karras,
}


def sampling_sigmas(sampler_name: str, steps: int, cfg: ScheduleConfig) -> torch.Tensor:
    """(steps+1,) float32 decreasing noise levels the sampler walks, as its diffusers scheduler.

    The grid ends at 0, except for "ddim" and "plms", which end at sigma(t=0) as diffusers' DDIM
    and PNDM do with `set_alpha_to_one=False`. With "trailing" spacing and T % steps != 0 numpy
    may return one point more, exactly as in diffusers. With "linspace" (or "trailing" and
    T % steps != 0) DDIM and PNDM step to `t - T // steps` rather than to the next timestep;
    this grid uses the next timestep, so those two agree with diffusers for "leading" only.
    """
    if sampler_name not in GRIDS:
        raise ValueError(f"unknown sampler {sampler_name!r}; choose from {', '.join(GRIDS)}")
    if not 0 < steps <= cfg.num_train_timesteps:
        raise ValueError(f"steps must be in 1..{cfg.num_train_timesteps}, got {steps}")
    return GRIDS[sampler_name](steps, cfg)


def init_noise_sigma(sampler_name: str, sigmas: torch.Tensor, cfg: ScheduleConfig) -> float:
    """Std of the starting x in VE space: unit-variance noise is multiplied by this.

    sqrt(1 + sigma_max^2) is the VE image of the VP prior N(0, 1) that DDIM, PNDM, DDPM, DPMSolver
    and UniPC start from, and what diffusers' Euler-type schedulers use with "leading" spacing;
    with "linspace" and "trailing" those use sigma_max alone (k-diffusion's convention).
    """
    sigma_max = sigmas.max().item()
    euler_type = GRIDS[sampler_name] in (_grid_euler, _grid_euler_karras)
    if euler_type and cfg.timestep_spacing != "leading":
        return sigma_max
    return math.sqrt(sigma_max**2 + 1)


def ve_latents(sampler_name: str | None) -> bool:
    """Whether the reference hands this sampler's intermediate latents over in VE space
    (x = x0 + sigma * eps: diffusers' Euler-type schedulers, and k-diffusion grids, None) rather
    than VP (x / sqrt(1 + sigma^2): DDIM, PNDM, DDPM, DPMSolver, UniPC)."""
    return sampler_name is None or GRIDS[sampler_name] in (_grid_euler, _grid_euler_karras)
