"""Schedule, denoisers and samplers on closed-form denoisers (fast; parity with diffusers is in
test_sampler_parity.py)."""

from __future__ import annotations

import math

import pytest
import torch

from sdtorch.config import ScheduleConfig
from sdtorch.models.condition import Condition
from sdtorch.sampling import schedule
from sdtorch.sampling.denoisers import CFGDenoiser, DiscreteDenoiser
from sdtorch.sampling.samplers import NAMES, ancestral_step, display_name, get_sampler, lms_coefficient, sample

CFG = ScheduleConfig()
MU, S = 0.7, 0.5  # Gaussian data N(MU, S^2)
DETERMINISTIC = ["ddim", "plms", "euler", "heun", "lms", "dpmpp_2m", "unipc"]
STOCHASTIC = ["ddpm", "euler_a", "euler_a_karras"]


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor, **_) -> torch.Tensor:
    """E[x0 | x] for x0 ~ N(MU, S^2), x = x0 + sigma * eps."""
    var = sigma.view(-1, 1, 1, 1) ** 2
    return (S**2 * x + var * MU) / (S**2 + var)


def exact_flow(x: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
    """The probability-flow ODE for Gaussian data, solved: x - MU scales with sqrt(S^2 + sigma^2)."""
    return MU + (x - MU) * math.sqrt(S**2 + sigma_to**2) / math.sqrt(S**2 + sigma_from**2)


def _start(sigma_max: float, shape=(2, 1, 8, 8), seed=0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return MU + math.sqrt(S**2 + sigma_max**2) * torch.randn(shape, generator=g, dtype=dtype)


# --- schedule ---------------------------------------------------------------------------------


def test_schedule_values():
    a = schedule.alphas_cumprod(CFG)
    assert a.dtype == torch.float32 and a.shape == (1000,)
    assert a[0].item() == pytest.approx(1 - 0.00085, rel=1e-6)
    sigmas = schedule.training_sigmas(CFG)
    assert torch.all(sigmas[1:] > sigmas[:-1])
    assert sigmas[-1].item() == pytest.approx(14.6146, rel=1e-4)  # SD's sigma_max
    assert sigmas[0].item() == pytest.approx(0.029168, rel=1e-4)


def test_sigma_t_round_trip():
    sigmas = schedule.training_sigmas(CFG)
    t = torch.arange(1000, dtype=torch.float32)
    assert torch.equal(schedule.sigma_to_t(sigmas, sigmas), t)  # training sigmas: exact integers
    t_frac = torch.linspace(0, 999, 777)
    back = schedule.sigma_to_t(schedule.t_to_sigma(t_frac, sigmas), sigmas)
    torch.testing.assert_close(back, t_frac, rtol=0, atol=2e-3)
    mid = schedule.t_to_sigma(torch.tensor([100.5]), sigmas)
    assert sigmas[100] < mid < sigmas[101]
    assert schedule.sigma_to_t(mid, sigmas, quantize=True).item() in (100.0, 101.0)
    outside = schedule.sigma_to_t(torch.tensor([1e-3, 100.0]), sigmas)
    assert outside.tolist() == [0.0, 999.0]  # clamped to the trained range


def test_karras_grid_endpoints():
    sigmas = schedule.get_sigmas_karras(12, 0.03, 14.6)
    assert sigmas.shape == (13,) and sigmas[-1] == 0
    assert sigmas[0].item() == pytest.approx(14.6, rel=1e-6)
    assert sigmas[-2].item() == pytest.approx(0.03, rel=1e-6)
    assert torch.all(sigmas[1:] < sigmas[:-1])


def test_sampling_grids_ends_and_lengths():
    train = schedule.training_sigmas(CFG)
    for name in NAMES:
        grid = schedule.sampling_sigmas(name, 10, CFG)
        assert grid.shape == (11,) and torch.all(grid[1:] < grid[:-1]), name
        assert grid[-1].item() == (train[0].item() if name in ("ddim", "plms") else 0.0), name
    # 10 leading steps: t = 901 .. 1, and the Euler-type Karras grid keeps those ends ...
    assert schedule.sampling_sigmas("euler", 10, CFG)[0] == train[901]
    euler_karras = schedule.sampling_sigmas("euler_karras", 10, CFG)
    assert euler_karras[0] == train[901] and euler_karras[-2].item() == pytest.approx(train[1].item())
    # ... while DPMSolver / UniPC Karras grids span the whole training range.
    dpm_karras = schedule.sampling_sigmas("dpmpp_2m_karras", 10, CFG)
    assert dpm_karras[0] == train[-1] and dpm_karras[-2] == train[0]


def test_init_noise_sigma():
    grid = schedule.sampling_sigmas("euler", 10, CFG)
    assert schedule.init_noise_sigma("euler", grid, CFG) == pytest.approx(math.sqrt(1 + grid[0].item() ** 2))
    linspace = ScheduleConfig(timestep_spacing="linspace")
    grid = schedule.sampling_sigmas("euler", 10, linspace)
    assert schedule.init_noise_sigma("euler", grid, linspace) == pytest.approx(grid[0].item())
    grid = schedule.sampling_sigmas("ddim", 10, linspace)  # VP schedulers: always the VP prior
    vp_prior = math.sqrt(1 + grid[0].item() ** 2)
    assert schedule.init_noise_sigma("ddim", grid, linspace) == pytest.approx(vp_prior)


# --- denoisers --------------------------------------------------------------------------------


class OracleUNet:
    """Knows x0 and eps; returns eps or v for the VP input, recording what it was called with."""

    def __init__(self, x0, eps, prediction):
        self.x0, self.eps, self.prediction, self.calls = x0, eps, prediction, []

    def __call__(self, x_in, t, context):
        self.calls.append((x_in, t, context))
        if self.prediction == "eps":
            return self.eps
        a = schedule.alphas_cumprod(CFG)[t.long()].view(-1, 1, 1, 1)
        return a.sqrt() * self.eps - (1 - a).sqrt() * self.x0


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_denoiser_recovers_x0(prediction):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    train = schedule.training_sigmas(CFG)
    sigma = train[torch.tensor([37, 800])]
    unet = OracleUNet(x0, eps, prediction)
    x = x0 + sigma.view(-1, 1, 1, 1) * eps
    denoised = DiscreteDenoiser(unet, CFG, prediction)(x, sigma, torch.zeros(2, 3, 5))
    torch.testing.assert_close(denoised, x0, rtol=0, atol=1e-5)
    x_in, t, _ = unet.calls[0]
    a = schedule.alphas_cumprod(CFG)[[37, 800]].view(-1, 1, 1, 1)
    torch.testing.assert_close(x_in, a.sqrt() * x0 + (1 - a).sqrt() * eps)  # the VP latent
    assert t.tolist() == [37.0, 800.0]


def test_denoiser_quantize_rounds_t():
    seen = []
    unet = lambda x, t, c: seen.append(t) or torch.zeros_like(x)  # noqa: E731
    sigma = schedule.t_to_sigma(torch.tensor([412.3, 86.7]), schedule.training_sigmas(CFG))
    x = torch.zeros(2, 4, 2, 2)
    DiscreteDenoiser(unet, CFG, quantize=False)(x, sigma, None)
    DiscreteDenoiser(unet, CFG, quantize=True)(x, sigma, None)
    torch.testing.assert_close(seen[0], torch.tensor([412.3, 86.7]), rtol=0, atol=2e-3)
    assert seen[1].tolist() == [412.0, 87.0]
    with pytest.raises(ValueError, match="prediction"):
        DiscreteDenoiser(unet, CFG, "x0")


def test_cfg_one_batch_negative_first():
    calls = []

    def inner(x, sigma, cond):
        cond = Condition.of(cond).crossattn  # guidance hands the inner denoiser one batched Condition
        calls.append((x.shape[0], cond.clone()))
        return x + cond.mean(dim=(1, 2)).view(-1, 1, 1, 1)  # x0 depends on the conditioning

    x, sigma = torch.randn(2, 4, 3, 3), torch.ones(2)
    cond, uncond = torch.full((2, 3, 5), 2.0), torch.full((2, 3, 5), -1.0)
    out = CFGDenoiser(inner, 7.5)(x, sigma, cond=cond, uncond=uncond)
    assert len(calls) == 1 and calls[0][0] == 4
    assert torch.equal(calls[0][1], torch.cat([uncond, cond]))
    torch.testing.assert_close(out, x - 1 + 7.5 * 3)
    calls.clear()
    out = CFGDenoiser(inner, 1.0)(x, sigma, cond=cond, uncond=uncond)  # guidance off: cond only
    assert len(calls) == 1 and calls[0][0] == 2 and torch.equal(calls[0][1], cond)
    torch.testing.assert_close(out, x + 2)


# --- samplers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(NAMES))
def test_point_mass_data(name):
    """With one data point the flow is a straight line to it: every sampler lands on it."""
    x0 = torch.tensor(0.3, dtype=torch.float64)
    sigmas = schedule.sampling_sigmas(name, 10, CFG).double()
    g = torch.Generator().manual_seed(1)
    x = x0 + sigmas[0] * torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    out = get_sampler(name).fn(lambda x, s: torch.full_like(x, 0.3), x, sigmas, disable=True,
                            generator=torch.Generator().manual_seed(2))
    expected = x0 + (x - x0) * sigmas[-1] / sigmas[0]  # = x0 where the grid ends at 0
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_gaussian_data_converges_to_the_exact_flow(name):
    """Against the closed-form probability-flow solution: first order halves the error when the
    steps double; the higher-order samplers are far more accurate and converge faster."""
    errors = {}
    for steps in (10, 20, 40):
        sigmas = schedule.get_sigmas_karras(steps, 0.02, 14.6).double()
        x = _start(sigmas[0].item())
        out = get_sampler(name).fn(gaussian_denoiser, x, sigmas, disable=True)
        exact = exact_flow(x, sigmas[0].item(), 0.0)
        errors[steps] = ((out - exact).abs().max() / (exact - MU).abs().max()).item()
    if name in ("euler", "ddim"):
        assert 1.8 < errors[20] / errors[40] < 2.2, errors
        assert errors[40] < 0.05
    else:
        assert errors[10] / errors[40] > 10, errors
        assert errors[40] < 3e-3, errors


@pytest.mark.parametrize("name,eta", [("ddpm", 0.0), ("euler_a", 0.0), ("ddim", 1.0)])
def test_ancestral_samplers_reach_the_data_distribution(name, eta):
    sigmas = schedule.get_sigmas_karras(200, 0.02, 14.6)
    x = _start(sigmas[0].item(), shape=(16, 1, 32, 32), dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    kwargs = {"eta": eta} if eta else {}
    out = get_sampler(name).fn(gaussian_denoiser, x, sigmas, disable=True, generator=g, **kwargs)
    assert out.mean().item() == pytest.approx(MU, abs=0.02)
    assert out.std().item() == pytest.approx(S, rel=0.04)


def test_ddim_eta_interpolates_between_ode_and_ddpm():
    sigmas = schedule.sampling_sigmas("ddim", 10, CFG)
    x = _start(sigmas[0].item(), dtype=torch.float32)
    fn = get_sampler("ddim").fn
    ode = fn(gaussian_denoiser, x, sigmas, disable=True)
    assert torch.equal(ode, get_sampler("euler").fn(gaussian_denoiser, x, sigmas, disable=True))
    g = torch.Generator().manual_seed(0)
    assert torch.equal(fn(gaussian_denoiser, x, sigmas, disable=True, generator=g, eta=0.0), ode)
    assert g.initial_seed() == 0 and torch.equal(g.get_state(), torch.Generator().manual_seed(0).get_state())
    noisy = fn(gaussian_denoiser, x, sigmas, disable=True, generator=g, eta=1.0)
    assert not torch.allclose(noisy, ode)


def test_ancestral_step():
    down, up = ancestral_step(2.0, 1.0)
    assert down**2 + up**2 == pytest.approx(1.0) and up == pytest.approx(math.sqrt(3) / 2)
    assert ancestral_step(2.0, 1.0, eta=0.0) == (1.0, 0.0)
    assert ancestral_step(2.0, 0.0) == (0.0, 0.0)


def test_lms_coefficients_are_exact_integrals():
    scipy_integrate = pytest.importorskip("scipy.integrate")
    sigmas = [14.6, 9.0, 5.5, 3.2, 1.7, 0.0]
    for order, i in ((1, 0), (2, 1), (3, 2), (4, 4)):
        coeffs = [lms_coefficient(sigmas, i, j, order) for j in range(order)]
        assert sum(coeffs) == pytest.approx(sigmas[i + 1] - sigmas[i])  # the basis sums to 1
        for j, c in enumerate(coeffs):
            def basis(tau):
                others = [k for k in range(order) if k != j]
                return math.prod((tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k]) for k in others)
            assert c == pytest.approx(scipy_integrate.quad(basis, sigmas[i], sigmas[i + 1])[0], rel=1e-10)


# --- sample(): the entry point ----------------------------------------------------------------


def _run(name, seed=0, steps=6, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(2, 4, 4, 4, generator=generator)
    return sample(name, lambda quantize: gaussian_denoiser, noise, steps, CFG, generator=generator,
                  disable=True, **kwargs)


@pytest.mark.parametrize("name", list(NAMES))
def test_callback_once_per_step(name):
    seen = []
    _run(name, steps=7, callback=seen.append)
    assert [info["i"] for info in seen] == list(range(7))
    assert all(set(info) == {"x", "i", "sigma", "sigma_hat", "denoised"} for info in seen)
    grid = schedule.sampling_sigmas(name, 7, CFG)
    assert [info["sigma"].item() for info in seen] == grid[:-1].tolist()


@pytest.mark.parametrize("name", list(NAMES))
def test_seeded_runs_are_reproducible(name):
    a, b, other = _run(name, seed=3), _run(name, seed=3), _run(name, seed=4)
    assert torch.equal(a, b) and not torch.allclose(a, other)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_samplers_use_the_generator(name):
    generator = torch.Generator().manual_seed(0)
    x = torch.zeros(1, 1, 4, 4)
    sigmas = schedule.sampling_sigmas(name, 5, CFG)
    first = get_sampler(name).fn(gaussian_denoiser, x, sigmas, disable=True, generator=generator)
    second = get_sampler(name).fn(gaussian_denoiser, x, sigmas, disable=True, generator=generator)
    assert not torch.allclose(first, second)  # same start, later draws from the generator
    expected_state = torch.Generator().manual_seed(0)
    for _ in range(10):  # one draw per step, 5 steps per run
        torch.randn(x.shape, generator=expected_state)
    assert torch.equal(generator.get_state(), expected_state.get_state())


def test_sample_returns_vp_latents_and_passes_quantize():
    flags = []

    def make_model(quantize):
        flags.append(quantize)
        return gaussian_denoiser

    noise = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    out = sample("ddim", make_model, noise, 5, CFG, disable=True)
    grid = schedule.sampling_sigmas("ddim", 5, CFG)
    x = get_sampler("ddim").fn(gaussian_denoiser, noise * math.sqrt(1 + grid[0].item() ** 2), grid, disable=True)
    torch.testing.assert_close(out, x / math.sqrt(1 + grid[-1].item() ** 2))
    sample("euler_karras", make_model, noise, 5, CFG, disable=True)
    assert flags == [True, False]


def test_sample_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown sampler 'dpm_fast'.*euler_a"):
        _run("dpm_fast")
    with pytest.raises(ValueError, match="unknown sampler"):
        schedule.sampling_sigmas("k_euler", 10, CFG)
    for steps in (0, -3):
        with pytest.raises(ValueError, match="steps"):
            _run("euler", steps=steps)
    with pytest.raises(ValueError, match="steps"):
        _run("euler", steps=1001)
    with pytest.raises(ValueError, match="eta"):
        _run("euler_a", eta=0.5)
    _run("ddim", eta=0.5)  # DDIM takes it


def test_display_names():
    assert display_name("dpmpp_2m_karras") == "DPM++ 2M Karras"
    assert display_name("euler_a") == "Euler a"
    assert len({display_name(n) for n in NAMES}) == len(NAMES)


@pytest.mark.parametrize("name", ["karras", "exponential", "uniform", "sgm_uniform", "simple"])
def test_scheduler_grids_fall_from_the_training_sigma_max_to_zero(name):
    from sdtorch.config import ScheduleConfig
    from sdtorch.sampling import schedule, schedulers

    cfg = ScheduleConfig()
    train = schedule.training_sigmas(cfg)
    sigmas = schedulers.SCHEDULES[name](10, cfg)
    assert sigmas.shape == (11,) and sigmas.dtype == torch.float32 and sigmas[-1] == 0
    assert torch.all(sigmas[1:] < sigmas[:-1])
    assert sigmas[0].item() == pytest.approx(train[-1].item(), rel=1e-5)
    if name == "exponential":  # evenly spaced in log sigma, down to sigma_min
        steps = sigmas[:-1].log().diff()
        torch.testing.assert_close(steps, steps.mean().expand_as(steps), rtol=1e-4, atol=1e-5)
        assert sigmas[-2].item() == pytest.approx(train[0].item(), rel=1e-5)
    if name == "simple":  # training sigmas themselves, every 100th timestep from the top
        torch.testing.assert_close(sigmas[:-1], train.flip(0)[::100])
    if name == "sgm_uniform":  # n + 1 points from T-1 to 0 with the last dropped: ends above sigma_min
        assert sigmas[-2] > train[0] * 1.5


def test_unknown_scheduler_and_sampler_are_named():
    from sdtorch.sampling import from_a1111, resolve

    with pytest.raises(ValueError, match="unknown scheduler 'nope'"):
        resolve("euler", "nope")
    with pytest.raises(ValueError, match="unknown sampler 'DPM fast'"):
        from_a1111("DPM fast")
    assert from_a1111("Euler a Karras") == ("euler_a", "karras")
    assert resolve("unipc_karras") == ("unipc", "karras")


def test_condition_concat_is_appended_after_input_scaling_and_batched_by_guidance():
    from sdtorch.config import ScheduleConfig

    seen = []

    def unet(x_in, t, context):
        seen.append(x_in)
        return torch.zeros_like(x_in[:, :4])

    x, sigma = torch.randn(2, 4, 3, 3), torch.full((2,), 3.0)
    extra = torch.randn(2, 5, 3, 3)
    cond = Condition(torch.ones(2, 3, 5), concat=extra)
    uncond = Condition(torch.zeros(2, 3, 5), concat=extra)
    CFGDenoiser(DiscreteDenoiser(unet, ScheduleConfig()), 5.0)(x, sigma, cond=cond, uncond=uncond)
    (x_in,) = seen
    assert x_in.shape == (4, 9, 3, 3)
    torch.testing.assert_close(x_in[:, :4], torch.cat([x, x]) / 10**0.5)  # c_in = 1 / sqrt(1 + 3^2)
    assert torch.equal(x_in[:, 4:], torch.cat([extra, extra]))  # unscaled, for both halves
    # a vector (SDXL) reaches the UNet as its fourth argument, batched like the rest by guidance
    vectors = []

    def unet_xl(x_in, t, context, y):
        vectors.append(y)
        return torch.zeros_like(x_in[:, :4])

    cond, uncond = Condition(torch.ones(2, 3, 5), vector=torch.ones(2, 8)), Condition(torch.ones(2, 3, 5), vector=-torch.ones(2, 8))
    CFGDenoiser(DiscreteDenoiser(unet_xl, ScheduleConfig()), 5.0)(x, sigma, cond=cond, uncond=uncond)
    assert torch.equal(vectors[0], torch.cat([-torch.ones(2, 8), torch.ones(2, 8)]))  # [uncond, cond] as the context
