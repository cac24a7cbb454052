"""Train the embedded demo model from scratch: python scripts/train_demo.py [--ae_steps N] [--unet_steps N]

Writes outputs/demo-train/demo-shapes.safetensors and demo-shapes.yaml (or --out DIR); intermediate files (the
stage-a autoencoder, encoded latents, resumable UNet state, train.log, summary.json) go to --workdir. The shipped
weights (microbatch/assets) are replaced only with --out microbatch/assets --replace_shipped.
A re-run that keeps the autoencoder: --ae_from WORKDIR/stage-a-frozen.safetensors --ae_steps 0.

The defaults are the shipped weights' recipe: one run of 60 min on 2 idle cores (autoencoder 2,400 steps, UNet
5,000 steps at lr 4e-4 with cosine decay; figures in the yaml header).

Threads: the default is 2, faster on an idle machine (UNet step 0.42 s vs 0.54 s with one). On a 2-core machine
shared with other work, one thread with OMP_WAIT_POLICY=PASSIVE (set here unless already set) ran 2.6x faster than
two spinning OpenMP threads (measured: autoencoder step 1.6 s vs 4.2 s under load ~4): pass --threads 1 there.
Stage a (the autoencoder) runs under bf16 autocast where the CPU has fast bf16 (--ae_autocast auto):
a step of 8 images took 0.38 s instead of 0.77 s with two threads (0.50 s instead of 0.86 s with one).
"""
import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a source checkout


def build_parser() -> argparse.ArgumentParser:
    from microbatch.demo.train import AE_AUTOCAST_MODES, TrainSettings

    d = TrainSettings.__dataclass_fields__
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", type=Path, default=d["config"].default, help="model yaml")
    p.add_argument("--out", type=Path, default=d["out"].default, help="folder for demo-shapes.safetensors and .yaml")
    p.add_argument("--replace_shipped", action="store_true", help="allow --out to be microbatch/assets, overwriting the shipped demo weights")
    p.add_argument("--workdir", type=Path, default=d["workdir"].default, help="folder for intermediate files and the log")
    p.add_argument("--seed", type=int, default=d["seed"].default)
    p.add_argument("--threads", type=int, default=d["threads"].default, help="torch CPU threads")
    p.add_argument("--ae_steps", type=int, default=d["ae_steps"].default, help="autoencoder steps (0 with --ae_from)")
    p.add_argument("--ae_batch", type=int, default=d["ae_batch"].default)
    p.add_argument("--ae_lr", type=float, default=d["ae_lr"].default)
    p.add_argument("--ae_warmup", type=int, default=d["ae_warmup"].default, help="autoencoder warm-up steps")
    p.add_argument("--ae_autocast", choices=AE_AUTOCAST_MODES, default=d["ae_autocast"].default, help="bf16 autocast in stage a (auto: where the CPU has fast bf16)")
    p.add_argument("--ae_from", type=Path, default=None, help="load the autoencoder (and text encoder) from this stage-a file; with --ae_steps 0 stage a is skipped, otherwise training continues")
    p.add_argument("--n_latents", type=int, default=d["n_latents"].default, help="images encoded once for the UNet stage")
    p.add_argument("--unet_steps", type=int, default=d["unet_steps"].default)
    p.add_argument("--unet_batch", type=int, default=d["unet_batch"].default)
    p.add_argument("--unet_lr", type=float, default=d["unet_lr"].default)
    p.add_argument("--unet_lr_floor", type=float, default=d["unet_lr_floor"].default, help="final learning rate / peak (cosine decay; 1: constant)")
    p.add_argument("--resume", action="store_true", help="continue the UNet stage from WORKDIR/unet-state.pt")
    p.add_argument("--log_every", type=int, default=d["log_every"].default)
    p.add_argument("--snapshot_every", type=int, default=d["snapshot_every"].default, help="UNet steps between resumable snapshots")
    p.add_argument("--finetune_decoder", type=Path, default=None, metavar="CKPT", help="stage d only: fine-tune the VAE decoder of a finished demo checkpoint (encoder and UNet fixed) and write it to --out")
    p.add_argument("--decoder_steps", type=int, default=400, help="steps of stage d")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    # Must precede torch's OpenMP start-up to take effect (it does when this runs as a script).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from microbatch.demo.train import TrainSettings, check_out_folder, finetune_decoder, train

    args = build_parser().parse_args(argv)
    if args.finetune_decoder is not None:
        if not args.finetune_decoder.is_file():
            print(f"error: --finetune_decoder {args.finetune_decoder} not found", file=sys.stderr)
            return 2
        try:
            check_out_folder(args.out, args.replace_shipped)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
        report = finetune_decoder(args.finetune_decoder, args.out / "demo-shapes.safetensors", args.decoder_steps, seed=args.seed, threads=args.threads)
        print(f"decoder fine-tuned: held-out {report}")
        return 0
    if args.ae_from is not None and not args.ae_from.is_file():
        print(f"error: --ae_from {args.ae_from} not found", file=sys.stderr)
        return 2
    try:
        settings = TrainSettings(**{k: v for k, v in vars(args).items() if k not in ("finetune_decoder", "decoder_steps")})
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    settings.workdir.mkdir(parents=True, exist_ok=True)
    handlers = [logging.StreamHandler(sys.stdout), logging.FileHandler(settings.workdir / "train.log", encoding="utf-8")]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", handlers=handlers, force=True)
    summary = train(settings)
    print(f"demo model written to {summary['checkpoint']['path']} ({summary['checkpoint']['megabytes']:.1f} MB) in {summary['total_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
