"""The SDXL UNet under sgm's path: `ldm.modules.diffusionmodules.openaimodel.UNetModel` with sgm's defaults.

sgm's UNet always uses spatial transformers, has no `image_size` parameter, and takes heads as
channels / num_head_channels of num_head_channels each (ldm's `legacy: False`). Everything else (the `adm` label
embedding, per-level transformer depths, linear projections) is the shared implementation's options.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from ldm.modules.diffusionmodules.openaimodel import UNetModel as _LdmUNetModel


class RowwiseLinear(nn.Linear):
    """nn.Linear that, on a 2-d input without gradients, multiplies one row at a time, so an image's time and label
    embedding never depends on its batch. SDXL's UNet computes these on the distinct (timestep, y) rows of a batch
    (ldm's TimeEmbedding), about two per distinct prompt, so their row count grows with the micro-batch; measured on
    the tiny SDXL base (CPU, float32), a [6, 72] label MLP differed from its rows one at a time by up to 1.5e-7 (the
    BLAS picks GEMV or differently blocked GEMMs by the row count), and micro-batch 3's latents after 3 guided Euler
    steps differed from micro-batch 1's by 2.4e-4. These layers see [U, C] vectors, so the per-row cost is small.
    Keys are nn.Linear's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[0] <= 1 or torch.is_grad_enabled():
            return super().forward(x)
        return torch.cat([super(RowwiseLinear, self).forward(x[i : i + 1]) for i in range(x.shape[0])])


def _rowwise_linears(module: nn.Module) -> None:
    for layer in module.modules():
        if type(layer) is nn.Linear:
            layer.__class__ = RowwiseLinear


class UNetModel(_LdmUNetModel):
    """x [B, 4, h, w], timesteps [B], context [B, 77, context_dim], y [B, adm_in_channels] -> [B, 4, h, w]."""

    def __init__(
        self,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: Union[int, Sequence[int]],
        attention_resolutions: Sequence[int],
        *,
        image_size: Optional[int] = None,
        use_spatial_transformer: bool = True,
        legacy: bool = False,
        **kwargs: Any,
    ):
        super().__init__(
            image_size=image_size, in_channels=in_channels, model_channels=model_channels, out_channels=out_channels,
            num_res_blocks=num_res_blocks, attention_resolutions=attention_resolutions,
            use_spatial_transformer=use_spatial_transformer, legacy=legacy, **kwargs,
        )
        # Everything that runs on the distinct (timestep, y) rows of a batch (the time and label MLPs, every
        # ResBlock's emb_layers): their count U is about two per distinct prompt in SDXL (one for SD), so these
        # products are made one row at a time (RowwiseLinear) to stay batch-invariant.
        for name, module in self.named_modules():
            if name in ("time_embed", "label_emb") or name.endswith("emb_layers"):
                _rowwise_linears(module)
