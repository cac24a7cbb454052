"""Choosing the micro-batch size from measured memory (`--max_batch_size auto`).

The memory model is measured, not guessed: one real sampler step (the guided UNet call, as the engine runs it) at
B = 1 and B = 2 images, and the engine's decode of those micro-batches, each under a peak-memory meter. Then

    peak(B) = max(fixed + per_image * B, decode + decode_per_image * (B - 1))

and the micro-batch size is the largest B with peak(B) <= budget, clamped to [1, n]. Decoding is one image at a
time, so its peak hardly grows with B: only the finished images of the micro-batch are held meanwhile (on the
CPU, where they are counted when the CPU is the device).

What is measured (`PeakMemory`):
- CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats: bytes of live tensors at the peak,
  weights included (what the caching allocator must find room for; its reserve and the CUDA context come on top).
- CPU: the bytes PyTorch's CPU allocator handed out during the call and that were live at the peak, from the
  profiler's memory events (torch.profiler with profile_memory=True: every allocation and free of the c10 CPU
  allocator, in order). Torch 2.13 has no CPU counterpart of the CUDA allocator stats, and the process's resident
  set is a poor ruler inside one process: glibc keeps freed pages, so a later call can reuse them without raising
  the high-water mark (/proc/self/status VmHWM, resettable by writing "5" to /proc/self/clear_refs). The allocator
  count is exact and repeatable; the weights (their tensors' bytes) are added to make it comparable with CUDA.
  Memory that libraries allocate outside PyTorch (oneDNN scratchpads) is not in it.
- MPS: the driver's allocated memory after the call minus before, after emptying the cache: the pool the call
  grew to, an approximation of its peak.
"""
from __future__ import annotations

import bisect
import dataclasses
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from microbatch.devices import empty_cache, is_out_of_memory

logger = logging.getLogger(__name__)

MEMORY_EVENT = "[memory]"


def tensor_bytes(module: torch.nn.Module, device: Optional[torch.device] = None) -> int:
    """Bytes of a module's parameters and buffers (those on `device`, when given)."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors if device is None or t.device.type == device.type)


def _profiler_events(prof: Any) -> tuple[list[tuple[int, int]], list[tuple[str, int, int]]]:
    """(memory events as (time ns, +/- bytes) of the CPU allocator in time order, ranges as (name, start, end))."""
    try:
        raw = list(prof.profiler.kineto_results.events())
    except AttributeError:  # private API moved: fall back to the exported trace
        import json
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "trace.json")
            prof.export_chrome_trace(path)
            with open(path) as f:
                trace = json.load(f).get("traceEvents", [])
        memory = [
            (int(e["ts"] * 1000), int(e["args"]["Bytes"]))
            for e in trace
            if e.get("name") == MEMORY_EVENT and e.get("args", {}).get("Device Type", 0) == 0
        ]
        ranges = [(e["name"], int(e["ts"] * 1000), int((e["ts"] + e.get("dur", 0)) * 1000)) for e in trace if e.get("ph") == "X"]
        return sorted(memory, key=lambda m: m[0]), ranges
    cpu = torch.autograd.DeviceType.CPU
    memory = [(e.start_ns(), e.nbytes()) for e in raw if e.name() == MEMORY_EVENT and e.device_type() == cpu]
    ranges = [(e.name(), e.start_ns(), e.end_ns()) for e in raw if e.name() != MEMORY_EVENT]
    return sorted(memory, key=lambda m: m[0]), ranges


def _running_peak(events: Sequence[tuple[int, int]]) -> int:
    total = peak = 0
    for _, nbytes in events:
        total += nbytes
        peak = max(peak, total)
    return peak


class PeakMemory:
    """Context manager measuring the peak memory of the code inside it on `device`.

    After exit: `transient_bytes` (the peak above what was allocated at entry) and `peak_bytes` (absolute: on CUDA
    the allocator's peak; elsewhere `resident_bytes` + transient, where `resident_bytes` is what the caller knows to
    be allocated already, usually the model's weights). `kind` names the ruler.
    """

    def __init__(self, device: torch.device, resident_bytes: int = 0):
        self.device = torch.device(device)
        self.resident_bytes = resident_bytes
        self.transient_bytes = 0
        self.peak_bytes = 0
        self.kind = ""
        self._start = 0
        self._prof: Any = None
        self.memory_events: list[tuple[int, int]] = []
        self.ranges: list[tuple[str, int, int]] = []

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        elif self.device.type == "mps":
            torch.mps.synchronize()
            torch.mps.empty_cache()
            self._start = torch.mps.driver_allocated_memory()
        else:
            from torch.profiler import ProfilerActivity, profile

            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._prof.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
            self.transient_bytes = self.peak_bytes - self._start
            self.kind = "torch.cuda.max_memory_allocated"
        elif self.device.type == "mps":
            torch.mps.synchronize()
            self.transient_bytes = max(0, torch.mps.driver_allocated_memory() - self._start)
            self.peak_bytes = self.resident_bytes + self.transient_bytes
            self.kind = "MPS driver memory growth + weights"
        else:
            self._prof.__exit__(*exc)
            if exc[0] is None:
                self.memory_events, self.ranges = _profiler_events(self._prof)
                self.transient_bytes = _running_peak(self.memory_events)
            self.peak_bytes = self.resident_bytes + self.transient_bytes
            self.kind = "torch CPU allocator peak (profiler memory events) + weights"
            self._prof = None

    def peaks_within(self, name: str) -> Optional[list[int]]:
        """CPU only: for every profiler range called `name` (e.g. a torch.profiler.record_function), the most bytes
        allocated inside it above what was allocated when it began. None on other devices."""
        if self.device.type != "cpu":
            return None
        times = [t for t, _ in self.memory_events]
        peaks = []
        for range_name, start, end in self.ranges:
            if range_name == name:
                lo, hi = bisect.bisect_left(times, start), bisect.bisect_right(times, end)
                peaks.append(_running_peak(self.memory_events[lo:hi]))
        return peaks


@dataclass(frozen=True)
class MemoryModel:
    """peak(B) = max(fixed_bytes + per_image_bytes * B, decode_bytes + decode_per_image_bytes * (B - 1)), in bytes,
    weights included: the sampling line and the decoding line (decode_bytes is one image's decode).

    `samples` holds the measured (B, sampling peak) pairs; `limit` is a B that ran out of memory while measuring
    (so only smaller ones are allowed), or None.
    """

    fixed_bytes: int
    per_image_bytes: int
    decode_bytes: int = 0
    decode_per_image_bytes: int = 0
    limit: Optional[int] = None
    kind: str = ""
    samples: tuple[tuple[int, int], ...] = ()

    def predict(self, batch_size: int) -> int:
        sampling = self.fixed_bytes + self.per_image_bytes * batch_size
        return max(sampling, self.decode_bytes + self.decode_per_image_bytes * (batch_size - 1))

    def describe(self) -> str:
        mb = 2**20
        return (
            f"peak(B) = max({self.fixed_bytes / mb:.0f} MB + {self.per_image_bytes / mb:.1f} MB x B, decode "
            f"{self.decode_bytes / mb:.0f} MB + {self.decode_per_image_bytes / mb:.1f} MB x (B - 1)) [{self.kind}]"
        )


def _jobs_for(jobs_sample: Sequence[Any], n: int) -> list[Any]:
    if not jobs_sample:
        raise ValueError("measure_memory_model needs at least one job")
    return [dataclasses.replace(jobs_sample[i % len(jobs_sample)], index=i) for i in range(n)]


def measure_memory_model(engine: Any, settings: Any, jobs_sample: Sequence[Any], batch_sizes: tuple[int, int] = (1, 2)) -> MemoryModel:
    """Measure peak memory of one sampler step at two micro-batch sizes and of one image's decode; fit the line.

    Args:
        engine: the Engine that will run the jobs (its model, device, img2img / inpainting state).
        settings: the run's SamplingSettings (size, guidance, split_guidance); the step is run with one euler step,
            which calls the guided UNet once, as every sampler step does at least once.
        jobs_sample: a few of the run's jobs (repeated as needed), for their prompts.
        batch_sizes: the two micro-batch sizes measured.
    Returns:
        the fitted MemoryModel. If the larger size runs out of memory, `limit` is set to it.
    """
    b1, b2 = batch_sizes
    if not 1 <= b1 < b2:
        raise ValueError(f"batch_sizes must be two increasing positive sizes, got {batch_sizes}")
    device = torch.device(engine.device)
    probe = dataclasses.replace(engine, step_callback=None)
    step = dataclasses.replace(
        settings, sampler="euler", steps=1, schedule=None, eta=0.0, strength=None if settings.strength is None else 1.0
    )
    jobs = _jobs_for(jobs_sample, b2)
    # Encode every prompt first: the text encoder's activations belong to no micro-batch (prompts are cached).
    probe.conditioning([j.prompt for j in jobs] + [j.negative_prompt for j in jobs], settings.prompt_steps, settings.clip_skip)
    resident = tensor_bytes(engine.model, device)
    samples: list[tuple[int, int]] = []
    decodes: list[tuple[int, int]] = []
    kind = ""
    limit = None
    for b in (b1, b2):
        empty_cache(device)
        try:
            with torch.no_grad(), PeakMemory(device, resident) as meter:
                out = probe.sample_batch(jobs[:b], step)
        except Exception as e:  # noqa: BLE001 - only out-of-memory is expected here
            if not is_out_of_memory(e) or b == b1:
                raise
            empty_cache(device)
            limit = b
            logger.warning("measuring %d images per micro-batch ran out of memory: the micro-batch size stays below it", b)
            break
        samples.append((b, meter.peak_bytes))
        kind = meter.kind
        empty_cache(device)
        with torch.no_grad(), PeakMemory(device, resident) as meter:
            probe.decode(out.clone())  # the micro-batch's latents are held while it decodes: count them
        decodes.append((b, meter.peak_bytes))
        del out
    per_image, fixed = _line(samples, resident)
    decode_per_image, decode_fixed = _line(decodes, resident)
    # Stored at B = 1: decode_bytes + decode_per_image_bytes * (B - 1).
    decode_one = decode_fixed + decode_per_image
    model = MemoryModel(int(fixed), int(per_image), int(decode_one), int(decode_per_image), limit, kind, tuple(samples))
    logger.info("memory model at %dx%d: %s", settings.width, settings.height, model.describe())
    return model


def _line(samples: Sequence[tuple[int, int]], resident: int) -> tuple[int, int]:
    """(slope, intercept) through two (B, peak) samples; with one, a conservative slope: everything above the
    weights scales with B."""
    if len(samples) == 2:
        (x1, y1), (x2, y2) = samples
        slope = max(0, round((y2 - y1) / (x2 - x1)))
    else:
        x1, y1 = samples[0]
        slope = max(1, (y1 - resident) // x1)
    return slope, samples[0][1] - slope * samples[0][0]


def _cgroup_available() -> Optional[int]:
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open("/sys/fs/cgroup/memory.current") as f:
            return int(limit) - int(f.read().strip())
    except (OSError, ValueError):
        return None


def free_memory_bytes(device: torch.device) -> int:
    """Memory a run could still take on `device`: CUDA: the driver's free memory plus what PyTorch's caching
    allocator holds unused; MPS: the recommended working set minus the driver's allocation; CPU: MemAvailable
    of /proc/meminfo, capped by the cgroup (container) limit."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "mps":
        return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if available is None:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    cgroup = _cgroup_available()
    return int(min(available, cgroup) if cgroup is not None else available)


def memory_budget(device: torch.device, model: torch.nn.Module, max_memory_gb: Optional[float] = None, safety: float = 0.9) -> int:
    """The peak (weights included, as MemoryModel counts) a run may reach: `max_memory_gb` when given, else what
    is in use now plus `safety` x the free memory."""
    if max_memory_gb is not None:
        if max_memory_gb <= 0:
            raise ValueError(f"--max_memory must be positive (GB), got {max_memory_gb}")
        return int(max_memory_gb * 2**30)
    device = torch.device(device)
    in_use = torch.cuda.memory_allocated(device) if device.type == "cuda" else tensor_bytes(model, device)
    return int(in_use + safety * free_memory_bytes(device))


def _largest(room: int, slope: int, offset: int, n: int) -> int:
    """Largest B with slope * (B - offset) <= room (n when the line is flat and fits, 0 when nothing fits)."""
    if slope <= 0:
        return n if room >= 0 else 0
    return math.floor(room / slope) + offset


def choose_batch_size(model: MemoryModel, budget_bytes: int, n: int) -> int:
    """The largest B in [1, n] with model.predict(B) <= budget_bytes (and below model.limit); 1 when none fits."""
    if n < 1:
        raise ValueError(f"number of images must be positive, got {n}")
    b = _largest(budget_bytes - model.fixed_bytes, model.per_image_bytes, 0, n)
    b = min(b, _largest(budget_bytes - model.decode_bytes, model.decode_per_image_bytes, 1, n))
    if model.limit is not None:
        b = min(b, model.limit - 1)
    b = max(1, min(n, b))
    if model.predict(1) > budget_bytes:
        logger.warning(
            "even one image per micro-batch is predicted to peak at %.0f MB, over the budget of %.0f MB: using 1",
            model.predict(1) / 2**20, budget_bytes / 2**20,
        )
    return b


# Default micro-batch when the user gives no --max_batch_size: UNet rows x latent area stays under this many
# latent pixels (a row is one image, two with guidance in one call), and at most DEFAULT_MAX_IMAGES images.
# CPU: 6 rows at 64x64 latents = 3 guided 512x512 images (the original's default n_samples), 1 at 1024x1024, the
# cap of 8 for the 64x64-pixel demo model. Batching gains the CPU little at real sizes (measured: the demo UNet at 32x32
# latents ran 2 and 16 rows per call at the same time per row) while memory grows linearly, and a CPU allocation
# failure may end in the kernel's OOM killer rather than an exception the back-off can catch.
# GPU: 8 rows at 64x64 = 4 guided 512x512 images, 1 at 768x768 (SD 2 v); an out-of-memory error halves it;
# `--max_batch_size auto` measures what fits.
DEFAULT_ROW_AREA = {"cpu": 6 * 64 * 64, "cuda": 8 * 64 * 64, "mps": 8 * 64 * 64}
DEFAULT_MAX_IMAGES = 8


def default_max_batch_size(device: torch.device, settings: Any, n_images: int) -> int:
    """The micro-batch size (images per UNet call) to use when the user gives none: min(n_images, the most images
    whose UNet rows x latent area stay under DEFAULT_ROW_AREA[device type], DEFAULT_MAX_IMAGES), at least 1.

    Args:
        device: where the UNet runs.
        settings: the run's SamplingSettings (height, width, factor, guidance_scale, split_guidance are read).
        n_images: images in the run (or the largest batch that may be grouped).
    Returns:
        an int in [1, max(1, n_images)]. A cheap rule, no measurement: `--max_batch_size auto` measures instead.
    """
    if n_images < 1:
        raise ValueError(f"number of images must be positive, got {n_images}")
    device = torch.device(device)
    latent_area = max(1, (settings.height // settings.factor) * (settings.width // settings.factor))
    guided_in_one_call = settings.guidance_scale != 1.0 and not settings.split_guidance
    rows_per_image = 2 if guided_in_one_call else 1
    budget = DEFAULT_ROW_AREA.get(device.type, DEFAULT_ROW_AREA["cuda"])
    cap = max(1, min(DEFAULT_MAX_IMAGES, budget // (latent_area * rows_per_image)))
    return min(n_images, cap)
