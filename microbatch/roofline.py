"""How far a model call is from what the machine allows, and where its time goes.

- `unet_shapes` lists the convolutions and GEMMs a UNet runs at a resolution (from its config), and
  `measure_rates` times each of them alone: the achieved FLOP/s of the machine's own kernels on the UNet's own
  shapes. The best of them is the *attainable rate* (per dtype): a model call can not run faster than its FLOPs at
  that rate, and `FLOPs / time / attainable` is the fraction of the machine a call reaches.
- `count_flops` counts a call's FLOPs from its shapes (torch.utils.flop_counter on the meta device: nothing is
  computed), convolutions, linears and attention included, as multiply-adds x 2.
- `time_breakdown` sorts a profiled call's operator self-times into convolutions, GEMMs, attention, norms,
  element-wise work, copies and the rest (`categorize`).

Used by `scripts/benchmark.py --kinds roofline,profile`; see docs/benchmark.md for the figures.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch


@dataclass(frozen=True)
class OpShape:
    """One kernel to time: a 3x3 convolution [rows, c, side, side] -> [rows, c, side, side], or a GEMM [m, k] x [k, n]."""

    kind: str  # "conv3x3" or "gemm"
    what: str  # where the UNet runs it
    m: int  # conv: rows; gemm: tokens
    k: int  # conv: channels in; gemm: inner dimension
    n: int  # conv: channels out; gemm: output features
    side: int = 0  # conv only

    @property
    def flops(self) -> int:
        if self.kind == "conv3x3":
            return 2 * self.m * self.side * self.side * self.k * self.n * 9
        return 2 * self.m * self.k * self.n

    def label(self) -> str:
        if self.kind == "conv3x3":
            return f"conv3x3 {self.m}x{self.k}x{self.side}x{self.side} -> {self.n}"
        return f"gemm [{self.m}, {self.k}] x [{self.k}, {self.n}]"


def unet_shapes(model_channels: int, channel_mult: list[int], latent_side: int, rows: int, context_dim: Optional[int] = 768) -> list[OpShape]:
    """The UNet's dominant kernels at a latent side (e.g. 64 for 512x512) for `rows` rows (2 per guided image):
    per level, the 3x3 convolution of its width and, for its tokens, the attention projection (d x d), the
    GEGLU feed-forward's input (d x 8d) and output (4d x d) GEMMs and the cross-attention key projection."""
    shapes = []
    for level, mult in enumerate(channel_mult):
        c, side = model_channels * mult, latent_side // 2**level
        if side < 1:
            break
        tokens = rows * side * side
        shapes.append(OpShape("conv3x3", f"ResBlock conv, level {level}", rows, c, c, side))
        shapes.append(OpShape("gemm", f"attention q/k/v/out projection, level {level} ({side * side} tokens)", tokens, c, c))
        shapes.append(OpShape("gemm", f"feed-forward in (GEGLU), level {level}", tokens, c, 8 * c))
        shapes.append(OpShape("gemm", f"feed-forward out, level {level}", tokens, 4 * c, c))
        if context_dim:
            shapes.append(OpShape("gemm", f"cross-attention k/v projection, level {level}", rows * 77, context_dim, c))
    deepest = latent_side // 2 ** (len(channel_mult) - 1)
    c = model_channels * channel_mult[-1]
    if deepest >= 2:
        shapes.append(OpShape("conv3x3", "middle block conv", rows, c, c, max(1, deepest)))
    return shapes


def _best_time(fn: Callable[[], Any], sync: Callable[[], None], min_repeats: int = 3, min_seconds: float = 0.3) -> float:
    """The fastest of at least `min_repeats` calls (and at least `min_seconds` in all) after one warm-up call: on
    a shared machine the minimum is the estimate of what the hardware does when nothing interferes."""
    fn()
    sync()
    best, spent, n = float("inf"), 0.0, 0
    while n < min_repeats or spent < min_seconds:
        start = time.perf_counter()
        fn()
        sync()
        elapsed = time.perf_counter() - start
        best, spent, n = min(best, elapsed), spent + elapsed, n + 1
        if n >= 50:
            break
    return best


def measure_rates(shapes: list[OpShape], dtype: torch.dtype, device: torch.device, layouts: tuple[str, ...] = ("contiguous", "channels_last")) -> list[dict]:
    """Time every shape alone (convolutions in each memory layout): one dict per (shape, layout) with seconds and
    GFLOP/s (float, best of several calls)."""
    device = torch.device(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    g = torch.Generator().manual_seed(0)
    results = []
    with torch.no_grad():
        for shape in shapes:
            if shape.kind == "conv3x3":
                conv = torch.nn.Conv2d(shape.k, shape.n, 3, padding=1).to(device, dtype).eval()
                x = torch.randn(shape.m, shape.k, shape.side, shape.side, generator=g).to(device, dtype)
                for layout in layouts:
                    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
                    conv_l, x_l = conv.to(memory_format=fmt), x.contiguous(memory_format=fmt)
                    seconds = _best_time(lambda: conv_l(x_l), sync)
                    results.append(_rate(shape, layout, dtype, seconds))
            else:
                a = torch.randn(shape.m, shape.k, generator=g).to(device, dtype)
                w = torch.randn(shape.n, shape.k, generator=g).to(device, dtype)
                b = torch.randn(shape.n, generator=g).to(device, dtype)
                seconds = _best_time(lambda: torch.nn.functional.linear(a, w, b), sync)
                results.append(_rate(shape, "", dtype, seconds))
    return results


def _rate(shape: OpShape, layout: str, dtype: torch.dtype, seconds: float) -> dict:
    return {
        "op": shape.kind, "shape": shape.label(), "what": shape.what, "layout": layout, "dtype": str(dtype).replace("torch.", ""),
        "gflop": round(shape.flops / 1e9, 3), "seconds": round(seconds, 6), "gflops_per_s": round(shape.flops / seconds / 1e9, 2),
    }


def count_flops(fn: Callable[[], Any]) -> dict[str, int]:
    """FLOPs of `fn()` by operator (torch.utils.flop_counter: matrix products, convolutions and attention kernels,
    2 per multiply-add), run under the counter. Give it meta tensors to count without computing."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fn()
    return {str(op).split(".")[-1] if not isinstance(op, str) else op: int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}


# -- where the time goes ------------------------------------------------------------------------------------------

CATEGORIES = ("convolution", "GEMM", "attention", "norms", "element-wise", "copies", "other")


def categorize(op: str) -> str:
    """The category of a profiled aten operator name (e.g. "aten::mkldnn_convolution")."""
    name = op.split("::")[-1].lower()
    if "conv" in name:
        return "convolution"
    if "attention" in name or name in ("_softmax", "softmax", "_safe_softmax"):
        return "attention"
    if name in ("addmm", "mm", "bmm", "baddbmm", "matmul", "linear", "addbmm", "_addmm_activation") or "gemm" in name or "linear" in name:
        return "GEMM"
    if "norm" in name:
        return "norms"
    if name in ("copy_", "clone", "contiguous", "cat", "_to_copy", "to", "stack", "index", "index_select", "repeat", "expand_as", "_unsafe_view",
                "reshape", "upsample_nearest2d", "_upsample_nearest_exact2d", "constant_pad_nd", "pad", "fill_", "zero_", "empty_like") or "upsample" in name:
        return "copies"
    if name in ("add", "add_", "mul", "mul_", "sub", "div", "div_", "silu", "silu_", "gelu", "sigmoid", "exp", "sin", "cos", "neg", "rsub",
                "tanh", "pow", "sqrt", "rsqrt", "where", "clamp", "chunk_cat", "addcmul", "lerp", "mean", "sum", "erf", "relu"):
        return "element-wise"
    return "other"


def time_breakdown(prof: Any, device: torch.device) -> dict[str, float]:
    """Seconds of operator self-time by category from a finished torch.profiler.profile (CPU self-time, or
    device self-time on CUDA). Views and dispatch wrappers have ~0 self-time, so nothing is counted twice."""
    out = {c: 0.0 for c in CATEGORIES}
    for event in prof.key_averages():
        if device.type == "cuda":
            us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        else:
            us = event.self_cpu_time_total
        if event.key.startswith("aten::") or device.type == "cuda":
            out[categorize(event.key)] += us / 1e6
    return out
