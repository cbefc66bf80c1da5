"""Parity of sdtorch's samplers with diffusers' schedulers, run as StableDiffusionPipeline runs them.

A deterministic toy "UNet" (nonlinear in x, t and the text context) stands in for the model; both
sides start from the same seeded generator, so the stochastic samplers must also draw their
per-step noise in diffusers' order to agree.
"""

from __future__ import annotations

import inspect

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from reference_models import reference_scheduler  # noqa: E402

from sdtorch.config import ScheduleConfig  # noqa: E402
from sdtorch.sampling import schedule  # noqa: E402
from sdtorch.sampling.denoisers import CFGDenoiser, DiscreteDenoiser  # noqa: E402
from sdtorch.sampling.samplers import NAMES, get_sampler, sample  # noqa: E402

# The SD 1.5 scheduler config (PNDM, as the diffusers single-file loader writes it).
SD_CONFIG = {
    "_class_name": "PNDMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "skip_prk_steps": True,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
}

CASES = [(name, 0.0) for name in NAMES if name != "ddim"] + [("ddim", 0.0), ("ddim", 1.0)]
MEASURED: dict[tuple, float] = {}


class ToyUNet:
    """eps (or v) = tanh(W x + b t/1000 + d sin(t/8) + c mean(context)) + 0.1 x, per pixel, with
    fixed random W, b, c, d. The sin term, like a timestep embedding, makes a rounded t visible."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(4, 4, generator=g) * 0.6
        self.b, self.c, self.d = (torch.randn(4, 1, 1, generator=g) for _ in range(3))

    def __call__(self, x, t, context):
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1)
        ctx = context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
        h = torch.einsum("oc,bchw->bohw", self.w, x) + self.c * ctx
        h = h + 2 * self.b * t / 1000 + 0.5 * self.d * torch.sin(t / 8)
        return torch.tanh(h) + 0.1 * x


def _make(name: str, steps: int, prediction: str = "eps", spacing: str = "leading"):
    """The diffusers scheduler for sampler `name`, after `set_timesteps(steps)`."""
    prediction_type = "v_prediction" if prediction == "v" else "epsilon"
    scheduler = reference_scheduler(name, dict(SD_CONFIG, prediction_type=prediction_type, timestep_spacing=spacing))
    scheduler.set_timesteps(steps)
    return scheduler


def _reference(name, toy, steps, prediction, seed, eta, cond, uncond=None, scale=1.0, spacing="leading"):
    """StableDiffusionPipeline's denoising loop, verbatim in substance."""
    scheduler = _make(name, steps, prediction, spacing)
    generator = torch.Generator("cpu").manual_seed(seed)
    latents = torch.randn(cond.shape[:1] + (4, 8, 8), generator=generator) * scheduler.init_noise_sigma
    accepted = set(inspect.signature(scheduler.step).parameters)
    extra = {k: v for k, v in (("eta", eta), ("generator", generator)) if k in accepted}
    guided = scale > 1
    for t in scheduler.timesteps:
        inp = torch.cat([latents] * 2) if guided else latents
        inp = scheduler.scale_model_input(inp, t)
        out = toy(inp, t, torch.cat([uncond, cond]) if guided else cond)
        if guided:
            out_uncond, out_cond = out.chunk(2)
            out = out_uncond + scale * (out_cond - out_uncond)
        latents = scheduler.step(out, t, latents, **extra).prev_sample
    return latents


def _ours(name, toy, steps, prediction, seed, eta, cond, uncond=None, scale=1.0):
    generator = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn(cond.shape[:1] + (4, 8, 8), generator=generator)

    def make_model(quantize: bool):
        return CFGDenoiser(DiscreteDenoiser(toy, ScheduleConfig(), prediction, quantize=quantize), scale)

    extra_args = {"cond": cond, "uncond": uncond}
    return sample(name, make_model, noise, steps, ScheduleConfig(), extra_args=extra_args,
                  generator=generator, eta=eta, disable=True, prediction=prediction)


def _context(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 8, generator=torch.Generator().manual_seed(seed))


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("steps", [1, 3, 10, 25])
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("name,eta", CASES)
def test_final_latents_match_diffusers(name, eta, prediction, steps):
    toy, cond = ToyUNet(), _context()
    ref = _reference(name, toy, steps, prediction, 42, eta, cond)
    ours = _ours(name, toy, steps, prediction, 42, eta, cond)
    err = _rel_err(ours, ref)
    MEASURED[(name, eta, prediction, steps)] = err
    assert ref.abs().max() > 0.5  # a real image-like output, not a collapsed one
    assert err <= 1e-4, f"{name} eta={eta} {prediction} {steps} steps: rel. error {err:.2e}"


@pytest.mark.parametrize("name", ["euler_a", "dpmpp_2m_karras", "ddim", "lcm"])
def test_guided_latents_match_diffusers(name):
    toy, cond, uncond = ToyUNet(), _context(seed=1), _context(seed=2)
    ref = _reference(name, toy, 12, "eps", 7, 0.0, cond, uncond, scale=7.5)
    ours = _ours(name, toy, 12, "eps", 7, 0.0, cond, uncond, scale=7.5)
    assert _rel_err(ours, ref) <= 1e-4


def _reference_grid(scheduler, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas (n+1,), timesteps (n,)) of a diffusers scheduler, one entry per sampler step."""
    ts = scheduler.timesteps
    if name in ("ddim", "plms", "ddpm", "lcm"):  # VP schedulers: sigma from alphas_cumprod at the timesteps
        if name == "plms":  # [t0, t1, t1, t2, ...]: the repeated t1 is the improved-Euler start
            ts = torch.cat([ts[:1], ts[2:]])
        a = scheduler.alphas_cumprod
        final = scheduler.final_alpha_cumprod if name not in ("ddpm", "lcm") else torch.tensor(1.0)
        sigmas = ((1 - a[ts]) / a[ts]) ** 0.5
        return torch.cat([sigmas, ((1 - final) / final).reshape(1) ** 0.5]), ts
    sigmas = scheduler.sigmas
    if name.startswith("heun"):  # every inner point twice, for the corrector's evaluation
        sigmas, ts = torch.cat([sigmas[:1], sigmas[1::2]]), torch.cat([ts[:1], ts[1::2]])
    return sigmas, ts


@pytest.mark.parametrize("steps", [1, 10, 20, 25, 50])
@pytest.mark.parametrize("name", list(NAMES))
def test_grid_and_timesteps_match_diffusers(name, steps):
    scheduler = _make(name, steps)
    ref_sigmas, ref_ts = _reference_grid(scheduler, name)
    cfg = ScheduleConfig()
    sigmas = schedule.sampling_sigmas(name, steps, cfg)
    assert torch.equal(sigmas, ref_sigmas.float())  # bit for bit
    ts = schedule.sigma_to_t(sigmas[:-1], schedule.training_sigmas(cfg), get_sampler(name).quantize)
    if get_sampler(name).quantize or "karras" not in name:
        assert torch.equal(ts, ref_ts.float())  # integer timesteps, exactly
    else:  # fractional t of Karras sigmas: diffusers interpolates in float64 from the float64 sigma
        torch.testing.assert_close(ts, ref_ts.float(), rtol=0, atol=2e-3)
    noise_scale = schedule.init_noise_sigma(name, sigmas, cfg)
    ref_scale = float(scheduler.init_noise_sigma)
    vp_scale = noise_scale / (1 + sigmas[0].item() ** 2) ** 0.5 if ref_scale == 1.0 else noise_scale
    assert vp_scale == pytest.approx(ref_scale, rel=1e-6)


@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
@pytest.mark.parametrize("name", ["ddpm", "euler", "heun", "lms", "euler_karras", "dpmpp_2m", "unipc_karras"])
def test_other_spacings_match_diffusers(name, spacing):
    """"linspace" and "trailing" grids and starting noise, for the schedulers whose steps
    follow their own timestep list (all but DDIM and PNDM, see `sampling_sigmas`)."""
    cfg = ScheduleConfig(timestep_spacing=spacing)
    ref_sigmas, _ = _reference_grid(_make(name, 20, spacing=spacing), name)
    assert torch.equal(schedule.sampling_sigmas(name, 20, cfg), ref_sigmas.float())
    toy, cond = ToyUNet(), _context()
    ref = _reference(name, toy, 20, "eps", 3, 0.0, cond, spacing=spacing)
    generator = torch.Generator("cpu").manual_seed(3)
    noise = torch.randn(2, 4, 8, 8, generator=generator)
    ours = sample(name, lambda q: DiscreteDenoiser(toy, cfg, quantize=q), noise, 20, cfg,
                  extra_args={"cond": cond}, generator=generator, disable=True)
    assert _rel_err(ours, ref) <= 1e-4


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear"])
def test_alphas_cumprod_bit_exact(beta_schedule):
    start, end = (0.0001, 0.02) if beta_schedule == "linear" else (0.00085, 0.012)
    cfg = ScheduleConfig(beta_schedule=beta_schedule, beta_start=start, beta_end=end)
    ref = diffusers.DDPMScheduler(beta_start=start, beta_end=end, beta_schedule=beta_schedule)
    assert torch.equal(schedule.betas(cfg), ref.betas)
    assert torch.equal(schedule.alphas_cumprod(cfg), ref.alphas_cumprod)


def test_report_measured_maxima():
    """Prints the largest parity error per sampler (run with -s); runs after the parity cases."""
    if not MEASURED:
        pytest.skip("parity cases did not run in this session")
    worst: dict[str, float] = {}
    for (name, eta, _, _), err in MEASURED.items():
        key = f"{name}(eta={eta})" if name == "ddim" else name
        worst[key] = max(worst.get(key, 0.0), err)
    print("\nmax |ours - diffusers| / max |diffusers| per sampler:")
    for key, err in sorted(worst.items()):
        print(f"  {key:18s} {err:.2e}")
    assert max(worst.values()) <= 1e-4
