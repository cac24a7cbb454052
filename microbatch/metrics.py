"""What our users measure: load time, sampling time, time to first image, time per image, peak memory."""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from microbatch.devices import peak_memory_mb


@dataclass
class RunMetrics:
    device: str
    model_load_s: float = 0.0
    images: int = 0
    sampling_s: float = 0.0
    first_image_s: Optional[float] = None
    per_image_s: list[float] = field(default_factory=list)
    # The closing lines' "Peak ... memory": the sampling phase's peak (peak_memory_sampling_mb).
    peak_memory_mb: float = 0.0
    peak_memory_kind: str = ""
    # Per phase: the peak up to the end of loading the model, and the peak while sampling and decoding (reset after
    # loading; `sampling_peak_reset` False where it could not be reset, so it also holds the load).
    peak_memory_load_mb: Optional[float] = None
    peak_memory_sampling_mb: Optional[float] = None
    sampling_peak_reset: bool = True
    final_max_batch_size: Optional[int] = None
    # --compile: seconds torch.compile spent compiling (or reading its cache) during sampling; it happens on first
    # use of each shape, so it is inside first_image_s (and sampling_s). None without --compile.
    compile_s: Optional[float] = None
    interrupted: bool = False
    settings: dict[str, Any] = field(default_factory=dict)
    ranks: list[dict[str, Any]] = field(default_factory=list)  # a distributed job's per-rank figures
    _start: Optional[float] = None
    _last: Optional[float] = None

    def start(self) -> None:
        self._start = self._last = time.perf_counter()

    def batch_done(self, n_images: int) -> None:
        """Record a finished micro-batch of n_images (each image gets an equal share of its time)."""
        now = time.perf_counter()
        if self._start is None:
            self.start()
        share = (now - self._last) / max(1, n_images)
        self.per_image_s.extend([share] * n_images)
        if self.first_image_s is None and n_images:
            self.first_image_s = now - self._start
        self.images += n_images
        self._last = now
        self.sampling_s = now - self._start

    def finish(self, device: torch.device) -> None:
        if self._start is not None:
            self.sampling_s = time.perf_counter() - self._start
        self.peak_memory_mb, self.peak_memory_kind = peak_memory_mb(device)
        self.peak_memory_sampling_mb = self.peak_memory_mb

    @property
    def median_image_s(self) -> Optional[float]:
        return statistics.median(self.per_image_s) if self.per_image_s else None

    @property
    def first_image_without_compile_s(self) -> Optional[float]:
        """Time to first image less the compilation inside it (what a run with a warm compiled model takes)."""
        if self.first_image_s is None or self.compile_s is None:
            return None
        return max(0.0, self.first_image_s - self.compile_s)

    @property
    def images_per_s(self) -> Optional[float]:
        return self.images / self.sampling_s if self.sampling_s > 0 and self.images else None

    def report(self) -> str:
        """The lines every script prints at the end."""
        lines = [f"Samples took {self.sampling_s:.2f} seconds ({self.images} images)"]
        if self.first_image_s is not None:
            lines.append(f"Time to first image: {self.first_image_s:.2f} s")
        if self.median_image_s is not None:
            lines.append(f"Time per image (median): {self.median_image_s:.2f} s; {self.images_per_s:.3f} images/s")
        lines.append(f"Model load took {self.model_load_s:.2f} seconds")
        if self.compile_s is not None:
            without = f"; time to first image without it: {self.first_image_without_compile_s:.2f} s" if self.first_image_s is not None else ""
            lines.append(f"Compilation (torch.compile, in the sampling time) took {self.compile_s:.2f} seconds{without}")
        label = "Peak GPU memory allocated" if self.peak_memory_kind == "GPU memory allocated" else f"Peak {self.peak_memory_kind}"
        lines.append(f"{label}: {self.peak_memory_mb:.2f} MB" + ("" if self.sampling_peak_reset else " (since the process started)"))
        if self.peak_memory_load_mb is not None:
            lines.append(f"Peak {self.peak_memory_kind or 'memory'} while loading the model: {self.peak_memory_load_mb:.2f} MB")
        for r in self.ranks if len(self.ranks) > 1 else []:
            lines.append(
                f"  {r['rank']}: {r['images']} images, {r['images_per_s'] or 0:.3f} images/s, idle {100 * r['idle_fraction']:.1f}%, "
                f"first image {r['first_image_s'] or 0:.2f} s, peak {r['peak_memory_mb']:.0f} MB"
            )
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        d["median_image_s"] = self.median_image_s
        d["images_per_s"] = self.images_per_s
        d["first_image_without_compile_s"] = self.first_image_without_compile_s
        return d

    def write_json(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text(json.dumps(self.as_dict(), indent=2, default=str))
        tmp.replace(path)
