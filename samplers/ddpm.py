"""DDPM ancestral sampling (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", eq. 6-7): each step draws
x' from the forward-process posterior q(x_{t'} | x_t, x0) with x0 replaced by the denoised estimate, on any grid.

In sigma space (x = x0 + sigma * eps, the forward process is Brownian motion in sigma^2) the posterior from sigma
to sigma' < sigma is
    x' ~ N(D + (sigma'^2 / sigma^2) (x - D),  sigma'^2 (sigma^2 - sigma'^2) / sigma^2),
which is the ancestral step with eta = 1 (DDIM eta = 1, Euler ancestral eta = 1) written in Ho et al.'s form. On
adjacent integer timesteps it is the original 1000-step DDPM sampler. Weak order 1.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from samplers.ddim import Callback, NoiseFn
from samplers.denoiser import Denoiser


@torch.no_grad()
def sample_ddpm(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    eta: float = 0.0,
    noise: Optional[NoiseFn] = None,
    callback: Optional[Callback] = None,
) -> torch.Tensor:
    """Run DDPM posterior sampling from x at sigmas[0] down to sigmas[-1].

    Args:
        denoiser: D(x, sigma).
        x: latent [B, C, h, w] at noise level sigmas[0] (sigma-space scaling).
        sigmas: descending noise levels [n + 1]; a final level > 0 gets noise too.
        eta: not a parameter of DDPM (its variance is fixed); 0 (the scripts' default) and 1 are accepted and mean
            the same. For other noise scales use ddim or euler_a with eta.
        noise: noise(x) -> standard normal like x from per-image generators (required).
        callback: called after each step with i, x, sigma, sigma_next, denoised.
    """
    if eta not in (0.0, 1.0):
        raise ValueError(f"ddpm has the fixed posterior variance (eta = 1); got eta {eta}: use ddim or euler_a for other values")
    if noise is None:
        raise ValueError("ddpm needs a noise function")
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoiser(x, sigma)
        # posterior mean D + (sigma'^2 / sigma^2) (x - D)
        x = denoised + (sigma_next**2 / sigma**2) * (x - denoised)
        if sigma_next > 0.0:
            # posterior std sigma' sqrt(sigma^2 - sigma'^2) / sigma
            x = x + (sigma_next * math.sqrt(sigma**2 - sigma_next**2) / sigma) * noise(x)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised})
    return x
