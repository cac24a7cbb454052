"""Heun's method (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models",
Algorithm 1 / 2 with churn 0) on the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma.

Second order, 2 model evaluations per step: an Euler predictor to sigma', then the trapezoid rule with the slope
there. A step to sigma' = 0 is a plain Euler step (it returns the denoised estimate), as in the paper.
"""
from __future__ import annotations

from typing import Optional

import torch

from samplers.ddim import Callback, NoiseFn
from samplers.denoiser import Denoiser


@torch.no_grad()
def sample_heun(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    eta: float = 0.0,
    noise: Optional[NoiseFn] = None,
    callback: Optional[Callback] = None,
) -> torch.Tensor:
    """Run Heun from x at sigmas[0] down to sigmas[-1]; x [B, C, h, w] in sigma-space scaling. Deterministic:
    eta must be 0. The callback gets i, x, sigma, sigma_next, denoised (at the step's start)."""
    if eta != 0.0:
        raise ValueError(f"heun is deterministic: eta must be 0, got {eta}")
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoiser(x, sigma)
        d = (x - denoised) / sigma
        dt = sigma_next - sigma
        if sigma_next == 0.0:
            # x' = x + dt d  (= D)
            x = x + dt * d
        else:
            # predictor x~ = x + dt d, slope d~ there; x' = x + dt (d + d~) / 2
            x_pred = x + dt * d
            d_pred = (x_pred - denoiser(x_pred, sigma_next)) / sigma_next
            x = x + dt * ((d + d_pred) / 2)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised})
    return x
