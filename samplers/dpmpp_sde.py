"""DPM-Solver++ SDE (k-diffusion `sample_dpmpp_sde`): a stochastic two-stage singlestep solver built on
DPM-Solver++(2S) (Lu et al. 2022, "DPM-Solver++", Algorithm 1, r = 1/2), with ancestral noise after each stage.

In lambda = -log sigma, with h = lambda' - lambda and the midpoint s = lambda + h / 2 (sigma_s = sqrt(sigma sigma')):
    stage 1: (d1, u1) = split(sigma -> sigma_s);  u = D + (d1 / sigma)(x - D) + u1 z_1
    stage 2: (d2, u2) = split(sigma -> sigma');   D2 = D(u, sigma_s);  x' = D2 + (d2 / sigma)(x - D2) + u2 z
where split is the ancestral split of `samplers.ddim.ancestral_split` and (d / sigma)(x - D) + D is the
DPM-Solver++(1) step to lambda_d (x_d = (sigma_d / sigma) x - (e^{-(lambda_d - lambda)} - 1) D). At eta = 0 this is
deterministic DPM-Solver++(2S), second order. 2 model evaluations per step; a step to sigma' = 0 returns D.

Noise: k-diffusion draws z_1 and z from a torchsde BrownianTree in sigma, so z is the normalized Brownian increment
over [sigma', sigma] and contains z_1's increment over [sigma_s, sigma]. We keep that within-step structure but
draw the increments from the per-image `noise` function: z_1 over [sigma_s, sigma], w over [sigma', sigma_s],
z = (sqrt(sigma - sigma_s) z_1 + sqrt(sigma_s - sigma') w) / sqrt(sigma - sigma'). Images are reproducible per seed
and independent of batching, but not step-count consistent: another step count draws different increments
(a Brownian tree would refine the same path).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from samplers.ddim import Callback, NoiseFn, ancestral_split, check_eta
from samplers.denoiser import Denoiser


@torch.no_grad()
def sample_dpmpp_sde(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    eta: float = 1.0,
    noise: Optional[NoiseFn] = None,
    callback: Optional[Callback] = None,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """Run DPM-Solver++ SDE from x at sigmas[0] down to sigmas[-1]; x [B, C, h, w] in sigma-space scaling.
    eta = 1 (default) is the SDE, 0 deterministic DPM-Solver++(2S); noise(x) is needed when eta > 0."""
    check_eta("dpmpp_sde", eta, noise)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoiser(x, sigma)
        if sigma_next == 0.0:
            # x' = x + (0 - sigma) (x - D) / sigma  (= D)
            x = x + (sigma_next - sigma) * ((x - denoised) / sigma)
        else:
            # lambda_s = lambda + h / 2  <=>  sigma_s = sqrt(sigma sigma')
            sigma_s = math.sqrt(sigma * sigma_next)
            down_1, up_1 = ancestral_split(sigma, sigma_s, eta)
            # u = D + (d1 / sigma)(x - D) + u1 z_1
            u = denoised + (down_1 / sigma) * (x - denoised)
            z_1 = noise(x) if up_1 > 0.0 else None
            if z_1 is not None:
                u = u + (s_noise * up_1) * z_1
            denoised_2 = denoiser(u, sigma_s)
            down_2, up_2 = ancestral_split(sigma, sigma_next, eta)
            # x' = D2 + (d2 / sigma)(x - D2) + u2 z
            x = denoised_2 + (down_2 / sigma) * (x - denoised_2)
            if up_2 > 0.0:
                w = noise(x)
                # Brownian increment over [sigma', sigma] = increment over [sigma_s, sigma] + over [sigma', sigma_s]
                z = w if z_1 is None else (math.sqrt(sigma - sigma_s) * z_1 + math.sqrt(sigma_s - sigma_next) * w) / math.sqrt(sigma - sigma_next)
                x = x + (s_noise * up_2) * z
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised})
    return x
