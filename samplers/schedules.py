"""Noise schedules: pure functions from (a denoiser's discrete sigma table, a step count) to the descending
sequence of noise levels a sampler visits.

Every schedule returns float64 sigmas [n + 1] on the CPU, descending. "uniform" is the CompVis DDIM/PLMS grid and
ends at sigma(t = 0) (the original's last "previous alpha" is alphas_cumprod[0], not 1); the others end at 0.

| name        | noise levels (T = 1000 training steps, N sampling steps)                    | first / last > 0   |
|-------------|-------------------------------------------------------------------------------|--------------------|
| uniform     | CompVis: t = range(0, T, T // N) + 1, descending, then sigma(t = 0)           | t = 981 / t = 0    |
| leading     | Lin et al. 2023, table 2: t = arange(N) * (T // N), descending, then 0         | t = 900 / t = 0    |
| linspace    | Lin et al. 2023, table 2: t = round(linspace(T - 1, 0, N)), then 0             | t = 999 / t = 0    |
| trailing    | Lin et al. 2023, table 2: t = round(arange(T, 0, -T / N)) - 1, then 0          | t = 999 / t = T/N-1|
| karras      | Karras et al. 2022 eq. 5, rho = 7, sigma_max -> sigma_min, then 0             | sigma_max / min    |
| exponential | uniform in log sigma (= half log-SNR), sigma_max -> sigma_min, then 0          | sigma_max / min    |

(first/last columns at N = 10). "leading", "linspace" and "trailing" are 0-indexed as in diffusers (Lin et al.
write them 1-indexed) and use integer timesteps, so every level is an entry of the training table; they give
exactly N steps and need N <= T. SD's diffusers config ("leading" with steps_offset 1) is our "uniform" with a
final 0 instead of sigma(0). Each sampler's default schedule is in `samplers.registry.SAMPLERS`:

| default     | samplers                                                                            |
|-------------|-------------------------------------------------------------------------------------|
| uniform     | ddim, plms (CompVis-exact)                                                          |
| karras      | ddpm, euler, euler_a, heun, dpm2, lms, dpmpp_2m, dpmpp_2s_a, dpmpp_sde, unipc       |
| exponential | dpmpp_2m_sde, dpmpp_3m_sde (the A1111 presets)                                      |

(why: see the registry's docstring and docs/sampler-quality.md)
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from ldm.modules.diffusionmodules.util import make_ddim_timesteps
from samplers.denoiser import Denoiser


def uniform_timesteps(steps: int, num_timesteps: int = 1000) -> np.ndarray:
    """The CompVis grid of DDPM timesteps, descending: range(0, T, T // steps) + 1 reversed (981 ... 1 at 50)."""
    return make_ddim_timesteps("uniform", steps, num_timesteps)[::-1].copy()


def sigmas_uniform(denoiser: Denoiser, steps: int) -> torch.Tensor:
    """CompVis DDIM grid: sigma at the leading+1 timesteps, then sigma(0). Its length can exceed steps + 1 (30
    steps give 31), exactly as the original."""
    ts = uniform_timesteps(steps, denoiser.num_timesteps)
    return torch.cat([denoiser.sigmas[torch.from_numpy(ts)], denoiser.sigmas[:1]])


def _sigmas_at(denoiser: Denoiser, timesteps: np.ndarray) -> torch.Tensor:
    """Table sigmas at integer timesteps (descending), then 0."""
    sigmas = denoiser.sigmas[torch.from_numpy(np.ascontiguousarray(timesteps, dtype=np.int64))]
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _check_integer_steps(name: str, steps: int, num_timesteps: int) -> None:
    if steps > num_timesteps:
        raise ValueError(f"the {name} schedule has integer timesteps: steps must be at most {num_timesteps}, got {steps}")


def leading_timesteps(steps: int, num_timesteps: int = 1000) -> np.ndarray:
    """Lin et al. 2023 "leading", 0-indexed as diffusers with steps_offset 0: arange(N) * (T // N), descending
    (900, 800, ..., 0 at 10 steps)."""
    _check_integer_steps("leading", steps, num_timesteps)
    return (np.arange(steps) * (num_timesteps // steps))[::-1].copy()


def linspace_timesteps(steps: int, num_timesteps: int = 1000) -> np.ndarray:
    """Lin et al. 2023 "linspace" (iDDPM): round(linspace(T - 1, 0, N)) (999, 888, ..., 111, 0 at 10 steps)."""
    _check_integer_steps("linspace", steps, num_timesteps)
    return np.linspace(0, num_timesteps - 1, steps).round().astype(np.int64)[::-1].copy()


def trailing_timesteps(steps: int, num_timesteps: int = 1000) -> np.ndarray:
    """Lin et al. 2023 "trailing" (DPM-Solver): round(arange(T, 0, -T / N)) - 1 (999, 899, ..., 99 at 10 steps)."""
    _check_integer_steps("trailing", steps, num_timesteps)
    return np.arange(num_timesteps, 0, -num_timesteps / steps).round().astype(np.int64)[:steps] - 1


def sigmas_leading(denoiser: Denoiser, steps: int) -> torch.Tensor:
    """Sigmas of the "leading" timesteps, then 0. Starts below sigma_max (t = 900 at 10 steps): Lin et al.'s flaw."""
    return _sigmas_at(denoiser, leading_timesteps(steps, denoiser.num_timesteps))


def sigmas_linspace(denoiser: Denoiser, steps: int) -> torch.Tensor:
    """Sigmas of the "linspace" timesteps (sigma_max ... sigma_min), then 0: close to k-diffusion's get_sigmas,
    which uses the same spacing with fractional timesteps."""
    return _sigmas_at(denoiser, linspace_timesteps(steps, denoiser.num_timesteps))


def sigmas_trailing(denoiser: Denoiser, steps: int) -> torch.Tensor:
    """Sigmas of the "trailing" timesteps (from sigma_max), then 0."""
    return _sigmas_at(denoiser, trailing_timesteps(steps, denoiser.num_timesteps))


def sigmas_karras(denoiser: Denoiser, steps: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022), eq. 5: sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho, then 0."""
    smin, smax = denoiser.sigma_min, denoiser.sigma_max
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    sigmas = (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def sigmas_exponential(denoiser: Denoiser, steps: int) -> torch.Tensor:
    """Uniform in log sigma (= uniform in half log-SNR) from sigma_max to sigma_min, then 0."""
    sigmas = torch.linspace(math.log(denoiser.sigma_max), math.log(denoiser.sigma_min), steps, dtype=torch.float64).exp()
    return torch.cat([sigmas, sigmas.new_zeros(1)])


SCHEDULES: dict[str, Callable[[Denoiser, int], torch.Tensor]] = {
    "uniform": sigmas_uniform,
    "leading": sigmas_leading,
    "linspace": sigmas_linspace,
    "trailing": sigmas_trailing,
    "karras": sigmas_karras,
    "exponential": sigmas_exponential,
}


def get_sigmas(name: str, denoiser: Denoiser, steps: int) -> torch.Tensor:
    """The schedule called `name` for `steps` steps: descending float64 sigmas on the CPU."""
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    return SCHEDULES[name](denoiser, steps)
