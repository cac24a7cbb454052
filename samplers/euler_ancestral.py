"""Euler ancestral (k-diffusion `sample_euler_ancestral`; the ancestral step of Ho et al. 2020 written with the
DDIM eta of Song et al. 2021).

Each step splits sigma' into a deterministic part sigma_down and fresh noise sigma_up
(sigma_down^2 + sigma_up^2 = sigma'^2, see `samplers.ddim.ancestral_split`), takes an Euler step of the
probability-flow ODE to sigma_down and adds sigma_up * z. eta = 1 (the default, as in k-diffusion) is the DDPM
posterior variance; eta = 0 is plain Euler (deterministic). Algebraically the step equals DDIM's with the same eta.
Weak order 1.
"""
from __future__ import annotations

from typing import Optional

import torch

from samplers.ddim import Callback, NoiseFn, ancestral_split, check_eta
from samplers.denoiser import Denoiser


@torch.no_grad()
def sample_euler_ancestral(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    eta: float = 1.0,
    noise: Optional[NoiseFn] = None,
    callback: Optional[Callback] = None,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """Run Euler ancestral from x at sigmas[0] down to sigmas[-1].

    Args:
        denoiser: D(x, sigma).
        x: latent [B, C, h, w] at noise level sigmas[0] (sigma-space scaling).
        sigmas: descending noise levels [n + 1]; a final level > 0 gets noise too, so x ends at that level.
        eta: scale of the fresh noise: 1 is ancestral sampling, 0 is deterministic Euler.
        noise: noise(x) -> standard normal like x from per-image generators; needed when eta > 0.
        callback: called after each step with i, x, sigma, sigma_next, denoised.
        s_noise: extra factor on the fresh noise (Karras S_noise).
    """
    check_eta("euler_a", eta, noise)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoiser(x, sigma)
        sigma_down, sigma_up = ancestral_split(sigma, sigma_next, eta)
        # x' = x + (sigma_down - sigma) (x - D) / sigma + s_noise sigma_up z
        x = x + (sigma_down - sigma) * ((x - denoised) / sigma)
        if sigma_up > 0.0:
            x = x + (s_noise * sigma_up) * noise(x)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised})
    return x
