"""sgm's DiffusionEngine, inference only: the SDXL UNet, its conditioner and the autoencoder, with the key layout
of the published checkpoints (`model.diffusion_model.*`, `conditioner.embedders.N.*`, `first_stage_model.*`).

Sampling belongs to `samplers/`, so the yaml's `sampler_config`, `loss_fn_config`, optimizer and scheduler sections
are accepted and ignored. The `denoiser_config` is read for what it says about the model: the discrete DDPM
schedule (`LegacyDDPMDiscretization`: linear_start, linear_end, num_timesteps) and the parameterization
(`EpsScaling` -> eps, `VScaling` -> v). The engine-facing surface is LatentDiffusion's: `alphas_cumprod`,
`parameterization`, `apply_model(x, t, cond)`, `get_learned_conditioning`, `encode_first_stage` /
`get_first_stage_encoding` / `decode_first_stage`, `scale_factor`, `set_attention`.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from ldm.modules.diffusionmodules.util import make_beta_schedule
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import get_obj_from_str, instantiate_from_config
from sgm.modules.diffusionmodules.wrappers import OPENAIUNETWRAPPER

logger = logging.getLogger(__name__)

# The published sampling's defaults for the refiner's aesthetic-score conditioning (positive and negative branch).
DEFAULT_AESTHETIC_SCORE = 6.0
DEFAULT_NEGATIVE_AESTHETIC_SCORE = 2.5
# SDXL's native resolution, 1024 x 1024 pixels: 128 x 128 latents.
DEFAULT_LATENT_SIZE = 128

_SCALINGS = {"EpsScaling": "eps", "VScaling": "v"}


def _target_name(config: Any, what: str) -> str:
    if not hasattr(config, "get") or "target" not in config:
        raise ValueError(f"{what} needs a `target`, got {config!r}")
    return str(config["target"]).rsplit(".", 1)[-1]


def schedule_from_denoiser_config(denoiser_config: Mapping[str, Any]) -> tuple[np.ndarray, str]:
    """(alphas_cumprod float64 [T], parameterization) described by sgm's `denoiser_config`.

    Supported: DiscreteDenoiser with LegacyDDPMDiscretization (SDXL: 0.00085 .. 0.012, 1000 steps, the SD
    "scaled linear" betas) and EpsScaling or VScaling. Anything else (EDM denoisers, zero-SNR or sub-sampled
    discretizations) is refused with a ValueError naming it.
    """
    name = _target_name(denoiser_config, "denoiser_config")
    if name != "DiscreteDenoiser":
        raise ValueError(f"denoiser {denoiser_config['target']!r} is not supported: only DiscreteDenoiser (discrete DDPM timesteps)")
    params = dict(denoiser_config.get("params") or {})
    scaling = _target_name(params.get("scaling_config"), "denoiser_config.params.scaling_config")
    if scaling not in _SCALINGS:
        raise ValueError(f"denoiser scaling {scaling!r} is not supported: expected one of {sorted(_SCALINGS)}")
    discretization = params.get("discretization_config")
    if _target_name(discretization, "denoiser_config.params.discretization_config") != "LegacyDDPMDiscretization":
        raise ValueError(f"discretization {discretization['target']!r} is not supported: only LegacyDDPMDiscretization")
    d = dict(discretization.get("params") or {})
    timesteps = int(d.get("num_timesteps", 1000))
    num_idx = int(params.get("num_idx", timesteps))
    if num_idx != timesteps:
        raise ValueError(f"denoiser num_idx {num_idx} differs from the discretization's num_timesteps {timesteps}")
    betas = make_beta_schedule("linear", timesteps, float(d.get("linear_start", 0.00085)), float(d.get("linear_end", 0.0120)))
    return np.cumprod(1.0 - betas, axis=0), _SCALINGS[scaling]


class DiffusionEngine(nn.Module):
    """SDXL base or refiner: `model` (OpenAIWrapper holding the UNet as `diffusion_model`), `conditioner`
    (GeneralConditioner) and `first_stage_model` (the KL autoencoder), with `alphas_cumprod` float32 [T] as a
    buffer that is not part of the state dict.

    Latents are [B, 4, H/8, W/8]; `image_size` is the native latent side (128 for 1024 x 1024; not a key of the
    published yaml, which this class defaults). Precision is set per component by the caller (`model`,
    `conditioner` (alias `cond_stage_model`), `first_stage_model`); the schedule stays float32.
    """

    def __init__(
        self,
        network_config: Mapping[str, Any],
        denoiser_config: Mapping[str, Any],
        first_stage_config: Mapping[str, Any],
        conditioner_config: Optional[Mapping[str, Any]] = None,
        sampler_config: Optional[Mapping[str, Any]] = None,
        optimizer_config: Optional[Mapping[str, Any]] = None,
        scheduler_config: Optional[Mapping[str, Any]] = None,
        loss_fn_config: Optional[Mapping[str, Any]] = None,
        network_wrapper: Optional[str] = None,
        ckpt_path: Optional[str] = None,
        use_ema: bool = False,
        ema_decay_rate: float = 0.9999,
        scale_factor: float = 1.0,
        disable_first_stage_autocast: bool = False,
        input_key: str = "jpg",
        log_keys: Optional[Sequence[str]] = None,
        no_cond_log: bool = False,
        compile_model: bool = False,
        en_and_decode_n_samples_a_time: Optional[int] = None,
        image_size: int = DEFAULT_LATENT_SIZE,
        **ignored: Any,
    ):
        super().__init__()
        if ignored:
            logger.debug("DiffusionEngine ignores parameters %s", sorted(ignored))
        if conditioner_config is None:
            raise ValueError("DiffusionEngine needs a conditioner_config (text-conditioned models only)")
        if ckpt_path is not None:
            logger.info("ignoring ckpt_path %s in the config: pass the checkpoint to the loader", ckpt_path)
        alphas_cumprod, self.parameterization = schedule_from_denoiser_config(denoiser_config)
        self.num_timesteps = int(alphas_cumprod.shape[0])
        self.register_buffer("alphas_cumprod", torch.tensor(alphas_cumprod, dtype=torch.float32), persistent=False)
        self.use_ema = bool(use_ema)  # EMA weights, when a file has them, replace the UNet's at load time
        self.scale_factor = float(scale_factor)
        self.image_size = int(image_size)
        self.input_key = input_key

        network = instantiate_from_config(network_config)
        self.model = get_obj_from_str(network_wrapper or OPENAIUNETWRAPPER)(network, compile_model=compile_model)
        self.conditioner = instantiate_from_config(conditioner_config)
        self.first_stage_model = instantiate_from_config(first_stage_config).eval()
        self.first_stage_model.requires_grad_(False)
        self.channels = int(self.first_stage_model.embed_dim)

    # -- the LatentDiffusion surface the runtime uses ---------------------------------------------------------------
    @property
    def cond_stage_model(self) -> nn.Module:
        """The conditioner, under LatentDiffusion's name (per-component precision and offloading use it)."""
        return self.conditioner

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    @contextlib.contextmanager
    def ema_scope(self, context: Optional[str] = None) -> Iterator[None]:
        yield

    @property
    def vae_scale(self) -> int:
        """Pixels per latent along a side: 8 for SDXL."""
        return 2 ** (self.first_stage_model.encoder.num_resolutions - 1)

    def conditioning_batch(
        self,
        prompts: Sequence[str],
        original_size: Optional[tuple[int, int]] = None,
        crop_coords_top_left: tuple[int, int] = (0, 0),
        target_size: Optional[tuple[int, int]] = None,
        aesthetic_score: float = DEFAULT_AESTHETIC_SCORE,
    ) -> dict[str, Any]:
        """The conditioner's batch (original keys) for B prompts and one micro-conditioning.

        Args:
            prompts: B strings.
            original_size, target_size: (height, width) in pixels; default the native size (1024, 1024).
            crop_coords_top_left: (top, left) in pixels.
            aesthetic_score: the refiner's score (published defaults 6.0, and 2.5 for the negative branch).
        Returns:
            {"txt": B prompts} plus [B, 2] / [B, 1] float32 tensors for the keys this conditioner reads.
        """
        prompts = list(prompts)
        native = self.image_size * self.vae_scale
        values = {
            "original_size_as_tuple": tuple(original_size or (native, native)),
            "crop_coords_top_left": tuple(crop_coords_top_left),
            "target_size_as_tuple": tuple(target_size or (native, native)),
            "aesthetic_score": (float(aesthetic_score),),
        }
        for key, value in values.items():
            if len(value) != (1 if key == "aesthetic_score" else 2):
                raise ValueError(f"{key} must be {'a number' if key == 'aesthetic_score' else '(height, width)'}, got {value}")
        batch: dict[str, Any] = {}
        for key in self.conditioner.input_keys:
            if key == "txt":
                batch[key] = prompts
            elif key in values:
                batch[key] = torch.tensor([values[key]], dtype=torch.float32, device=self.device).repeat(len(prompts), 1)
            else:
                raise ValueError(f"the conditioner reads batch key {key!r}, which conditioning_batch cannot fill")
        return batch

    def get_learned_conditioning(
        self, c: Union[Sequence[str], Mapping[str, Any]], force_zero_embeddings: Optional[Sequence[str]] = None
    ) -> dict[str, torch.Tensor]:
        """Prompts (B strings, with the default micro-conditioning) or a conditioner batch -> {"crossattn"
        [B, 77, context_dim], "vector" [B, adm_in_channels]}."""
        batch = c if isinstance(c, Mapping) else self.conditioning_batch(c)
        return self.conditioner(batch, force_zero_embeddings)

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor], return_ids: bool = False) -> torch.Tensor:
        """UNet output (eps or v by `parameterization`) for latents x_noisy [B, 4, h, w] at DDPM timesteps t [B];
        cond = {"crossattn": [B, 77, context_dim], "vector": [B, adm_in_channels]} (the conditioner's output)."""
        if not isinstance(cond, Mapping) or "crossattn" not in cond or "vector" not in cond:
            got = sorted(cond) if isinstance(cond, Mapping) else type(cond).__name__
            raise ValueError(f"an SDXL model needs cond = {{'crossattn': context, 'vector': y}} (get_learned_conditioning's output), got {got}")
        return self.model(x_noisy, t, cond)

    def encode_first_stage(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """images [B, 3, H, W] in [-1, 1] -> the VAE posterior over unscaled latents (as LatentDiffusion; sgm's
        version returns a scaled sample instead: `get_first_stage_encoding(encode_first_stage(x))`)."""
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, encoder_posterior: Union[DiagonalGaussianDistribution, torch.Tensor], noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Sample the posterior (with `noise` when given) and scale: latents [B, 4, H/8, W/8]."""
        z = encoder_posterior.sample(noise) if isinstance(encoder_posterior, DiagonalGaussianDistribution) else encoder_posterior
        return self.scale_factor * z

    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        """scaled latents [B, 4, h, w] -> images [B, 3, 8h, 8w], nominally in [-1, 1]."""
        return self.first_stage_model.decode(z / self.scale_factor)

    def set_attention(self, backend: Any) -> int:
        """Swap the attention strategy of every attention module (UNet and VAE) in one place."""
        from ldm.modules.attention_backends import set_attention_backend

        return set_attention_backend(self, backend)
