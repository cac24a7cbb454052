"""Schedule helpers and small building blocks shared by the UNet (inference only).

Names follow the original `ldm.modules.diffusionmodules.util` so that third-party code importing them keeps working.
"""
from __future__ import annotations

import math
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def make_beta_schedule(
    schedule: str, n_timestep: int, linear_start: float = 1e-4, linear_end: float = 2e-2, cosine_s: float = 8e-3
) -> np.ndarray:
    """Betas of the forward process, float64 [n_timestep].

    "linear" is the Stable Diffusion schedule (diffusers calls it "scaled_linear"): betas are the squares of
    values spaced linearly between sqrt(linear_start) and sqrt(linear_end).
    """
    if schedule == "linear":
        betas = torch.linspace(linear_start**0.5, linear_end**0.5, n_timestep, dtype=torch.float64, device="cpu") ** 2
    elif schedule == "cosine":
        steps = torch.arange(n_timestep + 1, dtype=torch.float64, device="cpu") / n_timestep + cosine_s
        alphas = torch.cos(steps / (1 + cosine_s) * math.pi / 2).pow(2)
        alphas = alphas / alphas[0]
        betas = (1 - alphas[1:] / alphas[:-1]).clamp(0, 0.999)
    elif schedule == "sqrt_linear":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64, device="cpu")
    elif schedule == "sqrt":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64, device="cpu") ** 0.5
    else:
        raise ValueError(f"unknown beta schedule {schedule!r}; expected linear, cosine, sqrt_linear or sqrt")
    return betas.numpy()


def make_ddim_timesteps(
    ddim_discr_method: Literal["uniform", "quad"], num_ddim_timesteps: int, num_ddpm_timesteps: int, verbose: bool = False
) -> np.ndarray:
    """The CompVis DDIM/PLMS grid of DDPM timesteps, ascending.

    "uniform" is `range(0, T, T // S) + 1`, so its length can exceed S (S = 30 gives 31 steps), exactly as the
    original. The original can also produce timestep T (out of range) when (T - 1) is divisible by the stride
    (S = 27, 110 or above T / 2); we clamp that last step to T - 1 and drop a duplicate, which is what the sampler
    must do to run at all.
    """
    if num_ddim_timesteps < 1:
        raise ValueError(f"number of sampling steps must be positive, got {num_ddim_timesteps}")
    if ddim_discr_method == "uniform":
        c = max(num_ddpm_timesteps // num_ddim_timesteps, 1)
        steps = np.asarray(list(range(0, num_ddpm_timesteps, c))) + 1
    elif ddim_discr_method == "quad":
        steps = ((np.linspace(0, np.sqrt(num_ddpm_timesteps * 0.8), num_ddim_timesteps)) ** 2).astype(int) + 1
    else:
        raise ValueError(f"unknown DDIM discretization {ddim_discr_method!r}; expected uniform or quad")
    steps = np.minimum(steps, num_ddpm_timesteps - 1)
    return np.unique(steps)


def make_ddim_sampling_parameters(
    alphacums: np.ndarray, ddim_timesteps: np.ndarray, eta: float, verbose: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sigmas, alphas, alphas_prev) of the DDIM update at the given timesteps; the first "prev" is alphacums[0]."""
    alphas = alphacums[ddim_timesteps]
    alphas_prev = np.asarray([alphacums[0]] + alphacums[ddim_timesteps[:-1]].tolist())
    sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    return sigmas, alphas, alphas_prev


def extract_into_tensor(a: torch.Tensor, t: torch.Tensor, x_shape: tuple[int, ...]) -> torch.Tensor:
    """a[t] reshaped to broadcast against a tensor of shape x_shape: [B, 1, 1, ...]."""
    out = a.gather(-1, t)
    return out.reshape(t.shape[0], *((1,) * (len(x_shape) - 1)))


def noise_like(shape: tuple[int, ...], device: torch.device, repeat: bool = False) -> torch.Tensor:
    if repeat:
        return torch.randn((1, *shape[1:]), device=device).repeat(shape[0], *((1,) * (len(shape) - 1)))
    return torch.randn(shape, device=device)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000, repeat_only: bool = False) -> torch.Tensor:
    """Sinusoidal embedding [B, dim] of (possibly fractional) timesteps [B]; the cosine half comes first.

    Computed in float32 whatever the model's dtype: t * freq reaches 1000 and fp16 would lose the phase.
    """
    if repeat_only:
        return timesteps[:, None].float().expand(-1, dim)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32: half-precision variance over large groups under- and overflows.

    On the CPU a half-precision input is upcast a block of whole groups at a time (every row), each block's float32
    result written into the half-precision output, so the float32 copies stay under `upcast_bytes` instead of two
    float32 copies of the whole input: SDXL's largest norm input at 1024x1024, [2, 960, 128, 128], needed 2 x 126 MB
    on top of its bf16 output, which was the peak of the whole UNet call (380 MB above the weights against 325 MB
    with blocks; tests/test_benchmark_sdxl.py). Statistics are per image and group, so the result is bit-identical
    to upcasting the whole input (tested for NCHW and channels-last inputs, fp16 and bf16, 1 to 4 threads).
    """

    upcast_bytes = 16 * 2**20

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        groups, dtype = self.num_groups, x.dtype
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        step = max(1, self.upcast_bytes // max(1, x.numel() // groups * 4))  # groups per block
        if step >= groups or x.device.type != "cpu" or x.dim() < 2:
            return nn.functional.group_norm(x.float(), groups, weight, bias, self.eps).to(dtype)
        out = torch.empty_like(x)
        width = x.shape[1] // groups
        for g in range(0, groups, step):
            c0, c1 = g * width, min(groups, g + step) * width
            out[:, c0:c1] = nn.functional.group_norm(
                x[:, c0:c1].float(), (c1 - c0) // width, None if weight is None else weight[c0:c1],
                None if bias is None else bias[c0:c1], self.eps,
            )
        return out


def normalization(channels: int) -> nn.Module:
    return GroupNorm32(32, channels)


def zero_module(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)  # through nn.init, so that building for a checkpoint load can skip it
    return module


class RowwiseConv2d(nn.Conv2d):
    """nn.Conv2d that, without gradients, convolves one batch row at a time, so an image's result never depends
    on its batch.

    The CPU (oneDNN) and GPU (cuDNN) libraries choose the convolution algorithm from the whole input shape, batch
    size and thread count included, and different algorithms sum in different orders: measured on the demo model
    in float32 on the CPU, a micro-batch of 8 images (16 UNet rows) differed from one image by up to 2e-6 in every
    conv output and by one level in saved pixels. With one row per call every image sees the same algorithm
    whatever the micro-batch (GroupNorm and attention were measured row-independent; the GEMMs are not at full
    size, see `RowwiseLinear`). Weights and checkpoint keys are those of nn.Conv2d. At full size one call per row
    paid oneDNN's weight reorder once per row, most of it at the deep levels' 1280-channel layers; those rows, and
    pointwise kernels, now run as matrix products (`_as_gemm`), faster there than even the batched convolution:
    on the v1 UNet at 512x512 (float32, 2 threads, 5 interleaved calls, median of the last 4) a guided call took
    6.80 s against 7.76 s with one-row convolutions everywhere and 6.86 s for diffusers' batched UNet (see
    docs/benchmark.md). A channels-last row is copied to NCHW first where that is cheaper than the weight copy
    PyTorch would otherwise make (`_rows_to_plain_layout`). Cost measured on the demo model before the products
    (CPU, 1 thread, 20 DDIM steps): at its
    8x8 latents, where per-call overhead dominates, 0.292 -> 0.354 s per image at micro-batch 1 (2 rows), 0.184 ->
    0.257 at 4 and 0.165 -> 0.238 at 8 (+21%, +40%, +44%); the demo UNet at 32x32 latents: 5-10%, where
    batching gained nothing to begin with. Only on the CPU: on a GPU one launch per row would give up most of what
    micro-batching gains, so there the batched kernel runs (results may then differ in the last bits by batch).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Training (gradients on) keeps the batched kernel: only inference results must not depend on the batch.
        # Under torch.compile (--compile) the rows run as here too: Inductor calls the same oneDNN convolution
        # with its per-call weight reorder, and the compiled v1 UNet at 512x512 (float32, 2 threads) took 7.50 s
        # per guided call with batched convolutions and products against 6.66 s with these (diffusers eager:
        # 7.20 and 6.95 s in the same two runs).
        if x.dim() != 4 or x.shape[0] == 0 or torch.is_grad_enabled() or x.device.type != "cpu":
            return super().forward(x)
        # every row has the same shape, so one decision holds for all of them
        gemm, plain = self._as_gemm(x[:1]), self._rows_to_plain_layout(x)
        first = self._row(x[:1], gemm, plain)
        if x.shape[0] == 1:
            return first
        # keep the layout the convolution chose (NHWC with --channels_last), so that no copy converts it back
        fmt = torch.channels_last if _channels_last(first) else torch.contiguous_format
        out = torch.empty((x.shape[0], *first.shape[1:]), dtype=first.dtype, device=first.device, memory_format=fmt)
        out[:1] = first
        for i in range(1, x.shape[0]):
            out[i : i + 1] = self._row(x[i : i + 1], gemm, plain)
        return out

    def _row(self, row: torch.Tensor, gemm: bool, plain: bool) -> torch.Tensor:
        if gemm:
            return self._gemm_row(row)
        return super().forward(row.contiguous() if plain else row)

    def _as_gemm(self, row: torch.Tensor) -> bool:
        """Whether one row is convolved as a matrix product (a pointwise convolution's, or the im2col product of a
        large kernel at a small size) instead of oneDNN's convolution. oneDNN brings the weight to its blocked
        layout in every call; for the 1280-channel 3x3 kernels (59 MB and more in float32) at the deep levels' 8x8
        and 16x16 latents that costs more than the arithmetic. Measured for one row (2 threads, convolution against
        product): float32 21.6 / 8.3 ms at 8x8, 39.2 / 26.7 at 16x16, 77.0 / 52.9 for 2560 -> 1280 at 16x16, 67.0 /
        56.3 at 24x24, 99.9 / 110.9 at 32x32; bfloat16 4.3 / 1.7, 7.5 / 5.9, 27.5 / 11.7, and 12.5 / 22.2 at 24x24;
        640 channels (3.7 M weights) 6.6 / 6.6 at 16x16. Pointwise kernels are products anyway (1920 -> 640 at
        32x32: 8.5 / 7.7 ms float32, 2.4 / 1.3 bfloat16). Decided from the row's shape and dtype and the weight,
        never from the batch."""
        if self.groups != 1 or self.padding_mode != "zeros" or isinstance(self.padding, str):
            return False
        if row.dtype not in (torch.float32, torch.bfloat16):
            return False
        if self._pointwise():
            return True
        ho, wo = self._out_size(row.shape[2], row.shape[3])
        pixels = 576 if row.dtype == torch.float32 else 256
        return self.weight.is_contiguous() and ho * wo <= pixels and self.weight.numel() >= 8 * 2**20

    def _pointwise(self) -> bool:
        return self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)

    def _out_size(self, h: int, w: int) -> tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1

    def _gemm_row(self, row: torch.Tensor) -> torch.Tensor:
        """One row [1, C, H, W] as a matrix product: pointwise kernels multiply the pixels in the layout they come
        in (a channels-last row gives a channels-last result), others through `unfold` (im2col)."""
        out_channels, (_, c, h, w) = self.out_channels, row.shape
        weight = self.weight.reshape(out_channels, -1)  # a view unless a non-pointwise weight is channels-last
        if self._pointwise():
            if _channels_last(row):
                pixels = row.permute(0, 2, 3, 1).reshape(h * w, c)
                out = torch.mm(pixels, weight.t()) if self.bias is None else torch.addmm(self.bias, pixels, weight.t())
                return out.view(1, h, w, out_channels).permute(0, 3, 1, 2)
            cols = row.reshape(c, h * w)
        else:
            cols = torch.nn.functional.unfold(row.contiguous(), self.kernel_size, self.dilation, self.padding, self.stride)[0]
        out = torch.mm(weight, cols) if self.bias is None else torch.addmm(self.bias[:, None], weight, cols)
        return out.view(1, out_channels, *self._out_size(h, w))

    def _rows_to_plain_layout(self, x: torch.Tensor) -> bool:
        """Whether each row is copied to the plain (NCHW) layout before its convolution: when the input is
        channels-last (the transformers' output is a permuted view) and the weight is not, and a row is smaller
        than the weight. PyTorch otherwise brings the weight to the input's layout, a copy of the whole weight in
        every call: measured on the full-size SDXL UNet at 512x512 (float32), each one-row call of a deep
        2560 -> 1280 convolution copied its 112.5 MB weight, which made the UNet call's peak 106 MB above diffusers'
        (which keeps NCHW throughout). Decided from one row's size, never from the batch, so every batch computes
        a row the same way."""
        return _channels_last(x) and self.weight.is_contiguous() and x[:1].numel() < self.weight.numel()


def _channels_last(t: torch.Tensor) -> bool:
    """Whether a 4-d tensor is laid out channels-last (NHWC) and not also plain NCHW."""
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A convolution layer; 2-d ones are `RowwiseConv2d` (batch-invariant results)."""
    if dims == 1:
        return nn.Conv1d(*args, **kwargs)
    if dims == 2:
        return RowwiseConv2d(*args, **kwargs)
    if dims == 3:
        return nn.Conv3d(*args, **kwargs)
    raise ValueError(f"unsupported dimensions: {dims}")


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    if dims == 1:
        return nn.AvgPool1d(*args, **kwargs)
    if dims == 2:
        return nn.AvgPool2d(*args, **kwargs)
    if dims == 3:
        return nn.AvgPool3d(*args, **kwargs)
    raise ValueError(f"unsupported dimensions: {dims}")


class RowwiseLinear(nn.Linear):
    """nn.Linear that, without gradients, multiplies one image's rows at a time, so an image's result never depends
    on its batch (the counterpart of `RowwiseConv2d` for the products of the transformer and embedding layers).

    The BLAS picks its GEMM kernel and blocking by the row count M of the product, and different kernels sum in
    different orders. On 2-d inputs [U, C] (the time and label MLPs, which see the distinct rows of a batch) every
    row is its own product, on every device: measured on the tiny SDXL base (CPU, float32), a [6, 72] label MLP
    differed from its rows one at a time by up to 1.5e-7. On inputs [B, N, C] (the transformers' projections and
    feed-forward layers), on the CPU, each image's [N, C] is its own product: measured on the full-size v1 UNet at
    512x512 (CPU, float32, 2 threads), the feed-forward output of input block 7 (M = 512 rows for one guided image,
    1024 for two) differed by 2.2e-8, and the UNet's output for an image by 3.4e-8, between micro-batch 1 and 2. With
    one image per product every image sees the same kernel whatever its micro-batch. On a GPU the batched product
    runs (one launch per image would give up what batching gains). Keys are nn.Linear's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rowwise_linear(x, self.weight, self.bias)


def rowwise_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """`F.linear(x, weight, bias)` as `RowwiseLinear` computes it (see there): one product per distinct row or
    image, without gradients. `weight` may be a slice of a layer's weight (GEGLU's two halves)."""
    if torch.is_grad_enabled() or x.dim() < 2:
        return F.linear(x, weight, bias)
    if x.dim() == 2:
        if x.shape[0] <= 1:
            return F.linear(x, weight, bias)
        return torch.cat([F.linear(x[i : i + 1], weight, bias) for i in range(x.shape[0])])
    if x.device.type != "cpu":
        return F.linear(x, weight, bias)
    # One 2-d product per image, a batch of one included (a 3-d input may take another path inside F.linear),
    # written in place: the same addmm / mm F.linear makes of a 2-d input, without a copy of each result.
    out_features = weight.shape[0]
    out = torch.empty((*x.shape[:-1], out_features), dtype=x.dtype, device=x.device)
    weight_t = weight.t()
    for i in range(x.shape[0]):
        rows, dest = x[i].reshape(-1, x.shape[-1]), out[i].view(-1, out_features)
        if bias is None:
            torch.mm(rows, weight_t, out=dest)
        else:
            torch.addmm(bias, rows, weight_t, out=dest)
    return out


def linear(*args, **kwargs) -> nn.Module:
    """A linear layer: `RowwiseLinear` (batch-invariant results)."""
    return RowwiseLinear(*args, **kwargs)
