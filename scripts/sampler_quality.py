"""Sampler quality against step count: python scripts/sampler_quality.py [--ckpt model.ckpt] [--outdir DIR]

For every registered sampler, the distance of its result at 5, 10, 15, 20, 25 and 50 steps to the same sampler's
1000-step result from the same start noise (its converged value on that schedule), and the smallest step count at
which it is as close as DDIM is at 50 steps.

  - Analytic model (always): the exact Gaussian model of samplers.gaussian (data N(mu, s^2) per latent coordinate,
    s log-uniform in 0.05..2) through the real Denoiser with guidance, float64 latents [1, 4, 16, 16]. Ancestral and
    SDE samplers run at eta = 0 here (their deterministic limit; a single noisy sample has no step-count limit to
    converge to). Their default-eta behaviour gets its own table: the relative error of the output standard
    deviation against the data's, over 20,000 samples per coordinate (Monte-Carlo floor about 0.5%; the final jump
    D(x, sigma_min) alone shrinks the std of s = 0.1 by 4%).
  - A real model when --ckpt is given, or the embedded demo model is installed, or --config builds one with random
    weights: its latents from a fixed seed with guidance, float32. The 1000-step references cost 1000 model calls
    per sampler (2000 for heun, dpm2, dpmpp_2s_a, dpmpp_sde): use a GPU for full-size models or lower --ref_steps.

Distances are RMS over latent elements. Writes quality.csv, quality.md and quality.png (drawn with PIL; matplotlib is
not a dependency) under --outdir; --markdown also writes the markdown report to that path.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a source checkout

import torch  # noqa: E402

from ldm.checkpoint import CheckpointError  # noqa: E402
from samplers import SAMPLERS, Denoiser, GuidedModel, get_sigmas  # noqa: E402
from samplers.gaussian import GaussianModel, sd_alphas_cumprod  # noqa: E402

STEPS = [5, 10, 15, 20, 25, 50]
ANALYTIC_SCALE = 7.5
SEARCH_MAX = 200


def ode_options(name: str) -> dict:
    """The deterministic limit of a sampler (eta 0 where it takes eta)."""
    return {"eta": 0.0} if SAMPLERS[name].uses_eta else {}


def run(name: str, denoiser: Callable, z: torch.Tensor, schedule: str, steps: int) -> torch.Tensor:
    """The sampler's ODE result from VP start noise z, scaled as the engine does (z * sqrt(sigma_0^2 + 1))."""
    sigmas = get_sigmas(schedule, denoiser, steps)
    x = z * math.sqrt(float(sigmas[0]) ** 2 + 1.0)
    return SAMPLERS[name].fn(denoiser, x, sigmas, **ode_options(name))


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).pow(2).mean().sqrt())


def steps_to_reach(name: str, denoiser: Callable, z: torch.Tensor, schedule: str, reference: torch.Tensor, target: float, cap: int) -> Optional[int]:
    """Smallest step count in 1..cap whose distance to the reference is at most target (None if none)."""
    for n in range(1, cap + 1):
        if rms(run(name, denoiser, z, schedule, n), reference) <= target:
            return n
    return None


def ode_table(denoiser: Callable, z: torch.Tensor, names: Sequence[str], schedule_of: Callable[[str], str], ref_steps: int, cap: int, log) -> list[dict]:
    rows = []
    for name in names:
        start = time.perf_counter()
        schedule = schedule_of(name)
        reference = run(name, denoiser, z, schedule, ref_steps)
        errors = {n: rms(run(name, denoiser, z, schedule, n), reference) for n in STEPS}
        rows.append({"sampler": name, "schedule": schedule, "nfe_per_step": SAMPLERS[name].nfe_per_step, "errors": errors, "reference": reference, "ref_steps": ref_steps})
        log(f"  {name:13s} {schedule:12s} " + " ".join(f"{errors[n]:.2e}" for n in STEPS) + f"  ({time.perf_counter() - start:.1f}s)")
    ddim = next((r for r in rows if r["sampler"] == "ddim"), None)
    target = ddim["errors"][50] if ddim is not None else None
    for row in rows:
        row["steps_to_ddim50"] = None if target is None else steps_to_reach(row["sampler"], denoiser, z, row["schedule"], row["reference"], target, cap)
    return rows


def analytic_problem(seed: int, guidance_scale: float) -> tuple[Denoiser, torch.Tensor, GaussianModel, torch.Tensor]:
    """(denoiser, start noise [1, 4, 16, 16], model, guided data mean) of the Gaussian model with guidance."""
    g = torch.Generator().manual_seed(seed)
    shape = (1, 4, 16, 16)
    s = torch.exp(torch.empty(shape, dtype=torch.float64).uniform_(math.log(0.05), math.log(2.0), generator=g))
    mu_cond = 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)
    mu_uncond = 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)
    alphas_cumprod = sd_alphas_cumprod()
    model = GaussianModel(s, alphas_cumprod)
    denoiser = Denoiser(GuidedModel(model.apply_model, mu_cond, mu_uncond, guidance_scale), alphas_cumprod)
    z = torch.randn(shape, generator=g, dtype=torch.float64)
    return denoiser, z, model, mu_uncond + guidance_scale * (mu_cond - mu_uncond)


def distribution_table(names: Sequence[str], seed: int, log) -> list[dict]:
    """Relative error of the output std of each stochastic sampler (its default eta, 1 for ddim) against the
    data's std s, from the data's marginal at the first level."""
    s = torch.tensor([0.1, 0.5, 1.0, 2.0], dtype=torch.float64).reshape(1, 4, 1, 1)
    mu = torch.tensor([0.3, -0.2, 0.5, 0.0], dtype=torch.float64).reshape(1, 4, 1, 1)
    alphas_cumprod = sd_alphas_cumprod()
    model = GaussianModel(s, alphas_cumprod)
    denoiser = Denoiser(GuidedModel(model.apply_model, mu), alphas_cumprod)
    rows = []
    for name in names:
        info = SAMPLERS[name]
        if not info.stochastic:
            continue
        # ddim's default eta is 0 (deterministic): run it at 1; ddpm has a fixed eta of 1 and takes none
        eta = (info.default_eta or 1.0) if info.uses_eta else None
        errors = {}
        for n in STEPS:
            g = torch.Generator().manual_seed(seed)
            sigmas = get_sigmas(info.default_schedule, denoiser, n)
            x = mu + model.marginal_std(float(sigmas[0])) * torch.randn(20_000, 4, 1, 1, generator=g, dtype=torch.float64)
            noise = lambda like: torch.randn(like.shape, generator=g, dtype=like.dtype)  # noqa: E731
            out = info.fn(denoiser, x, sigmas, noise=noise, **({} if eta is None else {"eta": eta}))
            errors[n] = float((out.std(0, keepdim=True) / s - 1).abs().max())
        rows.append({"sampler": name, "schedule": info.default_schedule, "eta": "1 (fixed)" if eta is None else f"{eta:g}", "errors": errors})
        log(f"  {name:13s} eta {rows[-1]['eta']} " + " ".join(f"{errors[n]:.3f}" for n in STEPS))
    return rows


def _shown(path: Path) -> str:
    """A path as the report shows it: relative to the working directory when inside it (no machine's prefix)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def real_problem(args) -> Optional[tuple[Denoiser, torch.Tensor, str]]:
    """(denoiser, start noise, description) of a real model, or None when there is none to load."""
    from microbatch.pipeline import default_scale
    from microbatch.devices import Dtypes, parse_device
    from microbatch.loading import demo_checkpoint, load_model

    # --config alone builds the model with random weights (a smoke test); neither flag: the embedded demo model
    ckpt = Path(args.ckpt) if args.ckpt else (None if args.config else demo_checkpoint())
    if ckpt is None and args.config is None:
        return None
    device = parse_device(args.device)
    loaded = load_model(ckpt, Path(args.config) if args.config else None, device, Dtypes(torch.float32, torch.float32, torch.float32), is_demo=args.ckpt is None)
    model = loaded.model
    # The scale the scripts would use for this model: --scale, else txt2img's default for it.
    scale = args.scale if args.scale is not None else default_scale(loaded)
    with torch.no_grad():
        cond = model.get_learned_conditioning([args.prompt])
        uncond = model.get_learned_conditioning([""])
    denoiser = Denoiser(GuidedModel(model.apply_model, cond, uncond, scale), model.alphas_cumprod, model.parameterization)
    shape = (1, model.channels, model.image_size, model.image_size)
    z = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed)).to(device)
    return denoiser, z, f"{_shown(ckpt) if ckpt else 'random weights'} ({_shown(loaded.config_path)}), latents {list(shape)}, guidance {scale:g}, prompt {args.prompt!r}, seed {args.seed}"


# -- output ------------------------------------------------------------------------------------------------------------

def markdown(sections: list[tuple[str, str, list[dict]]], dist_rows: list[dict]) -> str:
    out = ["# Sampler quality against step count", "",
           "Written by `python scripts/sampler_quality.py --markdown docs/sampler-quality.md`; its docstring has the method. "
           "Each table's last column is the smallest step count at which a sampler is as close to its own converged "
           "result as DDIM (in the same table, on its schedule there) is at 50 steps; Heun, DPM2, DPM++ 2S a and DPM++ SDE "
           "cost 2 model calls per step. The distance is to each sampler's own limit on its schedule, so it measures "
           "convergence, not agreement between samplers (their limits differ in the final step: the jump to D, LMS's "
           "and PLMS's multistep step to 0, or the uniform grid's stop at sigma(0)). Errors need not fall monotonically "
           "on the CompVis uniform grid, whose timesteps are range(0, 1000, 1000 // N) + 1 (15 steps happen to be "
           "closer than 20).", ""]
    for title, note, rows in sections:
        out += [f"## {title}", "", note, "", "| sampler | schedule | NFE/step | " + " | ".join(f"{n} steps" for n in STEPS) + " | steps to reach DDIM@50 |"]
        out.append("|---|---|---|" + "---|" * len(STEPS) + "---|")
        for r in rows:
            reach = r["steps_to_ddim50"]
            reach = "-" if reach is None and "steps_to_ddim50" not in r else (f"> {SEARCH_MAX}" if reach is None else str(reach))
            out.append(f"| {r['sampler']} | {r['schedule']} | {r['nfe_per_step']} | " + " | ".join(f"{r['errors'][n]:.2e}" for n in STEPS) + f" | {reach} |")
        out.append("")
    if dist_rows:
        out += ["## Stochastic samplers at their default eta: output distribution (analytic model)", "",
                "max over s in {0.1, 0.5, 1, 2} of |std(output) / s - 1| where s is the data's std, 20,000 samples per s, default schedule. "
                "Grids ending at 0 finish with the jump D(x, sigma_min), which alone makes the s = 0.1 std 4% small; "
                "the uniform grid ends at sigma_min and keeps that noise.", "",
                "| sampler | schedule | eta | " + " | ".join(f"{n} steps" for n in STEPS) + " |", "|---|---|---|" + "---|" * len(STEPS)]
        for r in dist_rows:
            out.append(f"| {r['sampler']} | {r['schedule']} | {r['eta']} | " + " | ".join(f"{r['errors'][n]:.3f}" for n in STEPS) + " |")
        out.append("")
    return "\n".join(out)


def write_csv(path: Path, sections: list[tuple[str, str, list[dict]]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["problem", "sampler", "schedule", "nfe_per_step", *[f"err_{n}" for n in STEPS], "steps_to_ddim50"])
        for title, _, rows in sections:
            for r in rows:
                w.writerow([title, r["sampler"], r["schedule"], r["nfe_per_step"], *[f"{r['errors'][n]:.6e}" for n in STEPS], r["steps_to_ddim50"]])


def plot(path: Path, title: str, rows: list[dict]) -> None:
    """Log-log error against steps, one line per sampler, drawn with PIL."""
    from PIL import Image, ImageDraw

    w, h, left, right, top, bottom = 900, 560, 70, 190, 40, 50
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    errs = [e for r in rows for e in r["errors"].values() if e > 0]
    lo, hi = math.floor(math.log10(min(errs))), math.ceil(math.log10(max(errs)))
    xs = lambda n: left + (math.log(n) - math.log(STEPS[0])) / (math.log(STEPS[-1]) - math.log(STEPS[0])) * (w - left - right)  # noqa: E731
    ys = lambda e: top + (hi - math.log10(max(e, 10.0**lo))) / (hi - lo) * (h - top - bottom)  # noqa: E731
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for p in range(lo, hi + 1):
        d.line([left, ys(10.0**p), w - right, ys(10.0**p)], fill=(225, 225, 225))
        d.text((8, ys(10.0**p) - 6), f"1e{p}", fill="black")
    for n in STEPS:
        d.line([xs(n), top, xs(n), h - bottom], fill=(225, 225, 225))
        d.text((xs(n) - 6, h - bottom + 6), str(n), fill="black")
    d.text((left, 12), f"{title}: RMS distance to the {rows[0].get('ref_steps', 1000)}-step result (log-log)", fill="black")
    d.text(((w - right + left) // 2 - 20, h - 22), "steps", fill="black")
    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75), (227, 119, 194),
               (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 0), (255, 0, 255), (0, 128, 128), (128, 0, 0)]
    for k, r in enumerate(rows):
        color = palette[k % len(palette)]
        pts = [(xs(n), ys(r["errors"][n])) for n in STEPS]
        d.line(pts, fill=color, width=2)
        for x, y in pts:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        d.line([w - right + 10, top + 8 + 16 * k, w - right + 30, top + 8 + 16 * k], fill=color, width=3)
        d.text((w - right + 35, top + 2 + 16 * k), r["sampler"], fill="black")
    img.save(path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--outdir", default="outputs/sampler-quality", help="where quality.csv / .md / .png go")
    p.add_argument("--markdown", default=None, help="also write the markdown report here (e.g. docs/sampler-quality.md)")
    p.add_argument("--samplers", default=",".join(SAMPLERS), help="comma-separated sampler names")
    p.add_argument("--ref_steps", type=int, default=1000, help="steps of each sampler's reference run")
    p.add_argument("--search_max", type=int, default=SEARCH_MAX, help="largest step count tried when matching DDIM@50")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--scale", type=float, default=None, help=f"guidance scale (default: {ANALYTIC_SCALE:g} for the analytic model; the scripts' default for the real one)")
    p.add_argument("--ckpt", default=None, help="a real model (default: the embedded demo model when installed)")
    p.add_argument("--config", default=None, help="model yaml (alone: random weights, for a smoke test)")
    p.add_argument("--prompt", default="a red circle on a white background")
    p.add_argument("--device", default="auto")
    p.add_argument("--no_real", action="store_true", help="analytic model only")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.samplers.split(",") if n.strip()]
    unknown = [n for n in names if n not in SAMPLERS]
    if unknown:
        p.error(f"unknown samplers {unknown}; choose from {', '.join(SAMPLERS)}")
    if args.ref_steps < max(STEPS):
        p.error(f"--ref_steps must be at least {max(STEPS)}, got {args.ref_steps}")
    ode_names = [n for n in names if n != "ddpm"]  # ddpm has no deterministic limit
    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    sections = []
    scale = ANALYTIC_SCALE if args.scale is None else args.scale
    denoiser, z, _, _ = analytic_problem(args.seed, scale)
    print(f"analytic model, default schedules, guidance {scale:g}: distance to the {args.ref_steps}-step result")
    rows = ode_table(denoiser, z, ode_names, lambda n: SAMPLERS[n].default_schedule, args.ref_steps, args.search_max, print)
    sections.append(("Analytic model, default schedules", f"Exact Gaussian model with guidance {scale:g}, latents [1, 4, 16, 16] (s log-uniform in 0.05..2), RMS distance to the same sampler's {args.ref_steps}-step result on the same schedule; ancestral/SDE samplers at eta 0.", rows))
    print("analytic model, karras schedule for every sampler")
    rows_k = ode_table(denoiser, z, ode_names, lambda n: "karras", args.ref_steps, args.search_max, print)
    sections.append(("Analytic model, karras schedule for all", "As above, every sampler on the Karras (rho 7) schedule.", rows_k))
    print("stochastic samplers at their default eta: relative error of the output std")
    dist_rows = distribution_table(names, args.seed, print)

    if not args.no_real:
        try:
            real = real_problem(args)
        except (CheckpointError, FileNotFoundError, ValueError, OSError) as e:
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
            return 2
        if real is None:
            print("no real model (no --ckpt, no embedded demo model, no --config): analytic model only")
        else:
            denoiser_r, z_r, what = real
            print(f"real model: {what}")
            rows_r = ode_table(denoiser_r, z_r, ode_names, lambda n: SAMPLERS[n].default_schedule, args.ref_steps, min(args.search_max, 100), print)
            sections.append(("Real model, default schedules", f"{what}; RMS latent distance to the same sampler's {args.ref_steps}-step result.", rows_r))

    for title, _, rows in sections:
        reach = {r["sampler"]: r["steps_to_ddim50"] for r in rows}
        print(f"{title}: steps to reach DDIM's 50-step error: " + ", ".join(f"{k} {v if v is not None else '>' + str(args.search_max)}" for k, v in reach.items()))
    text = markdown(sections, dist_rows)
    (outdir / "quality.md").write_text(text)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(text)
    write_csv(outdir / "quality.csv", sections)
    plot(outdir / "quality.png", sections[0][0], sections[0][2])
    print(f"wrote {outdir / 'quality.md'}, {outdir / 'quality.csv'}, {outdir / 'quality.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
