"""Prompt adherence of the demo model: python scripts/eval_demo.py [--seeds 3] [--samplers ddim,plms] [--steps 30]

Generates every (color, shape, background) combination of the shapes data for several seeds through the normal
pipeline (microbatch.loading.load_model + microbatch.engine.Engine), judges each image with
microbatch.demo.analyze, and prints a table per sampler: the fraction of images whose colour, shape, background and
all three match the prompt. Also an img2img check: a rendered red circle on white, turned into "a blue circle on
a white background" at strength 0.8, must come out blue. Writes table.md, results.json and one grid per sampler
to --outdir.

--concept adds what the model was not trained on (see microbatch.demo.concept), per sampler: the shape cross, its 18
prompts "a {color} cross on a {background} background" without and with the demo LoRA (--concept_lora, weight
--lora_weight); the word demo-scarlet (the data's red), its 9 prompts "a demo-scarlet {shape} on a {background}
background" without and with the demo embedding (--concept_embedding), judged against red, and the same 9 with
"red" (the word the model knows); and the 54 old prompts with the LoRA merged (the harm it does). Rows
"concept: ..." in the table, "concept" in results.json, grids concept-*.png (the first seed's images).
--concept_only skips the old table and the img2img check.
"""
import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a source checkout

import numpy as np  # noqa: E402
import torch  # noqa: E402

from microbatch.pipeline import default_scale  # noqa: E402
from microbatch.demo.analyze import analyze, score  # noqa: E402
from microbatch.demo.shapes import BACKGROUNDS, COLORS, SHAPES, all_combinations, caption, render, shape_combinations  # noqa: E402
from microbatch.devices import choose_dtypes, parse_device  # noqa: E402
from microbatch.engine import Engine, ImageJob, SamplingSettings  # noqa: E402
from microbatch.images import to_uint8  # noqa: E402
from microbatch.loading import LoadedModel, demo_checkpoint, load_model  # noqa: E402

KEYS = ("color", "shape", "background", "all")
CONCEPT_ROWS = ("cross, no LoRA", "cross, LoRA", "demo-scarlet, no embedding", "demo-scarlet, embedding", "red, the known word", "old prompts, LoRA")
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


def adherence(loaded: LoadedModel, labels: Sequence[tuple[str, str, str]], seeds: Sequence[int], settings: SamplingSettings, prompt_for: Optional[Callable[[tuple[str, str, str]], str]] = None) -> tuple[dict[str, float], list[np.ndarray]]:
    """Fraction of images matching the label per attribute (KEYS), over every label x seed; and the images
    (seed-major). Image of label i and seed s uses seed 1000 * s + i. `prompt_for(label)`: the prompt of a label
    (default its caption; a new word in a slot for a concept)."""
    prompt_for = prompt_for or (lambda label: caption(*label))
    prompts, job_seeds, expected = [], [], []
    for s in seeds:
        for i, label in enumerate(labels):
            prompts.append(prompt_for(label))
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


def concept_adherence(loaded: LoadedModel, seeds: Sequence[int], settings: SamplingSettings, lora: Path, embedding: Path, lora_weight: float = 1.0) -> tuple[dict[str, dict[str, float]], dict[str, list[np.ndarray]]]:
    """The CONCEPT_ROWS for one sampler setting: adherence and images per row. The LoRA is merged for its rows and
    removed after (the weights are the original bits again); the embedding is loaded for its row and dropped after."""
    from microbatch.demo.concept import CONCEPT_SHAPE, EMBEDDING_NAME, embedding_labels, embedding_prompt
    from microbatch.embeddings import load_embeddings, text_encoder
    from microbatch.lora import apply_lora

    labels, word_labels = shape_combinations(CONCEPT_SHAPE), embedding_labels()
    new_word = lambda label: embedding_prompt(label[1], label[2])  # noqa: E731
    results: dict[str, dict[str, float]] = {}
    images: dict[str, list[np.ndarray]] = {}
    results["cross, no LoRA"], images["cross, no LoRA"] = adherence(loaded, labels, seeds, settings)
    results["demo-scarlet, no embedding"], images["demo-scarlet, no embedding"] = adherence(loaded, word_labels, seeds, settings, new_word)
    results["red, the known word"], images["red, the known word"] = adherence(loaded, word_labels, seeds, settings)
    handle = apply_lora(loaded.model, lora, weight=lora_weight)
    try:
        results["cross, LoRA"], images["cross, LoRA"] = adherence(loaded, labels, seeds, settings)
        results["old prompts, LoRA"], images["old prompts, LoRA"] = adherence(loaded, all_combinations(), seeds, settings)
    finally:
        handle.remove()
    table = text_encoder(loaded.model).embeddings()
    if load_embeddings(loaded.model, embedding) != [EMBEDDING_NAME]:
        raise ValueError(f"{embedding} is not the {EMBEDDING_NAME} embedding (its file stem must be {EMBEDDING_NAME})")
    try:
        results["demo-scarlet, embedding"], images["demo-scarlet, embedding"] = adherence(loaded, word_labels, seeds, settings, new_word)
    finally:
        table.remove(EMBEDDING_NAME)
    return {row: results[row] for row in CONCEPT_ROWS}, {row: images[row] for row in CONCEPT_ROWS}


def grid(images: Sequence[np.ndarray], columns: int) -> np.ndarray:
    """Images [H, W, 3] tiled row-major with a 2-pixel white gutter."""
    h, w = images[0].shape[:2]
    rows = (len(images) + columns - 1) // columns
    out = np.full((rows * (h + 2) + 2, columns * (w + 2) + 2, 3), 255, dtype=np.uint8)
    for k, img in enumerate(images):
        r, c = divmod(k, columns)
        out[2 + r * (h + 2) : 2 + r * (h + 2) + h, 2 + c * (w + 2) : 2 + c * (w + 2) + w] = img
    return out


def markdown_table(results: dict[str, dict[str, float]], n_images: Optional[int]) -> str:
    """One row per entry; `n_images` in the header when every row has that many (else the rows say)."""
    header = "sampler" if n_images is None else f"sampler ({n_images} images)"
    lines = [f"| {header} | color | shape | background | all three |", "|---|---|---|---|---|"]
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
    p.add_argument("--concept", action="store_true", help="also measure what the model was not trained on: the shape cross without and with the demo LoRA, the word demo-scarlet without and with the demo embedding, and the old prompts with the LoRA")
    p.add_argument("--concept_only", action="store_true", help="--concept without the old table and the img2img check")
    p.add_argument("--concept_lora", type=Path, default=None, help="LoRA of the concept (default: the shipped microbatch/assets/lora/demo-cross.safetensors)")
    p.add_argument("--concept_embedding", type=Path, default=None, help="embedding of the word demo-scarlet, named so (default: the shipped microbatch/assets/embeddings/demo-scarlet.pt)")
    p.add_argument("--lora_weight", type=float, default=1.0, help="the concept LoRA's weight")
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
    args.concept = args.concept or args.concept_only
    if args.concept:
        from microbatch.demo.concept import SHIPPED_DIR, embedding_path, lora_path

        args.concept_lora = args.concept_lora or lora_path(SHIPPED_DIR)
        args.concept_embedding = args.concept_embedding or embedding_path(SHIPPED_DIR)
        for flag, path in (("--concept_lora", args.concept_lora), ("--concept_embedding", args.concept_embedding)):
            if not path.is_file():
                print(f"error: {flag} {path} not found (train it with scripts/train_demo_lora.py)", file=sys.stderr)
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
            if args.concept_only:
                break
            start = time.perf_counter()
            name = f"{sampler} {args.steps} steps, scale {scale:g}"
            results[name], images = adherence(loaded, labels, seeds, replace(settings_for(sampler, args.steps, scale), **extra))
            r = results[name]
            print(f"{name}: " + ", ".join(f"{k} {r[k]:.3f}" for k in KEYS) + f"  ({time.perf_counter() - start:.0f} s)", flush=True)
            Image.fromarray(grid(images[: len(labels)], columns=9)).save(args.outdir / f"grid-{sampler}-{scale:g}.png")
    table = markdown_table(results, len(labels) * len(seeds)) if results else ""
    summary: dict = {"checkpoint": str(loaded.ckpt), "precision": args.precision, "seeds": seeds, "settings": extra, "adherence": results}
    if args.concept:
        concept: dict[str, dict[str, float]] = {}
        for scale in scales:
            for sampler in args.samplers.split(","):
                start = time.perf_counter()
                name = f"{sampler} {args.steps} steps, scale {scale:g}"
                try:
                    rows, images = concept_adherence(loaded, seeds, settings_for(sampler, args.steps, scale), args.concept_lora, args.concept_embedding, args.lora_weight)
                except ValueError as e:  # a LoRA or embedding file that cannot be used
                    print(f"error: {e}", file=sys.stderr)
                    return 2
                for row, r in rows.items():
                    n = len(images[row])
                    concept[f"concept: {row} ({n} images), {name}"] = r
                    print(f"concept: {row}, {name}: " + ", ".join(f"{k} {r[k]:.3f}" for k in KEYS), flush=True)
                    per_seed = n // len(seeds)
                    Image.fromarray(grid(images[row][:per_seed], 6 if per_seed == 18 else 9)).save(args.outdir / f"concept-{row.replace(', ', '-').replace(' ', '_')}-{sampler}-{scale:g}.png")
                print(f"({time.perf_counter() - start:.0f} s)", flush=True)
        summary["concept"] = {"lora": str(args.concept_lora), "lora_weight": args.lora_weight, "embedding": str(args.concept_embedding), "adherence": concept}
        table = (table + "\n\n" if table else "") + markdown_table(concept, None)
    print(table)
    if args.img2img_seeds > 0 and not args.concept_only:
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
