"""CompVis-compatible `DDIMSampler` and `PLMSSampler`, thin adapters over the functional samplers, for code
written against the original `ldm.models.diffusion.ddim` / `plms` classes.

They use the original grid, guidance and randomness (the global torch generator on the model's device); new code
should call the functional samplers with per-image generators instead.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import torch

from ldm.modules.diffusionmodules.util import make_ddim_sampling_parameters, make_ddim_timesteps
from samplers.ddim import sample_ddim
from samplers.denoiser import Denoiser, from_vp, to_vp
from samplers.guidance import GuidedModel
from samplers.plms import sample_plms


class _CompVisSampler:
    _fn: Callable = staticmethod(sample_ddim)

    def __init__(self, model: Any, schedule: str = "linear", device: Optional[torch.device] = None, **kwargs: Any):
        self.model = model
        self.ddpm_num_timesteps = model.num_timesteps
        self.schedule = schedule
        self.device = device
        self.ddim_eta = 0.0

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0, verbose: bool = True) -> None:
        """Tables of the original: ddim_timesteps (ascending DDPM timesteps) and, per step, alphas, previous alphas,
        sigmas (from eta) and sqrt(1 - alphas)."""
        self.ddim_timesteps = make_ddim_timesteps(ddim_discretize, ddim_num_steps, self.ddpm_num_timesteps, verbose)
        alphas_cumprod = self.model.alphas_cumprod.detach().cpu().numpy()
        sigmas, alphas, alphas_prev = make_ddim_sampling_parameters(alphas_cumprod, self.ddim_timesteps, ddim_eta, verbose)
        dev = self.model.alphas_cumprod.device
        as_t = lambda a: torch.tensor(np.asarray(a), dtype=torch.float32, device=dev)  # noqa: E731
        self.ddim_sigmas = as_t(sigmas)
        self.ddim_alphas = as_t(alphas)
        self.ddim_alphas_prev = as_t(alphas_prev)
        self.ddim_sqrt_one_minus_alphas = as_t(np.sqrt(1.0 - alphas))
        self.ddim_eta = float(ddim_eta)

    def _denoiser(self, conditioning: Any, unconditional_guidance_scale: float, unconditional_conditioning: Any) -> Denoiser:
        guided = GuidedModel(self.model.apply_model, conditioning, unconditional_conditioning, unconditional_guidance_scale)
        return Denoiser(guided, self.model.alphas_cumprod, self.model.parameterization)

    def _sigmas(self, denoiser: Denoiser, timesteps: np.ndarray) -> torch.Tensor:
        """Descending sigmas of `timesteps` (ascending DDPM indices) followed by sigma(0)."""
        idx = torch.from_numpy(np.ascontiguousarray(timesteps[::-1]))
        return torch.cat([denoiser.sigmas[idx], denoiser.sigmas[:1]])

    def _run(self, denoiser: Denoiser, x_vp: torch.Tensor, sigmas: torch.Tensor, eta: float, callback, img_callback, log_every_t: int):
        intermediates: dict[str, list] = {"x_inter": [x_vp], "pred_x0": [x_vp]}
        n = len(sigmas) - 1

        def on_step(info: dict) -> None:
            i = info["i"]
            index = n - 1 - i
            if callback is not None:
                callback(i)
            if img_callback is not None:
                img_callback(info["denoised"], i)
            if index % log_every_t == 0 or index == 0:
                intermediates["x_inter"].append(to_vp(info["x"], info["sigma_next"]))
                intermediates["pred_x0"].append(info["denoised"])

        noise = (lambda like: torch.randn_like(like)) if eta > 0 else None
        x = self._fn(denoiser, from_vp(x_vp, float(sigmas[0])), sigmas, eta=eta, noise=noise, callback=on_step)
        return to_vp(x, float(sigmas[-1])), intermediates

    @torch.no_grad()
    def sample(
        self,
        S: int,
        batch_size: int,
        shape: tuple,
        conditioning: Any = None,
        callback: Optional[Callable] = None,
        normals_sequence: Any = None,
        img_callback: Optional[Callable] = None,
        quantize_x0: bool = False,
        eta: float = 0.0,
        mask: Optional[torch.Tensor] = None,
        x0: Optional[torch.Tensor] = None,
        temperature: float = 1.0,
        noise_dropout: float = 0.0,
        score_corrector: Any = None,
        corrector_kwargs: Any = None,
        verbose: bool = True,
        x_T: Optional[torch.Tensor] = None,
        log_every_t: int = 100,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, dict]:
        """Sample `batch_size` latents of `shape` (C, h, w); returns (samples [B, C, h, w], intermediates)."""
        if mask is not None or x0 is not None:
            raise ValueError("mask / x0 blending is not supported by this adapter; use scripts/inpaint or the functional samplers")
        if score_corrector is not None or quantize_x0 or temperature != 1.0 or noise_dropout != 0.0:
            raise ValueError("score_corrector, quantize_x0, temperature and noise_dropout are not supported")
        self.make_schedule(S, ddim_eta=eta, verbose=verbose)
        device = self.model.alphas_cumprod.device
        x_vp = torch.randn((batch_size, *shape), device=device) if x_T is None else x_T
        denoiser = self._denoiser(conditioning, unconditional_guidance_scale, unconditional_conditioning)
        return self._run(denoiser, x_vp, self._sigmas(denoiser, self.ddim_timesteps), eta, callback, img_callback, log_every_t)


class DDIMSampler(_CompVisSampler):
    """`DDIMSampler(model).sample(S, batch_size, shape, conditioning, ...)` as the original, plus img2img through
    `stochastic_encode` and `decode`."""

    _fn = staticmethod(sample_ddim)

    @torch.no_grad()
    def stochastic_encode(self, x0: torch.Tensor, t: torch.Tensor, use_original_steps: bool = False, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Noise x0 to DDIM index t [B] (a DDPM timestep with use_original_steps)."""
        if use_original_steps:
            sqrt_a = self.model.sqrt_alphas_cumprod
            sqrt_1ma = self.model.sqrt_one_minus_alphas_cumprod
        else:
            sqrt_a = self.ddim_alphas.sqrt()
            sqrt_1ma = self.ddim_sqrt_one_minus_alphas
        noise = torch.randn_like(x0) if noise is None else noise
        shape = (x0.shape[0],) + (1,) * (x0.dim() - 1)
        return sqrt_a[t].reshape(shape) * x0 + sqrt_1ma[t].reshape(shape) * noise

    @torch.no_grad()
    def decode(
        self,
        x_latent: torch.Tensor,
        cond: Any,
        t_start: int,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning: Any = None,
        use_original_steps: bool = False,
        callback: Optional[Callable] = None,
    ) -> torch.Tensor:
        """Denoise x_latent over the first t_start DDIM timesteps, in reverse (as the original, the first step uses
        the timestep one below the level stochastic_encode noised to)."""
        if t_start < 1:
            return x_latent
        denoiser = self._denoiser(cond, unconditional_guidance_scale, unconditional_conditioning)
        if use_original_steps:
            # The full DDPM tables end at alphas_cumprod_prev[0] = 1, i.e. sigma 0.
            sigmas = torch.cat([denoiser.sigmas[:t_start].flip(0), denoiser.sigmas.new_zeros(1)])
        else:
            sigmas = self._sigmas(denoiser, self.ddim_timesteps[:t_start])
        samples, _ = self._run(denoiser, x_latent, sigmas, self.ddim_eta, callback, None, 10**9)
        return samples


class PLMSSampler(_CompVisSampler):
    """`PLMSSampler(model).sample(...)` as the original; eta must be 0."""

    _fn = staticmethod(sample_plms)

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0, verbose: bool = True) -> None:
        if ddim_eta != 0:
            raise ValueError("ddim_eta must be 0 for PLMS")
        super().make_schedule(ddim_num_steps, ddim_discretize, ddim_eta, verbose)
