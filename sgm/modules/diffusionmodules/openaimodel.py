"""The SDXL UNet under sgm's path: `ldm.modules.diffusionmodules.openaimodel.UNetModel` with sgm's defaults.

sgm's UNet always uses spatial transformers, has no `image_size` parameter, and takes heads as
channels / num_head_channels of num_head_channels each (ldm's `legacy: False`). Everything else (the `adm` label
embedding, per-level transformer depths, linear projections) is the shared implementation's options.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from ldm.modules.diffusionmodules.openaimodel import UNetModel as _LdmUNetModel


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
