"""DPM2 (k-diffusion `sample_dpm_2`): the explicit midpoint method on the probability-flow ODE with the midpoint
taken in log sigma, sigma_mid = sqrt(sigma * sigma'). Karras et al. 2022 use it with their schedule; it is the
second-order singlestep DPM-Solver-2 of Lu et al. 2022 written in sigma.

Second order, 2 model evaluations per step. A step to sigma' = 0 is a plain Euler step (it returns D).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from samplers.ddim import Callback, NoiseFn
from samplers.denoiser import Denoiser


@torch.no_grad()
def sample_dpm2(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    eta: float = 0.0,
    noise: Optional[NoiseFn] = None,
    callback: Optional[Callback] = None,
) -> torch.Tensor:
    """Run DPM2 from x at sigmas[0] down to sigmas[-1]; x [B, C, h, w] in sigma-space scaling. Deterministic:
    eta must be 0."""
    if eta != 0.0:
        raise ValueError(f"dpm2 is deterministic: eta must be 0, got {eta}")
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoiser(x, sigma)
        d = (x - denoised) / sigma
        if sigma_next == 0.0:
            # x' = x + (0 - sigma) d  (= D)
            x = x + (sigma_next - sigma) * d
        else:
            # sigma_mid = exp((log sigma + log sigma') / 2); x_mid = x + (sigma_mid - sigma) d
            sigma_mid = math.exp(0.5 * (math.log(sigma) + math.log(sigma_next)))
            x_mid = x + (sigma_mid - sigma) * d
            d_mid = (x_mid - denoiser(x_mid, sigma_mid)) / sigma_mid
            # x' = x + (sigma' - sigma) d_mid
            x = x + (sigma_next - sigma) * d_mid
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised})
    return x
