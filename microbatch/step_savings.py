"""Opt-in step savings that change the images (README, "Step savings"): token merging (`--tome RATIO`) and DeepCache
(`--deepcache N`). Guidance on an interval (`--guidance_interval`) lives in samplers.guidance.GuidedModel.

Both are set on the UNet for one micro-batch's sampling and taken off afterwards, also after an error: they are
strategies the model's modules consult (BasicTransformerBlock.token_merge, UNetModel.deep_cache), not changes to
its weights, so the model is exactly as before once the run ends.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional

from torch import nn

from ldm.modules.attention import BasicTransformerBlock, SpatialTransformer
from ldm.modules.diffusionmodules.deep_cache import DeepCache
from ldm.modules.diffusionmodules.openaimodel import Downsample, Upsample
from ldm.modules.token_merging import TokenMerge, TokenMergeSettings


def transformer_blocks_by_downsample(unet: nn.Module) -> list[tuple[BasicTransformerBlock, int]]:
    """Every transformer block of a UNetModel with the factor its feature map is smaller than the latent by (1 for
    the highest-resolution blocks), in the order the forward runs them."""
    found: list[tuple[BasicTransformerBlock, int]] = []
    ds = 1

    def collect(block: nn.Module) -> None:
        for layer in block:
            if isinstance(layer, SpatialTransformer):
                found.extend((b, ds) for b in layer.transformer_blocks)

    for block in unet.input_blocks:
        if any(isinstance(layer, Downsample) for layer in block):
            ds *= 2
        collect(block)
    collect(unet.middle_block)
    for block in unet.output_blocks:
        collect(block)
        if any(isinstance(layer, Upsample) for layer in block):
            ds //= 2
    return found


def unet_of(model: Any) -> nn.Module:
    """The UNetModel inside a LatentDiffusion or an SDXL DiffusionEngine."""
    return model.model.diffusion_model


@contextlib.contextmanager
def step_savings(
    unet: nn.Module, step: Callable[[], int], tome: Optional[float] = None, deepcache: Optional[int] = None,
    tome_settings: Optional[TokenMergeSettings] = None,
) -> Iterator[Optional[DeepCache]]:
    """Within the block, `unet` merges tokens (ratio `tome`, the tomesd defaults otherwise, or `tome_settings`)
    and/or reuses its deep features every `deepcache` calls; `step()` gives the current denoiser call of the
    micro-batch. Yields the DeepCache (for its counts) or None. Nothing is set when both are None."""
    blocks: list[BasicTransformerBlock] = []
    cache = None
    previous_cache = getattr(unet, "deep_cache", None)
    try:
        if tome is not None or tome_settings is not None:
            settings = tome_settings or TokenMergeSettings(ratio=float(tome))
            for index, (block, ds) in enumerate(transformer_blocks_by_downsample(unet)):
                if ds <= settings.max_downsample:
                    block.token_merge = TokenMerge(settings, step, index)
                    blocks.append(block)
        if deepcache is not None:
            cache = DeepCache(int(deepcache), step)
            unet.deep_cache = cache
        yield cache
    finally:
        for block in blocks:
            block.token_merge = None
        if cache is not None:
            unet.deep_cache = previous_cache
