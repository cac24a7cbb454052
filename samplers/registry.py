"""Sampler registry: scripts pick a sampler by name with --sampler NAME."""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable

from samplers.ddim import sample_ddim
from samplers.plms import sample_plms


@dataclass(frozen=True)
class SamplerInfo:
    """A sampler function `fn(denoiser, x, sigmas, *, eta, noise, callback) -> x` and how to use it."""

    name: str
    fn: Callable
    description: str
    default_schedule: str = "karras"
    # Draws fresh noise while sampling (always, or when eta > 0).
    stochastic: bool = False
    uses_eta: bool = False
    # Model evaluations per step, for progress and cost estimates.
    nfe_per_step: int = 1


SAMPLERS: dict[str, SamplerInfo] = {}


def register(info: SamplerInfo) -> SamplerInfo:
    SAMPLERS[info.name] = info
    return info


register(SamplerInfo("ddim", sample_ddim, "DDIM (Song et al. 2021); deterministic at eta 0, CompVis-exact on the uniform grid", "uniform", uses_eta=True))
register(SamplerInfo("plms", sample_plms, "PLMS, CompVis pseudo linear multistep; eta must be 0", "uniform"))


def get_sampler(name: str) -> SamplerInfo:
    """The sampler called `name`; unknown names raise ValueError with the nearest known name."""
    if name in SAMPLERS:
        return SAMPLERS[name]
    close = difflib.get_close_matches(name, list(SAMPLERS), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown sampler {name!r}.{hint} Available: {', '.join(SAMPLERS)}")


def sampler_help() -> str:
    """One line per sampler, for --help."""
    return "; ".join(f"{s.name}: {s.description}" for s in SAMPLERS.values())
