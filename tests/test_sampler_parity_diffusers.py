"""Our samplers against diffusers' schedulers: the same exact Gaussian model (samplers.gaussian) on the same grid.

Skipped when diffusers is not installed (LMS also needs scipy, which diffusers uses for its coefficients).

diffusers computes in float32 (it stores sigmas as float32 and upcasts the sample to float32 inside `step`), so
"the same result" here means float32 round-off: both runs use diffusers' own float32 grid and the model sees the
same timesteps, and the results must agree to TOL. Conventions handled:
  - Euler-type schedulers (Euler, Euler a, Heun, LMS) work in sigma space like us (sample = x0 + sigma * eps) and
    take the input scaling 1 / sqrt(sigma^2 + 1) through `scale_model_input`; the multistep ones (DPMSolverMultistep,
    UniPC) keep the VP sample x_t = x / sqrt(sigma^2 + 1). We start both from the same x and compare at sigma = 0,
    where the two coincide.
  - DPMSolverMultistep and UniPC store their timesteps as int64: with Karras sigmas they round them, with
    exponential sigmas they truncate them, while the update still uses the unrounded sigma, so the model is
    evaluated at another noise level than the solver assumes (UniPC with exponential sigmas: 3e-3 off at 20 steps).
    We evaluate at the level we step to, so we compare on integer-timestep grids ("trailing" spacing, which is our
    `trailing` schedule).
  - EulerAncestral takes no custom sigmas: we use its "trailing" spacing and check it equals our `trailing`
    schedule. Its noise comes from a torch.Generator; our noise function draws from a twin generator with the same
    seed, shape and dtype, so both see identical noise (diffusers also draws on the last step and multiplies it by
    0; we skip that draw, which changes nothing before it).
  - DPMSolverMultistep order 3 warms up with its order-2 update; k-diffusion's 3M uses the "heun" form of that
    update ((e^{-h} - 1) / h + 1), so the comparison sets solver_type="heun".
  - Heun and LMS take Karras sigmas through `use_karras_sigmas`; we run our samplers on the grid diffusers built
    (and check it equals our `karras` schedule to float32).
"""
from __future__ import annotations

import inspect
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 copy= warnings inside diffusers

from samplers import Denoiser, GuidedModel, get_sigmas  # noqa: E402
from samplers.gaussian import GaussianModel  # noqa: E402
from samplers.registry import SAMPLERS  # noqa: E402

TOL = 2e-6  # float32 round-off (largest seen 4e-7) over <= 30 steps, on values of order 1
K = 8
S = torch.logspace(math.log10(0.05), math.log10(2.0), K, dtype=torch.float64).reshape(1, K, 1, 1)
MU = torch.linspace(-0.5, 0.8, K, dtype=torch.float64).reshape(1, K, 1, 1)
Z = torch.randn(2, K, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
SD_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def make(cls, parameterization: str = "eps", **config):
    """(scheduler, analytic model, our denoiser) sharing diffusers' float32 alphas_cumprod."""
    prediction = {"eps": "epsilon", "v": "v_prediction"}[parameterization]
    scheduler = cls(**SD_CONFIG, prediction_type=prediction, **config)
    alphas_cumprod = scheduler.alphas_cumprod.clone()
    model = GaussianModel(S, alphas_cumprod, parameterization)
    denoiser = Denoiser(GuidedModel(model.apply_model, MU), alphas_cumprod, parameterization)
    return scheduler, model, denoiser


def run_diffusers(scheduler, model: GaussianModel, x: torch.Tensor, generator=None) -> torch.Tensor:
    """The standard diffusers loop from the sigma-space latent x at the first level; returns the final sample."""
    vp = "Multistep" in type(scheduler).__name__
    sample = x / math.sqrt(float(scheduler.sigmas[0]) ** 2 + 1) if vp else x.clone()
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    scheduler.set_begin_index(0)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(sample, t)
        out = model.apply_model(model_input, t, MU)
        sample = scheduler.step(out, t, sample, **step_kwargs).prev_sample
    return sample


def grid_of(scheduler) -> torch.Tensor:
    """The scheduler's sigma grid (Heun repeats interior sigmas) as our float64 sigmas."""
    return torch.unique_consecutive(scheduler.sigmas.to(torch.float64))


def twin_noise(seed: int, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    return lambda like: torch.randn(like.shape, generator=g, dtype=dtype).to(like.dtype)


def start(sigmas: torch.Tensor) -> torch.Tensor:
    return MU + float(sigmas[0]) * Z


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_euler_matches_euler_discrete(parameterization):
    scheduler, model, denoiser = make(diffusers.EulerDiscreteScheduler, parameterization)
    ours = get_sigmas("karras", denoiser, 20)
    scheduler.set_timesteps(sigmas=ours.tolist())
    sigmas = grid_of(scheduler)
    x = start(sigmas)
    expected = run_diffusers(scheduler, model, x)
    got = SAMPLERS["euler"].fn(denoiser, x.clone(), sigmas)
    assert torch.allclose(got, expected.to(got.dtype), atol=TOL, rtol=0)


def test_euler_ancestral_matches_with_identical_noise():
    scheduler, model, denoiser = make(diffusers.EulerAncestralDiscreteScheduler, timestep_spacing="trailing")
    scheduler.set_timesteps(20)
    sigmas = grid_of(scheduler)
    # diffusers' "trailing" spacing is our trailing schedule (integer timesteps, exact interpolation)
    assert torch.allclose(sigmas, get_sigmas("trailing", denoiser, 20), rtol=1e-6, atol=0)
    x = start(sigmas)
    expected = run_diffusers(scheduler, model, x, generator=torch.Generator().manual_seed(7))
    got = SAMPLERS["euler_a"].fn(denoiser, x.clone(), sigmas, eta=1.0, noise=twin_noise(7))
    assert torch.allclose(got, expected.to(got.dtype), atol=TOL, rtol=0)
    # and the noise matters: another seed is far away
    other = SAMPLERS["euler_a"].fn(denoiser, x.clone(), sigmas, eta=1.0, noise=twin_noise(8))
    assert (other - expected).abs().max() > 100 * TOL


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_heun_matches_heun_discrete(parameterization):
    scheduler, model, denoiser = make(diffusers.HeunDiscreteScheduler, parameterization, use_karras_sigmas=True)
    scheduler.set_timesteps(15)
    sigmas = grid_of(scheduler)
    assert torch.allclose(sigmas, get_sigmas("karras", denoiser, 15), rtol=1e-6, atol=0)
    x = start(sigmas)
    expected = run_diffusers(scheduler, model, x)
    got = SAMPLERS["heun"].fn(denoiser, x.clone(), sigmas)
    assert torch.allclose(got, expected.to(got.dtype), atol=TOL, rtol=0)


def test_lms_matches_lms_discrete():
    pytest.importorskip("scipy")
    scheduler, model, denoiser = make(diffusers.LMSDiscreteScheduler, use_karras_sigmas=True)
    scheduler.set_timesteps(20)
    sigmas = grid_of(scheduler)
    assert torch.allclose(sigmas, get_sigmas("karras", denoiser, 20), rtol=1e-6, atol=0)
    x = start(sigmas)
    expected = run_diffusers(scheduler, model, x)
    got = SAMPLERS["lms"].fn(denoiser, x.clone(), sigmas)
    assert torch.allclose(got, expected.to(got.dtype), atol=TOL, rtol=0)


@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_dpmpp_2m_matches_dpm_solver_multistep(parameterization, steps):
    scheduler, model, denoiser = make(
        diffusers.DPMSolverMultistepScheduler, parameterization, algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="trailing"
    )
    scheduler.set_timesteps(steps)
    sigmas = grid_of(scheduler)
    assert torch.allclose(sigmas, get_sigmas("trailing", denoiser, steps), rtol=1e-6, atol=0)
    x = start(sigmas)
    expected = run_diffusers(scheduler, model, x)
    got = SAMPLERS["dpmpp_2m"].fn(denoiser, x.clone(), sigmas)
    assert torch.allclose(got, expected.to(got.dtype), atol=TOL, rtol=0)


def test_dpmpp_2m_sde_matches_sde_dpm_solver_multistep_with_identical_noise():
    scheduler, model, denoiser = make(
        diffusers.DPMSolverMultistepScheduler, algorithm_type="sde-dpmsolver++", solver_order=2, timestep_spacing="trailing"
    )
    scheduler.set_timesteps(20)
    sigmas = grid_of(scheduler)
    x = start(sigmas)
    expected = run_diffusers(scheduler, model, x, generator=torch.Generator().manual_seed(3))
    # diffusers draws this noise in float32
    got = SAMPLERS["dpmpp_2m_sde"].fn(denoiser, x.clone(), sigmas, eta=1.0, noise=twin_noise(3, torch.float32))
    assert torch.allclose(got, expected.to(got.dtype), atol=TOL, rtol=0)


def test_third_order_dpm_solver_multistep_is_kdiffusion_3m_not_ours():
    """diffusers' dpmsolver++ order 3 = k-diffusion's 3M at eta 0 (kdiffusion_d2=True); our default doubles the
    second-derivative term (see samplers/dpmpp_3m_sde.py) and differs by more than round-off."""
    scheduler, model, denoiser = make(
        diffusers.DPMSolverMultistepScheduler, algorithm_type="dpmsolver++", solver_order=3, solver_type="heun", timestep_spacing="trailing"
    )
    scheduler.set_timesteps(20)
    sigmas = grid_of(scheduler)
    x = start(sigmas)
    expected = run_diffusers(scheduler, model, x)
    legacy = SAMPLERS["dpmpp_3m_sde"].fn(denoiser, x.clone(), sigmas, eta=0.0, kdiffusion_d2=True)
    assert torch.allclose(legacy, expected.to(legacy.dtype), atol=TOL, rtol=0)
    ours = SAMPLERS["dpmpp_3m_sde"].fn(denoiser, x.clone(), sigmas, eta=0.0)
    assert (ours - expected).abs().max() > 10 * TOL


@pytest.mark.parametrize(
    "order,config,steps",
    [
        (2, dict(timestep_spacing="trailing"), 10),
        (2, dict(timestep_spacing="trailing"), 25),
        (3, dict(timestep_spacing="trailing"), 20),
    ],
)
@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_unipc_matches_unipc_multistep(parameterization, order, config, steps):
    scheduler, model, denoiser = make(diffusers.UniPCMultistepScheduler, parameterization, solver_order=order, solver_type="bh2", **config)
    scheduler.set_timesteps(steps)
    sigmas = grid_of(scheduler)
    x = start(sigmas)
    expected = run_diffusers(scheduler, model, x)
    got = SAMPLERS["unipc"].fn(denoiser, x.clone(), sigmas, order=order)
    assert torch.allclose(got, expected.to(got.dtype), atol=TOL, rtol=0)
