"""Teach the demo model what it does not know, on CPU: a shape (a cross) by a small LoRA, a new colour word
(demo-scarlet, the data's red) by a textual-inversion embedding.

    python scripts/train_demo_lora.py       # outputs/demo-concept/lora/demo-cross.safetensors, embeddings/demo-scarlet.pt
    python scripts/train_demo_lora.py --which embedding --out microbatch/assets --replace_shipped   # the shipped embedding

The LoRA (kohya format, UNet LoCon, float16) teaches the word "cross": "a red cross on a white background
<lora:demo-cross:1>". The embedding (the web UI's .pt format) teaches the new word "demo-scarlet" with the model
frozen: "a demo-scarlet circle on a white background" draws a red circle. How they were trained:
microbatch/demo/concept.py; how well they work: python scripts/eval_demo.py --concept_only.
"""
import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a source checkout


def build_parser() -> argparse.ArgumentParser:
    from microbatch.demo.concept import WHICH, ConceptSettings

    d = ConceptSettings.__dataclass_fields__
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", type=Path, default=None, help="base model (default: the shipped demo model)")
    p.add_argument("--out", type=Path, default=d["out"].default, help="folder for lora/demo-cross.safetensors and embeddings/demo-scarlet.pt")
    p.add_argument("--replace_shipped", action="store_true", help="allow --out to be microbatch/assets, overwriting the shipped files")
    p.add_argument("--which", choices=WHICH, default=d["which"].default, help="what to train (--which embedding: only the embedding, the LoRA file untouched)")
    p.add_argument("--seed", type=int, default=d["seed"].default)
    p.add_argument("--threads", type=int, default=d["threads"].default, help="torch CPU threads")
    for name, help_text in (
        ("n_concept", "cross images encoded once"),
        ("n_replay", "base-model images encoded once for the LoRA's replay"),
        ("n_embedding", "red shapes encoded once for the embedding"),
        ("lora_steps", None), ("lora_batch", None), ("lora_lr", None), ("lora_rank", None), ("lora_alpha", None),
        ("replay_fraction", "share of each LoRA batch from the base model's data"),
        ("uncond_prob", "share of LoRA captions replaced by the empty prompt"),
        ("ti_steps", None), ("ti_batch", None), ("ti_lr", None), ("ti_vectors", "vectors of the embedding"),
        ("ti_init", "word whose token embedding starts the vectors"),
        ("log_every", None),
    ):
        default = d[name].default
        p.add_argument(f"--{name}", type=type(default), default=default, help=help_text)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede torch's OpenMP start-up (see train_demo.py)
    from microbatch.demo.concept import ConceptSettings, train_concept

    args = build_parser().parse_args(argv)
    if args.ckpt is not None and not args.ckpt.is_file():
        print(f"error: --ckpt {args.ckpt} not found", file=sys.stderr)
        return 2
    try:
        settings = ConceptSettings(**vars(args))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    summary = train_concept(settings)
    from microbatch.demo.concept import DEFAULT_OUT, SHIPPED_DIR

    # the summary never lands among the shipped files (package data)
    folder = DEFAULT_OUT if settings.out.resolve() == SHIPPED_DIR.resolve() else settings.out
    folder.mkdir(parents=True, exist_ok=True)
    summary_path = folder / "demo-concept-summary.json"
    summary_path.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    for part in ("lora", "embedding"):
        if part in summary:
            s = summary[part]
            print(f"{part}: {s['path']} ({s['kilobytes']:.1f} KB) trained in {s['seconds']:.0f} s")
    print(f"total {summary['total_seconds']:.0f} s; summary in {summary_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
