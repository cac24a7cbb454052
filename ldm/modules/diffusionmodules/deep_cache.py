"""DeepCache (Ma, Fang & Wang 2023, "DeepCache: Accelerating Diffusion Models for Free"), an opt-in approximation.

The UNet's deep features change slowly from one denoiser call to the next, its shallow ones do not. Every
`interval`-th call runs the whole UNet and keeps the feature that enters the output block of skip branch `branch`;
the calls in between run only the shallow part: input blocks 0..branch, then that cached feature concatenated with
their fresh skip features through output blocks n-1-branch..n-1. Branch 0 (the published default) runs the first
input block (the conv_in) and the last output block; the middle block and everything else are reused. (This is
the branch numbering of DeepCache's own ldm UNet code and of its diffusers helper `DeepCacheSDHelper`.)

Calls are counted by `step()`: the denoiser calls of one micro-batch (a second-order sampler makes two per step),
so call 0, interval, 2 interval, ... run the whole UNet. A call whose inputs have no cached feature yet (the first
call after the conditioning changed, e.g. by prompt editing, or a guidance interval that drops the unconditional
rows: the cache is keyed by the input's shape and a fingerprint of the conditioning) runs the whole UNet too.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch


def _fingerprint(value: Any) -> tuple:
    """A key for a conditioning tensor: its shape and two sums (equal for equal tensors; unequal tensors collide
    only by accident)."""
    if value is None:
        return (None,)
    v = value.detach().float()
    sums = torch.stack([v.sum(), v.abs().sum()]).tolist()
    return (tuple(v.shape), *sums)


class DeepCache:
    """The feature cache a UNetModel uses while it is set as its `deep_cache` (for one micro-batch)."""

    def __init__(self, interval: int, step: Callable[[], int], branch: int = 0):
        if interval < 1 or branch < 0:
            raise ValueError(f"DeepCache needs interval >= 1 and branch >= 0, got {interval} and {branch}")
        self.interval = int(interval)
        self.branch = int(branch)
        self.step = step
        self.features: dict[tuple, torch.Tensor] = {}
        self._key: Optional[tuple] = None
        self.full_calls = 0
        self.shallow_calls = 0

    @property
    def shallow_blocks(self) -> int:
        """How many input blocks (and output blocks) the shallow calls run."""
        return self.branch + 1

    def lookup(self, x: torch.Tensor, context: Any, y: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The cached deep feature for this call, or None when the whole UNet must run (then `store` keeps it)."""
        key = (tuple(x.shape), _fingerprint(context), _fingerprint(y))
        cached = self.features.get(key)
        if cached is not None and self.step() % self.interval != 0:
            self.shallow_calls += 1
            self._key = None
            return cached
        self.full_calls += 1
        self._key = key
        return None

    def store(self, feature: torch.Tensor) -> None:
        """Keep the feature entering the cached branch's output block, from a whole-UNet call."""
        if self._key is not None:
            self.features[self._key] = feature
