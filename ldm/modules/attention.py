"""Transformer blocks of the UNet: SpatialTransformer, BasicTransformerBlock, CrossAttention, FeedForward.

Module and parameter names equal the original checkpoint keys (`transformer_blocks.0.attn1.to_q.weight`, ...).
The attention kernel itself is a swappable strategy (see `ldm.modules.attention_backends`).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.attention_backends import AttentionBackend
from ldm.modules.diffusionmodules.util import conv_nd, linear, rowwise_linear, zero_module


class GEGLU(nn.Module):
    """x -> a * gelu(b), where [a, b] = proj(x), split in halves along the features.

    Without gradients the two halves are two products with the halves of `proj`'s weight, each written once, and
    the gate's GELU and the product are done in place: the layer holds two [.., dim_out] tensors instead of the
    projection, the GELU and the result (four), and its GELU reads a contiguous tensor. The products are the same
    bits as the halves of the whole product; the GELU of a contiguous tensor takes PyTorch's vectorised kernel,
    which can differ from its kernel for the strided half in the last bit (float32; bf16 gave the same bits).
    Measured (one layer, 2 threads, median of 8 alternated calls): float32 [2, 4096, 320] 210 -> 170 ms,
    [2, 1024, 640] 133 -> 104 ms; bf16 [2, 4096, 640] 214 -> 182 ms, half the page faults. With gradients, or
    with hooks on `proj` (the demo concept trainer's), `proj` is called as a module."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        proj = self.proj
        if torch.is_grad_enabled() or not isinstance(proj, nn.Linear) or proj._forward_hooks or proj._forward_pre_hooks:
            x, gate = proj(x).chunk(2, dim=-1)
            return x * F.gelu(gate)
        half = proj.out_features // 2
        bias = proj.bias
        out = rowwise_linear(x, proj.weight[:half], None if bias is None else bias[:half])
        gate = rowwise_linear(x, proj.weight[half:], None if bias is None else bias[half:])
        return out.mul_(torch.ops.aten.gelu_(gate))


class FeedForward(nn.Module):
    def __init__(self, dim: int, dim_out: Optional[int] = None, mult: int = 4, glu: bool = False, dropout: float = 0.0):
        super().__init__()
        inner_dim = int(dim * mult)
        dim_out = dim_out or dim
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(linear(dim, inner_dim), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), linear(inner_dim, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CrossAttention(nn.Module):
    """Multi-head attention of x [B, N, query_dim] over context [B, M, context_dim] (self-attention without one)."""

    def __init__(self, query_dim: int, context_dim: Optional[int] = None, heads: int = 8, dim_head: int = 64, dropout: float = 0.0):
        super().__init__()
        inner_dim = dim_head * heads
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = linear(query_dim, inner_dim, bias=False)
        self.to_k = linear(context_dim, inner_dim, bias=False)
        self.to_v = linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(linear(inner_dim, query_dim), nn.Dropout(dropout))
        self.attention = AttentionBackend("sdpa")

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if mask is not None:
            raise ValueError("attention masks are not used by Stable Diffusion models and are not supported")
        context = x if context is None else context
        b, n, _ = x.shape
        h = self.heads
        # [B, N, h*d] -> [B, h, N, d]
        q, k, v = (
            t.reshape(b, t.shape[1], h, -1).transpose(1, 2)
            for t in (self.to_q(x), self.to_k(context), self.to_v(context))
        )
        out = self.attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class BasicTransformerBlock(nn.Module):
    def __init__(
        self,
        dim: int,
        n_heads: int,
        d_head: int,
        dropout: float = 0.0,
        context_dim: Optional[int] = None,
        gated_ff: bool = True,
        checkpoint: bool = True,
        disable_self_attn: bool = False,
    ):
        super().__init__()
        self.disable_self_attn = disable_self_attn
        self.attn1 = CrossAttention(dim, context_dim if disable_self_attn else None, n_heads, d_head, dropout)
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(dim, context_dim, n_heads, d_head, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        # Token merging (ldm.modules.token_merging.TokenMerge), set for a run by microbatch.step_savings; None: exact.
        self.token_merge = None

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None, grid: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """x [B, N, dim] (N = h * w tokens of the grid (h, w), which token merging needs), context [B, M, C]."""
        if self.token_merge is not None and grid is not None:
            return self._forward_merged(x, context, grid)
        x = x + self.attn1(self.norm1(x), context=context if self.disable_self_attn else None)
        x = x + self.attn2(self.norm2(x), context=context)
        return x + self.ff(self.norm3(x))

    def _forward_merged(self, x: torch.Tensor, context: Optional[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
        """The forward with the chosen parts on merged tokens (ToMe for SD): merge after the norm, unmerge the
        part's output before the residual add."""
        merge, unmerge = self.token_merge.plan(x, grid)
        s = self.token_merge.settings
        plain = lambda t: t  # noqa: E731
        m_a, u_a = (merge, unmerge) if s.merge_attn else (plain, plain)
        m_c, u_c = (merge, unmerge) if s.merge_crossattn else (plain, plain)
        m_m, u_m = (merge, unmerge) if s.merge_mlp else (plain, plain)
        x = x + u_a(self.attn1(m_a(self.norm1(x)), context=context if self.disable_self_attn else None))
        x = x + u_c(self.attn2(m_c(self.norm2(x)), context=context))
        return x + u_m(self.ff(m_m(self.norm3(x))))


class SpatialTransformer(nn.Module):
    """Transformer over the H*W positions of a feature map [B, C, H, W], conditioned on context [B, M, context_dim].

    v1 projects in and out with 1x1 convolutions; SD 2.x (`use_linear`) with Linear layers.
    """

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim: Union[None, int, Sequence[int]] = None,
        disable_self_attn: bool = False,
        use_linear: bool = False,
        use_checkpoint: bool = True,
    ):
        super().__init__()
        if context_dim is not None and not isinstance(context_dim, (list, tuple)):
            context_dim = [context_dim] * depth
        if context_dim is None:
            context_dim = [None] * depth
        inner_dim = n_heads * d_head
        self.in_channels = in_channels
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6)
        if use_linear:
            self.proj_in = linear(in_channels, inner_dim)
        else:
            self.proj_in = conv_nd(2, in_channels, inner_dim, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, n_heads, d_head, dropout, context_dim[d], disable_self_attn=disable_self_attn)
            for d in range(depth)
        )
        if use_linear:
            self.proj_out = zero_module(linear(inner_dim, in_channels))
        else:
            self.proj_out = zero_module(conv_nd(2, inner_dim, in_channels, kernel_size=1))

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)  # [B, H*W, C]
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context=context, grid=(h, w))
        if self.use_linear:
            x = self.proj_out(x)
        # [B, H*W, C] -> [B, C, H, W] as a permuted view, whose strides are the same for every B: reshaping the
        # transpose gave a one-image batch a different batch stride, and oneDNN's convolution and GroupNorm pick
        # their algorithm by strides, so an image's last bits depended on how many rows shared its UNet call
        x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in
