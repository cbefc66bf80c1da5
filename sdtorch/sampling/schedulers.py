"""Schedulers: how the sigma grid is spaced, chosen apart from the sampler (AUTOMATIC1111's
"Schedule type", ComfyUI's "scheduler").

"automatic" is the grid of the diffusers scheduler a sampler reproduces (`schedule.GRIDS`), so
`sampler="euler", scheduler="automatic"` gives diffusers' images; "karras" on a sampler that has
a diffusers Karras option is that option's grid, bit for bit. Every other pairing builds its grid
here from the training schedule, as k-diffusion / ComfyUI do, and starts from noise of std
sigma_max (k-diffusion's convention).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from sdtorch.config import ScheduleConfig
from sdtorch.sampling.schedule import GRIDS, get_sigmas_karras, sampling_sigmas, sigma_to_t, t_to_sigma, training_sigmas


def _ends(cfg: ScheduleConfig) -> tuple[float, float]:
    sigmas = training_sigmas(cfg)
    return sigmas[0].item(), sigmas[-1].item()


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def karras(n: int, cfg: ScheduleConfig) -> torch.Tensor:
    """Karras et al. (2022), eq. 5, between the training schedule's ends."""
    lo, hi = _ends(cfg)
    return get_sigmas_karras(n, lo, hi)


def exponential(n: int, cfg: ScheduleConfig) -> torch.Tensor:
    """Evenly spaced in log sigma (k-diffusion `get_sigmas_exponential`)."""
    lo, hi = _ends(cfg)
    return _append_zero(torch.linspace(math.log(hi), math.log(lo), n, dtype=torch.float64).exp())


def uniform(n: int, cfg: ScheduleConfig) -> torch.Tensor:
    """Evenly spaced timesteps from T-1 to 0 (k-diffusion `DiscreteSchedule.get_sigmas`; A1111's
    "Uniform" and, for these discrete models, "Normal")."""
    t = torch.linspace(cfg.num_train_timesteps - 1, 0, n, dtype=torch.float64)
    return _append_zero(t_to_sigma(t, training_sigmas(cfg).double()))


def sgm_uniform(n: int, cfg: ScheduleConfig) -> torch.Tensor:
    """n + 1 evenly spaced timesteps from T-1 to 0, the last dropped (A1111 / ComfyUI "SGM Uniform")."""
    t = torch.linspace(cfg.num_train_timesteps - 1, 0, n + 1, dtype=torch.float64)[:-1]
    return _append_zero(t_to_sigma(t, training_sigmas(cfg).double()))


def simple(n: int, cfg: ScheduleConfig) -> torch.Tensor:
    """Every (T/n)-th training sigma from the top (ComfyUI "simple")."""
    sigmas = training_sigmas(cfg)
    stride = len(sigmas) / n
    picked = [sigmas[-(1 + int(i * stride))].item() for i in range(n)]
    return _append_zero(torch.tensor(picked, dtype=torch.float64))


SCHEDULES: dict[str, Callable[[int, ScheduleConfig], torch.Tensor]] = {
    "karras": karras,
    "exponential": exponential,
    "uniform": uniform,
    "normal": uniform,
    "sgm_uniform": sgm_uniform,
    "simple": simple,
}
SCHEDULERS = ("automatic", *SCHEDULES)
LABELS = {"automatic": "Automatic", "karras": "Karras", "exponential": "Exponential", "uniform": "Uniform",
          "normal": "Normal", "sgm_uniform": "SGM Uniform", "simple": "Simple"}


def check_scheduler(name: str) -> None:
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose from {', '.join(SCHEDULERS)}")


def split_name(name: str, scheduler: str = "automatic") -> tuple[str, str]:
    """A combined name of sdtorch 0.1 ("dpmpp_2m_karras") -> ("dpmpp_2m", "karras"); others unchanged."""
    if name.endswith("_karras") and scheduler == "automatic":
        return name.removesuffix("_karras"), "karras"
    return name, scheduler


def native_grid(sampler: str, scheduler: str) -> str | None:
    """The `schedule.GRIDS` entry (a diffusers scheduler's own grid) of this pairing, if there is one."""
    if scheduler == "automatic":
        return sampler
    if scheduler == "karras" and f"{sampler}_karras" in GRIDS:
        return f"{sampler}_karras"
    return None


def grid(sampler: str, scheduler: str, steps: int, cfg: ScheduleConfig) -> tuple[torch.Tensor, str | None]:
    """(sigmas (steps+1,) float32, the native grid's name or None for a scheduler-built grid)."""
    check_scheduler(scheduler)
    native = native_grid(sampler, scheduler)
    if native is not None:
        return sampling_sigmas(native, steps, cfg), native
    if not 0 < steps <= cfg.num_train_timesteps:
        raise ValueError(f"steps must be in 1..{cfg.num_train_timesteps}, got {steps}")
    return SCHEDULES[scheduler](steps, cfg).float(), None


def handoff_index(sampler: str, scheduler: str, steps: int, cfg: ScheduleConfig, fraction: float) -> int:
    """The grid index where a denoising_end / denoising_start `fraction` splits a run of `sampler`
    (a base name, as `samplers.resolve` gives it) between two models; diffusers' rule: the steps
    whose timestep is >= round(T * (1 - fraction)) belong to the first."""
    if not 0 < fraction < 1:
        raise ValueError(f"a hand-off fraction must be in (0, 1), got {fraction!r}")
    sigmas, _ = grid(sampler, scheduler, steps, cfg)
    t = sigma_to_t(sigmas[:-1], training_sigmas(cfg)).round()
    return int((t >= round(cfg.num_train_timesteps * (1 - fraction))).sum())
