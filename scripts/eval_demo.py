"""Prompt adherence of the demo model: python scripts/eval_demo.py [--seeds 3] [--samplers ddim,plms] [--steps 30]

Generates every (color, shape, background) combination of the shapes data for several seeds through the normal
pipeline (microbatch.loading.load_model + microbatch.engine.Engine), judges each image with
microbatch.demo.analyze, and prints a table per sampler: the fraction of images whose colour, shape, background and
all three match the prompt. Also an img2img check: a rendered red circle on white, turned into "a blue circle on
a white background" at strength 0.8, must come out blue. Writes table.md, results.json and one grid per sampler
to --outdir.
"""
import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a source checkout

import numpy as np  # noqa: E402
import torch  # noqa: E402

from microbatch.pipeline import default_scale  # noqa: E402
from microbatch.demo.analyze import analyze, score  # noqa: E402
from microbatch.demo.shapes import BACKGROUNDS, COLORS, SHAPES, all_combinations, caption, render  # noqa: E402
from microbatch.devices import choose_dtypes, parse_device  # noqa: E402
from microbatch.engine import Engine, ImageJob, SamplingSettings  # noqa: E402
from microbatch.images import to_uint8  # noqa: E402
from microbatch.loading import LoadedModel, demo_checkpoint, load_model  # noqa: E402

KEYS = ("color", "shape", "background", "all")
IMG2IMG_PROMPT = "a blue circle on a white background"


def balanced_subset(n: int = 12) -> list[tuple[str, str, str]]:
    """n combinations with every colour, shape and background about equally often (for n = 12: each colour twice,
    each shape and background four times), none repeated."""
    colors, backgrounds = list(COLORS), list(BACKGROUNDS)
    picked = []
    for k in range(n):
        picked.append((colors[k % 6], SHAPES[(k + k // 6) % 3], backgrounds[(k // 2) % 3]))
    if len(set(picked)) != len(picked):
        raise AssertionError("balanced_subset repeated a combination")
    return picked


def load_demo(ckpt: Optional[Path] = None, precision: str = "full", device: str = "cpu") -> LoadedModel:
    """The demo checkpoint (or `ckpt`) through the scripts' loader: the yaml beside the file, strict key check."""
    ckpt = ckpt or demo_checkpoint()
    if ckpt is None:
        raise FileNotFoundError("no demo checkpoint: train one with scripts/train_demo.py")
    dev = parse_device(device)
    return load_model(Path(ckpt), None, dev, choose_dtypes(precision, dev), is_demo=True)


def generate(loaded: LoadedModel, prompts: Sequence[str], seeds: Sequence[int], settings: SamplingSettings, init: Optional[np.ndarray] = None) -> list[np.ndarray]:
    """uint8 images [H, W, 3], one per (prompt, seed) pair, in order. `init`: uint8 image for img2img."""
    device = loaded.model.device
    engine = Engine(loaded.model, device)
    if init is not None:
        x = torch.from_numpy(init).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        with torch.no_grad():
            engine.init_posterior = loaded.model.encode_first_stage(x.to(device))
    jobs = [ImageJob(i, prompt, int(seed)) for i, (prompt, seed) in enumerate(zip(prompts, seeds))]
    images: list[np.ndarray] = []
    engine.run(jobs, settings, lambda batch: images.extend(to_uint8(done.image) for done in batch))
    return images


def settings_for(sampler: str, steps: int, guidance_scale: float, size: int = 64, batch: int = 54, strength: Optional[float] = None) -> SamplingSettings:
    return SamplingSettings(sampler=sampler, steps=steps, guidance_scale=guidance_scale, height=size, width=size, max_batch_size=batch, strength=strength)


def adherence(loaded: LoadedModel, labels: Sequence[tuple[str, str, str]], seeds: Sequence[int], settings: SamplingSettings) -> tuple[dict[str, float], list[np.ndarray]]:
    """Fraction of images matching the prompt per attribute (KEYS), over every label x seed; and the images
    (seed-major). Image of label i and seed s uses seed 1000 * s + i."""
    prompts, job_seeds, expected = [], [], []
    for s in seeds:
        for i, label in enumerate(labels):
            prompts.append(caption(*label))
            job_seeds.append(1000 * s + i)
            expected.append(label)
    images = generate(loaded, prompts, job_seeds, settings)
    scores = [score(img, label) for img, label in zip(images, expected)]
    return {key: float(np.mean([sc[key] for sc in scores])) for key in KEYS}, images


def img2img_blue(loaded: LoadedModel, seeds: Sequence[int], sampler: str = "ddim", steps: int = 30, guidance_scale: Optional[float] = None, strength: float = 0.8) -> list[str]:
    """Colours the analyzer sees after turning a rendered red circle on white into a blue one, per seed; at
    img2img.py's default guidance scale for this model unless `guidance_scale` is given."""
    if guidance_scale is None:
        guidance_scale = default_scale(loaded, "img2img")
    init = render("red", "circle", "white", size=64)
    settings = settings_for(sampler, steps, guidance_scale, strength=strength, batch=len(seeds))
    images = generate(loaded, [IMG2IMG_PROMPT] * len(seeds), list(seeds), settings, init=init)
    return [analyze(img).color for img in images]


def grid(images: Sequence[np.ndarray], columns: int) -> np.ndarray:
    """Images [H, W, 3] tiled row-major with a 2-pixel white gutter."""
    h, w = images[0].shape[:2]
    rows = (len(images) + columns - 1) // columns
    out = np.full((rows * (h + 2) + 2, columns * (w + 2) + 2, 3), 255, dtype=np.uint8)
    for k, img in enumerate(images):
        r, c = divmod(k, columns)
        out[2 + r * (h + 2) : 2 + r * (h + 2) + h, 2 + c * (w + 2) : 2 + c * (w + 2) + w] = img
    return out


def markdown_table(results: dict[str, dict[str, float]], n_images: int) -> str:
    lines = [f"| sampler ({n_images} images) | color | shape | background | all three |", "|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[k]:.3f}" for k in KEYS) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", type=Path, default=None, help="checkpoint (default: the embedded demo model)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per combination")
    p.add_argument("--samplers", type=str, default="plms,ddim", help="comma-separated sampler names")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--scale", type=float, nargs="+", default=None, help="guidance scale(s) to evaluate (default: the scripts' default for the model: its yaml's sampling_defaults.scale, else 7.5)")
    p.add_argument("--precision", type=str, choices=["full", "autocast"], default="full")
    p.add_argument("--device", type=str, default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--img2img_seeds", type=int, default=8, help="seeds of the red -> blue img2img check (0: skip)")
    p.add_argument("--outdir", type=Path, default=Path("outputs/eval-demo"))
    p.add_argument("--setting", type=str, action="append", default=[], metavar="FIELD=VALUE", help="set a SamplingSettings field for the adherence runs, VALUE a Python literal (repeatable): --setting tome=0.5 --setting deepcache=3 --setting 'guidance_interval=(0.28, 5.42)'")
    return p


def parse_settings(items: Sequence[str]) -> dict:
    """--setting FIELD=VALUE items -> {field: value}; ValueError for an unknown field or a value that is no literal."""
    import ast
    import dataclasses

    fields = {f.name for f in dataclasses.fields(SamplingSettings)}
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name.strip() not in fields:
            raise ValueError(f"--setting needs FIELD=VALUE with a SamplingSettings field, got {item!r}")
        try:
            out[name.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise ValueError(f"--setting {item!r}: the value must be a Python literal") from None
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        extra = parse_settings(args.setting)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.seeds < 1 or args.steps < 1:
        print(f"error: --seeds and --steps must be positive, got {args.seeds} and {args.steps}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        loaded = load_demo(args.ckpt, args.precision, args.device)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.outdir.mkdir(parents=True, exist_ok=True)
    scales = args.scale or [default_scale(loaded)]
    labels = all_combinations()
    seeds = list(range(args.seeds))
    results: dict[str, dict[str, float]] = {}
    from PIL import Image

    for scale in scales:
        for sampler in args.samplers.split(","):
            start = time.perf_counter()
            name = f"{sampler} {args.steps} steps, scale {scale:g}"
            results[name], images = adherence(loaded, labels, seeds, replace(settings_for(sampler, args.steps, scale), **extra))
            r = results[name]
            print(f"{name}: " + ", ".join(f"{k} {r[k]:.3f}" for k in KEYS) + f"  ({time.perf_counter() - start:.0f} s)", flush=True)
            Image.fromarray(grid(images[: len(labels)], columns=9)).save(args.outdir / f"grid-{sampler}-{scale:g}.png")
    table = markdown_table(results, len(labels) * len(seeds))
    print(table)
    summary: dict = {"checkpoint": str(loaded.ckpt), "precision": args.precision, "seeds": seeds, "settings": extra, "adherence": results}
    if args.img2img_seeds > 0:
        i2i_scale = default_scale(loaded, "img2img")
        summary["img2img_blue"] = {}
        for sampler in args.samplers.split(","):
            colors = img2img_blue(loaded, list(range(args.img2img_seeds)), sampler, args.steps, i2i_scale)
            blue = sum(c == "blue" for c in colors) / len(colors)
            print(f"img2img red circle -> '{IMG2IMG_PROMPT}' (strength 0.8, {sampler} {args.steps}, scale {i2i_scale:g}): blue in {blue:.0%} of {len(colors)} seeds {colors}")
            summary["img2img_blue"][sampler] = {"scale": i2i_scale, "fraction": blue, "colors": colors}
    (args.outdir / "table.md").write_text(table + "\n", encoding="utf-8")
    (args.outdir / "results.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
