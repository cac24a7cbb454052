"""The SDXL first stage under sgm's names: the same KL autoencoder as `ldm.models.autoencoder.AutoencoderKL`.

SDXL's VAE has SD's architecture and key layout (`encoder.*`, `decoder.*`, `quant_conv`, `post_quant_conv`) with
other weights; the yaml's `ddconfig` (its `attn_type: vanilla-xformers` included), `embed_dim`, `lossconfig` and
`monitor` are read as for SD. One difference from sgm on purpose: `encode` returns the posterior
(`DiagonalGaussianDistribution`, as ldm), not a sample, so that callers choose its mean or a seeded sample.
"""
from __future__ import annotations

from ldm.models.autoencoder import AutoencoderKL as _LdmAutoencoderKL


class AutoencoderKL(_LdmAutoencoderKL):
    """images [B, 3, H, W] in [-1, 1] <-> latents [B, embed_dim, H/8, W/8] (the July 2023 SDXL yamls' class)."""


class AutoencoderKLInferenceWrapper(AutoencoderKL):
    """The class named by today's SDXL yamls; the same model (sgm's wrapper only changes what `encode` returns)."""
