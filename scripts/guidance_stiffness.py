"""Why a multistep sampler can fail where DDIM works: python scripts/guidance_stiffness.py [--ckpt M] [--scale 7.5]

Along a DDIM trajectory (the CompVis grid, fixed seed), estimates the dominant eigenvalue mu of the Jacobian of the
denoiser D(x, sigma) for the unconditional, the conditional and the guided prediction, by power iteration on
finite differences. For an ideal denoiser this Jacobian is Cov[x0 | x] / sigma^2: symmetric, eigenvalues in
[0, 1). Guidance D_u + g (D_c - D_u) can make it strongly negative where the prompt pins down what the unconditional
model is unsure of.

In sigma space the sampling ODE is dx/dsigma = (x - D(x, sigma)) / sigma, so a step h = (sigma' - sigma) / sigma
sees z = h (1 - mu). An explicit k-step Adams-Bashforth rule stays stable only for z down to a boundary (Euler,
which is DDIM here: -2; 2-step: -1; 3-step: -0.55; 4-step, which is PLMS and LMS: -0.3), printed per step. Steps
below a rule's boundary amplify an error by more than 1 per step.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a source checkout

import numpy as np  # noqa: E402
import torch  # noqa: E402

from samplers import Denoiser, GuidedModel, get_sigmas  # noqa: E402

# Adams-Bashforth weights, newest first (PLMS uses the 4-step rule once it has the history).
AB_WEIGHTS = {1: [1.0], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}


def ab_stability_boundary(k: int, resolution: float = 1e-4) -> float:
    """Most negative real z = h * lambda for which the k-step Adams-Bashforth rule is stable: every root of
    zeta^k - zeta^(k-1) - z * sum_j b_j zeta^(k-1-j) within the unit circle (found by scanning z downwards)."""
    if k not in AB_WEIGHTS:
        raise ValueError(f"k must be one of {sorted(AB_WEIGHTS)}, got {k}")
    rho = np.zeros(k + 1)
    rho[:2] = [1.0, -1.0]
    sigma = np.zeros(k + 1)
    sigma[1:] = AB_WEIGHTS[k]
    z = 0.0
    while z > -10.0:
        if np.abs(np.roots(rho - (z - resolution) * sigma)).max() > 1.0 + 1e-9:
            return z
        z -= resolution
    raise AssertionError("no stability boundary above -10")


def dominant_eigenvalue(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, iters: int = 12, rel_step: float = 1e-3, seed: int = 1) -> torch.Tensor:
    """Signed dominant eigenvalue of the Jacobian of fn at x, per batch element [B]: power iteration on
    finite-difference Jacobian-vector products, Rayleigh quotient of the last vector (exact for a symmetric
    Jacobian, which an ideal denoiser and any guided combination of two have)."""
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
    base = fn(x)
    step = rel_step * x.flatten(1).norm(dim=1).clamp_min(1e-6).view(-1, *[1] * (x.dim() - 1))
    lam = torch.zeros(x.shape[0], dtype=x.dtype)
    for _ in range(iters):
        v = v / v.flatten(1).norm(dim=1).view(-1, *[1] * (x.dim() - 1))
        jv = (fn(x + step * v) - base) / step
        lam = (jv * v).flatten(1).sum(dim=1)
        v = jv
    return lam


def stiffness_table(denoisers: dict[str, Denoiser], guided: str, x: torch.Tensor, sigmas: torch.Tensor, iters: int = 12) -> list[dict]:
    """Rows per step of a DDIM run of `denoisers[guided]` from x at sigmas[0]: sigma, h, the median dominant
    eigenvalue of each denoiser's Jacobian over the batch, and z = h (1 - mu) of the guided one."""
    rows = []
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        row = {"step": i, "sigma": sigma, "h": (sigma_next - sigma) / sigma}
        for name, den in denoisers.items():
            row[name] = float(dominant_eigenvalue(lambda y: den(y, sigma), x, iters).median())
        row["z"] = row["h"] * (1 - row[guided])
        rows.append(row)
        denoised = denoisers[guided](x, sigma)
        x = denoised + (x - denoised) * (sigma_next / sigma)  # the DDIM (eta 0) step
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, default=None, help="checkpoint (default: the embedded demo model)")
    p.add_argument("--config", type=Path, default=None, help="yaml (default: beside the checkpoint, else inferred)")
    p.add_argument("--prompt", type=str, action="append", default=None, help="prompt (repeatable; default: 9 demo captions)")
    p.add_argument("--scale", type=float, default=7.5, help="guidance scale")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iters", type=int, default=12, help="power iterations per estimate")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from microbatch.demo.shapes import all_combinations, caption
    from microbatch.devices import choose_dtypes
    from microbatch.loading import demo_checkpoint, load_model

    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.iters < 1:
        print(f"error: --steps and --iters must be positive, got {args.steps} and {args.iters}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    ckpt = args.ckpt or demo_checkpoint()
    try:
        loaded = load_model(ckpt, args.config, torch.device("cpu"), choose_dtypes("full", torch.device("cpu")), is_demo=args.ckpt is None)
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    model = loaded.model
    prompts = args.prompt or [caption(*label) for label in all_combinations()[::6]]
    with torch.no_grad():
        cond = model.get_learned_conditioning(prompts)
        uncond = model.get_learned_conditioning([""] * len(prompts))
        denoisers = {
            name: Denoiser(GuidedModel(model.apply_model, c, u, s), model.alphas_cumprod, model.parameterization)
            for name, c, u, s in (("uncond", uncond, None, 1.0), ("cond", cond, None, 1.0), ("guided", cond, uncond, args.scale))
        }
        sigmas = get_sigmas("uniform", denoisers["guided"], args.steps)
        shape = (len(prompts), model.channels, model.image_size, model.image_size)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed)) * float(sigmas[0])
        rows = stiffness_table(denoisers, "guided", x, sigmas, args.iters)
    bounds = {k: ab_stability_boundary(k) for k in (4, 3, 2, 1)}
    print(f"{ckpt}: {len(prompts)} prompts, guidance {args.scale:g}, DDIM {args.steps} steps on the CompVis grid, seed {args.seed}")
    print("AB stability boundaries (z): " + ", ".join(f"{k}-step {b:.3f}" for k, b in bounds.items()) + "  (PLMS/LMS: 4-step; DDIM: 1-step)")
    print(" step    sigma       h  mu_uncond  mu_cond  mu_guided       z  stable for")
    for r in rows:
        stable = [f"AB{k}" for k, b in bounds.items() if r["z"] >= b] or ["none"]
        print(f"{r['step']:5d} {r['sigma']:8.3f} {r['h']:7.3f} {r['uncond']:10.2f} {r['cond']:8.2f} {r['guided']:10.2f} {r['z']:7.3f}  {','.join(stable)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
