"""Device and precision choices, and peak-memory measurement."""
from __future__ import annotations

import logging
import resource
import sys
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, Optional

import torch

logger = logging.getLogger(__name__)

Precision = Literal["autocast", "full"]


def best_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def parse_device(name: Optional[str]) -> torch.device:
    """'auto' / None -> the best available; otherwise a torch device string that must be usable here."""
    if name in (None, "", "auto"):
        return best_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"--device {name}: Apple MPS is not available on this machine")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bfloat16 arithmetic (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    if sys.platform != "linux":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


@dataclass(frozen=True)
class Dtypes:
    """Compute dtype per component. Latents and sampler arithmetic always stay float32."""

    unet: torch.dtype
    text: torch.dtype
    vae: torch.dtype

    def describe(self) -> str:
        name = lambda d: str(d).replace("torch.", "")  # noqa: E731
        return f"UNet {name(self.unet)}, text encoder {name(self.text)}, VAE {name(self.vae)}"


def choose_dtypes(precision: Precision, device: torch.device) -> Dtypes:
    """`full` is float32 everywhere. `autocast` (the original's default) stores and runs the UNet and text encoder
    in float16 on CUDA / MPS and in bfloat16 on CPUs with native bf16 (float32 on other CPUs); the VAE runs in
    float16 on GPUs (with a float32 fallback on overflow) and float32 on the CPU."""
    if precision not in ("autocast", "full"):
        raise ValueError(f"--precision must be autocast or full, got {precision!r}")
    if precision == "full":
        return Dtypes(torch.float32, torch.float32, torch.float32)
    if device.type in ("cuda", "mps"):
        return Dtypes(torch.float16, torch.float16, torch.float16)
    half = torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    return Dtypes(half, half, torch.float32)


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak-memory phase: CUDA resets the allocator's peak; on Linux the process's peak resident set
    (VmHWM) is reset through /proc/self/clear_refs. False where the peak cannot be reset (it then keeps counting
    from the process start)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    if device.type == "cpu" and sys.platform.startswith("linux"):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False
    return False


def proc_status_mb(field: str) -> Optional[float]:
    """A memory field of /proc/self/status (Linux: "VmRSS", "VmHWM", the peak resident set since the start or the
    last reset, ...) in MB; None where it cannot be read."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """(peak MB, what was measured) since the last `reset_peak_memory`: torch.cuda.max_memory_allocated on CUDA,
    else the process's peak resident set (Linux: VmHWM, which the reset clears; elsewhere ru_maxrss, since the
    process started)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "GPU memory allocated"
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2**20, "MPS driver memory (current)"
    hwm = proc_status_mb("VmHWM") if sys.platform.startswith("linux") else None
    if hwm is not None:
        return hwm, "resident memory (RSS)"
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in kilobytes on Linux and bytes on macOS.
    return (rss_kb / 1024 if sys.platform != "darwin" else rss_kb / 2**20), "resident memory (RSS)"


# glibc's mallopt parameters (malloc.h) and the values `keep_freed_cpu_memory` sets.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD = 32 * 2**20  # glibc's largest (HEAP_MAX_SIZE / 2 on 64-bit systems)
_TRIM_THRESHOLD = 2**31 - 1  # an int: 2 GB of free heap top kept before any is given back
KEEP_FREED_MEMORY_ENV = "MICROBATCH_KEEP_FREED_MEMORY"


def keep_freed_cpu_memory() -> bool:
    """With `MICROBATCH_KEEP_FREED_MEMORY=1` in the environment (off by default), let glibc's malloc keep freed
    memory for the next allocation instead of giving it back to the kernel, so the UNet's temporaries (GEGLU and
    convolution outputs of up to 32 MB, allocated and freed every step) reuse pages instead of faulting in fresh,
    zeroed ones: blocks up to 32 MB always come from the heap (glibc's own threshold starts at 128 KB and rises as
    such blocks are freed), and up to 2 GB of free heap top is kept (glibc gives back what exceeds 2x its threshold).
    Exact (no value changes); process-wide; Linux with glibc only. Measured (one process, 2 threads, guided UNet
    call, alternated rounds, both models under the same setting): SDXL base at 1024x1024 in bf16 12.49 -> 11.16 s
    (47 MB more peak RSS), SD v1 at 512x512 float32 6.40 -> 6.19 s (same peak); but a whole SD v1 txt2img run
    (512x512 float32, 5 steps, decode included) gained nothing measurable (48.4 / 50.3 s against 49.3 / 49.9 s)
    and peaked 100-160 MB higher, hence opt-in (README "Metrics"). True when set."""
    import os
    import platform

    if os.environ.get(KEEP_FREED_MEMORY_ENV, "0") != "1" or not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
        ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    except (OSError, AttributeError):
        return False
    if ok:
        logger.debug("glibc malloc keeps freed memory (mmap threshold 32 MB, trim threshold 2 GB)")
    return ok


# Lower-case fragments of the messages of failed allocations that are not torch.OutOfMemoryError: the CPU allocator
# ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to allocate
# N bytes. Error code 12 (Cannot allocate memory)"), "... out of memory" of the MPS / HIP / XPU backends and older
# CUDA builds, and the allocation failures of cuBLAS / cuDNN workspaces.
OUT_OF_MEMORY_MESSAGES = (
    "out of memory",
    "can't allocate memory",
    "cannot allocate memory",
    "status_alloc_failed",
)


def is_out_of_memory(error: BaseException) -> bool:
    """True for a failed memory allocation on any device: torch.OutOfMemoryError, Python's MemoryError, or a
    RuntimeError whose message says an allocation failed (see OUT_OF_MEMORY_MESSAGES)."""
    if isinstance(error, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
        return True
    if not isinstance(error, RuntimeError):
        return False
    message = str(error).lower()
    return any(fragment in message for fragment in OUT_OF_MEMORY_MESSAGES)


def empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()
