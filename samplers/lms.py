"""Linear multistep (k-diffusion `sample_lms`; variable-step Adams-Bashforth in sigma, Karras et al. 2022 /
Crowson) on the probability-flow ODE dx/dsigma = d(x, sigma) = (x - D(x, sigma)) / sigma.

With the slopes d_0 (newest), d_1, ... at sigma_i, sigma_{i-1}, ..., the step is
    x_{i+1} = x_i + sum_j c_j d_j,   c_j = integral from sigma_i to sigma_{i+1} of l_j(s) ds,
where l_j is the Lagrange basis polynomial on the previous sigmas (l_j(sigma_{i-k}) = [j == k]). The order rises
1, 2, 3, 4 over the first steps (default order 4). The basis polynomials have degree order - 1, so Gauss-Legendre
quadrature with `order` nodes integrates them exactly (no scipy). The last step to sigma = 0 integrates the
polynomial over [sigma_min, 0] (not the denoised jump of the other samplers).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from samplers.ddim import Callback, NoiseFn
from samplers.denoiser import Denoiser


def lms_coefficients(sigmas: np.ndarray, i: int, order: int) -> list[float]:
    """c_j = integral_{sigmas[i]}^{sigmas[i+1]} prod_{k != j} (s - sigmas[i-k]) / (sigmas[i-j] - sigmas[i-k]) ds
    for j = 0 .. order - 1 (newest first); needs i >= order - 1."""
    a, b = float(sigmas[i]), float(sigmas[i + 1])
    nodes, weights = np.polynomial.legendre.leggauss(order)
    s = 0.5 * (b - a) * nodes + 0.5 * (a + b)
    coeffs = []
    for j in range(order):
        basis = np.ones_like(s)
        for k in range(order):
            if k != j:
                basis *= (s - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k])
        coeffs.append(float(0.5 * (b - a) * np.dot(weights, basis)))
    return coeffs


@torch.no_grad()
def sample_lms(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    eta: float = 0.0,
    noise: Optional[NoiseFn] = None,
    callback: Optional[Callback] = None,
    order: int = 4,
) -> torch.Tensor:
    """Run LMS from x at sigmas[0] down to sigmas[-1]; x [B, C, h, w] in sigma-space scaling. Deterministic:
    eta must be 0. `order` (1-4 in practice) is the number of slopes combined once warmed up."""
    if eta != 0.0:
        raise ValueError(f"lms is deterministic: eta must be 0, got {eta}")
    if order < 1:
        raise ValueError(f"lms order must be at least 1, got {order}")
    sigmas_np = sigmas.detach().cpu().double().numpy()
    ds: list[torch.Tensor] = []  # slopes, newest last
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoiser(x, sigma)
        ds.append((x - denoised) / sigma)
        if len(ds) > order:
            ds.pop(0)
        coeffs = lms_coefficients(sigmas_np, i, len(ds))
        # x' = x + sum_j c_j d_j
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised})
    return x
