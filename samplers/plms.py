"""PLMS, the CompVis "pseudo linear multistep" sampler (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion
Models on Manifolds", the PLMS variant with an improved-Euler first step).

Each step moves x along eps' with the DDIM (eta = 0) transfer, x' = x + (sigma' - sigma) eps', where eps' combines
the current raw model eps e_0 with those of earlier steps (newest first, e_1, e_2, e_3):
    first step:  eps' = (e_0 + eps(x + (sigma' - sigma) e_0, sigma')) / 2    (a second model evaluation)
    then:        eps' = (3 e_0 - e_1) / 2
                 eps' = (23 e_0 - 16 e_1 + 5 e_2) / 12
                 eps' = (55 e_0 - 59 e_1 + 37 e_2 - 9 e_3) / 24
The history keeps raw e_0, not eps'. n steps cost n + 1 model evaluations.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from samplers.denoiser import Denoiser


@torch.no_grad()
def sample_plms(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    eta: float = 0.0,
    noise: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    callback: Optional[Callable[[dict], None]] = None,
) -> torch.Tensor:
    """Run PLMS from x at sigmas[0] down to sigmas[-1]; x [B, C, h, w] in sigma-space scaling. PLMS is
    deterministic: eta must be 0."""
    if eta != 0.0:
        raise ValueError(f"PLMS is deterministic: eta must be 0, got {eta}")
    old_eps: list[torch.Tensor] = []
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoiser(x, sigma)
        e0 = (x - denoised) / sigma
        if not old_eps:
            x_next = x + (sigma_next - sigma) * e0
            # The original evaluates the model at the next grid timestep; on a one-step run (no next grid point
            # above the final level) it reuses the current one.
            sigma_eval = sigma_next if i + 1 < n else sigma
            e_next = (x_next - denoiser(x_next, sigma_eval)) / sigma_eval
            eps_prime = (e0 + e_next) / 2
        elif len(old_eps) == 1:
            eps_prime = (3 * e0 - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            eps_prime = (23 * e0 - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            eps_prime = (55 * e0 - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x = x + (sigma_next - sigma) * eps_prime
        old_eps.append(e0)
        if len(old_eps) > 3:
            old_eps.pop(0)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised})
    return x
