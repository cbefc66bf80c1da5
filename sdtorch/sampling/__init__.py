"""Noise schedules, schedulers (grid spacing) and samplers with one contract (k-diffusion's)."""

from sdtorch.sampling.samplers import A1111_SAMPLERS, ALIASES, NAMES, SAMPLERS, display_name, from_a1111, resolve, sample
from sdtorch.sampling.schedulers import SCHEDULERS

__all__ = ["A1111_SAMPLERS", "ALIASES", "NAMES", "SAMPLERS", "SCHEDULERS", "display_name", "from_a1111", "resolve",
           "sample"]
