"""Adapters from a UNet to a denoiser D(x, sigma, cond) -> x0, and classifier-free guidance.

The samplers see only denoisers (k-diffusion's `external.py` design). A denoiser works in VE
space, x = x0 + sigma * eps; the UNet was trained in VP space on x * sqrt(alpha_cumprod) =
x / sqrt(1 + sigma^2) at an integer timestep t, so the adapter scales the input and maps sigma
to t. Guidance is a wrapper around a denoiser with the same call; image conditioning (inpainting's
mask and masked image) travels in the `Condition` and is appended to the UNet input here.

UNet contract: `unet(x_in: (B, C, h, w), t: (B,) float, context: (B, L, D)) -> (B, C, h, w)`; UNets
with an added vector embedding (SDXL) take it as a fourth argument, `y: (B, adm)`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from sdtorch.config import Prediction, ScheduleConfig
from sdtorch.models.condition import Condition
from sdtorch.sampling.schedule import sigma_to_t, training_sigmas

UNetFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class DiscreteDenoiser(nn.Module):
    """A UNet trained on the discrete DDPM schedule, predicting eps or v, as a denoiser.

    `quantize` rounds the timestep to the nearest integer, as DDIM, PNDM, DDPM, DPMSolver and
    UniPC do in diffusers; Euler-type schedulers feed fractional timesteps (Karras grids).
    """

    def __init__(self, unet: UNetFn, schedule: ScheduleConfig, prediction: Prediction = "eps", *,
                 quantize: bool = False):
        super().__init__()
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
        self.unet = unet
        self.prediction = prediction
        self.quantize = quantize
        self.register_buffer("sigmas", training_sigmas(schedule), persistent=False)  # (T,)

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma_to_t(sigma, self.sigmas, self.quantize)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Condition | torch.Tensor | None) -> torch.Tensor:
        """x: (B, C, h, w) noisy latents in VE space; sigma: (B,); cond: a `Condition` (or bare
        cross-attention states (B, L, D)) -> x0 (B, C, h, w)."""
        cond = Condition.of(cond)
        s = sigma.view(-1, *[1] * (x.ndim - 1))
        c_in = (s**2 + 1) ** -0.5  # = sqrt(alpha_cumprod): VE -> VP
        x_in = (x * c_in).to(x.dtype)
        if cond.concat is not None:  # image channels, unscaled, as the UNet was trained ("concat")
            x_in = torch.cat([x_in, cond.concat.to(x_in)], dim=1)
        t = self.sigma_to_t(sigma)
        if cond.vector is None:
            out = self.unet(x_in, t, cond.crossattn)
        else:
            out = self.unet(x_in, t, cond.crossattn, cond.vector)
        if self.prediction == "eps":
            return (x - s * out).to(x.dtype)
        # v = sqrt(a) eps - sqrt(1-a) x0_vp (Salimans & Ho 2022), rewritten in VE terms:
        return (x * c_in**2 - out * s * c_in).to(x.dtype)


class CFGDenoiser(nn.Module):
    """Classifier-free guidance (Ho & Salimans 2022): uncond + scale * (cond - uncond).

    Applied to x0 rather than to the UNet output as diffusers does; the two are equal because
    x0 is affine in the UNet output with coefficients that only depend on x and sigma.
    """

    def __init__(self, denoiser: Callable[..., torch.Tensor], scale: float):
        super().__init__()
        self.denoiser = denoiser
        self.scale = scale

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Condition | torch.Tensor,
                uncond: Condition | torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, h, w); sigma: (B,); cond, uncond: `Condition`s (or (B, L, D) states). One UNet
        batch of 2B."""
        if self.scale <= 1 or uncond is None:
            return self.denoiser(x, sigma, cond)
        # Negative first, as diffusers batches it.
        x0_uncond, x0_cond = self.denoiser(
            torch.cat([x, x]), torch.cat([sigma, sigma]), Condition.of(uncond).cat(Condition.of(cond))
        ).chunk(2)
        return x0_uncond + self.scale * (x0_cond - x0_uncond)


Schedule = list[tuple[int, Condition]]  # (last denoiser call it conditions, condition), in order


def at_call(schedule: Schedule, k: int) -> Condition:
    """The condition of denoiser call k (0-based): the first entry that lasts to k or later."""
    return next((c for end, c in schedule if k <= end), schedule[-1][1])


class ScheduledCFG(nn.Module):
    """Guidance over composable, scheduled conditions, as AUTOMATIC1111 does it: at denoiser call
    k (counted from 0, one per call) each part's condition and the negative one are their
    schedules' entries for k, and x0 = x0_uncond + scale * sum_i w_i (x0_i - x0_uncond)
    (composable diffusion, Liu et al. 2022), all parts in one UNet batch. The call's own
    cond / uncond arguments are ignored: the schedules replace them."""

    def __init__(self, denoiser: Callable[..., torch.Tensor], scale: float, parts: list[tuple[float, Schedule]],
                 uncond: Schedule):
        super().__init__()
        self.denoiser, self.scale, self.parts, self.uncond = denoiser, scale, parts, uncond
        self.calls = 0

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond=None, uncond=None) -> torch.Tensor:
        k, self.calls = self.calls, self.calls + 1
        conds = [(w, at_call(s, k)) for w, s in self.parts]
        if self.scale <= 1 and len(conds) == 1 and conds[0][0] == 1.0:
            return self.denoiser(x, sigma, conds[0][1])
        batch = at_call(self.uncond, k)
        for _, c in conds:
            batch = batch.cat(c)
        n = len(conds) + 1
        x0 = self.denoiser(torch.cat([x] * n), torch.cat([sigma] * n), batch).chunk(n)
        guided = sum(w * (x0_i - x0[0]) for (w, _), x0_i in zip(conds, x0[1:]))
        return x0[0] + self.scale * guided


class MaskBlend(nn.Module):
    """Inpainting with an ordinary checkpoint: where mask == 0 the denoised estimate is the known
    image's latents, so every step pulls the known region to it and the sampler repaints only
    where mask == 1. mask: (B or 1, 1, h, w) in [0, 1]; known: (B or 1, C, h, w)."""

    def __init__(self, denoiser: Callable[..., torch.Tensor], known: torch.Tensor, mask: torch.Tensor):
        super().__init__()
        self.denoiser, self.known, self.mask = denoiser, known, mask

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **extra) -> torch.Tensor:
        return self.mask * self.denoiser(x, sigma, **extra) + (1 - self.mask) * self.known
