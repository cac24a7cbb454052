"""Euler (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models", Algorithm 2
without its second-order correction and without churn) on the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma.

First order. In sigma space this is exactly DDIM with eta = 0 and DPM-Solver(++)-1; a step to sigma = 0 returns
the denoised estimate.
"""
from __future__ import annotations

from typing import Optional

import torch

from samplers.ddim import Callback, NoiseFn
from samplers.denoiser import Denoiser


@torch.no_grad()
def sample_euler(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    eta: float = 0.0,
    noise: Optional[NoiseFn] = None,
    callback: Optional[Callback] = None,
) -> torch.Tensor:
    """Run Euler from x at sigmas[0] down to sigmas[-1] (which may be 0 or > 0).

    Args:
        denoiser: D(x, sigma).
        x: latent [B, C, h, w] at noise level sigmas[0] (sigma-space scaling, x = x0 + sigma * eps).
        sigmas: descending noise levels [n + 1], float64 on the CPU.
        eta: must be 0 (Euler is deterministic; use euler_a for ancestral noise).
        noise: unused.
        callback: called after each step with i, x, sigma, sigma_next, denoised.
    """
    if eta != 0.0:
        raise ValueError(f"euler is deterministic: eta must be 0, got {eta} (euler_a takes eta)")
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoiser(x, sigma)
        # d = (x - D) / sigma;  x' = x + (sigma' - sigma) d
        d = (x - denoised) / sigma
        x = x + (sigma_next - sigma) * d
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised})
    return x
