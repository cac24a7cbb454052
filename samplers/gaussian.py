"""An exact model for testing and benchmarking samplers: Gaussian data x0 ~ N(mu, s^2), independently per coordinate.

For such data the ideal denoiser, the ideal eps / v predictions and the probability-flow ODE solution are all in
closed form (in sigma space x = x0 + sigma * eps):
    D(x, sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu)
    x(sigma_b)  = mu + (x(sigma_a) - mu) sqrt((s^2 + sigma_b^2) / (s^2 + sigma_a^2))
`GaussianModel.apply_model(x_t, t, mu)` is a stand-in "UNet" with the model's signature (VP input x_t, timesteps t,
conditioning = the data mean mu), so the real `Denoiser` and `GuidedModel` wrap it unchanged. It maps t back to
sigma with the same log-sigma interpolation `Denoiser` uses, so the wrapper's conversion adds no error of its own.
"""
from __future__ import annotations

import math
from typing import Literal, Union

import torch

from samplers.denoiser import Denoiser

Tensorish = Union[torch.Tensor, float]


class GaussianModel:
    """Closed-form eps or v prediction for data N(mu, s^2) on a discrete training schedule.

    Args:
        s: data standard deviation, broadcastable to the latent [B, C, h, w] (> 0).
        alphas_cumprod: the training schedule [T]; sigma(t) is interpolated from it exactly as `Denoiser` does.
        parameterization: "eps" or "v".
    """

    def __init__(self, s: torch.Tensor, alphas_cumprod: torch.Tensor, parameterization: Literal["eps", "v"] = "eps"):
        if parameterization not in ("eps", "v"):
            raise ValueError(f"parameterization must be eps or v, got {parameterization!r}")
        self.s = s.to(torch.float64)
        self.parameterization = parameterization
        self._table = Denoiser(lambda x, t: x, alphas_cumprod)  # only for t_to_sigma

    def sigma_of_t(self, t: float) -> float:
        return self._table.t_to_sigma(t)

    def apply_model(self, x_t: torch.Tensor, t: Union[torch.Tensor, float], mu: Tensorish) -> torch.Tensor:
        """The ideal eps (or v) at VP input x_t [B, ...] and timesteps t [B] (or a scalar); mu [B, ...] or scalar."""
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
        if t.numel() == 1:
            t = t.expand(x_t.shape[0])
        levels, index = torch.unique(t, return_inverse=True)
        sigma = torch.tensor([self.sigma_of_t(float(ti)) for ti in levels], dtype=torch.float64)[index]
        shape = (-1,) + (1,) * (x_t.dim() - 1)
        a = (1.0 / (1.0 + sigma**2)).reshape(shape)  # alphas_cumprod at t
        mu = torch.as_tensor(mu, dtype=torch.float64)
        x = x_t.to(torch.float64)
        var = a * self.s**2 + 1 - a
        # E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) mu) / (a s^2 + 1 - a)
        eps = (1 - a).sqrt() * (x - a.sqrt() * mu) / var
        if self.parameterization == "eps":
            return eps.to(x_t.dtype)
        # E[x0 | x_t] = mu + sqrt(a) s^2 (x_t - sqrt(a) mu) / (a s^2 + 1 - a);  v = sqrt(a) eps - sqrt(1 - a) x0
        x0 = mu + a.sqrt() * self.s**2 * (x - a.sqrt() * mu) / var
        return (a.sqrt() * eps - (1 - a).sqrt() * x0).to(x_t.dtype)

    def denoised(self, x: torch.Tensor, sigma: float, mu: Tensorish) -> torch.Tensor:
        """Exact D(x, sigma) in sigma space."""
        return mu + self.s**2 / (self.s**2 + sigma**2) * (x - mu)

    def flow(self, x: torch.Tensor, sigma_from: float, sigma_to: float, mu: Tensorish) -> torch.Tensor:
        """Exact probability-flow ODE solution from sigma_from to sigma_to (either may be 0)."""
        return mu + (x - mu) * ((self.s**2 + sigma_to**2) / (self.s**2 + sigma_from**2)).sqrt()

    def marginal_std(self, sigma: float) -> torch.Tensor:
        """Standard deviation of x at noise level sigma: sqrt(s^2 + sigma^2)."""
        return (self.s**2 + sigma**2).sqrt()


def sd_alphas_cumprod(num_timesteps: int = 1000, linear_start: float = 0.00085, linear_end: float = 0.012) -> torch.Tensor:
    """The Stable Diffusion training schedule ("scaled_linear" betas), float32 as in the model's buffer."""
    betas = torch.linspace(math.sqrt(linear_start), math.sqrt(linear_end), num_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0).to(torch.float32)
