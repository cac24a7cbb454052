"""LatentDiffusion, inference only: the schedule buffers, the UNet wrapper, conditioning and first-stage I/O.

The original module is mostly training code (losses, logging, EMA updates, data handling); none of that is here.
Training-only yaml keys are accepted and ignored so that the published configs load unchanged.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator, Literal, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.diffusionmodules.util import extract_into_tensor, make_beta_schedule
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)

SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)

ConditioningKey = Literal["crossattn", "concat", "hybrid", "adm"]


class DiffusionWrapper(nn.Module):
    """Holds the UNet as `diffusion_model` (so keys start with `model.diffusion_model.`) and routes conditioning."""

    def __init__(self, diff_model_config: Any, conditioning_key: Optional[ConditioningKey]):
        super().__init__()
        self.diffusion_model = instantiate_from_config(diff_model_config)
        if conditioning_key not in (None, "crossattn", "concat", "hybrid", "adm"):
            raise ValueError(f"unknown conditioning_key {conditioning_key!r}")
        self.conditioning_key = conditioning_key

    def forward(self, x: torch.Tensor, t: torch.Tensor, c_concat: Optional[list] = None, c_crossattn: Optional[list] = None, c_adm=None) -> torch.Tensor:
        key = self.conditioning_key
        if key is None:
            return self.diffusion_model(x, t)
        if key == "concat":
            return self.diffusion_model(torch.cat([x, *c_concat], dim=1), t)
        if key == "crossattn":
            return self.diffusion_model(x, t, context=torch.cat(c_crossattn, dim=1))
        if key == "hybrid":
            return self.diffusion_model(torch.cat([x, *c_concat], dim=1), t, context=torch.cat(c_crossattn, dim=1))
        return self.diffusion_model(x, t, y=c_adm)


class LatentDiffusion(nn.Module):
    """Text-to-image latent diffusion: a VAE (`first_stage_model`), a text encoder (`cond_stage_model`) and a UNet
    (`model.diffusion_model`) with the discrete DDPM schedule as float32 buffers.

    Latents are [B, channels, image_size, image_size] at the native size; `scale_factor` maps VAE latents to unit
    variance. Precision is set per component by the caller (`model.model`, `first_stage_model`,
    `cond_stage_model`); the schedule buffers stay float32.
    """

    def __init__(
        self,
        first_stage_config: Any,
        cond_stage_config: Any,
        unet_config: Any,
        num_timesteps_cond: Optional[int] = None,
        cond_stage_key: str = "image",
        cond_stage_trainable: bool = False,
        concat_mode: bool = True,
        cond_stage_forward: Optional[str] = None,
        conditioning_key: Optional[ConditioningKey] = None,
        scale_factor: float = 1.0,
        scale_by_std: bool = False,
        timesteps: int = 1000,
        beta_schedule: str = "linear",
        given_betas: Optional[Any] = None,
        linear_start: float = 1e-4,
        linear_end: float = 2e-2,
        cosine_s: float = 8e-3,
        v_posterior: float = 0.0,
        parameterization: Literal["eps", "x0", "v"] = "eps",
        use_ema: bool = True,
        image_size: int = 256,
        channels: int = 3,
        first_stage_key: str = "image",
        log_every_t: int = 100,
        clip_denoised: bool = True,
        ckpt_path: Optional[str] = None,
        **ignored,
    ):
        super().__init__()
        if ignored:
            logger.debug("LatentDiffusion ignores training parameters %s", sorted(ignored))
        if parameterization not in ("eps", "x0", "v"):
            raise ValueError(f"parameterization must be eps, x0 or v, got {parameterization!r}")
        if conditioning_key is None:
            conditioning_key = "concat" if concat_mode else "crossattn"
        if cond_stage_config == "__is_unconditional__":
            conditioning_key = None
        self.parameterization = parameterization
        self.image_size = image_size
        self.channels = channels
        self.use_ema = use_ema
        self.log_every_t = log_every_t
        self.clip_denoised = clip_denoised
        self.first_stage_key = first_stage_key
        self.cond_stage_key = cond_stage_key
        self.cond_stage_trainable = cond_stage_trainable
        self.cond_stage_forward = cond_stage_forward
        self.num_timesteps_cond = num_timesteps_cond or 1
        self.v_posterior = v_posterior
        self.scale_by_std = scale_by_std
        if scale_by_std:
            self.register_buffer("scale_factor", torch.tensor(float(scale_factor)))
        else:
            self.scale_factor = float(scale_factor)
        if ckpt_path is not None:
            logger.info("ignoring ckpt_path %s in the config: pass the checkpoint to the loader", ckpt_path)

        self.model = DiffusionWrapper(unet_config, conditioning_key)
        self.first_stage_model = instantiate_from_config(first_stage_config).eval()
        for p in self.first_stage_model.parameters():
            p.requires_grad = False
        if cond_stage_config in ("__is_unconditional__", "__is_first_stage__"):
            raise ValueError(f"cond_stage_config {cond_stage_config!r} is not supported: text-conditioned models only")
        self.cond_stage_model = instantiate_from_config(cond_stage_config)
        self.register_schedule(given_betas, beta_schedule, timesteps, linear_start, linear_end, cosine_s)

    def register_schedule(
        self,
        given_betas: Optional[Any] = None,
        beta_schedule: str = "linear",
        timesteps: int = 1000,
        linear_start: float = 1e-4,
        linear_end: float = 2e-2,
        cosine_s: float = 8e-3,
    ) -> None:
        """Register the DDPM schedule as float32 buffers, computed in float64 as the original."""
        if given_betas is not None:
            betas = np.asarray(given_betas, dtype=np.float64)
        else:
            betas = make_beta_schedule(beta_schedule, timesteps, linear_start, linear_end, cosine_s)
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas, axis=0)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        self.num_timesteps = int(betas.shape[0])
        self.linear_start, self.linear_end = linear_start, linear_end
        posterior_variance = (1 - self.v_posterior) * betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod) + self.v_posterior * betas
        values = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
            "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
            "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
        }
        for name in SCHEDULE_BUFFERS:
            self.register_buffer(name, torch.tensor(values[name], dtype=torch.float32))

    @property
    def device(self) -> torch.device:
        return self.betas.device

    @contextlib.contextmanager
    def ema_scope(self, context: Optional[str] = None) -> Iterator[None]:
        """Kept for code written against the original. EMA weights, when wanted, are loaded in place of the
        training weights by the checkpoint loader, so there is nothing to swap here."""
        yield

    # -- forward process (VP variables, integer timesteps) --
    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        noise = torch.randn_like(x_start) if noise is None else noise
        return (
            extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
        )

    # -- conditioning, first stage, UNet --
    def get_learned_conditioning(self, c: Union[list[str], Any]) -> torch.Tensor:
        """Prompts (list of B strings) -> context [B, 77, context_dim]."""
        if self.cond_stage_forward is not None:
            return getattr(self.cond_stage_model, self.cond_stage_forward)(c)
        if hasattr(self.cond_stage_model, "encode") and callable(self.cond_stage_model.encode):
            c = self.cond_stage_model.encode(c)
            return c.mode() if isinstance(c, DiagonalGaussianDistribution) else c
        return self.cond_stage_model(c)

    def encode_first_stage(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """images [B, 3, H, W] in [-1, 1] -> the VAE posterior over unscaled latents."""
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, encoder_posterior: Union[DiagonalGaussianDistribution, torch.Tensor], noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Sample the posterior (with `noise` when given) and scale: latents [B, 4, H/8, W/8] of unit variance."""
        if isinstance(encoder_posterior, DiagonalGaussianDistribution):
            z = encoder_posterior.sample(noise)
        elif isinstance(encoder_posterior, torch.Tensor):
            z = encoder_posterior
        else:
            raise ValueError(f"encoder_posterior of type {type(encoder_posterior)} not supported")
        return self.scale_factor * z

    def decode_first_stage(self, z: torch.Tensor, predict_cids: bool = False, force_not_quantize: bool = False) -> torch.Tensor:
        """latents [B, 4, h, w] -> images [B, 3, 8h, 8w], nominally in [-1, 1]."""
        return self.first_stage_model.decode(z / self.scale_factor)

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any, return_ids: bool = False) -> torch.Tensor:
        """Raw UNet output (eps, x0 or v by `parameterization`) for latents x_noisy [B, C, h, w] at DDPM
        timesteps t [B]. `cond` is a context tensor, a list of them, or a dict of c_concat / c_crossattn lists."""
        if not isinstance(cond, dict):
            if not isinstance(cond, list):
                cond = [cond]
            key = "c_concat" if self.model.conditioning_key == "concat" else "c_crossattn"
            cond = {key: cond}
        return self.model(x_noisy, t, **cond)

    def set_attention(self, backend: Any) -> int:
        """Swap the attention strategy of every attention module (UNet and VAE) in one place."""
        from ldm.modules.attention_backends import set_attention_backend

        return set_attention_backend(self, backend)


class LatentInpaintDiffusion(LatentDiffusion):
    """SD 2.x inpainting: a hybrid-conditioned LatentDiffusion whose UNet reads [z, mask, masked-image latent]
    (4 + 1 + 4 = 9 channels) plus the text context.

    `concat_keys` name the extra inputs in order ("mask", then the masked image); `masked_image_key` says which of
    them is VAE-encoded. `finetune_keys`, `keep_finetune_dims` and the c_concat_log_* parameters of the original
    only serve to initialise training from a 4-channel checkpoint; they are accepted and ignored (inference only).
    """

    def __init__(
        self,
        *args: Any,
        concat_keys: Sequence[str] = ("mask", "masked_image"),
        masked_image_key: str = "masked_image",
        finetune_keys: Optional[Sequence[str]] = None,
        keep_finetune_dims: int = 4,
        c_concat_log_start: Optional[int] = None,
        c_concat_log_end: Optional[int] = None,
        **kwargs: Any,
    ):
        kwargs.setdefault("conditioning_key", "hybrid")
        super().__init__(*args, **kwargs)
        if masked_image_key not in concat_keys:
            raise ValueError(f"masked_image_key {masked_image_key!r} is not one of concat_keys {list(concat_keys)}")
        self.concat_keys = tuple(concat_keys)
        self.masked_image_key = masked_image_key
        self.finetune_keys = finetune_keys
        self.keep_finetune_dims = keep_finetune_dims

    def get_concat_conditioning(
        self, image: torch.Tensor, mask: torch.Tensor, noise: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """The UNet's extra input channels for inpainting `image` where `mask` is 1.

        Args:
            image: [B, 3, H, W] in [-1, 1].
            mask: [B, 1, H, W], 1 = repaint, 0 = keep (binarised at 0.5 here).
            noise: standard normal like the latent, to sample the VAE posterior of the masked image; None uses
                its mean (the original samples it with the global RNG; the difference is the posterior's std).
        Returns:
            c_concat [B, 1 + 4, H/f, W/f]: the mask resized to the latent size (nearest) and the scaled latent of
            image * (mask < 0.5), in `concat_keys` order.
        """
        if image.shape[0] != mask.shape[0] or image.shape[-2:] != mask.shape[-2:] or mask.shape[1] != 1:
            raise ValueError(f"image {tuple(image.shape)} and mask {tuple(mask.shape)} must be [B, 3, H, W] and [B, 1, H, W]")
        mask = (mask >= 0.5).to(image.dtype)
        masked_image = image * (mask < 0.5)
        posterior = self.encode_first_stage(masked_image)
        latent = self.get_first_stage_encoding(posterior.mode() if noise is None else posterior.sample(noise)).float()
        parts = []
        for key in self.concat_keys:
            if key == self.masked_image_key:
                parts.append(latent)
            elif key == "mask":
                parts.append(F.interpolate(mask.float(), size=latent.shape[-2:]))
            else:
                raise ValueError(f"concat key {key!r} is not supported: only 'mask' and the masked image")
        return torch.cat(parts, dim=1)

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any, return_ids: bool = False) -> torch.Tensor:
        """As LatentDiffusion.apply_model; `cond` must be a dict with c_concat [mask, masked latent] and
        c_crossattn [context]."""
        if not isinstance(cond, dict) or not cond.get("c_concat"):
            raise ValueError(
                "an inpainting model needs cond = {'c_concat': [mask + masked-image latent], 'c_crossattn': [context]}: "
                "give it an image and a mask (scripts/inpaint.py)"
            )
        return super().apply_model(x_noisy, t, cond)
