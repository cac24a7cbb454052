"""DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12) in sigma space.

With x = x_t / sqrt(a_t), the DDIM update from sigma to sigma' is
    x' = D + sigma_down * (x - D) / sigma + sigma_up * z,
where sigma_up = eta * sqrt(sigma'^2 (sigma^2 - sigma'^2) / sigma^2) and sigma_down = sqrt(sigma'^2 - sigma_up^2).
These are the original's sigma_t (eta) and sqrt(1 - a_prev - sigma_t^2) divided by sqrt(a_prev); at eta = 0 the
update is an Euler step of the probability-flow ODE.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from samplers.denoiser import Denoiser

NoiseFn = Callable[[torch.Tensor], torch.Tensor]
Callback = Callable[[dict], None]


def ancestral_split(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) of a step from sigma to sigma_next with fresh noise scaled by eta."""
    if eta == 0.0 or sigma_next == 0.0:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


def check_eta(name: str, eta: float, noise: Optional[NoiseFn]) -> None:
    """The stochastic samplers' argument checks: eta >= 0, and a noise function whenever eta > 0."""
    if eta < 0.0:
        raise ValueError(f"{name}: eta must be >= 0, got {eta}")
    if eta != 0.0 and noise is None:
        raise ValueError(f"{name} with eta > 0 needs a noise function")


@torch.no_grad()
def sample_ddim(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    eta: float = 0.0,
    noise: Optional[NoiseFn] = None,
    callback: Optional[Callback] = None,
) -> torch.Tensor:
    """Run DDIM from x at sigmas[0] down to sigmas[-1].

    Args:
        denoiser: D(x, sigma).
        x: latent [B, C, h, w] at noise level sigmas[0] (sigma-space scaling).
        sigmas: descending noise levels [n + 1].
        eta: 0 is deterministic; 1 gives the DDPM posterior variance.
        noise: noise(x) -> standard normal like x, drawn from per-image generators; needed when eta > 0.
        callback: called after each step with i, x, sigma, sigma_next, denoised.
    """
    if eta != 0.0 and noise is None:
        raise ValueError("DDIM with eta > 0 needs a noise function")
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoiser(x, sigma)
        sigma_down, sigma_up = ancestral_split(sigma, sigma_next, eta)
        x = denoised + (sigma_down / sigma) * (x - denoised)
        if sigma_up > 0.0:
            x = x + sigma_up * noise(x)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised})
    return x
