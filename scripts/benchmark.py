"""Benchmark: time and peak memory of our UNet, engine and VAE, side by side with diffusers on the same weights.

Case kinds (every case runs in its own subprocess, so each peak is that case's alone):
- unet: one guided UNet call (batch [uncond, cond] x images) at a resolution, ours and diffusers'
  UNet2DConditionModel built from the same weights in the same process, timed alternately (ABBA) so that a
  shared machine's drift hits both; the ratio is the median of the per-pair ratios.
- generate: a whole run through our Engine (n_samples images in micro-batches of max_batch_size, steps): time to
  first image, time per image, peak. Its peer is diffusers' StableDiffusionPipeline on the same weights, fed the
  same text embeddings, called once per micro-batch.
- vae: one image's VAE decode at a resolution, whole or tiled (microbatch.vae_tiling), and diffusers' AutoencoderKL
  whole or with its tiling set to the same tile and overlap; tiled rows report their difference from the whole
  decode.

Weights: --ckpt (+ --config), or random weights for a config (default: the full-size SD v1 config) built on the
meta device and filled deterministically (same seed, same weights in every subprocess).

Peak memory (see microbatch.memory.PeakMemory) is the implementation's weights plus what its run allocated above
the start at the peak: CUDA: torch.cuda.max_memory_allocated; CPU: the CPU allocator's peak from the profiler's
memory events. rss_peak_mb is the process's peak resident set (ru_maxrss), only for cases that hold one
implementation.

    python scripts/benchmark.py --cases quick --out bench/
    python scripts/benchmark.py --config configs/tiny/tiny-v1.yaml --random --cases quick --out /tmp/b
    python scripts/benchmark.py --ckpt sd-v1-5.safetensors --device cuda --cases full --out bench-h100/
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import os
import math
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
V1_CONFIG = REPO / "configs" / "stable-diffusion" / "v1-inference.yaml"
SDXL_CONFIG = REPO / "configs" / "sdxl" / "sd_xl_base.yaml"
PROMPT = "a photograph of an astronaut riding a horse"

COLUMNS = [
    "kind", "impl", "status", "device", "device_name", "resolution", "batch", "rows", "n_samples", "max_batch_size",
    "steps", "attention", "precision", "offload", "vae_mode", "tile", "overlap", "repeats", "time_s", "time_min_s",
    "time_per_image_s", "first_image_s", "timing", "time_ratio_vs_diffusers", "peak_mb", "transient_mb", "weights_mb",
    "rss_peak_mb", "memory_kind", "attn_peak_mb", "score_peak_mb", "score_block_mb", "max_abs_diff", "mean_abs_diff", "diff_vs",
    "threads", "torch", "diffusers", "seconds_in_case", "error",
    # --compile, --channels_last, roofline and profile cases
    "compile", "channels_last", "compile_s", "first_call_s", "first_image_cold_s", "time_ratio_vs_diffusers_compiled",
    "gflop", "gflops_per_s", "attainable_gflops_per_s", "fraction_of_limit", "op", "shape", "layout",
    # lora cases (time_s: one application; first_call_s: the first)
    "network", "layers", "values_m", "originals_mb", "file_mb", "remove_s", "restored",
]
PRECISIONS = ("fp32", "fp16", "bf16", "autocast")
KINDS = ("unet", "generate", "vae", "roofline", "profile", "lora")
ATTENTIONS = ("sdpa", "math", "sliced")


@dataclass
class Case:
    """One subprocess: `impl` is "ours", "diffusers", or "both" (unet kind: both, timed alternately)."""

    kind: str
    impl: str = "ours"
    resolution: int = 512
    batch: int = 1
    n_samples: int = 1
    max_batch_size: int = 1
    steps: int = 1
    attention: str = "sdpa"
    precision: str = "fp32"
    offload: str = "none"
    vae_mode: str = ""  # vae: whole, tiled or both (one after the other, in this order)
    tile: int = 0
    overlap: int = 0
    compile: bool = False  # unet / vae: compiled variants beside the eager ones; generate: both sides compiled
    channels_last: bool = False  # weights and inputs in NHWC order (both implementations)
    network: str = ""  # lora: the network kind merged (lora or locon)


@dataclass
class Context:
    """What every case shares: the weights' source, the device and the timing protocol."""

    ckpt: Optional[str]
    config: Optional[str]  # None with a checkpoint: the loader's choice, filled in by build_model
    device: str
    repeats: int
    warmup: int
    threads: Optional[int]
    seed: int = 0
    # GFLOP/s the machine attains per precision name, from a roofline case of the same run (see microbatch.roofline)
    attainable: Optional[dict] = None


# -- weights -----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def params_on_meta():
    """Construct modules with their parameters on the meta device (nothing allocated, no init), buffers real."""
    import torch
    from torch import nn

    real = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: Optional[nn.Parameter]) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=False)
        real(self, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = real


def fill_random_(module: Any, seed: int = 0, gain: float = 0.5, dtype: Any = None) -> Any:
    """Materialise meta parameters with deterministic random values: matrices and kernels N(0, gain^2 / fan_in)
    (activations keep their scale through the residual stacks), norm scales 1, biases N(0, 0.02^2). Drawn in
    float32, then stored as `dtype` one parameter at a time (default float32)."""
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    for owner in module.modules():
        for name, p in list(owner._parameters.items()):
            if p is None:
                continue
            t = torch.empty(p.shape, dtype=torch.float32)
            if p.dim() >= 2:
                t.normal_(0.0, gain / math.sqrt(max(1, p[0].numel())), generator=g)
            elif name.endswith("weight"):
                t.fill_(1.0)
            else:
                t.normal_(0.0, 0.02, generator=g)
            owner._parameters[name] = nn.Parameter(t if dtype is None else t.to(dtype), requires_grad=False)
    return module


def _config(ctx: Context) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.load(ctx.config)


def build_model(ctx: Context, part: str = "all", dtype: Any = None) -> Any:
    """The LatentDiffusion (part "all"), or only its UNet ("unet") or VAE ("vae"), on the CPU in `dtype` (random
    weights; default float32) or float32 (a checkpoint)."""
    import torch

    from ldm.util import instantiate_from_config

    if ctx.ckpt:
        from microbatch.devices import Dtypes
        from microbatch.loading import load_model

        f32 = Dtypes(torch.float32, torch.float32, torch.float32)
        loaded = load_model(Path(ctx.ckpt), Path(ctx.config) if ctx.config else None, torch.device("cpu"), f32)
        ctx.config = str(loaded.config_path)
        model = loaded.model
        return {"all": model, "unet": model.model.diffusion_model, "vae": model.first_stage_model}[part]
    cfg = _config(ctx).model
    target = cfg if part == "all" else cfg.params.get("unet_config" if part == "unet" else "first_stage_config")
    with params_on_meta():
        module = instantiate_from_config(target)
    return fill_random_(module, ctx.seed, dtype=dtype).requires_grad_(False).eval()


def vae_wrapper(vae: Any, scale_factor: float) -> Any:
    """The part of LatentDiffusion that vae_tiling uses: first_stage_model and the scaled decode / encode."""
    from torch import nn

    class _VaeOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first_stage_model = vae
            self.scale_factor = scale_factor

        def decode_first_stage(self, z: Any) -> Any:
            return self.first_stage_model.decode(z / self.scale_factor)

        def encode_first_stage(self, x: Any) -> Any:
            return self.first_stage_model.encode(x)

    return _VaeOnly()


def _ldm_state_dict(module: Any, prefix: str) -> dict:
    return {prefix + k: v for k, v in module.state_dict().items()}


def diffusers_unet(ctx: Context, unet: Any) -> Any:
    """diffusers' UNet2DConditionModel holding the same weights as our UNet (converted, not copied)."""
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from omegaconf import OmegaConf

    container = OmegaConf.to_container(_config(ctx), resolve=True)
    sd = _ldm_state_dict(unet, "model.diffusion_model.")
    cfg = sfu.create_unet_diffusers_config_from_ldm(container, sd)
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**cfg)
    theirs.load_state_dict(sfu.convert_ldm_unet_checkpoint(sd, cfg), strict=True, assign=True)
    return theirs.requires_grad_(False).eval()


def diffusers_vae(ctx: Context, vae: Any) -> Any:
    import torch
    from diffusers import AutoencoderKL
    from diffusers.loaders import single_file_utils as sfu
    from omegaconf import OmegaConf

    container = OmegaConf.to_container(_config(ctx), resolve=True)
    sd = _ldm_state_dict(vae, "first_stage_model.")
    cfg = sfu.create_vae_diffusers_config_from_ldm(container, sd)
    with torch.device("meta"):
        theirs = AutoencoderKL(**cfg)
    theirs.load_state_dict(sfu.convert_ldm_vae_checkpoint(sd, cfg), strict=True, assign=True)
    return theirs.requires_grad_(False).eval()


def set_diffusers_attention(module: Any, name: str) -> None:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if name == "sdpa":
        module.set_attn_processor(AttnProcessor2_0())
    elif name == "math":
        module.set_attn_processor(AttnProcessor())
    elif name == "sliced":
        module.set_attention_slice("auto")
    else:
        raise ValueError(f"unknown attention {name!r}")


def dtype_of(precision: str, device: Any) -> Any:
    """The UNet's dtype for a precision name (autocast: our default choice for the device)."""
    import torch

    from microbatch.devices import choose_dtypes

    if precision == "autocast":
        return choose_dtypes("autocast", device).unet
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def dtypes_of(precision: str, device: Any) -> Any:
    """Per-component dtypes for a generation: the VAE stays float32 on the CPU (half convolutions are slow there)."""
    import torch

    from microbatch.devices import Dtypes, choose_dtypes

    if precision in ("autocast", "fp32"):
        return choose_dtypes("autocast" if precision == "autocast" else "full", device)
    half = dtype_of(precision, device)
    return Dtypes(half, half, half if device.type != "cpu" else torch.float32)


# -- measuring ---------------------------------------------------------------------------------------------------


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: Any) -> tuple[float, Any]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def rss_peak_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def module_bytes(module: Any) -> int:
    from microbatch.memory import tensor_bytes

    return tensor_bytes(module)


class AttentionProbe:
    """Measures the memory of attention inside a model call, by instrumenting the backend (not the process):

    - per backend call (q, k, v -> out, including the backend's own copies and its output) and
    - per score block (each `attention_math` call of the math and sliced backends: the float32 scores, the
      softmax probabilities and the block's output),
    as the most bytes allocated inside above what was allocated when the call began. On the CPU the calls are
    profiler ranges read back from PeakMemory's memory events; on CUDA each call resets the peak counter, so a
    probe runs in a pass of its own and measures one `level` ("call" or "scores"). `score_blocks` also records
    each block's float32 score size from its shapes.
    """

    CALL = "attention_backend"
    SCORES = "attention_scores"

    def __init__(self, model: Any, device: Any, level: str = "call"):
        self.model = model
        self.device = device
        self.level = level
        self.cuda_peaks: dict[str, list[int]] = {self.CALL: [], self.SCORES: []}
        self.score_blocks: list[int] = []
        self._saved: list[tuple[Any, Any]] = []

    def _measured(self, name: str, fn: Callable[[], Any]) -> Any:
        import torch

        if self.device.type != "cuda":
            with torch.profiler.record_function(name):
                return fn()
        if (name == self.CALL) != (self.level == "call"):
            return fn()
        torch.cuda.synchronize(self.device)
        start = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        out = fn()
        torch.cuda.synchronize(self.device)
        self.cuda_peaks[name].append(torch.cuda.max_memory_allocated(self.device) - start)
        return out

    def peaks(self, name: str, meter: Any) -> list[int]:
        return self.cuda_peaks[name] if self.device.type == "cuda" else (meter.peaks_within(name) or [])

    def __enter__(self) -> "AttentionProbe":
        import ldm.modules.attention_backends as ab

        real_math = ab.attention_math
        probe = self

        def spy(q: Any, k: Any, v: Any) -> Any:
            self.score_blocks.append(math.prod(q.shape[:-1]) * k.shape[-2] * 4)
            return self._measured(self.SCORES, lambda: real_math(q, k, v))

        class Probed:
            def __init__(self, backend: Any):
                self.backend = backend

            def __call__(self, q: Any, k: Any, v: Any) -> Any:
                return probe._measured(AttentionProbe.CALL, lambda: self.backend(q, k, v))

        self._real_math = real_math
        ab.attention_math = spy
        for module in self.model.modules():
            backend = getattr(module, "attention", None)
            if isinstance(backend, ab.AttentionBackend):
                self._saved.append((module, backend))
                module.attention = Probed(backend)
        return self

    def __exit__(self, *exc: Any) -> None:
        import ldm.modules.attention_backends as ab

        ab.attention_math = self._real_math
        for module, backend in self._saved:
            module.attention = backend


def _row(case: Case, ctx: Context, device: Any, impl: str, **values: Any) -> dict:
    import torch

    try:
        import diffusers

        dver = diffusers.__version__
    except ImportError:
        dver = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    row = {c: None for c in COLUMNS}
    row.update(asdict(case))
    row.update(
        impl=impl, status="ok", device=str(device), device_name=name, repeats=ctx.repeats, threads=torch.get_num_threads(),
        torch=torch.__version__, diffusers=dver,
    )
    row.update(values)
    return row


def _mb(nbytes: Optional[float]) -> Optional[float]:
    return None if nbytes is None else round(nbytes / 2**20, 2)


# -- case runners ------------------------------------------------------------------------------------------------


@dataclass
class Impl:
    """One implementation of a case: `run()` returns (output tensor or None, seconds to the first image or None)."""

    run: Callable[[], tuple[Any, Optional[float]]]
    weights: int
    warmup: Optional[Callable[[], Any]] = None
    probe: Optional[Callable[[], Any]] = None  # context manager around the measured run
    prepare: Optional[Callable[[], Any]] = None  # a first call before anything is measured (compiles), timed
    gflop: Optional[float] = None  # FLOPs of one run (counted from the shapes), for the fraction of the limit
    dtype: str = "float32"  # the dtype whose attainable rate is the limit


def measure(impls: dict[str, Impl], ctx: Context, device: Any) -> dict[str, dict]:
    """One measured run per implementation (peak memory; also the first warm-up), `ctx.warmup` untimed runs, then
    `repeats` timed rounds that alternate the order (ABBA), so that a shared machine's drift hits every
    implementation alike. The time ratio ours / diffusers is the median of the per-round ratios."""
    import torch

    from microbatch.memory import PeakMemory

    from microbatch.speedups import compile_seconds

    stats: dict[str, dict] = {name: {"times": [], "firsts": [], "ratios": {}} for name in impls}
    peers = [p for p in ("diffusers", "diffusers+compile") if p in impls]
    with torch.no_grad():
        for name, impl in impls.items():
            if impl.prepare is not None:  # compilation, before the memory and time measurements
                before = compile_seconds()
                stats[name]["first_call_s"], _ = timed(impl.prepare, device)
                stats[name]["compile_s"] = compile_seconds() - before
        for name, impl in impls.items():
            # On CUDA the probe resets the peak counter per call, so it gets a pass of its own.
            inline = impl.probe is not None and device.type != "cuda"
            probe = impl.probe() if inline else contextlib.nullcontext()
            with probe, PeakMemory(device, impl.weights) as meter:
                seconds, (out, first) = timed(impl.run, device)
            if impl.probe is not None and not inline:
                with impl.probe() as probe:
                    impl.run()
                with impl.probe() as scores:
                    scores.level = "scores"
                    impl.run()
                probe.cuda_peaks[AttentionProbe.SCORES] = scores.cuda_peaks[AttentionProbe.SCORES]
            stats[name].update(meter=meter, probe=probe, output=None if out is None else out.float().cpu(), measured=(seconds, first))
        # Warm-up after the measured run: the first call after a profiled one is slow (measured: 33 s instead of
        # 26 s for a 512x512 UNet call on 2 CPU cores), and the measured run has warmed the kernels already.
        for _ in range(ctx.warmup):
            for impl in impls.values():
                (impl.warmup or impl.run)()
        for r in range(ctx.repeats):
            order = list(impls) if r % 2 == 0 else list(impls)[::-1]
            pair = {}
            for name in order:
                pair[name], (_, first) = timed(impls[name].run, device)
                stats[name]["times"].append(pair[name])
                stats[name]["firsts"].append(first)
            for name in pair:
                for peer in peers:
                    if name != peer:
                        stats[name]["ratios"].setdefault(peer, []).append(pair[name] / pair[peer])
    for name, s in stats.items():
        s["timing"] = f"median of {len(s['times'])} timed runs"
        if not s["times"]:  # no timed rounds: the measured run's time
            s["times"], s["firsts"] = [s["measured"][0]], [s["measured"][1]]
            s["timing"] = "the measured run" + (" (under the CPU profiler: slower)" if device.type == "cpu" else "")
        s["ratio"] = {peer: statistics.median(r) for peer, r in s["ratios"].items()}
    return stats


def rows_from(
    case: Case, ctx: Context, device: Any, impls: dict[str, Impl], stats: dict[str, dict], per_image: int, rss: bool = True, **common: Any
) -> list[dict]:
    """Table rows of measured implementations. The process's peak RSS is reported only when it is the case's own
    (`rss` and a single implementation in the process)."""
    rows = []
    outputs = {name: s["output"] for name, s in stats.items() if s["output"] is not None}
    reference = next(iter(outputs), None)  # the first implementation's output (ours, eager)
    for name, s in stats.items():
        meter, median = s["meter"], statistics.median(s["times"])
        firsts = [f for f in s["firsts"] if f is not None]
        values = dict(
            time_s=round(median, 4), time_min_s=round(min(s["times"]), 4), time_per_image_s=round(median / per_image, 4),
            first_image_s=round(statistics.median(firsts), 4) if firsts else None, timing=s["timing"],
            times_s=[round(t, 4) for t in s["times"]],
            ratios=[round(r, 4) for r in s["ratios"]["diffusers"]] if "diffusers" in s["ratios"] else None,
            time_ratio_vs_diffusers=round(s["ratio"]["diffusers"], 4) if "diffusers" in s["ratio"] else None,
            time_ratio_vs_diffusers_compiled=round(s["ratio"]["diffusers+compile"], 4) if "diffusers+compile" in s["ratio"] else None,
            compile_s=round(s["compile_s"], 2) if "compile_s" in s else None,
            first_call_s=round(s["first_call_s"], 3) if "first_call_s" in s else None,
            first_image_cold_s=round(s["measured"][1], 4) if s["measured"][1] is not None else None,
            # weights + what the run allocated above its start: per implementation even when the peer's weights
            # share the device (on CUDA the allocator's absolute peak would include them)
            peak_mb=_mb(impls[name].weights + meter.transient_bytes), transient_mb=_mb(meter.transient_bytes),
            weights_mb=_mb(impls[name].weights), memory_kind=meter.kind,
            rss_peak_mb=round(rss_peak_mb(), 1) if rss and device.type == "cpu" and len(impls) == 1 else None,
        )
        if len(outputs) >= 2 and case.kind != "vae":
            other = reference if name != reference else next(n for n in outputs if n != reference)
            diff = (outputs[name] - outputs[other]).abs()
            values.update(max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean()), diff_vs=other)
        gflop = impls[name].gflop
        if gflop:
            rate = gflop / median
            limit = (ctx.attainable or {}).get(impls[name].dtype)
            values.update(gflop=round(gflop, 2), gflops_per_s=round(rate, 2), attainable_gflops_per_s=limit,
                          fraction_of_limit=round(rate / limit, 4) if limit else None)
        probe = s["probe"]
        if isinstance(probe, AttentionProbe):
            calls, scores = probe.peaks(AttentionProbe.CALL, meter), probe.peaks(AttentionProbe.SCORES, meter)
            values.update(
                attn_peak_mb=_mb(max(calls)) if calls else None, score_peak_mb=_mb(max(scores)) if scores else None,
                score_block_mb=_mb(max(probe.score_blocks)) if probe.score_blocks else None,
            )
        values.update(common)
        rows.append(_row(case, ctx, device, name, **values))
    return rows


def wanted(case: Case) -> list[str]:
    return ["ours", "diffusers"] if case.impl == "both" else [case.impl]


def _meta_unet(ctx: Context) -> Any:
    """Our UNet built on the meta device (shapes only), to count FLOPs."""
    import torch

    from ldm.util import instantiate_from_config

    with torch.device("meta"):
        return instantiate_from_config(_config(ctx).model.params.unet_config).eval()


def unet_gflop(ctx: Context, rows: int, side: int) -> float:
    """GFLOPs of one UNet call on [rows, C, side, side] with a 77-token context, counted on the meta device."""
    import torch

    from microbatch.roofline import count_flops

    unet = _meta_unet(ctx)
    x = torch.empty(rows, unet.in_channels, side, side, device="meta")
    t = torch.full((rows,), 500.0, device="meta")
    context = torch.empty(rows, 77, unet.context_dim, device="meta") if unet.context_dim else None
    y = torch.empty(rows, unet.adm_in_channels, device="meta") if unet.num_classes is not None else None
    return sum(count_flops(lambda: unet(x, t, context=context, y=y)).values()) / 1e9


def vae_gflop(ctx: Context, side: int) -> float:
    """GFLOPs of one VAE decode of a [1, C, side, side] latent, counted on the meta device."""
    import torch

    from ldm.util import instantiate_from_config
    from microbatch.roofline import count_flops

    with torch.device("meta"):
        vae = instantiate_from_config(_config(ctx).model.params.first_stage_config).eval()
    z = torch.empty(1, vae.embed_dim, side, side, device="meta")
    return sum(count_flops(lambda: vae.decode(z)).values()) / 1e9


def _dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


def _compiled(module: Any) -> Any:
    """A compiled view of `module` with static shapes; the eager module stays callable beside it."""
    import torch

    from microbatch.speedups import configure_cache

    configure_cache()
    return torch.compile(module, dynamic=False)


def _layout(case: Case, *tensors_or_modules: Any) -> None:
    import torch

    if case.channels_last:
        for m in tensors_or_modules:
            m.to(memory_format=torch.channels_last)


@dataclass
class GuidedCall:
    """One guided UNet call of a case, as the `unet` and `profile` cases make it: our UNet and (when wanted)
    diffusers' on the same weights, on the case's device and dtype with its attention, and the inputs x [2B, 4,
    r/8, r/8], t = 500, context [2B, 77, D] drawn from seed + 1. `ours`: whether our UNet runs (else it only
    supplied the weights)."""

    device: Any
    dtype: Any
    unet: Any
    theirs: Any
    ours: bool
    x: Any
    t: Any
    context: Any
    rows: int
    side: int

    @classmethod
    def prepare(cls, case: Case, ctx: Context, layout: bool) -> "GuidedCall":
        """`layout`: apply the case's `channels_last` to the inputs and models (the `unet` case does; the profile
        case profiles the default layout)."""
        import torch

        from ldm.modules.attention_backends import AttentionBackend, set_attention_backend

        device = torch.device(ctx.device)
        dtype = dtype_of(case.precision, device)
        unet = build_model(ctx, "unet")
        theirs = diffusers_unet(ctx, unet) if "diffusers" in wanted(case) else None
        g = torch.Generator().manual_seed(ctx.seed + 1)
        rows, side = 2 * case.batch, case.resolution // 8
        x = torch.randn(rows, unet.in_channels, side, side, generator=g).to(device, dtype)
        if layout and case.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        context = torch.randn(rows, 77, unet.context_dim, generator=g).to(device, dtype)
        t = torch.full((rows,), 500, device=device)
        ours = "ours" in wanted(case)
        if ours:
            unet.to(device=device, dtype=dtype)
            if layout:
                _layout(case, unet)
            set_attention_backend(unet, AttentionBackend(case.attention))
        if theirs is not None:
            theirs.to(device=device, dtype=dtype)
            if layout:
                _layout(case, theirs)
            set_diffusers_attention(theirs, case.attention)
        return cls(device, dtype, unet, theirs, ours, x, t, context, rows, side)


def run_unet_case(case: Case, ctx: Context) -> list[dict]:
    """One guided UNet call: x [2B, 4, r/8, r/8] at t = 500 with a [2B, 77, D] context. With `compile`, compiled
    copies of each implementation run beside the eager ones (same weights), all timed in alternation."""
    call = GuidedCall.prepare(case, ctx, layout=True)
    unet, theirs, x, t, context, rows, device = call.unet, call.theirs, call.x, call.t, call.context, call.rows, call.device
    gflop, dname = unet_gflop(ctx, rows, call.side), _dtype_name(call.dtype)
    impls: dict[str, Impl] = {}
    if call.ours:
        impls["ours"] = Impl(lambda: (unet(x, t, context=context), None), module_bytes(unet), probe=lambda: AttentionProbe(unet, device), gflop=gflop, dtype=dname)
    if theirs is not None:
        impls["diffusers"] = Impl(lambda: (theirs(x, t, encoder_hidden_states=context).sample, None), module_bytes(theirs), gflop=gflop, dtype=dname)
    if case.compile:
        if "ours" in impls:
            ours_c = _compiled(unet)
            run = lambda: (ours_c(x, t, context=context), None)  # noqa: E731
            impls["ours+compile"] = Impl(run, module_bytes(unet), prepare=run, gflop=gflop, dtype=dname)
        if "diffusers" in impls:
            theirs_c = _compiled(theirs)
            run_t = lambda: (theirs_c(x, t, encoder_hidden_states=context).sample, None)  # noqa: E731
            impls["diffusers+compile"] = Impl(run_t, module_bytes(theirs), prepare=run_t, gflop=gflop, dtype=dname)
    stats = measure(impls, ctx, device)
    return rows_from(case, ctx, device, impls, stats, case.batch, rows=rows)


def _prompt_embeddings(model: Any, n: int) -> tuple[Any, Any]:
    import torch

    with torch.no_grad():
        cond = model.get_learned_conditioning([PROMPT])
        uncond = model.get_learned_conditioning([""])
    return cond.expand(n, -1, -1), uncond.expand(n, -1, -1)


def run_generate_case(case: Case, ctx: Context) -> list[dict]:
    """A whole run of n_samples images (`steps` ddim steps, guidance 7.5) in micro-batches of max_batch_size:
    our Engine, and diffusers' pipeline called once per micro-batch with the same text embeddings."""
    import torch

    from ldm.modules.attention_backends import AttentionBackend
    from microbatch.engine import Engine, ImageJob, SamplingSettings
    from microbatch.memory import tensor_bytes
    from microbatch.offload import apply_offload

    device = torch.device(ctx.device)
    dtypes = dtypes_of(case.precision, device)
    model = build_model(ctx, "all")
    model.model.to(dtypes.unet)
    model.cond_stage_model.to(dtypes.text)
    model.first_stage_model.to(dtypes.vae)
    model.set_attention(AttentionBackend(case.attention))
    impls: dict[str, Impl] = {}
    n, mbs = case.n_samples, case.max_batch_size

    if "diffusers" in wanted(case):
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        model.cond_stage_model.to(device)
        cond, uncond = _prompt_embeddings(model, mbs)
        unet = diffusers_unet(ctx, model.model.diffusion_model).to(device)
        # The pipeline hands the VAE latents in the UNet's dtype, so its VAE runs in that dtype too.
        vae = diffusers_vae(ctx, model.first_stage_model).to(device=device, dtype=dtypes.unet)
        set_diffusers_attention(unet, case.attention)
        vae.enable_slicing()  # one image at a time, as our engine decodes
        scheduler = DDIMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1
        )
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        _layout(case, unet, vae)
        if case.compile:  # compiled in place, as diffusers' documentation does it (unet, vae decoder)
            from microbatch.speedups import configure_cache

            configure_cache()
            unet.compile(dynamic=False)
            vae.decoder.compile(dynamic=False)

        def run_diffusers(count: int = n, steps: int = case.steps) -> tuple[Any, Optional[float]]:
            start, first, images = time.perf_counter(), None, []
            for lo in range(0, count, mbs):
                b = min(mbs, count - lo)
                generators = [torch.Generator().manual_seed(ctx.seed + lo + i) for i in range(b)]
                images.append(pipe(
                    prompt_embeds=cond[:b], negative_prompt_embeds=uncond[:b], num_inference_steps=steps, guidance_scale=7.5,
                    height=case.resolution, width=case.resolution, generator=generators, output_type="pt",
                ).images)
                _sync(device)
                first = first if first is not None else time.perf_counter() - start
            return None, first

        impls["diffusers"] = Impl(run_diffusers, module_bytes(unet) + module_bytes(vae), warmup=lambda: run_diffusers(1, 1))

    if "ours" in wanted(case):
        if case.offload == "none" or apply_offload(model, case.offload, device) is None:
            model.to(device)
        if case.compile or case.channels_last:
            from microbatch.speedups import apply_speedups

            apply_speedups(model, case.compile, case.channels_last)
        engine = Engine(model, device)
        jobs = [ImageJob(i, PROMPT, ctx.seed + i) for i in range(n)]
        settings = SamplingSettings(sampler="ddim", steps=case.steps, height=case.resolution, width=case.resolution, max_batch_size=mbs)

        def run_ours(count: int = n, s: Any = settings) -> tuple[Any, Optional[float]]:
            start, first = time.perf_counter(), []
            engine.run(jobs[:count], s, lambda batch: first.append(time.perf_counter() - start) if not first else None)
            return None, first[0]

        warm = dataclasses.replace(settings, steps=1, max_batch_size=1)
        impls = {"ours": Impl(run_ours, tensor_bytes(model, device), warmup=lambda: run_ours(1, warm)), **impls}
    stats = measure(impls, ctx, device)
    return rows_from(case, ctx, device, impls, stats, n, rows=2 * mbs)


def run_vae_case(case: Case, ctx: Context) -> list[dict]:
    """Decode one scaled latent [1, 4, r/8, r/8] whole, then tiled (vae_mode "both", or just one of them); tiled
    rows report their difference from the whole decode of the same implementation."""
    import torch

    from ldm.modules.attention_backends import AttentionBackend, set_attention_backend
    from microbatch.vae_tiling import decode_tiled

    device = torch.device(ctx.device)
    dtype = dtypes_of(case.precision, device).vae
    vae = build_model(ctx, "vae")
    scale = float(_config(ctx).model.params.get("scale_factor", 0.18215))
    side = case.resolution // 8
    z = torch.randn(1, vae.embed_dim, side, side, generator=torch.Generator().manual_seed(ctx.seed + 2)).to(device)
    if case.channels_last:
        z = z.contiguous(memory_format=torch.channels_last)
    gflop = vae_gflop(ctx, side)
    decoders: dict[str, Callable[[bool], Any]] = {}
    weights: dict[str, int] = {}
    if "diffusers" in wanted(case):
        theirs = diffusers_vae(ctx, vae).to(device=device, dtype=dtype)
        _layout(case, theirs)
        set_diffusers_attention(theirs, case.attention)

        def decode_theirs(tiled: bool) -> Any:
            if tiled:
                theirs.enable_tiling()
                theirs.tile_latent_min_size, theirs.tile_sample_min_size = case.tile, case.tile * 8
                theirs.tile_overlap_factor = case.overlap / case.tile
            else:
                theirs.disable_tiling()
            return theirs.decode((z / scale).to(dtype)).sample

        decoders["diffusers"], weights["diffusers"] = decode_theirs, module_bytes(theirs)
    if "ours" in wanted(case):
        model = vae_wrapper(vae, scale).to(device=device, dtype=dtype)
        _layout(case, vae)
        set_attention_backend(vae, AttentionBackend(case.attention))

        def decode_ours(tiled: bool) -> Any:
            return decode_tiled(model, z, case.tile, case.overlap) if tiled else model.decode_first_stage(z)

        decoders = {"ours": decode_ours, **decoders}
        weights["ours"] = module_bytes(vae)
    modes = ["whole", "tiled"] if case.vae_mode == "both" else [case.vae_mode]
    rows, wholes = [], {}
    for mode in modes:
        impls = {
            name: Impl(lambda fn=fn, tiled=mode == "tiled": (fn(tiled), None), weights[name], gflop=gflop if mode == "whole" else None, dtype=_dtype_name(dtype))
            for name, fn in decoders.items()
        }
        if case.compile and mode == "whole":  # the decoder compiled (as --compile does), the eager one beside it
            for name in list(impls):
                if name == "ours":
                    dec = _compiled(vae.decoder)
                    run = lambda dec=dec: (dec(vae.post_quant_conv((z / scale).to(dtype))), None)  # noqa: E731
                else:
                    dec = _compiled(theirs.decoder)
                    run = lambda dec=dec: (dec(theirs.post_quant_conv((z / scale).to(dtype))), None)  # noqa: E731
                impls[name + "+compile"] = Impl(run, weights[name], prepare=run, gflop=gflop, dtype=_dtype_name(dtype))
        stats = measure(impls, ctx, device)
        for row in rows_from(dataclasses.replace(case, vae_mode=mode), ctx, device, impls, stats, 1, mode == modes[0], rows=1):
            out = stats[row["impl"]]["output"]
            if mode == "whole":
                wholes[row["impl"]] = out
            else:
                with torch.no_grad():
                    reference = wholes[row["impl"]] if row["impl"] in wholes else decoders[row["impl"]](False).float().cpu()
                diff = (out - reference).abs()
                row.update(max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean()), diff_vs="whole decode, same implementation")
            rows.append(row)
    return rows


def run_roofline_case(case: Case, ctx: Context) -> list[dict]:
    """The machine's attainable rate in one precision: the UNet's 3x3 convolutions (NCHW and NHWC) and its
    attention / feed-forward GEMMs at `resolution` with 2 x batch rows, each timed alone (best of several calls).
    One row per kernel, and a row `op` "best" whose attainable_gflops_per_s is the best of the dominant ones (at
    least 5% of the largest kernel's FLOPs): the limit the unet and vae rows are a fraction of."""
    import torch

    from microbatch.roofline import measure_rates, unet_shapes

    device = torch.device(ctx.device)
    dtype = dtype_of(case.precision, device)
    params = _config(ctx).model.params.unet_config.params
    context_dim = params.get("context_dim")
    context_dim = context_dim[0] if isinstance(context_dim, (list, tuple)) or hasattr(context_dim, "__len__") else context_dim
    shapes = unet_shapes(int(params.model_channels), list(params.channel_mult), case.resolution // 8, 2 * case.batch, context_dim)
    results = measure_rates(shapes, dtype, device)
    rows = []
    for r in results:
        rows.append(_row(case, ctx, device, "machine", op=r["op"], shape=r["shape"], layout=r["layout"], gflop=r["gflop"],
                         time_s=r["seconds"], gflops_per_s=r["gflops_per_s"], what=r["what"], dtype=r["dtype"]))
    # The limit: the best rate among the dominant kernels (each at least 5% of the largest one's FLOPs): a tiny
    # in-cache GEMM (the 77-token cross-attention projections) can run far above what the UNet's bulk can.
    big = max(r["gflop"] for r in results)
    best = max((r for r in results if r["gflop"] >= 0.05 * big), key=lambda r: r["gflops_per_s"])
    by_op = {op: max(r["gflops_per_s"] for r in results if r["op"] == op) for op in {r["op"] for r in results}}
    rows.append(_row(case, ctx, device, "machine", op="best", shape=best["shape"], layout=best["layout"], dtype=best["dtype"],
                     attainable_gflops_per_s=best["gflops_per_s"], best_by_op=by_op))
    return rows


def run_profile_case(case: Case, ctx: Context) -> list[dict]:
    """Where one guided UNet call's time goes (the `unet` case's call), ours and diffusers' eager, under
    torch.profiler: operator self-time by category (microbatch.roofline.categorize), after `warmup` untimed calls."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from microbatch.roofline import time_breakdown

    call = GuidedCall.prepare(case, ctx, layout=False)
    unet, theirs, x, t, context, device = call.unet, call.theirs, call.x, call.t, call.context, call.device
    calls: dict[str, Callable[[], Any]] = {}
    if call.ours:
        calls["ours"] = lambda: unet(x, t, context=context)
    if theirs is not None:
        calls["diffusers"] = lambda: theirs(x, t, encoder_hidden_states=context).sample
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    rows = []
    with torch.no_grad():
        for _ in range(ctx.warmup):
            for fn in calls.values():
                fn()
        for name, fn in calls.items():
            with profile(activities=activities) as prof:
                seconds, _ = timed(fn, device)
            breakdown = time_breakdown(prof, device)
            top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
            rows.append(_row(case, ctx, device, name, time_s=round(seconds, 4), timing="one call under torch.profiler",
                             breakdown_s={k: round(v, 4) for k, v in breakdown.items()},
                             top_ops=[(e.key, e.count, round(e.self_cpu_time_total / 1e6, 4)) for e in top]))
    return rows


NETWORKS = ("lora", "locon")
# kohya's default targets, by the diffusers module a layer sits in: the transformers' linears and 1x1 convolutions
# (LoRA); LoCon (a conv rank given) also the ResNet blocks', down- and upsamplers' layers, 3x3 convolutions included
_LORA_BLOCKS = ("_attentions_",)
_LOCON_BLOCKS = ("_attentions_", "_resnets_", "_downsamplers_", "_upsamplers_")
_TE_PREFIXES = {"te": "lora_te_", "te1": "lora_te1_", "te2": "lora_te2_"}


def kohya_network(model: Any, network: str, rank: int = 32, alpha: float = 16.0, seed: int = 0) -> dict:
    """A random kohya network file's tensors (fp16, as kohya saves them) at kohya's default targets for `model`
    (SD 1.x / 2.x or SDXL): UNet layers under their diffusers names, every text-encoder attention and MLP linear
    (q / k / v of OpenCLIP's in_proj_weight as separate layers, as the trainers write them)."""
    import torch

    from microbatch.lora import _layer_index

    blocks = _LOCON_BLOCKS if network == "locon" else _LORA_BLOCKS
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(seed)
    tensors: dict = {}
    for key, target in _layer_index(model).items():
        kind, name = key.split(":", 1)
        shape = params[target.param].shape
        if target.rows is not None:
            shape = (target.rows[1] - target.rows[0], *shape[1:])
        if kind == "unet":
            conv3 = len(shape) == 4 and tuple(shape[2:]) != (1, 1)
            if not name.startswith(("down_blocks_", "mid_block_", "up_blocks_")) or not any(b in name for b in blocks):
                continue
            if conv3 and network != "locon":
                continue
            prefix = "lora_unet_"
        else:
            prefix = _TE_PREFIXES[kind]
        down = torch.randn(rank, *shape[1:], generator=g) / math.sqrt(math.prod(shape[1:]))
        up = torch.randn(shape[0], rank, *([1, 1] if len(shape) == 4 else []), generator=g) / math.sqrt(rank)
        tensors[f"{prefix}{name}.lora_down.weight"] = down.half()
        tensors[f"{prefix}{name}.lora_up.weight"] = up.half()
        tensors[f"{prefix}{name}.alpha"] = torch.tensor(alpha).half()
    return tensors


def run_lora_case(case: Case, ctx: Context) -> list[dict]:
    """Merging a network into the whole model and taking it out again (`apply_lora` / `remove`, the file read
    included), `repeats` + 1 times: the first application, the median of the others, the removal, whether the
    weights came back bit-identical, how many weights and values it touched."""
    import tempfile

    import torch
    from safetensors.torch import save_file

    from microbatch.lora import _STATES, apply_lora

    device = torch.device(ctx.device)
    dtype = dtype_of(case.precision, device)
    model = build_model(ctx, "all", dtype).to(device, dtype)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{case.network}.safetensors"
        save_file(kohya_network(model, case.network, seed=ctx.seed), str(path))
        file_mb = path.stat().st_size / 2**20
        applies, removes, restored, handle = [], [], True, None
        touched: dict = {}
        for i in range(ctx.repeats + 1):
            seconds, handle = timed(lambda: apply_lora(model, path), device)
            applies.append(seconds)
            if i == 0:  # the originals, to check the removal against (held outside the timed calls)
                touched = {name: t.clone() for name, t in _STATES[model].originals.items()}
            seconds, _ = timed(handle.remove, device)
            removes.append(seconds)
            params = dict(model.named_parameters())
            restored = restored and all(torch.equal(params[name], t.to(device)) for name, t in touched.items())
    values = sum(t.numel() for t in touched.values())
    later = applies[1:] or applies
    return [_row(case, ctx, device, "ours", time_s=round(statistics.median(later), 3), time_min_s=round(min(later), 3),
                 first_call_s=round(applies[0], 3), remove_s=round(statistics.median(removes), 3), layers=handle.layers,
                 values_m=round(values / 1e6, 1), originals_mb=_mb(sum(t.numel() * t.element_size() for t in touched.values())),
                 file_mb=round(file_mb, 1), restored=restored, rss_peak_mb=round(rss_peak_mb(), 1),
                 timing=f"apply: median of {len(later)} after the first; remove: median of {len(removes)}",
                 times_s=[round(s, 3) for s in applies], remove_times_s=[round(s, 3) for s in removes])]


RUNNERS = {"unet": run_unet_case, "generate": run_generate_case, "vae": run_vae_case, "roofline": run_roofline_case, "profile": run_profile_case, "lora": run_lora_case}


def run_case_here(case: Case, ctx: Context) -> list[dict]:
    import torch

    from microbatch.devices import keep_freed_cpu_memory

    if ctx.threads:
        torch.set_num_threads(ctx.threads)
    torch.manual_seed(ctx.seed)
    # The runtime's opt-in malloc setting (MICROBATCH_KEEP_FREED_MEMORY=1), as Pipeline.load makes it; in one
    # process it holds for diffusers' peer too, so the same-process ratios compare the models, not the allocators.
    kept = keep_freed_cpu_memory()
    start = time.perf_counter()
    rows = RUNNERS[case.kind](case, ctx)
    for row in rows:
        row["seconds_in_case"] = round(time.perf_counter() - start, 2)
        row["keep_freed_memory"] = kept
    return rows


# -- SDXL --------------------------------------------------------------------------------------------------------

SDXL_PRESETS = ("sdxl", "gpu-sdxl")
# The published sampling's micro-conditioning at a square size r, per conditioner input key (sgm's defaults; the
# refiner's aesthetic score 6.0).
SDXL_TIME_IDS = {
    "original_size_as_tuple": lambda r: [r, r], "crop_coords_top_left": lambda r: [0, 0],
    "target_size_as_tuple": lambda r: [r, r], "aesthetic_score": lambda r: [6.0],
}


def is_sdxl_config(config: Optional[str]) -> bool:
    """An sgm DiffusionEngine config (SDXL base or refiner): its UNet is `network_config`, not `unet_config`."""
    if not config or not Path(config).is_file():
        return False
    from omegaconf import OmegaConf

    return "network_config" in (OmegaConf.load(config).model.get("params") or {})


def build_sdxl_unet(ctx: Context, dtype: Any) -> Any:
    """Our SDXL UNet (`model.diffusion_model` of the DiffusionEngine) in `dtype` on the CPU: from --ckpt (through
    the scripts' loader; the rest of the model is dropped), or random weights drawn one parameter at a time, so
    that the full-size UNet (2.57 G parameters) never exists in float32."""
    import torch

    from ldm.util import instantiate_from_config

    if ctx.ckpt:
        from microbatch.devices import Dtypes
        from microbatch.loading import load_model

        loaded = load_model(Path(ctx.ckpt), Path(ctx.config) if ctx.config else None, torch.device("cpu"), Dtypes(dtype, dtype, torch.float32))
        ctx.config = str(loaded.config_path)
        unet = loaded.model.model.diffusion_model
    else:
        with params_on_meta():
            unet = instantiate_from_config(_config(ctx).model.params.network_config)
        unet = fill_random_(unet, ctx.seed, dtype=dtype)
    if getattr(unet, "num_classes", None) is None:
        raise ValueError(f"{ctx.ckpt or ctx.config} is not an SDXL model (its UNet has no label embedding)")
    return unet.to(dtype).requires_grad_(False).eval()


def sdxl_time_ids(ctx: Context, resolution: int) -> tuple[list[float], int]:
    """(one row of diffusers' add_time_ids, the embedding width per number): the conditioner's
    ConcatTimestepEmbedderND inputs in its order, at the published defaults for a square image."""
    ids, outdim = [], None
    for spec in _config(ctx).model.params.conditioner_config.params.emb_models:
        if str(spec.target).endswith("ConcatTimestepEmbedderND"):
            ids += SDXL_TIME_IDS[spec.input_key](resolution)
            outdim = int(spec.params.outdim)
    if outdim is None:
        raise ValueError(f"{ctx.config}: no ConcatTimestepEmbedderND in the conditioner")
    return [float(v) for v in ids], outdim


def diffusers_sdxl_unet(ctx: Context, unet: Any, time_embed_dim: int) -> Any:
    """diffusers' UNet2DConditionModel with SDXL's "text_time" added conditioning, holding our UNet's weights
    through diffusers' single-file converter (assigned, so the two share the weights' storage)."""
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from omegaconf import OmegaConf

    container = OmegaConf.to_container(_config(ctx), resolve=True)
    sd = _ldm_state_dict(unet, "model.diffusion_model.")
    cfg = sfu.create_unet_diffusers_config_from_ldm(container, sd)
    # diffusers recognises the added conditioning by the full-size context widths (2048 / 1280) only
    cfg.update(class_embed_type=None, addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim)
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**cfg)
    theirs.load_state_dict(sfu.convert_ldm_unet_checkpoint(sd, cfg), strict=True, assign=True)
    return theirs.requires_grad_(False).eval()


def run_sdxl_unet_case(case: Case, ctx: Context) -> list[dict]:
    """One guided SDXL UNet call at t = 500: x [2B, 4, r/8, r/8], rows [uncond x B, cond x B]; the uncond rows
    have zero text (context and pooled embedding, the published `force_zero_embeddings`), the cond rows random
    ones. Ours takes y [2B, adm] = [pooled, sinusoidal embedding of the time ids]; diffusers takes the same as
    added_cond_kwargs {"text_embeds": pooled, "time_ids": [2B, 6]} and builds the same y inside."""
    import torch

    from ldm.modules.attention_backends import AttentionBackend, set_attention_backend
    from ldm.modules.diffusionmodules.util import timestep_embedding

    device = torch.device(ctx.device)
    dtype = dtype_of(case.precision, device)
    unet = build_sdxl_unet(ctx, dtype)
    ids, outdim = sdxl_time_ids(ctx, case.resolution)
    theirs = diffusers_sdxl_unet(ctx, unet, outdim) if "diffusers" in wanted(case) else None
    g = torch.Generator().manual_seed(ctx.seed + 1)
    rows, side = 2 * case.batch, case.resolution // 8
    pooled_dim = unet.adm_in_channels - len(ids) * outdim
    x = torch.randn(rows, unet.in_channels, side, side, generator=g)
    context = torch.randn(rows, 77, unet.context_dim, generator=g)
    text_embeds = torch.randn(rows, pooled_dim, generator=g)
    context[: case.batch] = 0
    text_embeds[: case.batch] = 0
    time_ids = torch.tensor([ids] * rows)
    y = torch.cat([text_embeds, timestep_embedding(time_ids.flatten(), outdim).reshape(rows, -1)], dim=1)
    x, context, text_embeds, y = (v.to(device, dtype) for v in (x, context, text_embeds, y))
    added = {"text_embeds": text_embeds, "time_ids": time_ids.to(device)}
    t = torch.full((rows,), 500, device=device)
    cpu_seconds: dict[str, list[float]] = {}

    def on_cpu_clock(name: str, fn: Callable[[], Any]) -> Callable[[], tuple[Any, None]]:
        # The process's CPU seconds per call beside the wall clock: on a shared machine the wall clock also counts
        # the time spent waiting for a core, the CPU clock only the work (all threads summed).
        def run() -> tuple[Any, None]:
            start = time.process_time()
            out = fn()
            cpu_seconds.setdefault(name, []).append(time.process_time() - start)
            return out, None

        return run

    impls: dict[str, Impl] = {}
    if "ours" in wanted(case):
        unet.to(device=device, dtype=dtype)
        set_attention_backend(unet, AttentionBackend(case.attention))
        run_ours = on_cpu_clock("ours", lambda: unet(x, t, context=context, y=y))
        impls["ours"] = Impl(run_ours, module_bytes(unet), probe=lambda: AttentionProbe(unet, device))
    if theirs is not None:
        theirs.to(device=device, dtype=dtype)
        set_diffusers_attention(theirs, case.attention)
        run_theirs = on_cpu_clock("diffusers", lambda: theirs(x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample)
        impls["diffusers"] = Impl(run_theirs, module_bytes(theirs))
    stats = measure(impls, ctx, device)
    out = rows_from(case, ctx, device, impls, stats, case.batch, rows=rows)
    for row in out:
        # calls in order: the measured (profiled) one, `warmup` untimed ones, `repeats` timed ones
        calls = cpu_seconds[row["impl"]]
        timed_calls = calls[len(calls) - ctx.repeats :] if ctx.repeats else calls[:1]
        row.update(cpu_s=round(statistics.median(timed_calls), 4), cpu_times_s=[round(c, 4) for c in timed_calls])
    return out


RUNNERS["sdxl_unet"] = run_sdxl_unet_case


def plan_sdxl_cases(args: argparse.Namespace, device_type: str, peer: bool) -> list[Case]:
    """SDXL cases (an SDXL --config, or --cases sdxl / gpu-sdxl): one guided UNet call per resolution, precision,
    attention and batch; default 1 image at the config's native size (1024 for the published one) with SDPA, in
    bf16 on a CPU with native bf16 (else fp32) and fp16 on CUDA. gpu-sdxl is the GPU plan: fp16, SDPA, needs
    --device cuda (--dry_run shows it anywhere)."""
    from omegaconf import OmegaConf

    from microbatch.devices import cpu_has_fast_bf16

    kinds = args.kinds or ["unet"]
    if not set(kinds) <= {"unet", "lora"}:
        raise ValueError(f"the SDXL benchmark times UNet calls and LoRA merges only (--kinds unet,lora), got --kinds {','.join(kinds)}")
    gpu = args.cases == "gpu-sdxl"
    if gpu and device_type != "cuda" and not args.dry_run:
        raise ValueError(f"--cases gpu-sdxl is the CUDA plan: use --device cuda (this device is {device_type}; --dry_run shows the plan)")
    if gpu and device_type != "cuda":
        print(f"note: --cases gpu-sdxl is planned for --device cuda; shown here on {device_type} (dry run)")
    if gpu or device_type == "cuda":
        half = "fp16"
    else:
        half = "bf16" if device_type == "cpu" and cpu_has_fast_bf16() else "fp32"
    native = 1024
    if args.config and Path(args.config).is_file():
        native = int(OmegaConf.load(args.config).model.params.get("image_size", 128)) * 8
    impl = "both" if peer else "ours"
    cases = [
        Case("sdxl_unet", impl, r, batch=b, attention=a, precision=p)
        for r in args.resolutions or [native]
        for p in args.precision or [half]
        for a in args.attention or ["sdpa"]
        for b in args.batch or [1]
    ] if "unet" in kinds else []
    # the whole SDXL model in float32 and the originals a network touches would not fit beside it in 24 GB
    return cases + lora_cases(kinds, args.precision or ["fp16" if half == "fp32" else half])


def lora_cases(kinds: Sequence[str], precisions: Sequence[str]) -> list[Case]:
    """The lora kind: a kohya LoRA and a LoCon (kohya's default targets, rank 32, alpha 16) merged into the whole
    model and taken out again, per precision; ours only (diffusers fuses LoRAs through peft, not a core
    dependency of either)."""
    if "lora" not in kinds:
        return []
    return [Case("lora", "ours", precision=p, network=n) for p in precisions for n in NETWORKS]


# -- planning, subprocesses, tables ------------------------------------------------------------------------------


def native_resolution(config: str) -> int:
    from omegaconf import OmegaConf

    params = OmegaConf.load(config).model.params
    ddconfig = params.first_stage_config.params.ddconfig
    return int(params.image_size) * 2 ** (len(ddconfig.ch_mult) - 1)


def plan_cases(args: argparse.Namespace, device_type: str, peer: bool) -> list[Case]:
    """The sweep: preset values, each replaced by the flag given on the command line."""
    if args.cases == "gpu":
        return plan_gpu_cases(args, peer)
    native = native_resolution(args.config or str(V1_CONFIG))
    quick = args.cases == "quick"
    half = "fp16" if device_type == "cuda" else "bf16"
    resolutions = args.resolutions or ([native] if quick else [native, 768, 1024])
    attentions = args.attention or (["sdpa"] if quick else list(ATTENTIONS))
    precisions = args.precision or (["fp32"] if quick else ["fp32", half])
    unet_batches = args.batch or ([1] if quick else [1, 2, 4, 8])
    n_samples = args.n_samples or ([2] if quick else [1, 4, 8])
    max_batch_sizes = args.max_batch_size or ([1, 2] if quick else [1, 2, 4, 8])
    offloads = args.offload or (["none"] if quick or device_type != "cuda" else ["none", "model", "sequential"])
    steps = args.steps or (2 if quick else 20)
    vae_resolutions = args.vae_resolutions or ([2 * native] if quick else [native, 2 * native, 4 * native])
    kinds = list(args.kinds or ["unet", "generate", "vae"])
    if args.roofline and "roofline" not in kinds:
        kinds.insert(0, "roofline")
    impl = "both" if peer else "ours"
    cl = bool(args.channels_last)
    cases: list[Case] = []
    if "roofline" in kinds:
        cases.extend(roofline_cases(precisions, device_type, resolutions[0]))
    if "profile" in kinds:
        for r in resolutions:
            for p in precisions:
                cases.append(Case("profile", impl, r, attention=attentions[0], precision=p))
    if "unet" in kinds:
        for r in resolutions:
            for p in precisions:
                for a in attentions:
                    for b in unet_batches:
                        cases.append(Case("unet", impl, r, batch=b, attention=a, precision=p, compile=args.compile, channels_last=cl))
    if "generate" in kinds:
        for r in resolutions:
            for p in precisions:
                for n in n_samples:
                    for m in max_batch_sizes:
                        if m > n:
                            continue
                        for o in offloads:
                            for c in ([False, True] if args.compile and o != "sequential" else [False]):
                                cases.append(Case("generate", impl if o == "none" else "ours", r, n_samples=n, max_batch_size=m, steps=steps,
                                                  attention=attentions[0], precision=p, offload=o, compile=c, channels_last=cl))
    cases.extend(lora_cases(kinds, precisions))
    if "vae" in kinds:
        for r in vae_resolutions:
            latent = r // 8
            tile = args.vae_tile or (64 if latent > 64 else max(2, latent // 2))
            overlap = args.vae_overlap if args.vae_overlap is not None else tile // 4
            cases.append(Case("vae", impl, r, attention=attentions[0], precision=precisions[0], vae_mode="both", tile=tile, overlap=overlap,
                              compile=args.compile, channels_last=cl))
    return cases


def roofline_cases(precisions: Sequence[str], device_type: str, resolution: int) -> list[Case]:
    """Roofline cases: float32, the planned precisions, and the half types the device runs natively (bf16 on a
    CPU with AVX512-BF16 / AMX; fp16 and bf16 on CUDA)."""
    from microbatch.devices import cpu_has_fast_bf16

    wanted_p = ["fp32", *[p for p in precisions if p != "autocast"]]
    if device_type == "cuda":
        wanted_p += ["fp16", "bf16"]
    elif device_type == "cpu" and cpu_has_fast_bf16():
        wanted_p.append("bf16")
    return [Case("roofline", "machine", resolution, precision=p) for p in dict.fromkeys(wanted_p)]


def plan_gpu_cases(args: argparse.Namespace, peer: bool) -> list[Case]:
    """`--cases gpu`: the GPU table in one command (fp16 unless --precision): the roofline; one guided UNet call
    with sdpa (eager and compiled, both implementations), sliced and math; whole runs of 4 images at 512x512, 50
    steps, micro-batches of 1 and 4, sdpa eager and compiled and sliced (time per image, time to first image,
    sampling peak); a profile of one step; the VAE decode at 512 and 1024 (eager and compiled)."""
    native = native_resolution(args.config or str(V1_CONFIG))
    impl = "both" if peer else "ours"
    p = (args.precision or ["fp16"])[0]
    r = (args.resolutions or [native])[0]
    steps = args.steps or 50
    cl = bool(args.channels_last)
    cases = roofline_cases([p], "cuda", r)
    cases.append(Case("profile", impl, r, attention="sdpa", precision=p))
    for b in args.batch or [1, 4]:
        cases.append(Case("unet", impl, r, batch=b, attention="sdpa", precision=p, compile=True, channels_last=cl))
        for a in ("sliced", "math"):
            cases.append(Case("unet", impl, r, batch=b, attention=a, precision=p, channels_last=cl))
    for n in args.n_samples or [4]:
        for m in args.max_batch_size or [1, 4]:
            if m > n:
                continue
            for a, c in (("sdpa", False), ("sdpa", True), ("sliced", False)):
                cases.append(Case("generate", impl, r, n_samples=n, max_batch_size=m, steps=steps, attention=a, precision=p, compile=c, channels_last=cl))
    for vr in args.vae_resolutions or [r, 2 * r]:
        tile = args.vae_tile or (64 if vr // 8 > 64 else max(2, vr // 16))
        overlap = args.vae_overlap if args.vae_overlap is not None else tile // 4
        cases.append(Case("vae", impl, vr, attention="sdpa", precision=p, vae_mode="both", tile=tile, overlap=overlap, compile=True, channels_last=cl))
    return cases


def run_case_subprocess(case: Case, ctx: Context, out: Path, index: int, timeout: Optional[float]) -> list[dict]:
    spec = out / "cases" / f"{index:03d}.json"
    spec.parent.mkdir(parents=True, exist_ok=True)
    result = spec.with_suffix(".rows.json")
    spec.write_text(json.dumps({"case": asdict(case), "context": asdict(ctx)}))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run-case", str(spec), "--case-out", str(result)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        error = None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["exit code %d" % proc.returncode])[-1]
        status = "ok" if proc.returncode == 0 else "error"
        (out / "cases" / f"{index:03d}.log").write_text(proc.stdout + proc.stderr)
    except subprocess.TimeoutExpired:
        error, status = f"timed out after {timeout} s", "timeout"
    if status == "ok" and result.is_file():
        return json.loads(result.read_text())
    row = {c: None for c in COLUMNS}
    row.update(asdict(case), status=status, error=error, seconds_in_case=round(time.perf_counter() - start, 2))
    return [row]


def write_tables(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_summary(rows: list[dict], out: Path) -> str:
    """summary.md: the attainable rates, each unet / vae row's fraction of them, and the profile's time by
    category (ours against diffusers). Returns its text ("" when no row has any of these)."""
    ok = [r for r in rows if r.get("status") == "ok"]
    parts = []
    best = [r for r in ok if r["kind"] == "roofline" and r.get("op") == "best"]
    if best:
        parts.append("| dtype | attainable GFLOP/s (best kernel) | best conv3x3 | best GEMM | kernel |\n|---|---|---|---|---|")
        for r in best:
            by_op = r.get("best_by_op") or {}
            parts[-1] += f"\n| {r['dtype']} | {r['attainable_gflops_per_s']} | {by_op.get('conv3x3')} | {by_op.get('gemm')} | {r['shape']} {r['layout']} |"
    frac = [r for r in ok if r.get("gflop") and r["kind"] in ("unet", "vae")]
    if frac:
        lines = ["| kind | impl | resolution | rows | precision | GFLOP per call | time s | GFLOP/s | fraction of limit | ratio vs diffusers | vs diffusers compiled |",
                 "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in frac:
            lines.append(f"| {r['kind']} | {r['impl']} | {r['resolution']} | {r['rows']} | {r['precision']} | {r['gflop']} | {r['time_s']} | "
                         f"{r['gflops_per_s']} | {r.get('fraction_of_limit')} | {r.get('time_ratio_vs_diffusers')} | {r.get('time_ratio_vs_diffusers_compiled')} |")
        parts.append("\n".join(lines))
    prof = [r for r in ok if r["kind"] == "profile"]
    if prof:
        from microbatch.roofline import CATEGORIES

        head = " | ".join(f"{r['impl']} s (share)" for r in prof)
        lines = [f"| category | {head} |", "|---" * (len(prof) + 1) + "|"]
        for c in CATEGORIES:
            cells = []
            for r in prof:
                total = sum(r["breakdown_s"].values()) or 1.0
                cells.append(f"{r['breakdown_s'][c]:.2f} ({100 * r['breakdown_s'][c] / total:.1f}%)")
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
        lines.append("| wall time of the call | " + " | ".join(f"{r['time_s']:.2f}" for r in prof) + " |")
        parts.append("\n".join(lines))
    text = "\n\n".join(parts)
    if text:
        (out / "summary.md").write_text(text + "\n")
    return text


# -- plots -------------------------------------------------------------------------------------------------------

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75), (227, 119, 194), (127, 127, 127)]


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if m * step >= raw)
    start = math.floor(lo / step) * step
    return [start + i * step for i in range(int(math.ceil((hi - start) / step)) + 1)]


def plot_pil(path: Path, title: str, xlabel: str, ylabel: str, series: dict[str, list[tuple[float, float]]]) -> None:
    """A line plot with PIL only: x values as evenly spaced categories (batch sizes, resolutions), y linear from 0."""
    from PIL import Image, ImageDraw, ImageFont

    width, height, left, right, top, bottom = 900, 560, 80, 260, 50, 60
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    xs = sorted({x for pts in series.values() for x, _ in pts})
    ys = [y for pts in series.values() for _, y in pts]
    ticks = _nice_ticks(0.0, max(ys) if ys else 1.0)
    y_max = ticks[-1]
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (plot_w / 2 if len(xs) == 1 else plot_w * xs.index(x) / (len(xs) - 1))

    def py(y: float) -> float:
        return top + plot_h * (1 - y / y_max)

    draw.text((left, 15), title, fill="black", font=font)
    draw.line([(left, top), (left, top + plot_h), (left + plot_w, top + plot_h)], fill="black")
    for t in ticks:
        draw.line([(left - 4, py(t)), (left + plot_w, py(t))], fill=(225, 225, 225))
        draw.text((8, py(t) - 6), f"{t:g}", fill="black", font=font)
    for x in xs:
        draw.line([(px(x), top + plot_h), (px(x), top + plot_h + 4)], fill="black")
        draw.text((px(x) - 6, top + plot_h + 8), f"{x:g}", fill="black", font=font)
    draw.text((left + plot_w / 2 - 30, height - 22), xlabel, fill="black", font=font)
    draw.text((8, top - 20), ylabel, fill="black", font=font)
    for i, (label, pts) in enumerate(sorted(series.items())):
        color = PALETTE[i % len(PALETTE)]
        pts = sorted(pts)
        coords = [(px(x), py(y)) for x, y in pts]
        if len(coords) > 1:
            draw.line(coords, fill=color, width=2)
        for cx, cy in coords:
            draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=color)
        ly = top + 14 * i
        draw.line([(width - right + 12, ly + 6), (width - right + 32, ly + 6)], fill=color, width=3)
        draw.text((width - right + 38, ly), label[:36], fill="black", font=font)
    img.save(path)


def plot(path: Path, title: str, xlabel: str, ylabel: str, series: dict[str, list[tuple[float, float]]]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plot_pil(path, title, xlabel, ylabel, series)
        return
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for label, pts in sorted(series.items()):
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def make_plots(rows: list[dict], out: Path) -> list[Path]:
    """Peak memory and time per image against batch size (unet: images per call; generate: max_batch_size), and
    the VAE's against resolution. One line per implementation and setting."""
    ok = [r for r in rows if r.get("status") == "ok"]
    made = []
    specs = [
        ("unet", "batch", lambda r: f"{r['impl']} {r['resolution']}px {r['attention']} {r['precision']}", "images per UNet call"),
        ("generate", "max_batch_size", lambda r: f"{r['impl']} n={r['n_samples']} {r['resolution']}px {r['precision']} off={r['offload']}", "max_batch_size"),
        ("vae", "resolution", lambda r: f"{r['impl']} {r['vae_mode']} {r['precision']}", "resolution (px)"),
    ]
    for kind, xkey, label, xlabel in specs:
        subset = [r for r in ok if r["kind"] == kind]
        if not subset:
            continue
        for ykey, ylabel, name in (("peak_mb", "peak memory (MB)", "peak_memory"), ("time_per_image_s", "time per image (s)", "time_per_image")):
            series: dict[str, list[tuple[float, float]]] = {}
            for r in subset:
                if r.get(ykey) is not None:
                    series.setdefault(label(r), []).append((float(r[xkey]), float(r[ykey])))
            if series:
                path = out / f"{kind}_{name}.png"
                plot(path, f"{kind}: {ylabel} on {subset[0]['device']}", xlabel, ylabel, series)
                made.append(path)
    return made


# -- command line ------------------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _names(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        values = [v for v in text.split(",") if v]
        bad = [v for v in values if v not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"{', '.join(bad)} not in {', '.join(choices)}")
        return values

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Time and peak memory of our UNet, engine and VAE against diffusers on the same weights.")
    p.add_argument("--ckpt", type=str, default=None, help="checkpoint (.ckpt / .safetensors); default: random weights")
    p.add_argument("--config", type=str, default=None, help="model yaml (default: the full-size SD v1 config)")
    p.add_argument("--random", action="store_true", help="random weights for --config (the default without --ckpt)")
    p.add_argument("--cases", choices=["quick", "full", "gpu", *SDXL_PRESETS], default="quick",
                   help="preset sweep; the flags below replace its values (gpu: the GPU table in one command, needs --device cuda; "
                        "sdxl: one guided SDXL UNet call at 1024x1024 on this device; gpu-sdxl: the same in fp16 with SDPA on "
                        "CUDA; both default to --config configs/sdxl/sd_xl_base.yaml)")
    p.add_argument("--kinds", type=_names(KINDS), default=None, help="comma list of " + ", ".join(KINDS))
    p.add_argument("--roofline", action="store_true", help="also measure the machine's attainable rate first (the roofline kind): "
                   "unet and vae rows then give their fraction of it")
    p.add_argument("--compile", action="store_true", help="unet / vae: compiled variants of both implementations beside the eager "
                   "ones; generate: each case also compiled")
    p.add_argument("--channels_last", action="store_true", help="weights and inputs in NHWC order (both implementations)")
    p.add_argument("--resolutions", type=_ints, default=None, help="comma list of image sides in pixels (unet, generate)")
    p.add_argument("--batch", type=_ints, default=None, help="unet: images per guided call (2 rows each)")
    p.add_argument("--n_samples", type=_ints, default=None, help="generate: images per run")
    p.add_argument("--max_batch_size", type=_ints, default=None, help="generate: images per micro-batch")
    p.add_argument("--steps", type=int, default=None, help="generate: sampling steps")
    p.add_argument("--attention", type=_names(ATTENTIONS), default=None, help="comma list of sdpa, math, sliced")
    p.add_argument("--precision", type=_names(PRECISIONS), default=None, help="comma list of fp32, fp16, bf16, autocast")
    p.add_argument("--offload", type=_names(("none", "model", "sequential")), default=None, help="generate: comma list of offload modes")
    p.add_argument("--vae_resolutions", type=_ints, default=None, help="vae: image sides in pixels")
    p.add_argument("--vae_tile", type=int, default=None, help="vae: tile side in latents (default 64, or half the latent when smaller)")
    p.add_argument("--vae_overlap", type=int, default=None, help="vae: overlap in latents (default tile / 4)")
    p.add_argument("--no_diffusers", action="store_true", help="skip the diffusers peers")
    p.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--repeats", type=int, default=2, help="timed repetitions after the measured (memory) run")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before the measured run")
    p.add_argument("--threads", type=int, default=None, help="torch threads in each case (default: torch's)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per case")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=str, default="outputs/benchmark", help="folder for results.csv, results.json and the plots")
    p.add_argument("--append", action="store_true", help="add to the results already in --out instead of replacing them")
    p.add_argument("--dry_run", action="store_true", help="print the planned cases and exit")
    p.add_argument("--load", action="store_true",
                   help="measure loading --ckpt instead: ours (load_model, the scripts' loader) and diffusers' single-file "
                        "pipeline load (UNet, VAE, text encoder; SD 1 layouts, else UNet + VAE), alternating, each in a "
                        "fresh process (imports done before the clock starts): seconds and peak RSS")
    p.add_argument("--load-child", dest="load_child", choices=("ours", "diffusers"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--load-pipeline", dest="load_pipeline", default=None, help=argparse.SUPPRESS)
    p.add_argument("--run-case", dest="run_case", type=str, default=None, help=argparse.SUPPRESS)
    p.add_argument("--case-out", dest="case_out", type=str, default=None, help=argparse.SUPPRESS)
    return p


def diffusers_pipeline_folder(ckpt: str, config: str, folder: Path) -> bool:
    """Write, offline, the configuration folder that lets diffusers' `StableDiffusionPipeline.from_single_file` load
    the whole model of `ckpt` (UNet, VAE and text encoder) without the hub: model_index.json, the UNet and VAE
    configs from diffusers' own converters, the text encoder's CLIPTextConfig (ours, from the config), the tokenizer
    (vocab.json / merges.txt from the shipped merges) and a scheduler. False (nothing written) when `config`'s text
    encoder is not a CLIP text model (SD 2's OpenCLIP, SDXL): the diffusers peer then loads the UNet and VAE only."""
    import diffusers
    import torch
    import yaml
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm, create_vae_diffusers_config_from_ldm

    from ldm.checkpoint import read_checkpoint
    from ldm.modules.encoders.tokenizer import DEFAULT_MERGES_PATH, _Vocab
    from ldm.util import instantiate_from_config, load_config

    with torch.device("meta"):
        model = instantiate_from_config(load_config(config).model)
    text = getattr(getattr(model, "cond_stage_model", None), "transformer", None)
    text = getattr(text, "text_model", text)
    if type(text).__name__ not in ("CLIPTextModel", "CLIPTextTransformer") or getattr(model, "conditioner", None) is not None:
        return False
    original = yaml.safe_load(Path(config).read_text())
    state_dict = read_checkpoint(ckpt)[0]
    for sub, conf in (("unet", create_unet_diffusers_config_from_ldm(original, state_dict)),
                      ("vae", create_vae_diffusers_config_from_ldm(original, state_dict))):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        (folder / sub / "config.json").write_text(json.dumps(conf))
    text.config.save_pretrained(folder / "text_encoder")
    vocab = _Vocab(DEFAULT_MERGES_PATH)  # the shipped merges, read and checked once, in rank order
    (folder / "tokenizer").mkdir(exist_ok=True)
    (folder / "tokenizer" / "vocab.json").write_text(json.dumps(vocab.encoder, ensure_ascii=False), encoding="utf-8")
    merges = "".join(f"{first} {second}\n" for first, second in vocab.ranks)
    (folder / "tokenizer" / "merges.txt").write_text("#version: 0.2\n" + merges, encoding="utf-8")
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    (folder / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77, **specials}))
    diffusers.PNDMScheduler().save_config(folder / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "PNDMScheduler"], "safety_checker": [None, None], "feature_extractor": [None, None],
             "requires_safety_checker": False}
    (folder / "model_index.json").write_text(json.dumps(index))
    return True


def load_child(impl: str, ckpt: str, config: str, pipeline: Optional[str] = None) -> dict:
    """One load in this (fresh) process: seconds, peak RSS (VmHWM), the RSS before, and the loaded weights' bytes.
    diffusers: the whole pipeline through `from_single_file` with the offline folder `pipeline`
    (`diffusers_pipeline_folder`), else its single-file UNet + VAE loads."""
    import torch

    from microbatch.devices import proc_status_mb

    if impl == "ours":
        from microbatch.devices import Dtypes
        from microbatch.loading import load_model
        # Imports outside the clock, as diffusers' below.
        import ldm.models.autoencoder  # noqa: F401
        import ldm.models.diffusion.ddpm  # noqa: F401
        import transformers.models.clip.modeling_clip  # noqa: F401

        def load() -> list:
            loaded = load_model(Path(ckpt), Path(config), torch.device("cpu"), Dtypes(torch.float32, torch.float32, torch.float32))
            return [loaded.model]
        what = "full model (UNet, VAE, text encoder)"
    elif pipeline:
        import diffusers.loaders.single_file  # noqa: F401
        import transformers.models.clip.modeling_clip  # noqa: F401
        from diffusers import StableDiffusionPipeline

        def load() -> list:
            pipe = StableDiffusionPipeline.from_single_file(ckpt, config=pipeline, original_config=config, local_files_only=True,
                                                            torch_dtype=torch.float32, safety_checker=None)
            return [pipe.unet, pipe.vae, pipe.text_encoder]
        what = "full pipeline (UNet, VAE, text encoder)"
    else:
        import diffusers.loaders.single_file_model  # noqa: F401
        from diffusers import AutoencoderKL, UNet2DConditionModel

        def load() -> list:
            kw = dict(original_config=config, local_files_only=True, torch_dtype=torch.float32)
            return [UNet2DConditionModel.from_single_file(ckpt, **kw), AutoencoderKL.from_single_file(ckpt, **kw)]
        what = "UNet + VAE (no offline text encoder config for this model)"
    before = proc_status_mb("VmRSS")
    start = time.perf_counter()
    models = load()
    seconds = time.perf_counter() - start
    weights = sum(t.numel() * t.element_size() for m in models for t in [*m.parameters(), *m.buffers()]) / 2**20
    peak = proc_status_mb("VmHWM")  # None off Linux: the memory columns stay empty
    return {"impl": impl, "load_s": round(seconds, 2), "rss_before_mb": before and round(before),
            "peak_rss_mb": peak and round(peak), "weights_mb": round(weights, 2),
            "peak_over_weights": peak and round(peak / weights, 3), "what": what}


def run_load_benchmark(args: argparse.Namespace) -> int:
    import subprocess

    if not args.ckpt:
        print("error: --load needs --ckpt", file=sys.stderr)
        return 2
    config = args.config or str(V1_CONFIG)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    impls = ["ours"] + ([] if args.no_diffusers else ["diffusers"])
    pipeline = out / "diffusers-pipeline"
    if not args.no_diffusers and not diffusers_pipeline_folder(args.ckpt, config, pipeline):
        pipeline = None
    for round_ in range(max(1, args.repeats)):
        for impl in impls if round_ % 2 == 0 else impls[::-1]:
            cmd = [sys.executable, __file__, "--load-child", impl, "--ckpt", args.ckpt, "--config", config]
            if impl == "diffusers" and pipeline is not None:
                cmd += ["--load-pipeline", str(pipeline)]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if done.returncode != 0:
                rows.append({"impl": impl, "error": (done.stderr.strip().splitlines() or ["failed"])[-1]})
            else:
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    (out / "load.json").write_text(json.dumps(rows, indent=2))
    times = {impl: [r["load_s"] for r in rows if r["impl"] == impl and "load_s" in r] for impl in impls}
    medians = {impl: statistics.median(t) for impl, t in times.items() if t}
    if medians:
        line = ", ".join(f"{impl} {m:.2f} s" for impl, m in medians.items())
        ratio = f"; ours / diffusers {medians['ours'] / medians['diffusers']:.3f}" if len(medians) == 2 else ""
        print(f"median load time: {line}{ratio}")
    return 0 if all("error" not in r for r in rows) else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.load_child:
        print(json.dumps(load_child(args.load_child, args.ckpt, args.config, args.load_pipeline)))
        return 0
    if args.load:
        return run_load_benchmark(args)
    if args.run_case:
        spec = json.loads(Path(args.run_case).read_text())
        rows = run_case_here(Case(**spec["case"]), Context(**spec["context"]))
        Path(args.case_out).write_text(json.dumps(rows))
        return 0
    from microbatch.devices import parse_device

    if args.ckpt and not Path(args.ckpt).is_file():
        print(f"error: checkpoint not found: {args.ckpt}", file=sys.stderr)
        return 2
    if args.ckpt and args.random:
        print("error: --random and --ckpt exclude each other", file=sys.stderr)
        return 2
    if args.config is None and not args.ckpt:
        args.config = str(SDXL_CONFIG if args.cases in SDXL_PRESETS else V1_CONFIG)
    if args.config is not None and not Path(args.config).is_file():
        print(f"error: config not found: {args.config}", file=sys.stderr)
        return 2
    if args.repeats < 0 or args.warmup < 0:
        print("error: --repeats and --warmup must be >= 0", file=sys.stderr)
        return 2
    try:
        device = parse_device(args.device)
    except ValueError as e:
        if not args.dry_run or args.device in ("auto", None):
            print(f"error: {e}", file=sys.stderr)
            return 2
        # a plan for a machine that is not this one (e.g. --device cuda --dry_run on a CPU machine)
        import torch

        device = torch.device(args.device)
        print(f"note: {e}; planning only", file=sys.stderr)
    if args.cases == "gpu" and device.type != "cuda":
        print("error: --cases gpu is the GPU table: use --device cuda (add --dry_run to see the plan here)", file=sys.stderr)
        return 2
    try:
        import diffusers  # noqa: F401

        peer = not args.no_diffusers
    except ImportError:
        peer = False
    sdxl = args.cases in SDXL_PRESETS or is_sdxl_config(args.config)
    try:
        cases = plan_sdxl_cases(args, device.type, peer) if sdxl else plan_cases(args, device.type, peer)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config = str(Path(args.config).resolve()) if args.config else None
    ctx = Context(args.ckpt, config, str(device), args.repeats, args.warmup, args.threads, args.seed)
    out = Path(args.out)
    print(f"{len(cases)} cases on {device} ({'random weights' if not args.ckpt else args.ckpt}, {args.config})")
    if args.dry_run:
        for case in cases:
            print(" ", asdict(case))
        return 0
    rows: list[dict] = []
    if args.append and (out / "results.json").is_file():
        rows = json.loads((out / "results.json").read_text())
    first_index = len(list((out / "cases").glob("[0-9][0-9][0-9].json"))) if args.append else 0
    for i, case in enumerate(cases):
        start = time.perf_counter()
        new = run_case_subprocess(case, ctx, out, first_index + i, args.timeout)
        rows.extend(new)
        for r in new:  # the limit later cases are a fraction of
            if r.get("kind") == "roofline" and r.get("op") == "best" and r.get("status") == "ok":
                ctx.attainable = {**(ctx.attainable or {}), r["dtype"]: r["attainable_gflops_per_s"]}
        write_tables(rows, out)
        summary = "; ".join(
            f"{r['impl']}: {r['status']} time {r.get('time_s')} s peak {r.get('peak_mb')} MB" + (f" ({r['error']})" if r.get("error") else "")
            for r in new if r.get("kind") != "roofline" or r.get("status") != "ok"
        ) or "; ".join(f"attainable {r['attainable_gflops_per_s']} GFLOP/s {r['dtype']} ({r['shape']} {r['layout']})" for r in new if r.get("op") == "best")
        what = f"{case.network} {case.precision}" if case.kind == "lora" else f"{case.resolution}px {case.attention} {case.precision}"
        print(f"[{i + 1}/{len(cases)}] {case.kind} {what} "
              f"b={case.batch} n={case.n_samples} mbs={case.max_batch_size} {case.vae_mode}: {summary} ({time.perf_counter() - start:.0f} s)", flush=True)
    plots = make_plots(rows, out)
    summary = write_summary(rows, out)
    if summary:
        print(summary)
    print(f"wrote {out / 'results.csv'}, {out / 'results.json'} and {len(plots)} plots")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
