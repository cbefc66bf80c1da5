"""Samplers: one free function each, with k-diffusion's contract.

    sample_x(model, x, sigmas, extra_args=None, callback=None, disable=None, *, generator=None)

`model(x, sigma, **extra_args)` returns the denoised x0 for x: (B, C, h, w) and sigma: (B,);
`sigmas` is the decreasing grid (n+1,) from `schedule.sampling_sigmas`; x starts at noise of std
`schedule.init_noise_sigma` and everything is in VE space (x = x0 + sigma * eps).
`callback({"x", "i", "sigma", "sigma_hat", "denoised"})` runs once per step, before the update.
Stochastic samplers draw their noise with one `torch.randn(x.shape, generator=...)` per step,
where diffusers draws it, so a seeded generator reproduces diffusers' images.

Each sampler reproduces the diffusers scheduler of the same name on its grid (for v models PLMS
needs `combine="v"`, see `sample_plms`); tests/test_sampler_parity.py holds them to it. In sigma space
several coincide: DDIM(eta) is the ancestral Euler step with sigma_up scaled by eta, DDPM is DDIM
with eta = 1, PNDM's step is an Euler step on eps.

How the denoiser gets built (`sample`): whether the UNet sees the exact fractional timestep of
a sigma or the nearest integer one is part of what a diffusers scheduler does (DDIM, PNDM, DDPM,
DPMSolver and UniPC pass integer timesteps; on Karras grids the last two round them while the
solver keeps the exact sigma). It is a property of the sampler, recorded as `Sampler.quantize`,
but it acts inside the denoiser. So `sample` takes a factory, `make_model(quantize) -> model`,
and calls it once with the table's flag; wrappers (guidance, inpainting) stay unaware of it and
the sampler functions never see it. The `sample` caller builds the wrappers in the factory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from tqdm.auto import trange

from sdtorch.config import ScheduleConfig
from sdtorch.sampling.lcm import sample_lcm
from sdtorch.sampling.noise import step_noise
from sdtorch.sampling.schedule import init_noise_sigma, sigma_to_t, training_sigmas, ve_latents
from sdtorch.sampling.schedulers import LABELS, check_scheduler, grid

Model = Callable[..., torch.Tensor]


def _report(callback, x, i, sigma, denoised) -> None:
    if callback is not None:  # sigma_hat = sigma: no sampler here adds churn noise
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})


def _to_d(x, sigma, denoised):
    """The probability-flow ODE derivative dx/dsigma = eps (Karras et al. 2022, eq. 3)."""
    return (x - denoised) / sigma


def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, *, generator=None):
    """Algorithm 2 (Euler steps) of Karras et al. (2022), without churn."""
    extra_args, s_in = extra_args or {}, x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], denoised)
        x = x + _to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up): deterministic target and fresh-noise std of an ancestral step.
    sigma_up is DDIM's eq. 16 sigma_t(eta) in VE space; eta = 1 gives the DDPM posterior."""
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up


def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, *,
                           generator=None, eta=1.0):
    """Ancestral sampling with Euler method steps (k-diffusion); one noise draw per step if eta > 0."""
    extra_args, s_in = extra_args or {}, x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], denoised)
        sigma_down, sigma_up = ancestral_step(float(sigmas[i]), float(sigmas[i + 1]), eta)
        x = x + _to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if eta > 0:
            x = x + step_noise(x, generator) * sigma_up
    return x


def sample_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None, *, generator=None,
                eta=0.0):
    """DDIM (Song et al. 2021, eqs. 12 and 16): in sigma space, the ancestral Euler step."""
    return sample_euler_ancestral(model, x, sigmas, extra_args, callback, disable,
                                  generator=generator, eta=eta)


def sample_ddpm(model, x, sigmas, extra_args=None, callback=None, disable=None, *, generator=None):
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2): DDIM with eta = 1."""
    return sample_euler_ancestral(model, x, sigmas, extra_args, callback, disable,
                                  generator=generator, eta=1.0)


def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, *, generator=None):
    """Algorithm 2 (Heun steps) of Karras et al. (2022), without churn; Euler into sigma = 0."""
    extra_args, s_in = extra_args or {}, x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], denoised)
        d = _to_d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = _to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * s_in, **extra_args))
            x = x + (d + d_2) / 2 * dt
    return x


# Adams-Bashforth weights on (eps_i, eps_i-1, ...) for orders 2, 3 and 4.
_ADAMS_BASHFORTH = {
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def _v_of(x, sigma, denoised):
    """The v-prediction that yields `denoised` at (x, sigma), in VE space."""
    return (x / (1 + sigma**2) - denoised) * (1 + sigma**2) ** 0.5 / sigma


def _eps_of_v(v, x, sigma):
    """eps = sqrt(a) v + sqrt(1 - a) x_vp, with a = 1 / (1 + sigma^2) and x_vp = x sqrt(a)."""
    return (v + sigma * x / (1 + sigma**2) ** 0.5) / (1 + sigma**2) ** 0.5


def sample_plms(model, x, sigmas, extra_args=None, callback=None, disable=None, *, generator=None,
                combine="eps"):
    """PLMS (Liu et al. 2022, PNDM eq. 12) with an improved-Euler first step, as diffusers'
    PNDMScheduler with skip_prk_steps: linear multistep on eps, each step an Euler step.

    combine="v": for v-prediction models diffusers mixes the raw v outputs and converts the mix to
    eps at the current point (not a multistep method on the ODE, but the reference's images)."""
    extra_args, s_in = extra_args or {}, x.new_ones([x.shape[0]])
    as_out = _to_d if combine == "eps" else _v_of  # what gets mixed across steps

    def to_eps(out, x_ref, sigma):
        return out if combine == "eps" else _eps_of_v(out, x_ref, sigma)

    history = []
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], denoised)
        out = as_out(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if not history and len(sigmas) > 2:
            # First step: the average of the outputs here and at the Euler prediction (an extra
            # UNet call at the repeated timestep). That second output is not kept in the history.
            x_2 = x + to_eps(out, x, sigmas[i]) * dt
            out_2 = as_out(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * s_in, **extra_args))
            mixed = (out + out_2) / 2
        elif not history:
            mixed = out
        else:
            recent = [out] + history[::-1][:3]
            mixed = sum(w * e for w, e in zip(_ADAMS_BASHFORTH[len(recent)], recent))
        history.append(out)
        x = x + to_eps(mixed, x, sigmas[i]) * dt
    return x


def lms_coefficient(sigmas: list[float], i: int, j: int, order: int) -> float:
    """Integral over [sigmas[i], sigmas[i+1]] of the Lagrange basis polynomial of node i-j among
    the nodes sigmas[i-order+1 .. i]; exact, by integrating the polynomial."""
    poly = np.polynomial.Polynomial([1.0])
    for k in range(order):
        if k != j:
            poly *= np.polynomial.Polynomial([-sigmas[i - k], 1.0]) / (sigmas[i - j] - sigmas[i - k])
    integral = poly.integ()
    return float(integral(sigmas[i + 1]) - integral(sigmas[i]))


def sample_lms(model, x, sigmas, extra_args=None, callback=None, disable=None, *, generator=None, order=4):
    """Linear multistep method of order 4 on the probability-flow ODE (k-diffusion's `sample_lms`)."""
    extra_args, s_in = extra_args or {}, x.new_ones([x.shape[0]])
    sigmas_list = [float(s) for s in sigmas]
    ds = []
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], denoised)
        ds = (ds + [_to_d(x, sigmas[i], denoised)])[-order:]
        cur_order = min(i + 1, order)
        coeffs = [lms_coefficient(sigmas_list, i, j, cur_order) for j in range(cur_order)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
    return x


def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None, *, generator=None):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2); first order on the first and last steps."""
    extra_args, s_in = extra_args or {}, x.new_ones([x.shape[0]])
    old_denoised, h_last = None, None
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], denoised)
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        if sigma_next == 0:  # h = inf: the step lands on the data prediction
            x = denoised
            continue
        h = math.log(sigma / sigma_next)  # step in lambda = -log(sigma)
        if old_denoised is None:
            denoised_d = denoised
        else:
            r = h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (sigma_next / sigma) * x - math.expm1(-h) * denoised_d
        old_denoised, h_last = denoised, h
    return x


def _unipc_rhos(h: float, rk: float) -> tuple[float, float]:
    """UniC-2 weights with B(h) = e^h - 1 (bh2): the solution of R rho = b in UniPC's Algorithm 2."""
    hh = -h  # data prediction integrates in -lambda
    phi_1 = math.expm1(hh)
    phi_k = phi_1 / hh - 1
    b1 = phi_k / phi_1
    b2 = (phi_k / hh - 0.5) * 2 / phi_1
    rho_0 = (b1 - b2) / (1 - rk)
    return rho_0, b1 - rho_0


def _unipc_update(x, sigma, sigma_next, m0, correction):
    """x at sigma_next from x at sigma: exact for the linear part, data prediction m0 plus a
    correction term; in VE space the B(h) and h*phi_1(h) factors are both e^-h - 1."""
    h = math.log(sigma / sigma_next)
    return (sigma_next / sigma) * x - math.expm1(-h) * (m0 + correction)


def sample_unipc(model, x, sigmas, extra_args=None, callback=None, disable=None, *, generator=None):
    """UniPC-2, bh2, data prediction (Zhao et al. 2023, Algorithms 1-2), as diffusers'
    UniPCMultistepScheduler default: UniP-2 predictor, then UniC corrects each predicted x with
    the model output already taken there (the final x is not corrected); first order on the
    first and last steps."""
    extra_args, s_in = extra_args or {}, x.new_ones([x.shape[0]])
    n = len(sigmas) - 1
    s = [float(v) for v in sigmas]
    lam = [-math.log(v) if v > 0 else math.inf for v in s]
    ms, x_last, last_order = [], None, 0  # data predictions, predictor input, order of last step
    for i in trange(n, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if x_last is not None:  # UniC: correct x with the model output at the predicted point
            h = lam[i] - lam[i - 1]
            if last_order == 1:
                corr = 0.5 * (denoised - ms[-1])
            else:
                rk = (lam[i - 2] - lam[i - 1]) / h
                rho_0, rho_1 = _unipc_rhos(h, rk)
                corr = rho_0 * (ms[-2] - ms[-1]) / rk + rho_1 * (denoised - ms[-1])
            x = _unipc_update(x_last, s[i - 1], s[i], ms[-1], corr)
        _report(callback, x, i, sigmas[i], denoised)
        ms = (ms + [denoised])[-2:]
        last_order = min(2, n - i, i + 1)
        x_last = x
        if s[i + 1] == 0:  # h = inf, the last step (order 1): x lands on the data prediction
            x = denoised
        elif last_order == 1:
            x = _unipc_update(x, s[i], s[i + 1], denoised, 0.0)
        else:  # UniP-2: rho_p = 1/2 on the divided difference of the last two predictions
            rk = (lam[i - 1] - lam[i]) / (lam[i + 1] - lam[i])
            x = _unipc_update(x, s[i], s[i + 1], denoised, 0.5 * (ms[-2] - denoised) / rk)
    return x


@dataclass(frozen=True)
class Sampler:
    """A table entry: the function and what `sample` must know to run it like diffusers does."""

    fn: Callable[..., torch.Tensor]
    label: str  # AUTOMATIC1111's name, for PNG metadata
    quantize: bool = False  # the UNet sees integer timesteps
    eta: bool = False  # accepts `eta` (DDIM)


SAMPLERS: dict[str, Sampler] = {
    "ddim": Sampler(sample_ddim, "DDIM", quantize=True, eta=True),
    "plms": Sampler(sample_plms, "PLMS", quantize=True),
    "ddpm": Sampler(sample_ddpm, "DDPM", quantize=True),
    "euler": Sampler(sample_euler, "Euler"),
    "euler_a": Sampler(sample_euler_ancestral, "Euler a"),
    "heun": Sampler(sample_heun, "Heun"),
    "lms": Sampler(sample_lms, "LMS"),
    "dpmpp_2m": Sampler(sample_dpmpp_2m, "DPM++ 2M", quantize=True),
    "unipc": Sampler(sample_unipc, "UniPC", quantize=True),
    "lcm": Sampler(sample_lcm, "LCM", quantize=True),
}
# sdtorch 0.1's combined names, still accepted: "<sampler>_karras" = that sampler, scheduler "karras".
ALIASES: dict[str, tuple[str, str]] = {f"{s}_karras": (s, "karras") for s in
                                       ("euler", "euler_a", "heun", "lms", "dpmpp_2m", "unipc")}
NAMES = (*SAMPLERS, *ALIASES)  # every name `sample` accepts
# AUTOMATIC1111's sampler names (its API's `sampler_name`) -> sdtorch's; its scheduler comes apart.
A1111_SAMPLERS: dict[str, str] = {s.label: name for name, s in SAMPLERS.items()}


def resolve(name: str, scheduler: str = "automatic") -> tuple[str, str]:
    """(sampler, scheduler) from a sampler name or a combined alias ("dpmpp_2m_karras")."""
    if name in ALIASES and scheduler == "automatic":
        return ALIASES[name]
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(NAMES)}")
    check_scheduler(scheduler)
    return name, scheduler


def from_a1111(sampler_name: str, scheduler: str | None = None) -> tuple[str, str]:
    """AUTOMATIC1111's sampler and schedule names ("DPM++ 2M Karras", or "DPM++ 2M" + "Karras")
    -> sdtorch's (sampler, scheduler). Raises ValueError naming an unknown one."""
    labels = {v.lower(): k for k, v in LABELS.items()}
    sched = labels.get((scheduler or "automatic").lower(), (scheduler or "").lower())
    name = sampler_name.strip()
    for label in sorted(labels, key=len, reverse=True):  # a schedule spelled into the sampler name
        if label != "automatic" and name.lower().endswith(" " + label) and sched == "automatic":
            name, sched = name[: -len(label) - 1], labels[label]
            break
    match = {k.lower(): v for k, v in A1111_SAMPLERS.items()}.get(name.lower(), name if name in SAMPLERS else None)
    if match is None:
        raise ValueError(f"unknown sampler {sampler_name!r}; choose from {', '.join(A1111_SAMPLERS)}")
    return resolve(match, sched)


def get_sampler(name: str) -> Sampler:
    return SAMPLERS[resolve(name)[0]]


def display_name(name: str, scheduler: str = "automatic") -> str:
    """AUTOMATIC1111's name of a sampler ("dpmpp_2m_karras" -> "DPM++ 2M Karras")."""
    base, scheduler = resolve(name, scheduler)
    label = SAMPLERS[base].label
    return label if scheduler == "automatic" else f"{label} {LABELS[scheduler]}"


def sample(name: str, make_model: Callable[[bool], Model], noise: torch.Tensor, steps: int,
           schedule: ScheduleConfig, *, extra_args: dict | None = None, callback: Callable | None = None,
           generator: torch.Generator | None = None, eta: float = 0.0, disable: bool | None = None,
           prediction: str = "eps", init: torch.Tensor | None = None, start: int = 0,
           scheduler: str = "automatic", stop: int | None = None, noised: bool = False) -> torch.Tensor:
    """Run sampler `name` for `steps` steps on the grid of `scheduler` from unit `noise`
    (B, C, h, w); return latents in the reference's VP space, equal to diffusers' final latents.
    `make_model(quantize)` builds the denoiser `model(x, sigma, **extra_args) -> x0`; see the module
    docstring. `prediction` is the model's ("eps" / "v"): only PLMS needs it, to mix outputs as
    the reference does.

    img2img: with clean latents `init`, the walk starts at grid index `start` from
    x = init + sigmas[start] * noise (diffusers' `add_noise` in VE space) and takes
    steps - start steps; with start == steps nothing is sampled and `init` comes back.

    Hand-off between two models (SDXL base -> refiner; diffusers' denoising_end / denoising_start):
    `stop` ends the walk at grid index `stop` and returns the still-noisy latents there, and
    `noised` says `init` is such latents (at grid index `start`), taken as they are; both in the
    reference's space for the sampler (`schedule.ve_latents`)."""
    base, scheduler = resolve(name, scheduler)
    sampler = SAMPLERS[base]
    if not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if eta and not sampler.eta:
        raise ValueError(f"sampler {name!r} takes no eta (got eta={eta}); only 'ddim' does")
    sigmas, native = grid(base, scheduler, steps, schedule)  # stays on the CPU: no device syncs per step
    if init is None:
        x = noise * (init_noise_sigma(native, sigmas, schedule) if native else sigmas[0].item())
    elif start >= steps:
        return init
    else:
        sigmas = sigmas[start:]
        ve = ve_latents(native)
        x = (init if ve else init * (1 + sigmas[0].item() ** 2) ** 0.5) if noised else init + noise * sigmas[0].item()
    if stop is not None:
        if not start < stop <= steps:
            raise ValueError(f"stop must be in {start + 1}..{steps}, got {stop}")
        sigmas = sigmas[: stop - start + 1]
    kwargs = {"eta": eta} if sampler.eta else {}
    if sampler.fn is sample_plms:
        kwargs["combine"] = prediction  # the reference mixes raw model outputs
    if sampler.fn is sample_lcm:  # its boundary condition needs the timesteps
        kwargs["timesteps"] = sigma_to_t(sigmas, training_sigmas(schedule), quantize=True).tolist()
    x = sampler.fn(make_model(sampler.quantize), x, sigmas, extra_args, callback, disable,
                   generator=generator, **kwargs)
    if stop is not None and stop < steps and ve_latents(native):
        return x
    # DDIM and PLMS stop at sigma(t=0) > 0: hand back the VP latent diffusers returns.
    return x / (1 + sigmas[-1].item() ** 2) ** 0.5

