"""AutoencoderKL: the first stage of latent diffusion, inference only."""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from torch import nn

from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

logger = logging.getLogger(__name__)


class AutoencoderKL(nn.Module):
    """images [B, 3, H, W] in [-1, 1] <-> latents [B, embed_dim, H/f, W/f].

    `lossconfig`, `monitor`, `ckpt_path` and other training keys of the published yaml are accepted and ignored
    (no loss network is built).
    """

    def __init__(
        self,
        ddconfig: dict,
        embed_dim: int,
        lossconfig: Optional[Any] = None,
        ckpt_path: Optional[str] = None,
        ignore_keys: tuple = (),
        image_key: str = "image",
        colorize_nlabels: Optional[int] = None,
        monitor: Optional[str] = None,
        **ignored,
    ):
        super().__init__()
        if not ddconfig.get("double_z", True):
            raise ValueError("AutoencoderKL needs ddconfig.double_z: true (mean and log-variance)")
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.quant_conv = nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self.embed_dim = embed_dim
        self.image_key = image_key
        if ckpt_path is not None:
            logger.info("AutoencoderKL ignores ckpt_path %s: weights come from the model checkpoint", ckpt_path)

    @property
    def dtype(self) -> torch.dtype:
        return self.post_quant_conv.weight.dtype

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        moments = self.quant_conv(self.encoder(x.to(self.dtype)))
        return DiagonalGaussianDistribution(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z.to(self.dtype)))

    def forward(self, x: torch.Tensor, sample_posterior: bool = True):
        posterior = self.encode(x)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior
