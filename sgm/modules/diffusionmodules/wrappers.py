"""The UNet holder of sgm's DiffusionEngine: `model.diffusion_model.*` keys, conditioning routed by name."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

OPENAIUNETWRAPPER = "sgm.modules.diffusionmodules.wrappers.OpenAIWrapper"


class IdentityWrapper(nn.Module):
    """Holds the network as `diffusion_model`. `compile_model` of the original is accepted and ignored."""

    def __init__(self, diffusion_model: nn.Module, compile_model: bool = False):
        super().__init__()
        self.diffusion_model = diffusion_model

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.diffusion_model(*args, **kwargs)


class OpenAIWrapper(IdentityWrapper):
    """model(x, t, c): c["concat"] (optional) is appended to x's channels, c["crossattn"] is the context
    [B, 77, context_dim], c["vector"] the adm vector y [B, adm_in_channels]."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: Mapping[str, torch.Tensor], **kwargs: Any) -> torch.Tensor:
        concat = c.get("concat")
        if concat is not None:
            x = torch.cat((x, concat.to(x.dtype)), dim=1)
        return self.diffusion_model(x, timesteps=t, context=c.get("crossattn"), y=c.get("vector"), **kwargs)
