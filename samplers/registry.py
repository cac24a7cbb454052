"""Sampler registry: scripts pick a sampler by name with --sampler NAME.

| name         | method (paper)                                   | default schedule | noise            | NFE/step | ODE order |
|--------------|--------------------------------------------------|------------------|------------------|----------|-----------|
| ddim         | DDIM (Song et al. 2021)                          | uniform          | eta (default 0)  | 1        | 1         |
| plms         | PLMS (Liu et al. 2022), CompVis                  | uniform          | none             | 1 (+1)   | 2         |
| ddpm         | DDPM posterior sampling (Ho et al. 2020)         | karras           | always (eta 1)   | 1        | weak 1    |
| euler        | Euler (Karras et al. 2022)                       | karras           | none             | 1        | 1         |
| euler_a      | Euler ancestral (k-diffusion)                    | karras           | eta (default 1)  | 1        | 1 at eta 0|
| heun         | Heun (Karras et al. 2022)                        | karras           | none             | 2        | 2         |
| dpm2         | DPM2, log-sigma midpoint (k-diffusion)           | karras           | none             | 2        | 2         |
| lms          | linear multistep, order 4 (k-diffusion)          | karras           | none             | 1        | 4 *       |
| dpmpp_2m     | DPM-Solver++(2M) (Lu et al. 2022)                | karras           | none             | 1        | 2         |
| dpmpp_2s_a   | DPM-Solver++(2S) ancestral                       | karras           | eta (default 1)  | 2        | 2 at eta 0|
| dpmpp_sde    | DPM-Solver++ SDE (k-diffusion)                   | karras           | eta (default 1)  | 2        | 2 at eta 0|
| dpmpp_2m_sde | DPM-Solver++(2M) SDE                             | exponential      | eta (default 1)  | 1        | 2 at eta 0|
| dpmpp_3m_sde | DPM-Solver++(3M) SDE (k-diffusion)               | exponential      | eta (default 1)  | 1        | 3 * eta 0 |
| unipc        | UniPC bh2, p = 2 + UniC (Zhao et al. 2023)       | karras           | none             | 1        | 3         |

ODE orders are measured on the exact Gaussian model (tests/test_sampler_convergence.py). *: LMS and 3M start with a
first-order step, whose O(h^2) error is damped by the flow's contraction but makes the global order 2 as N grows
(visible from N ~ 100 for data std ~2); dpmpp_3m_sde also fixes k-diffusion's second-derivative coefficient, without
which it is second order (see its module).

Default schedules: CompVis-exact "uniform" for ddim and plms; "exponential" for the multistep SDE samplers (the
A1111 presets); "karras" for the rest. A1111's "Automatic" for euler / heun / lms is the t-uniform grid (our
"linspace"), but on the analytic model (docs/sampler-quality.md) every one of them is more accurate on karras, and
the integer "trailing" / "linspace" grids end with a large step (from t = T/N - 1, or across t = 0..T/(N-1)) that
over-smooths the result.

eta: the ancestral and SDE samplers default to eta = 1, as k-diffusion does (`SamplerInfo.default_eta`); ddim
defaults to 0 (deterministic, the original's default). The scripts use the sampler's default when --ddim_eta / --eta
is not given. eta = 0 makes every ancestral / SDE sampler deterministic (euler_a becomes euler, dpmpp_2s_a becomes
DPM-Solver++(2S), ...). ddpm has no eta (its variance is fixed).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable

from samplers.ddim import sample_ddim
from samplers.ddpm import sample_ddpm
from samplers.dpm2 import sample_dpm2
from samplers.dpmpp_2m import sample_dpmpp_2m
from samplers.dpmpp_2m_sde import sample_dpmpp_2m_sde
from samplers.dpmpp_2s_ancestral import sample_dpmpp_2s_ancestral
from samplers.dpmpp_3m_sde import sample_dpmpp_3m_sde
from samplers.dpmpp_sde import sample_dpmpp_sde
from samplers.euler import sample_euler
from samplers.euler_ancestral import sample_euler_ancestral
from samplers.heun import sample_heun
from samplers.lms import sample_lms
from samplers.plms import sample_plms
from samplers.unipc import sample_unipc


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
    # The eta used when none is given (k-diffusion's default for ancestral / SDE samplers).
    default_eta: float = 0.0


SAMPLERS: dict[str, SamplerInfo] = {}


def register(info: SamplerInfo) -> SamplerInfo:
    SAMPLERS[info.name] = info
    return info


_ETA = "default eta 1; eta 0 gives"

register(SamplerInfo("ddim", sample_ddim, "DDIM (Song et al. 2021); deterministic at eta 0, CompVis-exact on the uniform grid", "uniform", stochastic=True, uses_eta=True))
register(SamplerInfo("plms", sample_plms, "PLMS, CompVis pseudo linear multistep; eta must be 0", "uniform"))
register(SamplerInfo("ddpm", sample_ddpm, "DDPM ancestral posterior sampling (Ho et al. 2020), always stochastic, no eta", "karras", stochastic=True))
register(SamplerInfo("euler", sample_euler, "Euler on the probability-flow ODE (Karras et al. 2022), 1st order", "karras"))
register(SamplerInfo("euler_a", sample_euler_ancestral, f"Euler ancestral, A1111's 'Euler a' ({_ETA} Euler)", "karras", stochastic=True, uses_eta=True, default_eta=1.0))
register(SamplerInfo("heun", sample_heun, "Heun (Karras et al. 2022), 2nd order, 2 model calls per step", "karras", nfe_per_step=2))
register(SamplerInfo("dpm2", sample_dpm2, "DPM2, log-sigma midpoint (k-diffusion), 2nd order, 2 model calls per step", "karras", nfe_per_step=2))
register(SamplerInfo("lms", sample_lms, "linear multistep in sigma, order 4 (k-diffusion LMS)", "karras"))
register(SamplerInfo("dpmpp_2m", sample_dpmpp_2m, "DPM-Solver++(2M) (Lu et al. 2022), 2nd order multistep", "karras"))
register(SamplerInfo("dpmpp_2s_a", sample_dpmpp_2s_ancestral, f"DPM-Solver++(2S) ancestral, 2 model calls per step ({_ETA} DPM-Solver++(2S))", "karras", stochastic=True, uses_eta=True, nfe_per_step=2, default_eta=1.0))
register(SamplerInfo("dpmpp_sde", sample_dpmpp_sde, f"DPM-Solver++ SDE (k-diffusion), 2 model calls per step, per-seed noise, not step-count consistent ({_ETA} DPM-Solver++(2S))", "karras", stochastic=True, uses_eta=True, nfe_per_step=2, default_eta=1.0))
register(SamplerInfo("dpmpp_2m_sde", sample_dpmpp_2m_sde, f"DPM-Solver++(2M) SDE, per-seed noise, not step-count consistent ({_ETA} DPM-Solver++(2M))", "exponential", stochastic=True, uses_eta=True, default_eta=1.0))
register(SamplerInfo("dpmpp_3m_sde", sample_dpmpp_3m_sde, f"DPM-Solver++(3M) SDE, per-seed noise, not step-count consistent ({_ETA} 3rd-order DPM-Solver++(3M))", "exponential", stochastic=True, uses_eta=True, default_eta=1.0))
register(SamplerInfo("unipc", sample_unipc, "UniPC bh2 (Zhao et al. 2023), UniP-2 + UniC corrector: 3rd order, 1 model call per step", "karras"))


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
