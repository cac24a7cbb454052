"""What the opt-in step savings (--tome, --deepcache, --guidance_interval) save and cost.

    python scripts/step_savings_bench.py --part quality --seeds 1 --out outputs/step-savings
    python scripts/step_savings_bench.py --part unet --resolution 256 --rounds 2 --out outputs/step-savings
    python scripts/step_savings_bench.py --part demo_time --rounds 5 --out outputs/step-savings

quality: the demo model (DDIM, 30 steps, its guidance scale 2) over every colour x shape x background combination
for --seeds seeds, exact and with each setting: adherence (scripts/eval_demo.py's judge), the mean absolute
pixel distance to the exact run's images (same seeds; 0-255 scale) and the time per image (wall time of each
setting's run / images; the exact run is timed before and after the others to show the machine's drift; on a
shared machine prefer demo_time's figures).

demo_time: time per image on the demo model, every setting making the same few images once per round, settings
in a rotated order each round (drift hits all of them), median over rounds.

unet: one guided UNet call ([uncond, cond] rows, t = 500, random context) of a random-weight model of --config
(default: the full-size SD v1 layout) at --resolution: ours exact, with ToMe 0.3 / 0.5 and DeepCache's cheap call,
and the same on diffusers' UNet converted from the same weights with the published packages (tomesd and
DeepCache's DeepCacheSDHelper) when they import. Configurations are timed in turn, --rounds times, each round in
a rotated order; the figure is the median. Cross-checks: ours exact vs diffusers exact; ours with fixed
destinations (use_rand off) vs tomesd with use_rand off; ours' cheap DeepCache call vs DeepCacheSDHelper's.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a source checkout

REPO = Path(__file__).resolve().parents[1]
QUALITY_SETTINGS: dict[str, dict[str, Any]] = {
    "exact": {},
    "tome 0.3": {"tome": 0.3},
    "tome 0.5": {"tome": 0.5},
    "deepcache 2": {"deepcache": 2},
    "deepcache 3": {"deepcache": 3},
    "deepcache 5": {"deepcache": 5},
    # Kynkaanniemi et al. 2024's interval for SD-XL, whose noise schedule is SD's (sigma_max 14.6)
    "guidance interval 0.28 5.42": {"guidance_interval": (0.28, 5.42)},
    # guidance off only at the low noise levels (the last steps)
    "guidance interval 0.28 inf": {"guidance_interval": (0.28, float("inf"))},
    # guidance off at the high noise levels (the first steps)
    "guidance interval 0 5.42": {"guidance_interval": (0.0, 5.42)},
}


def _script(name: str) -> Any:
    """Another script of scripts/ as a module (scripts/ is no package)."""
    import importlib

    if str(REPO / "scripts") not in sys.path:
        sys.path.insert(0, str(REPO / "scripts"))
    return importlib.import_module(name)


def run_quality(args: argparse.Namespace) -> dict:
    import dataclasses

    import numpy as np

    from microbatch.demo.shapes import all_combinations
    from microbatch.pipeline import default_scale
    eval_demo = _script("eval_demo")

    loaded = eval_demo.load_demo(None, "full", "cpu")
    labels = all_combinations()
    seeds = list(range(args.seeds))
    base = eval_demo.settings_for("ddim", args.steps, default_scale(loaded))
    names = list(QUALITY_SETTINGS) + ["exact (again)"]
    out: dict[str, dict] = {}
    exact_images = None
    for name in names:
        extra = QUALITY_SETTINGS.get(name, {})
        settings = dataclasses.replace(base, **extra)
        start = time.perf_counter()
        adherence, images = eval_demo.adherence(loaded, labels, seeds, settings)
        seconds = time.perf_counter() - start
        if exact_images is None:
            exact_images = images
        distance = float(np.mean([np.abs(a.astype(np.float64) - b.astype(np.float64)).mean() for a, b in zip(images, exact_images)]))
        out[name] = {"settings": {k: list(v) if isinstance(v, tuple) else v for k, v in extra.items()}, "adherence": adherence,
                     "pixel_distance": distance, "time_per_image_s": seconds / len(images), "images": len(images)}
        print(f"{name}: all {adherence['all']:.3f} (color {adherence['color']:.3f}, shape {adherence['shape']:.3f}, "
              f"background {adherence['background']:.3f}), distance {distance:.2f}, {seconds / len(images):.3f} s/image", flush=True)
    return out


def run_demo_time(args: argparse.Namespace) -> dict:
    """Time per image on the demo model: each setting makes the same --images images (4 prompts, DDIM, 30 steps)
    once per round, settings in a rotated order each round; the median over rounds."""
    import dataclasses

    from microbatch.demo.shapes import all_combinations, caption
    from microbatch.pipeline import default_scale

    eval_demo = _script("eval_demo")
    loaded = eval_demo.load_demo(None, "full", "cpu")
    labels = all_combinations()[: args.images]
    prompts, seeds = [caption(*label) for label in labels], list(range(args.images))
    base = eval_demo.settings_for("ddim", args.steps, default_scale(loaded), batch=args.images)
    configs = {
        name: (lambda extra=extra: eval_demo.generate(loaded, prompts, seeds, dataclasses.replace(base, **extra)))
        for name, extra in QUALITY_SETTINGS.items()
    }
    times = _median_times(configs, args.rounds)
    return {"images": args.images, "steps": args.steps, "times_s": times,
            "median_s_per_image": {k: statistics.median(v) / args.images for k, v in times.items()}}


def _median_times(configs: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    import torch

    names = list(configs)
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.no_grad():
        for n in names:  # one untimed run each (allocator, kernels)
            configs[n]()
        for r in range(rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            if r % 2:
                order = order[::-1]
            for n in order:
                start = time.perf_counter()
                configs[n]()
                times[n].append(time.perf_counter() - start)
                print(f"  round {r}: {n} {times[n][-1]:.2f} s", flush=True)
    return times


def run_unet(args: argparse.Namespace) -> dict:
    import torch

    benchmark = _script("benchmark")
    from ldm.modules.token_merging import TokenMergeSettings
    from microbatch.step_savings import step_savings

    ctx = benchmark.Context(ckpt=None, config=str(args.config), device="cpu", repeats=args.rounds, warmup=0, threads=None)
    unet = benchmark.build_model(ctx, "unet")
    theirs = benchmark.diffusers_unet(ctx, unet)
    g = torch.Generator().manual_seed(1)
    side = args.resolution // 8
    x = torch.randn(2, unet.in_channels, side, side, generator=g)
    context = torch.randn(2, 77, unet.context_dim, generator=g)
    t = torch.full((2,), 500)
    result: dict[str, Any] = {"resolution": args.resolution, "config": str(args.config), "threads": torch.get_num_threads(), "checks": {}}

    with torch.no_grad():
        ours_exact = unet(x, t, context=context)
        theirs_exact = theirs(x, t, encoder_hidden_states=context).sample
    result["checks"]["ours_vs_diffusers_exact_max_abs"] = float((ours_exact - theirs_exact).abs().max())

    def ours_with(**kw: Any) -> Callable[[], Any]:
        def call() -> Any:
            with step_savings(unet, lambda: 0, **kw):
                return unet(x, t, context=context)
        return call

    def ours_deepcache_cheap() -> Any:
        step = [0]
        with step_savings(unet, lambda: step[0], deepcache=args.deepcache) as cache:
            unet(x, t, context=context)  # the whole UNet, cached
            step[0] = 1
            start = time.perf_counter()
            out = unet(x, t, context=context)
            ours_deepcache_cheap.seconds = time.perf_counter() - start
            assert cache.shallow_calls == 1
        return out

    configs: dict[str, Callable[[], Any]] = {
        "ours exact": lambda: unet(x, t, context=context),
        "ours tome 0.3": ours_with(tome=0.3),
        "ours tome 0.5": ours_with(tome=0.5),
    }
    packages: dict[str, str] = {}
    try:
        import tomesd

        packages["tomesd"] = getattr(tomesd, "__version__", "installed")
    except ImportError as e:
        packages["tomesd"] = f"not importable: {e}"
        tomesd = None
    try:
        from DeepCache import DeepCacheSDHelper
        packages["DeepCache"] = "installed"
    except ImportError as e:
        packages["DeepCache"] = f"not importable: {e}"
        DeepCacheSDHelper = None
    result["packages"] = packages

    def theirs_exact_call() -> Any:
        return theirs(x, t, encoder_hidden_states=context).sample

    configs["diffusers exact"] = theirs_exact_call

    def tomesd_call(ratio: float, use_rand: bool = True) -> Callable[[], Any]:
        def call() -> Any:
            tomesd.apply_patch(theirs, ratio=ratio, use_rand=use_rand)
            try:
                return theirs(x, t, encoder_hidden_states=context).sample
            finally:
                tomesd.remove_patch(theirs)
        return call

    if tomesd is not None:
        try:
            with torch.no_grad():
                fixed_theirs = tomesd_call(0.5, use_rand=False)()
                with step_savings(unet, lambda: 0, tome_settings=TokenMergeSettings(ratio=0.5, use_rand=False)):
                    fixed_ours = unet(x, t, context=context)
            result["checks"]["tome_0.5_fixed_destinations_ours_vs_tomesd_max_abs"] = float((fixed_ours - fixed_theirs).abs().max())
            result["checks"]["tome_0.5_fixed_destinations_change_vs_exact_max_abs"] = float((fixed_ours - ours_exact).abs().max())
            configs["diffusers+tomesd 0.3"] = tomesd_call(0.3)
            configs["diffusers+tomesd 0.5"] = tomesd_call(0.5)
        except Exception as e:  # noqa: BLE001 - a package that does not run with this diffusers is reported, not fatal
            packages["tomesd"] += f"; failed on diffusers' UNet: {type(e).__name__}: {e}"

    class _Scheduler:
        timesteps = torch.tensor([500, 480])

    class _Pipe:
        def __init__(self) -> None:
            self.unet = theirs
            self.scheduler = _Scheduler()

    def deepcache_helper_cheap() -> Any:
        helper = DeepCacheSDHelper(pipe=_Pipe())
        helper.set_params(cache_interval=args.deepcache, cache_branch_id=0)
        helper.enable()
        try:
            theirs(x, torch.tensor(500), encoder_hidden_states=context)
            start = time.perf_counter()
            out = theirs(x, torch.tensor(480), encoder_hidden_states=context).sample
            deepcache_helper_cheap.seconds = time.perf_counter() - start
            return out
        finally:
            helper.disable()

    if DeepCacheSDHelper is not None:
        try:
            with torch.no_grad():
                theirs_cheap = deepcache_helper_cheap()
                # ours at the same two timesteps: the whole UNet at 500, the cheap call at 480
                step = [0]
                with step_savings(unet, lambda: step[0], deepcache=args.deepcache):
                    unet(x, torch.full((2,), 500), context=context)
                    step[0] = 1
                    ours_cheap = unet(x, torch.full((2,), 480), context=context)
                exact_480 = unet(x, torch.full((2,), 480), context=context)
            result["checks"]["deepcache_cheap_call_ours_vs_helper_max_abs"] = float((ours_cheap - theirs_cheap).abs().max())
            result["checks"]["deepcache_cheap_call_change_vs_exact_max_abs"] = float((ours_cheap - exact_480).abs().max())
        except Exception as e:  # noqa: BLE001
            packages["DeepCache"] += f"; failed on diffusers' UNet: {type(e).__name__}: {e}"
            DeepCacheSDHelper = None

    times = _median_times(configs, args.rounds)
    # the cheap DeepCache calls, timed alone inside their runs (the whole-UNet call that fills the cache excluded)
    cheap: dict[str, list[float]] = {"ours deepcache cheap call": []}
    if DeepCacheSDHelper is not None:
        cheap["diffusers+DeepCache cheap call"] = []
    with torch.no_grad():
        for _ in range(args.rounds):
            ours_deepcache_cheap()
            cheap["ours deepcache cheap call"].append(ours_deepcache_cheap.seconds)
            if DeepCacheSDHelper is not None:
                deepcache_helper_cheap()
                cheap["diffusers+DeepCache cheap call"].append(deepcache_helper_cheap.seconds)
    times.update(cheap)
    result["times_s"] = times
    result["median_s"] = {k: statistics.median(v) for k, v in times.items()}
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["quality", "unet", "demo_time"], required=True)
    p.add_argument("--images", type=int, default=4, help="demo_time: images per run (one micro-batch)")
    p.add_argument("--seeds", type=int, default=1, help="quality: seeds per combination (54 combinations)")
    p.add_argument("--steps", type=int, default=30, help="quality: DDIM steps")
    p.add_argument("--config", type=Path, default=REPO / "configs" / "stable-diffusion" / "v1-inference.yaml", help="unet: the model layout (random weights)")
    p.add_argument("--resolution", type=int, default=256, help="unet: image side in pixels")
    p.add_argument("--rounds", type=int, default=2, help="unet: timed rounds per configuration")
    p.add_argument("--deepcache", type=int, default=3, help="unet: DeepCache interval (only the cheap call is timed)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=Path("outputs/step-savings"))
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"quality": run_quality, "unet": run_unet, "demo_time": run_demo_time}[args.part](args)
    path = args.out / f"{args.part}{f'-{args.resolution}' if args.part == 'unet' else ''}.json"
    path.write_text(json.dumps(result, indent=2), encoding="utf-8")
    if args.part == "quality":
        result = {k: v["adherence"]["all"] for k, v in result.items()}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
