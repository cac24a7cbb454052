"""The one wrapper that owns classifier-free guidance.

Guidance is applied to the raw model output (eps for eps models, v for v models), where the original applies
it: out = out_uncond + scale * (out_cond - out_uncond). Unconditional and conditional inputs go through the
UNet as one batch ordered [uncond, cond] (the original's order), or as two calls when `split` is set to bound
the UNet batch to the number of images.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

# apply_model(x_t [B, C, h, w], t [B], cond) -> raw output [B, C, h, w]
ApplyModel = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


def _cat_cond(a: Any, b: Any) -> Any:
    """Concatenate two conditionings along the batch: tensors, lists of tensors, or dicts of lists."""
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    if isinstance(a, dict):
        return {k: _cat_cond(a[k], b[k]) for k in a}
    if isinstance(a, (list, tuple)):
        return [_cat_cond(x, y) for x, y in zip(a, b)]
    raise ValueError(f"cannot batch conditioning of type {type(a).__name__}")


class GuidedModel:
    """model_fn(x_t, t) for a batch of B images with per-image cond / uncond of batch B.

    Args:
        apply_model: the model's `apply_model`.
        cond: conditioning for the batch (context tensor [B, 77, D] or a dict of lists for hybrid models).
        uncond: unconditional conditioning of the same structure, or None for no guidance.
        guidance_scale: s in out_u + s (out_c - out_u); 1 disables guidance (one call, cond only).
        split: run uncond and cond as two UNet calls of B instead of one of 2B.
    """

    def __init__(self, apply_model: ApplyModel, cond: Any, uncond: Optional[Any] = None, guidance_scale: float = 1.0, split: bool = False):
        self.apply_model = apply_model
        self.cond = cond
        self.uncond = uncond
        self.guidance_scale = float(guidance_scale)
        self.split = split
        self.calls = 0  # UNet evaluations, for metrics and tests

    @property
    def guided(self) -> bool:
        return self.uncond is not None and self.guidance_scale != 1.0

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if not self.guided:
            return self.apply_model(x_t, t, self.cond)
        if self.split:
            out_uncond = self.apply_model(x_t, t, self.uncond)
            out_cond = self.apply_model(x_t, t, self.cond)
        else:
            out = self.apply_model(torch.cat([x_t, x_t]), torch.cat([t, t]), _cat_cond(self.uncond, self.cond))
            out_uncond, out_cond = out.chunk(2)
        return out_uncond + self.guidance_scale * (out_cond - out_uncond)
