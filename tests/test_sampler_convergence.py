"""Sampler correctness against an exact model: Gaussian data x0 ~ N(mu, s^2) per coordinate (samplers.gaussian).

The analytic eps (or v) "UNet" goes through the real `Denoiser` (and `GuidedModel`), so the samplers run unchanged.
The model maps the timestep back to sigma with the Denoiser's own log-sigma interpolation, and the order tests snap
their grid to sigmas whose timestep is a float32 number (the Denoiser passes t as float32), so the model is exact at
every grid point and the measured error is the sampler's alone. Everything runs in float64.

Orders are measured on the Karras (rho 7) grid from sigma_max down to sigma_min, *without* the final 0: every
sampler except LMS ends with the jump x = D(x, sigma_min), whose error against the exact flow does not shrink with N
(samplers-math.md 5.3). The final step to 0 is tested separately (it must return D). Error = max over coordinates of
|x_N - exact|, order = least-squares slope of -log(error) against log(N) over the stated window, chosen where the
successive slopes have settled (pre-asymptotic at N = 10-20, float64/float32-timestep floors beyond ~1e-9).

Start-up caveat (LMS, DPM++ 3M): a multistep method that starts with a first-order step carries that step's O(h^2)
local error to the end. At sigma_max it is damped by the flow's contraction (by about s / sigma_max, and it scales
like s^3), so it is invisible for s <= 0.5 but dominates the s = 2 coordinate from N ~ 80 on, where both methods
drop to slope 2 (measured: LMS 3.4 -> 2.1, 3M 3.0 -> 2.2 at N = 20 ... 640). k-diffusion and diffusers start the same
way, so their order tests use the coordinates with s <= 0.5.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from samplers import Denoiser, GuidedModel, get_sigmas
from samplers.gaussian import GaussianModel, sd_alphas_cumprod
from samplers.lms import lms_coefficients
from samplers.registry import SAMPLERS

ALPHAS_CUMPROD = sd_alphas_cumprod()
K = 8
S = torch.logspace(math.log10(0.05), math.log10(2.0), K, dtype=torch.float64).reshape(1, K, 1, 1)
MU = torch.linspace(-0.5, 0.8, K, dtype=torch.float64).reshape(1, K, 1, 1)
Z = torch.randn(1, K, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
STIFF = (S.flatten() <= 0.5)  # the coordinates without the start-up error (module docstring)
ALL = torch.ones(K, dtype=torch.bool)

STOCHASTIC = ["euler_a", "ddpm", "dpmpp_2s_a", "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde"]
DETERMINISTIC = ["ddim", "plms", "euler", "heun", "dpm2", "lms", "dpmpp_2m", "unipc"]


def make_denoiser(parameterization: str = "eps", guidance_scale: float = 1.0, mu_uncond: float = 0.0):
    """(GaussianModel, Denoiser, the mean the guided ODE samples) for data N(MU, S^2)."""
    model = GaussianModel(S, ALPHAS_CUMPROD, parameterization)
    if guidance_scale == 1.0:
        guided = GuidedModel(model.apply_model, MU)
        mean = MU
    else:
        uncond = torch.full_like(MU, mu_uncond)
        guided = GuidedModel(model.apply_model, MU, uncond, guidance_scale)
        # eps is affine in mu with a coefficient shared by cond and uncond: guidance samples N(mu_g, S^2)
        mean = uncond + guidance_scale * (MU - uncond)
    return model, Denoiser(guided, ALPHAS_CUMPROD, parameterization), mean


def snapped(sigmas: torch.Tensor, denoiser: Denoiser) -> torch.Tensor:
    """The nearest sigmas whose timestep is exactly a float32 number (0 stays 0)."""
    out = [0.0 if v == 0 else denoiser.t_to_sigma(float(np.float32(denoiser.sigma_to_t(v)))) for v in sigmas.tolist()]
    return torch.tensor(out, dtype=torch.float64)


def ode_error(name: str, steps: int, mask: torch.Tensor = ALL, guidance_scale: float = 1.0, **kwargs) -> float:
    """Max error at sigma_min of `name` on the snapped Karras grid without its final 0."""
    model, denoiser, mean = make_denoiser(guidance_scale=guidance_scale, mu_uncond=0.1)
    sigmas = snapped(get_sigmas("karras", denoiser, steps)[:-1], denoiser)
    x = mean + float(sigmas[0]) * Z
    out = SAMPLERS[name].fn(denoiser, x.clone(), sigmas, **kwargs)
    exact = model.flow(x, float(sigmas[0]), float(sigmas[-1]), mean)
    return float((out - exact).flatten()[mask].abs().max())


def fitted_order(steps: list[int], errors: list[float]) -> float:
    return float(-np.polyfit(np.log(steps), np.log(errors), 1)[0])


# (sampler, options, expected order, window of step counts, coordinates, guidance)
ORDER_CASES = [
    ("ddim", {}, 1, [40, 80, 160, 320], ALL, 1.0),
    ("euler", {}, 1, [40, 80, 160, 320], ALL, 1.0),
    ("euler_a", {"eta": 0.0}, 1, [40, 80, 160, 320], ALL, 1.0),
    ("heun", {}, 2, [40, 80, 160, 320], ALL, 1.0),
    ("dpm2", {}, 2, [40, 80, 160, 320], ALL, 1.0),
    ("plms", {}, 2, [40, 80, 160, 320], ALL, 1.0),
    ("dpmpp_2m", {}, 2, [40, 80, 160, 320], ALL, 1.0),
    ("dpmpp_2s_a", {"eta": 0.0}, 2, [40, 80, 160, 320], ALL, 1.0),
    ("dpmpp_sde", {"eta": 0.0}, 2, [40, 80, 160, 320], ALL, 1.0),
    ("dpmpp_2m_sde", {"eta": 0.0}, 2, [40, 80, 160, 320], ALL, 1.0),
    ("dpmpp_3m_sde", {"eta": 0.0}, 3, [40, 80, 160, 320], STIFF, 1.0),
    # k-diffusion's / diffusers' coefficient: second order (samplers/dpmpp_3m_sde.py)
    ("dpmpp_3m_sde", {"eta": 0.0, "kdiffusion_d2": True}, 2, [40, 80, 160, 320], STIFF, 1.0),
    ("unipc", {}, 3, [40, 80, 160, 320], ALL, 1.0),
    ("unipc", {"order": 3}, 4, [40, 80, 160, 320], ALL, 1.0),
    ("unipc", {"order": 1}, 2, [40, 80, 160, 320], ALL, 1.0),
    ("unipc", {"use_corrector": False}, 2, [40, 80, 160, 320], ALL, 1.0),
    # classifier-free guidance through GuidedModel (scale 7.5, uncond mean 0.1)
    ("dpmpp_2m", {}, 2, [40, 80, 160, 320], ALL, 7.5),
    ("heun", {}, 2, [40, 80, 160, 320], ALL, 7.5),
    ("unipc", {}, 3, [40, 80, 160, 320], ALL, 7.5),
]


@pytest.mark.parametrize(
    "name,options,expected,window,mask,guidance",
    ORDER_CASES,
    ids=[f"{c[0]}{''.join(f'-{k}={v}' for k, v in c[1].items())}{'-cfg' if c[5] != 1 else ''}{'-stiff' if c[4] is STIFF else ''}" for c in ORDER_CASES],
)
def test_measured_order(name, options, expected, window, mask, guidance):
    errors = [ode_error(name, n, mask, guidance, **options) for n in window]
    assert fitted_order(window, errors) == pytest.approx(expected, abs=0.15), errors


def test_lms_order_is_at_least_three_and_a_half():
    window = [40, 80, 160, 320]
    errors = [ode_error("lms", n, STIFF) for n in window]
    assert fitted_order(window, errors) >= 3.5, errors


def test_lms_coefficients_are_adams_bashforth_on_equal_steps():
    """On an equally spaced grid the integrated Lagrange weights are the classical AB4 ones, h (55, -59, 37, -9) / 24,
    and for any grid they sum to the step (the basis sums to 1)."""
    sigmas = np.array([10.0, 9.5, 9.0, 8.5, 8.0, 7.5])
    assert np.allclose(lms_coefficients(sigmas, 3, 4), [-0.5 * c / 24 for c in (55, -59, 37, -9)], rtol=1e-13, atol=0)
    uneven = np.array([14.6, 9.7, 6.1, 3.9, 2.2, 1.1, 0.0])
    for i, order in [(2, 3), (4, 4), (5, 4)]:
        assert sum(lms_coefficients(uneven, i, order)) == pytest.approx(uneven[i + 1] - uneven[i], rel=1e-13)


@pytest.mark.parametrize("schedule", ["karras", "uniform", "trailing"])
def test_ddim_euler_and_dpm_solver_1_coincide(schedule):
    """DDIM (eta 0) = Euler = Euler a (eta 0) = UniP-1 = DPM-Solver++(1), written here from Lu et al. 2022 eq. (9):
    x' = (sigma'/sigma) x - (e^{-h} - 1) D with h = log(sigma / sigma')."""
    _, denoiser, _ = make_denoiser()
    sigmas = get_sigmas(schedule, denoiser, 25)
    x = MU + float(sigmas[0]) * Z
    reference = x.clone()
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoiser(reference, sigma)
        h = math.log(sigma / sigma_next) if sigma_next > 0 else math.inf
        reference = (sigma_next / sigma) * reference - math.expm1(-h) * denoised
    for name, options in [("ddim", {}), ("euler", {}), ("euler_a", {"eta": 0.0}), ("unipc", {"order": 1, "use_corrector": False})]:
        out = SAMPLERS[name].fn(denoiser, x.clone(), sigmas, **options)
        assert torch.allclose(out, reference, atol=1e-10, rtol=0), name


@pytest.mark.parametrize("schedule", ["karras", "uniform"])
def test_equivalent_formulations(schedule):
    """Pairs that are one method written two ways: DPM++(2M) = its SDE at eta 0 = UniP-2; DPM++(2S) ancestral at
    eta 0 = DPM++ SDE at eta 0; and with identical noise DDPM = DDIM eta 1 = Euler a eta 1."""
    _, denoiser, _ = make_denoiser()
    sigmas = get_sigmas(schedule, denoiser, 25)
    x = MU + float(sigmas[0]) * Z

    def run(name, seed=None, **options):
        noise = None
        if seed is not None:
            g = torch.Generator().manual_seed(seed)
            noise = lambda like: torch.randn(like.shape, generator=g, dtype=like.dtype)  # noqa: E731
        return SAMPLERS[name].fn(denoiser, x.clone(), sigmas, noise=noise, **options)

    close = lambda a, b: torch.allclose(a, b, atol=1e-10, rtol=0)  # noqa: E731
    assert close(run("dpmpp_2m"), run("dpmpp_2m_sde", eta=0.0))
    assert close(run("dpmpp_2m"), run("unipc", order=2, use_corrector=False))
    assert close(run("dpmpp_2s_a", eta=0.0), run("dpmpp_sde", eta=0.0))
    ddpm = run("ddpm", seed=5)
    assert close(ddpm, run("ddim", seed=5, eta=1.0))
    assert close(ddpm, run("euler_a", seed=5, eta=1.0))
    assert not close(ddpm, run("ddpm", seed=6))


# Samplers that also evaluate the model between grid points (midpoints): there the timestep is fractional and the
# Denoiser passes it as float32, so the eps and v models see sigma rounded differently (1e-7 relative).
MIDPOINT = {"dpm2", "dpmpp_2s_a", "dpmpp_sde"}


@pytest.mark.parametrize("schedule", ["karras", "uniform"])
@pytest.mark.parametrize("name", DETERMINISTIC + STOCHASTIC)
def test_eps_and_v_parameterizations_give_the_same_samples(name, schedule):
    outs = []
    for parameterization in ("eps", "v"):
        _, denoiser, _ = make_denoiser(parameterization)
        sigmas = snapped(get_sigmas(schedule, denoiser, 12), denoiser)
        g = torch.Generator().manual_seed(1)
        noise = lambda like: torch.randn(like.shape, generator=g, dtype=like.dtype)  # noqa: E731
        outs.append(SAMPLERS[name].fn(denoiser, MU + float(sigmas[0]) * Z, sigmas, noise=noise))
    assert torch.allclose(outs[0], outs[1], atol=1e-6 if name in MIDPOINT else 1e-10, rtol=0)


@pytest.mark.parametrize("name", [n for n in DETERMINISTIC + STOCHASTIC if n not in ("lms", "plms")])
def test_final_step_to_zero_returns_the_denoised_estimate(name):
    """With a final 0 the result is D(x, sigma_min) of the run that stops at sigma_min (LMS integrates its polynomial
    to 0 instead, PLMS steps with its multistep eps)."""
    _, denoiser, _ = make_denoiser()
    sigmas = get_sigmas("karras", denoiser, 15)
    assert float(sigmas[-1]) == 0.0
    x = MU + float(sigmas[0]) * Z
    runs = []
    for grid in (sigmas, sigmas[:-1]):
        g = torch.Generator().manual_seed(2)
        noise = lambda like: torch.randn(like.shape, generator=g, dtype=like.dtype)  # noqa: E731
        runs.append(SAMPLERS[name].fn(denoiser, x.clone(), grid, noise=noise))
    assert torch.allclose(runs[0], denoiser(runs[1], float(sigmas[-2])), atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", DETERMINISTIC + STOCHASTIC)
def test_grids_ending_above_zero(name):
    """The CompVis "uniform" grid ends at sigma(0) = 0.0292 > 0: the sampler must take an ordinary step to it and
    converge to the exact flow there. Treating that last step as the jump to D leaves an error of ~0.03 that does not
    shrink with N (measured: 0.029-0.062 at 50 steps, 0.029-0.033 at 200); the samplers reach <= 0.015 at 200 steps
    and at least a factor 0.4 below their 50-step error (the t-uniform grid is pre-asymptotic: DDIM's slope is 0.85)."""
    model, denoiser, _ = make_denoiser()
    if name == "ddpm":
        # no deterministic limit; the final level's noise stays in (variance checked by the tests below)
        sigmas = get_sigmas("uniform", denoiser, 50)
        g = torch.Generator().manual_seed(3)
        x = MU + float(sigmas[0]) * torch.randn(4000, K, 1, 1, generator=g, dtype=torch.float64)
        out = SAMPLERS[name].fn(denoiser, x, sigmas, noise=lambda like: torch.randn(like.shape, generator=g, dtype=like.dtype))
        assert torch.isfinite(out).all()
        return
    options = {"eta": 0.0} if name in STOCHASTIC else {}
    errors = []
    for steps in (50, 200):
        sigmas = get_sigmas("uniform", denoiser, steps)
        assert float(sigmas[-1]) == pytest.approx(0.0292, abs=1e-4)
        x = MU + float(sigmas[0]) * Z
        out = SAMPLERS[name].fn(denoiser, x.clone(), sigmas, **options)
        errors.append(float((out - model.flow(x, float(sigmas[0]), float(sigmas[-1]), MU)).abs().max()))
    assert errors[1] < 0.02 and errors[1] < 0.4 * errors[0], errors


# -- stochastic samplers ---------------------------------------------------------------------------------------------

def output_variance(name: str, sigmas: torch.Tensor, denoiser: Denoiser, **options) -> torch.Tensor:
    """Exact variance [K] of the sampler's output when it starts from the true marginal N(MU, S^2 + sigma_0^2).

    For Gaussian data D is affine in x, so every sampler's output is x_N - MU = a (x_0 - MU) + sum_k b_k z_k with
    independent standard normal draws z_k, and Var = a^2 Var(x_0) + sum_k b_k^2. Row 0 of a batch measures a, row
    k + 1 gets a unit draw at the k-th noise call and zeros elsewhere, measuring b_k. No Monte-Carlo error."""
    rows = 2 * (len(sigmas) - 1) + 2  # dpmpp_sde draws twice per step
    x = MU.expand(rows, -1, -1, -1).clone()
    x[0] += (S**2 + float(sigmas[0]) ** 2).sqrt()[0]
    calls = [0]

    def probe(like: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        z = torch.zeros_like(like)
        z[calls[0]] = 1.0
        return z

    out = SAMPLERS[name].fn(denoiser, x, sigmas, noise=probe, **options)
    return ((out - MU) ** 2).sum(0).flatten()


def target_variance(sigmas: torch.Tensor) -> torch.Tensor:
    """Variance of the data after the same final step: D(., sigma_min) of the exact marginal at sigma_min."""
    s2 = S.flatten() ** 2
    return s2 * s2 / (s2 + float(sigmas[-2]) ** 2)


STOCHASTIC_CASES = [
    # (sampler, options, steps for the weak-order fit, least weak order of the variance error, bound on the relative
    #  variance error at 50 steps); measured orders 0.95 (first group), 1.93 / 2.18 / 2.02, 2.82
    ("euler_a", {}, [40, 80, 160, 320], 0.85, 0.2),
    ("ddpm", {}, [40, 80, 160, 320], 0.85, 0.2),
    ("ddim", {"eta": 1.0}, [40, 80, 160, 320], 0.85, 0.2),
    ("dpmpp_2s_a", {}, [20, 40, 80, 160], 1.8, 0.02),
    ("dpmpp_sde", {}, [20, 40, 80, 160], 1.8, 0.01),
    ("dpmpp_2m_sde", {}, [20, 40, 80, 160], 1.8, 0.02),
    ("dpmpp_3m_sde", {}, [20, 40, 80, 160], 2.5, 0.02),
]


@pytest.mark.parametrize("name,options,window,order,bound", STOCHASTIC_CASES, ids=[c[0] for c in STOCHASTIC_CASES])
def test_output_distribution_converges_to_the_data(name, options, window, order, bound):
    """Weak convergence: the exact output variance tends to the data's (after the same final step) at least at the
    given rate on the Karras grid. The mean is exactly MU by symmetry; the Monte-Carlo test below checks it."""
    _, denoiser, _ = make_denoiser()
    errors = []
    for n in window:
        sigmas = snapped(get_sigmas("karras", denoiser, n), denoiser)
        errors.append(float((output_variance(name, sigmas, denoiser, **options) / target_variance(sigmas) - 1).abs().max()))
    assert fitted_order(window, errors) >= order, errors


@pytest.mark.parametrize("name,options,window,order,bound", STOCHASTIC_CASES, ids=[c[0] for c in STOCHASTIC_CASES])
def test_large_batch_matches_the_data_distribution(name, options, window, order, bound):
    """20,000 samples per coordinate through the generator-driven noise path at 50 Karras steps: sample mean within 4
    standard errors of MU, sample variance within 4 standard errors of the exact discretised variance, and that
    within the discretisation bound of the data's variance (after the same final step)."""
    _, denoiser, _ = make_denoiser()
    sigmas = get_sigmas("karras", denoiser, 50)
    m = 20_000
    g = torch.Generator().manual_seed(11)
    x = MU + (S**2 + float(sigmas[0]) ** 2).sqrt() * torch.randn(m, K, 1, 1, generator=g, dtype=torch.float64)
    out = SAMPLERS[name].fn(denoiser, x, sigmas, noise=lambda like: torch.randn(like.shape, generator=g, dtype=like.dtype), **options)
    exact_var = output_variance(name, sigmas, denoiser, **options)
    mean, var = out.mean(0).flatten(), out.var(0).flatten()
    assert ((mean - MU.flatten()).abs() <= 4 * (exact_var / m).sqrt()).all()
    assert ((var - exact_var).abs() <= 4 * exact_var * math.sqrt(2 / (m - 1))).all()
    assert ((exact_var / target_variance(sigmas) - 1).abs() <= bound).all()


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_samplers_need_noise(name):
    _, denoiser, _ = make_denoiser()
    sigmas = get_sigmas("karras", denoiser, 3)
    with pytest.raises(ValueError, match="noise"):
        SAMPLERS[name].fn(denoiser, MU + float(sigmas[0]) * Z, sigmas)


@pytest.mark.parametrize("name", ["euler", "heun", "dpm2", "lms", "dpmpp_2m", "unipc"])
def test_deterministic_samplers_reject_eta(name):
    _, denoiser, _ = make_denoiser()
    sigmas = get_sigmas("karras", denoiser, 3)
    with pytest.raises(ValueError, match="eta"):
        SAMPLERS[name].fn(denoiser, MU + float(sigmas[0]) * Z, sigmas, eta=0.5)
