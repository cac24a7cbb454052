"""Exact speed-ups applied to a loaded model: `--compile` (torch.compile of the UNet and the VAE decoder) and
`--channels_last` (convolution weights and activations in NHWC order).

Both change images only by float rounding (a compiled graph fuses and reorders floating-point work; an NHWC
convolution sums in another order). Both are off by default: the default run stays exactly what it was.

Compilation is lazy and keyed on shapes: `nn.Module.compile(dynamic=False)` compiles in place (the module tree
and the state-dict keys stay as they are, so LoRAs, offload bookkeeping and the attention switch keep working), and
the first call with a new input shape (micro-batch rows, latent size, dtype) compiles a graph for it. A run of
n_samples images in micro-batches of B compiles the UNet for 2B rows (B with --split_guidance) and, when B does
not divide n_samples, once more for the last, smaller micro-batch: the last micro-batch is not padded, since padded
rows would cost a UNet evaluation per step each, on every run, while a recompile is paid once and then read from
the on-disk cache. The hires fix's second size, guidance intervals (B rows outside the interval) and the VAE
decoder (one image at a time, or one tile size) add a graph each. Graphs beyond dynamo's limit per function
(`torch._dynamo.config.recompile_limit`, 8 by default) run eagerly, with dynamo's warning.

The compiler's on-disk caches (Inductor's FX graph cache and its compiled kernels) live in TORCHINDUCTOR_CACHE_DIR,
which defaults here to ~/.cache/microbatch/inductor (TORCHINDUCTOR_CACHE_DIR set by the user wins), so a second
run with the same model layout, shapes and torch version does not pay the compilation again (it still traces the
Python code: about 10 s for the tiny test model here, against 2.5 min cold). The time spent compiling is read from
dynamo's own counters (`compile_seconds`) and reported in the metrics as `compile_s`.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "microbatch" / "inductor"
# torch.compile's backend for --compile ("eager" only traces: the tests use it to check the plumbing quickly)
BACKEND = "inductor"


def compile_supported() -> Optional[str]:
    """None when torch.compile can run here, else why not (one line)."""
    try:
        import torch._dynamo

        if not torch._dynamo.is_dynamo_supported():
            return f"torch.compile is not supported with this Python / torch ({torch.__version__})"
    except Exception as e:  # an incomplete install
        return f"torch.compile is unavailable: {e}"
    return None


def configure_cache(cache_dir: Optional[Path] = None) -> Path:
    """Point Inductor's on-disk caches at `cache_dir`, else TORCHINDUCTOR_CACHE_DIR if set, else
    ~/.cache/microbatch/inductor, and turn its FX graph cache on. Returns the folder."""
    if cache_dir is not None:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)
    else:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(DEFAULT_CACHE_DIR))
    folder = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    folder.mkdir(parents=True, exist_ok=True)
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    return folder


def compile_seconds() -> float:
    """Seconds spent compiling so far in this process (dynamo's own per-frame compile timer, which includes
    Inductor's code generation or its cache lookup); differences of two readings time one run's compilation."""
    try:
        from torch._dynamo.utils import compilation_time_metrics
    except ImportError:
        return 0.0
    return float(sum(compilation_time_metrics.get("_compile.compile_inner", [])))


def compiled_parts(model: Any) -> list[tuple[str, torch.nn.Module]]:
    """The modules `--compile` compiles: the UNet (`model.model.diffusion_model`) and the VAE decoder
    (`model.first_stage_model.decoder`), for SD 1 / 2 and SDXL alike."""
    parts = []
    unet = getattr(getattr(model, "model", None), "diffusion_model", None)
    if isinstance(unet, torch.nn.Module):
        parts.append(("UNet", unet))
    decoder = getattr(getattr(model, "first_stage_model", None), "decoder", None)
    if isinstance(decoder, torch.nn.Module):
        parts.append(("VAE decoder", decoder))
    return parts


def compile_model(model: Any, backend: Optional[str] = None, compile_fn: Optional[Callable[[torch.nn.Module], None]] = None) -> list[str]:
    """torch.compile the UNet and the VAE decoder of `model` in place, with static shapes (one graph per input
    shape, see the module docstring). `compile_fn(module)` replaces `module.compile(...)` (tests). Returns the names
    of the compiled parts."""
    why = compile_supported()
    if why is not None:
        raise ValueError(why)
    folder = configure_cache()
    backend = backend or BACKEND
    names = []
    for name, module in compiled_parts(model):
        if compile_fn is not None:
            compile_fn(module)
        else:
            module.compile(backend=backend, dynamic=False)
        names.append(name)
    logger.info("torch.compile (%s, static shapes) of the %s; compiler cache: %s", backend, " and ".join(names), folder)
    return names


def is_compiled(module: torch.nn.Module) -> bool:
    """Whether `module.compile()` was applied to this module."""
    return getattr(module, "_compiled_call_impl", None) is not None


def to_channels_last(model: Any) -> list[str]:
    """Store the 4-D convolution weights of the UNet and the VAE in NHWC order ("channels last"): their
    convolutions then produce NHWC activations, which the following norms and element-wise ops keep. oneDNN's CPU
    convolutions and the GPUs' tensor-core convolutions are faster in NHWC (measured by `scripts/benchmark.py
    --kinds roofline`). Returns the names of the converted parts."""
    names = []
    for name, module in (("UNet", getattr(getattr(model, "model", None), "diffusion_model", None)), ("VAE", getattr(model, "first_stage_model", None))):
        if isinstance(module, torch.nn.Module):
            module.to(memory_format=torch.channels_last)
            names.append(name)
    return names


def apply_speedups(model: Any, compile: bool = False, channels_last: bool = False) -> list[str]:
    """Apply the options a `ModelOptions` asks for to a loaded model (channels last first: the compiled graphs
    are traced with the weights' layout). Returns notes for the user."""
    notes = []
    if channels_last:
        notes.append(f"channels last: {', '.join(to_channels_last(model))}")
    if compile:
        parts = compile_model(model)
        notes.append(
            f"torch.compile: {' and '.join(parts)} (compiled on first use of each shape; cache "
            f"{os.environ.get('TORCHINDUCTOR_CACHE_DIR')})"
        )
    return notes
