"""DPM-Solver++(2M) SDE (Lu et al. 2022, "DPM-Solver++", the SDE-DPM-Solver++(2M) of section 5 / appendix;
k-diffusion `sample_dpmpp_2m_sde`, midpoint variant): a second-order multistep exponential integrator of the
reverse SDE on the data prediction, with eta scaling the noise as in k-diffusion.

In lambda = -log sigma with h = lambda' - lambda, r = h_last / h and eta_h = eta h:
    x' = (sigma' / sigma) e^{-eta_h} x + (1 - e^{-h - eta_h}) D
         + (1/2)(1 - e^{-h - eta_h}) (D - D_prev) / r              (from the second step on)
         + sigma' sqrt(1 - e^{-2 eta_h}) z
eta = 1 (default) is the SDE of the paper; eta = 0 is deterministic DPM-Solver++(2M), second order. A step to
sigma' = 0 returns D. 1 model evaluation per step.

Noise: one standard normal increment per step from the per-image `noise` function instead of k-diffusion's torchsde
BrownianTree (increments over disjoint intervals are independent, so only step-count consistency is lost: images
are reproducible per seed and batch-independent, but another step count draws a different path).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from samplers.ddim import Callback, NoiseFn, check_eta
from samplers.denoiser import Denoiser


@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    eta: float = 1.0,
    noise: Optional[NoiseFn] = None,
    callback: Optional[Callback] = None,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """Run DPM-Solver++(2M) SDE from x at sigmas[0] down to sigmas[-1]; x [B, C, h, w] in sigma-space scaling.
    noise(x) -> standard normal like x is needed when eta > 0; s_noise scales the noise."""
    check_eta("dpmpp_2m_sde", eta, noise)
    old_denoised: Optional[torch.Tensor] = None
    h_last = 0.0
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoiser(x, sigma)
        if sigma_next == 0.0:
            x = denoised
        else:
            h = math.log(sigma) - math.log(sigma_next)
            eta_h = eta * h
            # 1 - e^{-h - eta_h}
            c = -math.expm1(-h - eta_h)
            # x' = (sigma'/sigma) e^{-eta_h} x + (1 - e^{-h-eta_h}) D
            x = (sigma_next / sigma * math.exp(-eta_h)) * x + c * denoised
            if old_denoised is not None:
                # + (1/2)(1 - e^{-h-eta_h}) (D - D_prev) / r
                r = h_last / h
                x = x + (0.5 * c / r) * (denoised - old_denoised)
            if eta != 0.0:
                # + sigma' sqrt(1 - e^{-2 eta_h}) z
                x = x + (s_noise * sigma_next * math.sqrt(-math.expm1(-2 * eta_h))) * noise(x)
            h_last = h
        old_denoised = denoised
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised})
    return x
