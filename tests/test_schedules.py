"""Noise schedules (samplers/schedules.py): values at known points, shapes, and the timestep spacings of Lin et al.
2023 against diffusers' DDIMScheduler where diffusers is installed."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from samplers import SCHEDULES, Denoiser, get_sigmas
from samplers.gaussian import sd_alphas_cumprod
from samplers.registry import SAMPLERS
from samplers.schedules import leading_timesteps, linspace_timesteps, trailing_timesteps

DENOISER = Denoiser(lambda x, t: x, sd_alphas_cumprod())
SIGMA_MAX = 14.614641  # sqrt((1 - a_999) / a_999) of SD's scaled_linear schedule
SIGMA_MIN = 0.0291675  # sqrt((1 - a_0) / a_0)


def timesteps_of(sigmas: torch.Tensor) -> list[float]:
    """The (possibly fractional) timesteps of the nonzero sigmas."""
    return [DENOISER.sigma_to_t(float(s)) for s in sigmas if float(s) > 0]


def test_table_endpoints():
    assert DENOISER.sigma_max == pytest.approx(SIGMA_MAX, rel=1e-6)
    assert DENOISER.sigma_min == pytest.approx(SIGMA_MIN, rel=1e-5)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("steps", [1, 2, 7, 10, 50])
def test_every_schedule_is_descending_float64_on_cpu(name, steps):
    sigmas = get_sigmas(name, DENOISER, steps)
    assert sigmas.dtype == torch.float64 and sigmas.device.type == "cpu"
    assert (sigmas[1:] < sigmas[:-1]).all()
    if name == "uniform":
        assert float(sigmas[-1]) == pytest.approx(SIGMA_MIN, rel=1e-5)
    else:
        assert len(sigmas) == steps + 1
        assert float(sigmas[-1]) == 0.0


def test_karras_endpoints_and_rho():
    sigmas = get_sigmas("karras", DENOISER, 10)
    assert float(sigmas[0]) == pytest.approx(SIGMA_MAX, rel=1e-6)
    assert float(sigmas[-2]) == pytest.approx(SIGMA_MIN, rel=1e-5)
    # sigma^(1/7) is linear in the step index
    root = sigmas[:-1] ** (1 / 7)
    assert torch.allclose(root[1:] - root[:-1], (root[1] - root[0]).expand(9), rtol=1e-10, atol=0)
    # k-diffusion's list for 10 steps (samplers-math.md 0): 14.6146, 9.1029, ..., 0.0292
    assert [round(float(s), 4) for s in sigmas[:3]] == [14.6146, 9.1029, 5.4784]


def test_exponential_is_uniform_in_log_sigma():
    sigmas = get_sigmas("exponential", DENOISER, 12)
    steps = sigmas[:-1].log().diff()
    assert torch.allclose(steps, steps[0].expand(11), rtol=1e-10, atol=0)
    assert float(steps.sum()) == pytest.approx(math.log(SIGMA_MIN / SIGMA_MAX), rel=1e-5)


def test_uniform_is_the_compvis_grid():
    sigmas = get_sigmas("uniform", DENOISER, 50)
    assert len(sigmas) == 51
    assert timesteps_of(sigmas[:-1]) == list(range(981, 0, -20))
    assert float(sigmas[-1]) == pytest.approx(SIGMA_MIN, rel=1e-5)  # sigma(t = 0), not 0
    # the original's quirk: 30 steps give 31 (range(0, 1000, 33) + 1 has 31 entries)
    assert len(get_sigmas("uniform", DENOISER, 30)) == 32


def test_lin_et_al_spacings_at_ten_steps():
    """Lin et al. 2023, table 2, 0-indexed as in diffusers' docs."""
    assert timesteps_of(get_sigmas("leading", DENOISER, 10)) == list(range(900, -1, -100))
    assert timesteps_of(get_sigmas("linspace", DENOISER, 10)) == list(range(999, -1, -111))
    assert timesteps_of(get_sigmas("trailing", DENOISER, 10)) == list(range(999, 0, -100))


@pytest.mark.parametrize("steps", [1, 3, 7, 25, 50, 333, 1000])
def test_trailing_and_linspace_start_at_the_last_timestep(steps):
    assert trailing_timesteps(steps)[0] == 999
    assert float(get_sigmas("trailing", DENOISER, steps)[0]) == pytest.approx(SIGMA_MAX, rel=1e-6)
    if steps > 1:
        assert linspace_timesteps(steps)[0] == 999 and linspace_timesteps(steps)[-1] == 0
    for fn in (leading_timesteps, linspace_timesteps, trailing_timesteps):
        t = fn(steps)
        assert len(t) == steps and len(np.unique(t)) == steps and t.min() >= 0 and t.max() <= 999


def test_leading_skips_the_top_of_the_schedule():
    """The flaw Lin et al. point out: at 10 steps "leading" starts at t = 900 (sigma 8.35, not 14.6)."""
    assert float(get_sigmas("leading", DENOISER, 10)[0]) == pytest.approx(8.3466, rel=1e-4)


@pytest.mark.parametrize("name", ["leading", "linspace", "trailing"])
def test_integer_spacings_reject_more_steps_than_timesteps(name):
    with pytest.raises(ValueError, match="at most 1000"):
        get_sigmas(name, DENOISER, 1001)


def test_bad_names_and_step_counts():
    with pytest.raises(ValueError, match="unknown schedule"):
        get_sigmas("cosine", DENOISER, 10)
    with pytest.raises(ValueError, match="positive"):
        get_sigmas("karras", DENOISER, 0)


def test_every_sampler_default_schedule_exists():
    for info in SAMPLERS.values():
        assert info.default_schedule in SCHEDULES, info.name


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("steps", [7, 10, 25, 50, 999])
def test_spacings_match_diffusers(spacing, steps):
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing=spacing, steps_offset=0
    )
    scheduler.set_timesteps(steps)
    ours = {"leading": leading_timesteps, "linspace": linspace_timesteps, "trailing": trailing_timesteps}[spacing](steps)
    assert scheduler.timesteps.tolist() == ours.tolist()
