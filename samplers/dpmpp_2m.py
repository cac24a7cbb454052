"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
Models", Algorithm 2; k-diffusion `sample_dpmpp_2m`): a second-order multistep exponential integrator on the data
prediction D, in lambda = -log sigma.

With h = lambda' - lambda and r = h_last / h (the previous step's h over this one):
    D' = (1 + 1 / (2r)) D_i - (1 / (2r)) D_{i-1}
    x' = (sigma' / sigma) x - (e^{-h} - 1) D'
The first step, and a step to sigma' = 0 (which returns D), use D' = D: DPM-Solver++(1), i.e. DDIM / Euler.
Second order, 1 model evaluation per step.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from samplers.ddim import Callback, NoiseFn
from samplers.denoiser import Denoiser


@torch.no_grad()
def sample_dpmpp_2m(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    eta: float = 0.0,
    noise: Optional[NoiseFn] = None,
    callback: Optional[Callback] = None,
) -> torch.Tensor:
    """Run DPM-Solver++(2M) from x at sigmas[0] down to sigmas[-1]; x [B, C, h, w] in sigma-space scaling.
    Deterministic: eta must be 0 (dpmpp_2m_sde is the stochastic variant)."""
    if eta != 0.0:
        raise ValueError(f"dpmpp_2m is deterministic: eta must be 0, got {eta} (dpmpp_2m_sde takes eta)")
    old_denoised: Optional[torch.Tensor] = None
    h_last = 0.0
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoiser(x, sigma)
        if sigma_next == 0.0:
            # lambda' = inf: x' = D
            x = denoised
        else:
            h = math.log(sigma) - math.log(sigma_next)
            if old_denoised is None:
                denoised_d = denoised
            else:
                # D' = (1 + 1/(2r)) D_i - (1/(2r)) D_{i-1}
                r = h_last / h
                denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            # x' = (sigma'/sigma) x - (e^{-h} - 1) D'
            x = (sigma_next / sigma) * x - math.expm1(-h) * denoised_d
            h_last = h
        old_denoised = denoised
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised})
    return x
