"""DPM-Solver++(2S) ancestral (k-diffusion `sample_dpmpp_2s_ancestral`; the singlestep second-order solver of Lu
et al. 2022, "DPM-Solver++", Algorithm 1 with r = 1/2, followed by ancestral noise).

Each step splits sigma' into sigma_down and fresh noise sigma_up (`samplers.ddim.ancestral_split`), solves the
probability-flow ODE from sigma to sigma_down with DPM-Solver++(2S) in lambda = -log sigma, then adds
sigma_up * z. With h = lambda_down - lambda and the midpoint s = lambda + h / 2:
    u  = (sigma_s / sigma) x - (e^{-h/2} - 1) D(x, sigma)
    x' = (sigma_down / sigma) x - (e^{-h} - 1) D(u, sigma_s) + sigma_up z
eta = 1 (default, as k-diffusion) is ancestral; eta = 0 is deterministic DPM-Solver++(2S), second order. A step
with sigma_down = 0 is a plain Euler step (returns D). 2 model evaluations per step (1 on the last).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from samplers.ddim import Callback, NoiseFn, ancestral_split, check_eta
from samplers.denoiser import Denoiser


@torch.no_grad()
def sample_dpmpp_2s_ancestral(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    eta: float = 1.0,
    noise: Optional[NoiseFn] = None,
    callback: Optional[Callback] = None,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """Run DPM-Solver++(2S) ancestral from x at sigmas[0] down to sigmas[-1]; x [B, C, h, w] in sigma-space
    scaling. noise(x) -> standard normal like x is needed when eta > 0; s_noise scales the fresh noise."""
    check_eta("dpmpp_2s_a", eta, noise)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoiser(x, sigma)
        sigma_down, sigma_up = ancestral_split(sigma, sigma_next, eta)
        if sigma_down == 0.0:
            # x' = x + (0 - sigma) (x - D) / sigma  (= D)
            x = x + (sigma_down - sigma) * ((x - denoised) / sigma)
        else:
            h = math.log(sigma) - math.log(sigma_down)
            sigma_s = sigma * math.exp(-0.5 * h)
            # u = (sigma_s / sigma) x - (e^{-h/2} - 1) D
            u = (sigma_s / sigma) * x - math.expm1(-0.5 * h) * denoised
            denoised_2 = denoiser(u, sigma_s)
            # x' = (sigma_down / sigma) x - (e^{-h} - 1) D(u, sigma_s)
            x = (sigma_down / sigma) * x - math.expm1(-h) * denoised_2
        if sigma_up > 0.0:
            x = x + (s_noise * sigma_up) * noise(x)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised})
    return x
