"""Noise schedules: pure functions from (a denoiser's discrete sigma table, a step count) to the descending
sequence of noise levels a sampler visits.

Every schedule returns float64 sigmas [n + 1] on the CPU, descending. "uniform" is the CompVis DDIM/PLMS grid and
ends at sigma(t = 0) (the original's last "previous alpha" is alphas_cumprod[0], not 1); the others end at 0.
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
    "karras": sigmas_karras,
    "exponential": sigmas_exponential,
}


def get_sigmas(name: str, denoiser: Denoiser, steps: int) -> torch.Tensor:
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    return SCHEDULES[name](denoiser, steps)
