"""The one wrapper that owns the model's parameterization.

Samplers work in k-diffusion's variance-exploding coordinates: x = x_t / sqrt(alphas_cumprod_t) = x0 + sigma * eps
with sigma_t = sqrt((1 - alphas_cumprod_t) / alphas_cumprod_t). A `Denoiser` maps (x, sigma) to the denoised
estimate of x0. It converts sigma to a (possibly fractional) DDPM timestep by interpolating log-sigma over the
discrete table, scales the input to the VP variable the UNet was trained on, and converts eps / v / x0 outputs.
"""
from __future__ import annotations

import math
from typing import Callable, Literal

import torch

Parameterization = Literal["eps", "v", "x0"]
# (x_t [B, C, h, w] in VP coordinates, timesteps [B] float) -> raw model output (eps, v or x0)
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Denoiser:
    """D(x, sigma) for a model trained on a discrete schedule.

    Args:
        model_fn: raw model (already guided, see `samplers.guidance`), called as model_fn(x_t, t).
        alphas_cumprod: the training schedule [T] (the model's float32 buffer).
        parameterization: what model_fn predicts: "eps", "v" or "x0".
    """

    def __init__(self, model_fn: ModelFn, alphas_cumprod: torch.Tensor, parameterization: Parameterization = "eps"):
        if parameterization not in ("eps", "v", "x0"):
            raise ValueError(f"parameterization must be eps, v or x0, got {parameterization!r}")
        self.model_fn = model_fn
        self.parameterization = parameterization
        self.alphas_cumprod = alphas_cumprod.detach().to("cpu", torch.float64)
        # Table of sigma_t for t = 0..T-1 (float64 so that conversions add no error of their own).
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()
        self.log_sigmas = self.sigmas.log()

    @property
    def num_timesteps(self) -> int:
        return self.sigmas.shape[0]

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def t_to_sigma(self, t: float) -> float:
        """sigma at a (fractional) timestep: log-sigma interpolated linearly between neighbouring integers."""
        t = min(max(float(t), 0.0), self.num_timesteps - 1.0)
        lo = int(math.floor(t))
        hi = min(lo + 1, self.num_timesteps - 1)
        w = t - lo
        return float(((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi]).exp())

    def sigma_to_t(self, sigma: float) -> float:
        """Inverse of t_to_sigma; exact integers at the table's own sigmas."""
        log_sigma = math.log(sigma)
        ls = self.log_sigmas
        if log_sigma <= float(ls[0]):
            return 0.0
        if log_sigma >= float(ls[-1]):
            return float(self.num_timesteps - 1)
        hi = int(torch.searchsorted(ls, torch.tensor(log_sigma, dtype=torch.float64)))
        lo = hi - 1
        if float(ls[hi]) == log_sigma:
            return float(hi)
        w = (float(ls[hi]) - log_sigma) / (float(ls[hi]) - float(ls[lo]))
        return w * lo + (1 - w) * hi

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """x [B, C, h, w] at noise level sigma (> 0) -> denoised estimate of x0, same shape and dtype."""
        sigma = float(sigma)
        t = torch.full((x.shape[0],), self.sigma_to_t(sigma), dtype=torch.float32, device=x.device)
        c_in = 1.0 / math.sqrt(sigma**2 + 1.0)  # = sqrt(alphas_cumprod_t): x * c_in is the VP variable x_t
        out = self.model_fn(x * c_in, t).to(x.dtype)
        if self.parameterization == "eps":
            # x = x0 + sigma * eps
            return x - sigma * out
        if self.parameterization == "v":
            # x0 = sqrt(a) x_t - sqrt(1 - a) v with a = 1 / (sigma^2 + 1)
            return x * (c_in * c_in) - (sigma * c_in) * out
        return out

    def eps(self, x: torch.Tensor, sigma: float, denoised: torch.Tensor) -> torch.Tensor:
        """The eps (ODE derivative dx/dsigma) that corresponds to a denoised estimate."""
        return (x - denoised) / float(sigma)


def to_vp(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """VE latent at sigma -> the VP latent x_t = x / sqrt(sigma^2 + 1) (identity at sigma = 0)."""
    return x / math.sqrt(float(sigma) ** 2 + 1.0)


def from_vp(x_t: torch.Tensor, sigma: float) -> torch.Tensor:
    return x_t * math.sqrt(float(sigma) ** 2 + 1.0)
