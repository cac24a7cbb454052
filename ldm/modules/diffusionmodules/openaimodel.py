"""The Stable Diffusion UNet (`UNetModel`), inference only, with the original module names.

Shapes for SD v1 at 512x512: x [B, 4, 64, 64], timesteps [B], context [B, 77, 768] -> [B, 4, 64, 64].
SDXL base at 1024x1024: x [B, 4, 128, 128], context [B, 77, 2048] and the `adm` vector y [B, 2816].
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.util import (
    avg_pool_nd,
    conv_nd,
    linear,
    normalization,
    timestep_embedding,
    zero_module,
)

logger = logging.getLogger(__name__)


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""


class TimeEmbedding:
    """Timestep embeddings of the distinct timesteps of a batch, values [U, C], and each row's entry, index [B].

    A batch usually holds one timestep, so the time MLPs run once on U rows instead of B. That is cheaper, and it
    keeps every image's result independent of the batch size: small-M matrix products take other kernels (with
    another summation order) than large ones. For the same reason each distinct row goes through the MLPs alone
    (M = 1): the rows of concurrent requests at different noise levels may share a UNet call (the server's
    continuous batching), and an image's result must not depend on which other timesteps its call held. With an
    `adm` vector (SDXL) the distinct rows are the distinct (timestep, vector) pairs: a guided batch holds about two.

    `index` None: `values` holds every row [B, C], each computed alone. This is the form used where finding the
    distinct rows would cost a host synchronisation (torch.unique on a GPU waits for the device) or break a
    compiled graph (its output size depends on the data); a batch of one timestep gives bit-identical values
    either way.
    """

    def __init__(self, values: torch.Tensor, index: Optional[torch.Tensor]):
        self.values = values
        self.index = index

    def map(self, fn) -> torch.Tensor:
        """fn applied to each distinct row alone, expanded to the batch: [B, ...] (index None: every row alone)."""
        if self.index is None:
            return rowwise(fn, self.values)
        return rowwise(fn, self.values)[self.index]


def rowwise(fn, rows: torch.Tensor) -> torch.Tensor:
    """fn applied to rows [U, ...] one row at a time (the kernels of a one-row call whatever U), concatenated."""
    if rows.shape[0] == 1:
        return fn(rows)
    return torch.cat([fn(rows[i : i + 1]) for i in range(rows.shape[0])])


def _distinct_on_host(t: torch.Tensor) -> bool:
    """Whether the distinct rows of `t` may be found with torch.unique: on the CPU, outside torch.compile (elsewhere
    it synchronises with the device, or breaks the compiled graph, or has no meta kernel)."""
    compiling = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling
    return t.device.type == "cpu" and not compiling()


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """Sequential that hands the timestep embedding to ResBlocks and the context to SpatialTransformers."""

    def forward(self, x: "torch.Tensor | list[torch.Tensor]", emb: "torch.Tensor | TimeEmbedding", context: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x, or (an output block) the list [h, skip] to concatenate along channels. The list is emptied here, so that
        nothing holds h and the skip, and the concatenation is freed as soon as the first layer (a ResBlock) has made
        its output, instead of living on through the block's transformer and upsampling."""
        if isinstance(x, list):
            parts = x
            x = torch.cat(parts, dim=1)
            parts.clear()
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour x2, then an optional 3x3 conv (key `conv`)."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: Optional[int] = None, padding: int = 1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """Stride-2 3x3 conv (key `op`), or average pooling without a conv."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: Optional[int] = None, padding: int = 1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, self.channels, self.out_channels, 3, stride=stride, padding=padding)
        else:
            if self.channels != self.out_channels:
                raise ValueError("Downsample without conv cannot change the channel count")
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """GroupNorm-SiLU-conv twice with the timestep embedding added in between, plus a skip connection."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: Optional[int] = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        dims: int = 2,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        if up or down:
            raise ValueError("resblock_updown is not used by Stable Diffusion models and is not supported")
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(), conv_nd(dims, channels, self.out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(
            nn.SiLU(), linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels)
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: "torch.Tensor | TimeEmbedding") -> torch.Tensor:
        h = self.in_layers(x)
        emb_out = emb.map(self.emb_layers) if isinstance(emb, TimeEmbedding) else self.emb_layers(emb)
        emb_out = emb_out.to(h.dtype)
        emb_out = emb_out.reshape(*emb_out.shape, *((1,) * (h.dim() - emb_out.dim())))
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = emb_out.chunk(2, dim=1)
            h = out_rest(out_norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


def _per_level(value: Union[int, Sequence[int]], n: int, name: str) -> list[int]:
    if isinstance(value, int):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"{name} must be an int or a list of {n} values, got {value}")
    return value


def _single_context_dim(context_dim: Union[int, Sequence[int]]) -> int:
    """The cross-attention width. Lists (one entry per level, as in the SDXL refiner yaml) must be homogeneous."""
    if not hasattr(context_dim, "__len__"):  # an int
        return context_dim
    widths = list(context_dim)
    if not widths or any(w != widths[0] for w in widths):
        raise ValueError(f"context_dim lists must repeat one width, got {widths}")
    return widths[0]


class UNetModel(nn.Module):
    """The latent-diffusion UNet with cross-attention (SpatialTransformer) blocks.

    Accepts the published yaml parameters; training-only ones (use_checkpoint, use_fp16) are accepted and do not
    change the computation: the compute dtype is the pipeline's decision, set by casting the module.

    SDXL options (sgm's UNet): `num_classes: sequential` with `adm_in_channels` adds the label embedding
    `label_emb.0.{0,2}` (an MLP of the conditioning vector y [B, adm_in_channels], added to the time embedding);
    `transformer_depth` may be a list per level (the output blocks of a level use that level's depth) and
    `transformer_depth_middle` sets the middle block's (default: the last level's); `disable_middle_transformer`
    replaces the middle transformer by an identity. `spatial_transformer_attn_type` is accepted and ignored (the
    attention kernel is a strategy set on the built model).
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: Union[int, Sequence[int]],
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: Optional[int] = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        use_bf16: bool = False,
        num_heads: int = -1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_spatial_transformer: bool = False,
        transformer_depth: Union[int, Sequence[int]] = 1,
        context_dim: Optional[int] = None,
        n_embed: Optional[int] = None,
        legacy: bool = True,
        disable_self_attentions: Optional[Sequence[bool]] = None,
        num_attention_blocks: Optional[Sequence[int]] = None,
        disable_middle_self_attn: bool = False,
        use_linear_in_transformer: bool = False,
        adm_in_channels: Optional[int] = None,
        transformer_depth_middle: Optional[int] = None,
        disable_middle_transformer: bool = False,
        **ignored,
    ):
        super().__init__()
        if ignored:
            logger.debug("UNetModel ignores parameters %s", sorted(ignored))
        if not use_spatial_transformer:
            raise ValueError("only UNets with use_spatial_transformer: True (Stable Diffusion) are supported")
        if context_dim is None:
            raise ValueError("use_spatial_transformer needs context_dim")
        if n_embed is not None or (num_classes is not None and num_classes != "sequential"):
            raise ValueError(f"class-conditional and codebook UNets are not supported (num_classes {num_classes!r}, n_embed {n_embed!r}); only num_classes: sequential (SDXL)")
        if num_classes == "sequential" and not adm_in_channels:
            raise ValueError(f"num_classes: sequential needs adm_in_channels (the conditioning vector's width), got {adm_in_channels!r}")
        if resblock_updown:
            raise ValueError("resblock_updown is not supported")
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("either num_heads or num_head_channels must be set")
        context_dim = _single_context_dim(context_dim)

        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        levels = len(channel_mult)
        self.num_res_blocks = _per_level(num_res_blocks, levels, "num_res_blocks")
        depths = _per_level(transformer_depth, levels, "transformer_depth")
        depth_middle = depths[-1] if transformer_depth_middle is None else transformer_depth_middle
        self.attention_resolutions = list(attention_resolutions)
        self.channel_mult = list(channel_mult)
        self.context_dim = context_dim
        self.num_classes = num_classes
        self.adm_in_channels = adm_in_channels if num_classes is not None else None
        self.predict_codebook_ids = False

        def heads_for(ch: int) -> tuple[int, int]:
            if num_head_channels == -1:
                heads, dim_head = num_heads, ch // num_heads
            else:
                heads, dim_head = ch // num_head_channels, num_head_channels
            if legacy:
                dim_head = ch // heads
            return heads, dim_head

        def attention_block(ch: int, depth: int, disable_self: bool) -> SpatialTransformer:
            heads, dim_head = heads_for(ch)
            return SpatialTransformer(
                ch, heads, dim_head, depth=depth, dropout=dropout, context_dim=context_dim,
                disable_self_attn=disable_self, use_linear=use_linear_in_transformer,
            )

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(linear(model_channels, time_embed_dim), nn.SiLU(), linear(time_embed_dim, time_embed_dim))
        if num_classes == "sequential":
            # sgm's key layout: label_emb.0.0 / label_emb.0.2
            self.label_emb = nn.Sequential(
                nn.Sequential(linear(adm_in_channels, time_embed_dim), nn.SiLU(), linear(time_embed_dim, time_embed_dim))
            )

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(conv_nd(dims, in_channels, model_channels, 3, padding=1))])
        input_block_chans = [model_channels]
        ch = model_channels
        ds = 1
        for level, mult in enumerate(channel_mult):
            for nr in range(self.num_res_blocks[level]):
                layers: list[nn.Module] = [
                    ResBlock(ch, time_embed_dim, dropout, out_channels=mult * model_channels, dims=dims, use_scale_shift_norm=use_scale_shift_norm)
                ]
                ch = mult * model_channels
                if ds in self.attention_resolutions and (num_attention_blocks is None or nr < num_attention_blocks[level]):
                    disable_self = bool(disable_self_attentions[level]) if disable_self_attentions is not None else False
                    layers.append(attention_block(ch, depths[level], disable_self))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != levels - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch, conv_resample, dims=dims, out_channels=ch)))
                input_block_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, time_embed_dim, dropout, dims=dims, use_scale_shift_norm=use_scale_shift_norm),
            nn.Identity() if disable_middle_transformer else attention_block(ch, depth_middle, disable_middle_self_attn),
            ResBlock(ch, time_embed_dim, dropout, dims=dims, use_scale_shift_norm=use_scale_shift_norm),
        )

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(self.num_res_blocks[level] + 1):
                ich = input_block_chans.pop()
                layers = [
                    ResBlock(ch + ich, time_embed_dim, dropout, out_channels=model_channels * mult, dims=dims, use_scale_shift_norm=use_scale_shift_norm)
                ]
                ch = model_channels * mult
                if ds in self.attention_resolutions and (num_attention_blocks is None or i < num_attention_blocks[level]):
                    disable_self = bool(disable_self_attentions[level]) if disable_self_attentions is not None else False
                    layers.append(attention_block(ch, depths[level], disable_self))
                if level and i == self.num_res_blocks[level]:
                    layers.append(Upsample(ch, conv_resample, dims=dims, out_channels=ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(normalization(ch), nn.SiLU(), zero_module(conv_nd(dims, model_channels, out_channels, 3, padding=1)))
        # DeepCache (ldm.modules.diffusionmodules.deep_cache.DeepCache), set for a run by microbatch.step_savings;
        # None: every call runs the whole UNet.
        self.deep_cache = None

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: Optional[torch.Tensor] = None, y: Optional[torch.Tensor] = None, **kwargs
    ) -> torch.Tensor:
        """x [B, in_channels, h, w], timesteps [B] (may be fractional), context [B, M, context_dim]; y [B,
        adm_in_channels] exactly when the UNet has a label embedding (SDXL)."""
        dtype = self.dtype
        if (y is not None) != (self.num_classes is not None):
            raise ValueError(
                f"the conditioning vector y must be given exactly when the UNet has a label embedding "
                f"(num_classes {self.num_classes!r}); got y {None if y is None else tuple(y.shape)}"
            )
        if y is None and _distinct_on_host(timesteps):
            distinct, index = torch.unique(timesteps, return_inverse=True)
            embed = lambda t: self.time_embed(timestep_embedding(t, self.model_channels).to(dtype))  # noqa: E731
            emb = TimeEmbedding(rowwise(embed, distinct), index)
        elif y is None:
            rows = [self.time_embed(timestep_embedding(timesteps[i : i + 1], self.model_channels).to(dtype)) for i in range(timesteps.shape[0])]
            emb = TimeEmbedding(torch.cat(rows), None)
        else:
            emb = self._time_and_label_embedding(timesteps, y, dtype)
        if context is not None:
            context = context.to(dtype)
        h = x.to(dtype)
        cache = self.deep_cache
        cached = None if cache is None else cache.lookup(x, context, y)
        if cached is not None:
            return self._forward_shallow(h, emb, context, cached, cache.shallow_blocks).to(x.dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        first_shallow = len(self.output_blocks) - (0 if cache is None else cache.shallow_blocks)
        for j, block in enumerate(self.output_blocks):
            if j == first_shallow:
                cache.store(h)
            parts, h = [h, skips.pop()], None  # the block owns h and the skip from here (see TimestepEmbedSequential)
            h = block(parts, emb, context)
        return self.out(h).to(x.dtype)

    def _forward_shallow(self, h: torch.Tensor, emb: "torch.Tensor | TimeEmbedding", context: Optional[torch.Tensor], deep: torch.Tensor, m: int) -> torch.Tensor:
        """DeepCache's cheap call: the first m input blocks, then the last m output blocks with the cached deep
        feature [B, C, h', w'] in place of what the skipped blocks would have given (see deep_cache.py)."""
        if not 0 < m < len(self.input_blocks):
            raise ValueError(f"DeepCache branch {m - 1} does not exist: the UNet has {len(self.input_blocks)} input blocks")
        skips = []
        for block in self.input_blocks[:m]:
            h = block(h, emb, context)
            skips.append(h)
        h = deep
        for block in self.output_blocks[len(self.output_blocks) - m :]:
            parts, h = [h, skips.pop()], None
            h = block(parts, emb, context)
        return self.out(h)

    def _time_and_label_embedding(self, timesteps: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> TimeEmbedding:
        """time_embed(t) + label_emb(y), computed once per distinct (t, y) row: [U, C] and the index [B]."""
        if y.dim() != 2 or y.shape[0] != timesteps.shape[0] or y.shape[1] != self.adm_in_channels:
            raise ValueError(f"y must be [B={timesteps.shape[0]}, {self.adm_in_channels}], got {tuple(y.shape)}")
        rows = torch.cat([timesteps[:, None].to(torch.float64), y.to(torch.float64)], dim=1)
        if not _distinct_on_host(rows):
            per_row = [
                self.time_embed(timestep_embedding(rows[i : i + 1, 0], self.model_channels).to(dtype)) + self.label_emb(rows[i : i + 1, 1:].to(dtype))
                for i in range(rows.shape[0])
            ]
            return TimeEmbedding(torch.cat(per_row), None)
        distinct, index = torch.unique(rows, dim=0, return_inverse=True)

        def embed(row: torch.Tensor) -> torch.Tensor:
            t, y = row[:, 0], row[:, 1:]
            return self.time_embed(timestep_embedding(t, self.model_channels).to(dtype)) + self.label_emb(y.to(dtype))

        return TimeEmbedding(rowwise(embed, distinct), index)
