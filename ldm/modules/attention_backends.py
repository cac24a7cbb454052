"""Attention kernels: one function signature, three strategies.

Every attention module in the model (UNet self/cross attention, the VAE's single-head block) calls
`self.attention(q, k, v)` with q [B, heads, Nq, d], k and v [B, heads, Nk, d] and gets [B, heads, Nq, d].
`AttentionBackend` objects are that callable; `set_attention_backend` swaps it on a built model in one place.

- "math": the reference. Scores q k^T are computed in float32 (the original's upcast; half-precision scores
  overflow on SD 2.x), softmax in float32, then multiplied with v in v's dtype.
- "sdpa": torch.nn.functional.scaled_dot_product_attention (flash / memory-efficient kernels where the device
  has them).
- "sliced": the math reference computed a slice of (batch x heads) and a chunk of queries at a time, so the
  score matrix never exists whole. Peak score memory = slice_size x query_chunk x Nk x 4 bytes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

BackendName = Literal["auto", "math", "sdpa", "sliced"]
BACKENDS = ("auto", "math", "sdpa", "sliced")


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v with float32 scores; shapes [B, h, N, d]."""
    scale = q.shape[-1] ** -0.5
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2))
    # In place (inference only): one score matrix alive instead of three (product, scaled, probabilities).
    scores.mul_(scale)
    torch.softmax(scores, dim=-1, out=scores)
    return torch.matmul(scores.to(v.dtype), v)


def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


@dataclass(frozen=True)
class AttentionBackend:
    """A picklable attention strategy. For "sliced": `slice_size` bounds the heads of one image per chunk and
    `max_score_bytes` bounds one chunk's float32 score matrix (queries are chunked to fit)."""

    name: Literal["math", "sdpa", "sliced"] = "sdpa"
    slice_size: Optional[int] = None
    max_score_bytes: int = 16 * 2**20

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.name == "sdpa":
            return attention_sdpa(q, k, v)
        if self.name == "math":
            return attention_math(q, k, v)
        return self._sliced(q, k, v)

    def _sliced(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # Slices are views of q, k, v as they come ([B, h, N, d], usually transposed from [B, N, h, d]): reshaping
        # them to [B*h, N, d] first would copy all three. The output is written in [B, N, h, d] order, so the
        # caller's transpose back to [B, N, h*d] is a view too.
        b, h, nq, d = q.shape
        nk = k.shape[2]
        heads = h if self.slice_size is None else max(1, min(self.slice_size, h))
        # Query chunk so that heads x chunk x nk float32 scores stay under the budget.
        chunk = max(1, min(nq, self.max_score_bytes // max(1, heads * nk * 4)))
        out = torch.empty(b, nq, h, v.shape[-1], dtype=v.dtype, device=v.device).transpose(1, 2)
        for i in range(b):
            for r in range(0, h, heads):
                for c in range(0, nq, chunk):
                    out[i, r : r + heads, c : c + chunk] = attention_math(q[i, r : r + heads, c : c + chunk], k[i, r : r + heads], v[i, r : r + heads])
        return out


def resolve_backend(
    name: BackendName = "auto", slicing: Optional[str] = None, device: Optional[torch.device] = None
) -> AttentionBackend:
    """Turn the user's choice into a backend.

    name: auto | math | sdpa | sliced. slicing: None, "auto", "max" or a number of (batch x heads) rows per slice;
    any slicing choice implies the sliced backend; N counts heads of one image per slice. "auto" picks sdpa (it uses flash / memory-efficient kernels where
    the device has them and never materialises the full score matrix on CUDA).
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if slicing is not None and name in ("auto", "sliced"):
        if slicing == "auto":
            return AttentionBackend("sliced", slice_size=None)
        if slicing == "max":
            return AttentionBackend("sliced", slice_size=1, max_score_bytes=8 * 2**20)
        try:
            size = int(slicing)
        except ValueError:
            raise ValueError(f"--attention_slicing must be auto, max or a positive integer, got {slicing!r}") from None
        if size < 1:
            raise ValueError(f"--attention_slicing must be auto, max or a positive integer, got {slicing!r}")
        return AttentionBackend("sliced", slice_size=size)
    if name == "auto":
        return AttentionBackend("sdpa")
    return AttentionBackend(name)


def set_attention_backend(model: nn.Module, backend: AttentionBackend) -> int:
    """Swap the attention strategy of every attention module in `model`; returns how many were changed."""
    count = 0
    for module in model.modules():
        if hasattr(module, "attention") and isinstance(getattr(module, "attention"), AttentionBackend):
            module.attention = backend
            count += 1
    logger.debug("attention backend %s set on %d modules", backend, count)
    return count
