"""Shared command-line flags and the run loop of txt2img, img2img and batch_gen.

Each script builds its parser with `build_parser`, then calls `run(args, mode)`. Flags keep the original CompVis
names and meanings; new ones are documented in the README.
"""
from __future__ import annotations

import argparse
import logging
import math
import re
import signal
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import torch

from ldm.checkpoint import CheckpointError
from ldm.modules.attention_backends import BACKENDS, resolve_backend
from microbatch.devices import choose_dtypes, parse_device, reset_peak_memory
from microbatch.engine import Engine, FinishedImage, ImageJob, Interrupted, SamplingSettings
from microbatch.images import load_init_image, next_number, save_grid, save_png_atomic, to_uint8
from microbatch.loading import DEFAULT_CKPT, LoadedModel, demo_checkpoint, load_model
from microbatch.memory import choose_batch_size, measure_memory_model, memory_budget
from microbatch.metrics import RunMetrics
from microbatch.offload import apply_offload
from microbatch.vae_tiling import TileSettings, encode_tiled
from samplers import SAMPLERS, SCHEDULES, get_sampler

logger = logging.getLogger(__name__)

Mode = Literal["txt2img", "img2img", "batch_gen"]

DEFAULTS = {
    "txt2img": dict(outdir="outputs/txt2img-samples", n_iter=2, n_samples=3, scale=7.5),
    "img2img": dict(outdir="outputs/img2img-samples", n_iter=1, n_samples=2, scale=5.0),
    "batch_gen": dict(outdir="outputs/batch_gen-samples", n_iter=1, n_samples=9, scale=7.5),
}


class UsageError(ValueError):
    """Bad command-line input: reported as one line, exit code 2."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Flag defaults in the help, and the epilog (the sampler list) kept one line per entry."""


class OneLineParser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage block) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser(mode: Mode, description: str) -> argparse.ArgumentParser:
    d = DEFAULTS[mode]
    samplers = "\n".join(f"  {s.name:<13} {s.description} [schedule: {s.default_schedule}]" for s in SAMPLERS.values())
    p = OneLineParser(description=description, formatter_class=_HelpFormatter, epilog=f"samplers (--sampler NAME):\n{samplers}")
    p.add_argument("--prompt", type=str, nargs="?", default="a painting of a virus monster playing guitar", help="the prompt to render")
    p.add_argument("--negative_prompt", type=str, default="", help="replaces the empty prompt of classifier-free guidance")
    p.add_argument("--outdir", type=str, nargs="?", default=d["outdir"], help="dir to write results to")
    p.add_argument("--skip_grid", action="store_true", help="do not save a grid, only individual samples")
    p.add_argument("--skip_save", action="store_true", help="do not save individual samples (for speed measurements)")
    p.add_argument("--ddim_steps", "--steps", dest="ddim_steps", type=int, default=50, help="number of sampling steps")
    p.add_argument("--plms", action="store_true", help="use PLMS sampling (same as --sampler plms)")
    p.add_argument("--sampler", type=str, default=None, help="sampler name: " + ", ".join(SAMPLERS) + " (default ddim)")
    p.add_argument("--schedule", type=str, default=None, choices=sorted(SCHEDULES), help="noise schedule (default: the sampler's own; uniform for ddim and plms)")
    p.add_argument("--fixed_code", action="store_true", help="reuse the same start noise for every iteration and prompt batch")
    p.add_argument("--ddim_eta", "--eta", dest="ddim_eta", type=float, default=None, help="noise of DDIM / ancestral / SDE samplers, 0 = deterministic (default: the sampler's own: 0 for ddim, 1 for ancestral and SDE samplers)")
    p.add_argument("--n_iter", type=int, default=d["n_iter"], help="sample this often")
    if mode != "img2img":
        p.add_argument("--H", type=int, default=None, help="image height in pixels (default: the model's native size)")
        p.add_argument("--W", type=int, default=None, help="image width in pixels (default: the model's native size)")
    p.add_argument("--C", type=int, default=4, help="latent channels")
    p.add_argument("--f", type=int, default=8, help="downsampling factor")
    p.add_argument("--n_samples", type=int, default=d["n_samples"], help="how many samples to produce for each given prompt (the batch size)")
    p.add_argument("--n_rows", type=int, default=0, help="rows in the grid (default: n_samples)")
    p.add_argument(
        "--scale", type=float, default=None,
        help="unconditional guidance scale: eps = eps(x, empty) + scale * (eps(x, cond) - eps(x, empty)); "
        f"default: the model config's sampling_defaults.scale if it sets one (the demo model: 2), else {d['scale']:g}",
    )
    p.add_argument("--from-file", dest="from_file", type=str, help="read prompts from this file, one per line ('prompt || negative' gives a line its own negative prompt)")
    p.add_argument("--config", type=str, default=None, help="model yaml (default: the yaml beside the checkpoint, else inferred from the checkpoint)")
    p.add_argument("--ckpt", type=str, default=None, help=f"checkpoint (.ckpt or .safetensors); default {DEFAULT_CKPT}, else the embedded demo model")
    p.add_argument("--seed", type=int, default=42, help="seed of image 0; image i uses seed + i")
    p.add_argument("--precision", type=str, choices=["full", "autocast"], default="autocast", help="autocast: half precision where it is safe and fast; full: float32")
    p.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--max_batch_size", type=str, default=None, help="most images per UNet micro-batch, or auto: the largest that fits the device's free memory (or --max_memory), from a measured memory model (default: n_samples)")
    p.add_argument("--max_memory", type=float, default=None, help="with --max_batch_size auto: the peak memory to stay under, in GB (weights included)")
    p.add_argument("--vae_tiling", type=str, default="auto", choices=["auto", "on", "off"], help="decode (and encode) through the VAE in overlapping, blended tiles; auto: for latents above 128 (images above 1024 px)")
    p.add_argument("--vae_tile", type=int, default=64, help="VAE tile side in latents (x f pixels)")
    p.add_argument("--vae_tile_overlap", type=int, default=16, help="overlap of neighbouring VAE tiles in latents")
    p.add_argument("--offload", type=str, default="none", choices=["none", "model", "sequential"], help="GPU memory saving: model keeps only the component in use on the GPU; sequential streams the UNet's blocks one at a time (no-ops on CPU)")
    p.add_argument("--split_guidance", action="store_true", help="run the unconditional and conditional halves of guidance as separate UNet calls")
    p.add_argument("--attention", type=str, default="auto", choices=list(BACKENDS), help="attention kernel")
    p.add_argument("--attention_slicing", type=str, default=None, help="auto, max or N: compute attention in slices (implies --attention sliced)")
    p.add_argument("--use_ema", action="store_true", help="use the EMA weights of a full checkpoint")
    p.add_argument("--parameterization", type=str, choices=["auto", "eps", "v"], default="auto", help="what the UNet predicts; auto: the config's, measured from the checkpoint when the config is inferred")
    p.add_argument("--metrics_json", type=str, default=None, help="also write the run's metrics and settings as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--verbose", action="store_true", help="show tracebacks and debug logs")
    if mode == "txt2img":
        p.add_argument("--from_png", type=str, default=None, help="regenerate the image whose `parameters` metadata this PNG holds")
    if mode == "img2img":
        p.add_argument("--init-img", dest="init_img", type=str, help="path to the input image")
        p.add_argument("--strength", type=float, default=0.75, help="fraction of the schedule re-run from the noised input: 1.0 ignores the input")
    return p


@dataclass
class Plan:
    jobs: list[ImageJob]
    settings: SamplingSettings
    n_rows: int


def read_prompt_file(path: str) -> list[tuple[str, Optional[str]]]:
    """(prompt, negative or None) per non-blank, non-comment line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"prompt file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"prompt file {path} cannot be read as UTF-8 text ({e})") from None
    entries = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        prompt, sep, negative = line.partition("||")
        entries.append((prompt.strip(), negative.strip() if sep else None))
    if not entries:
        raise UsageError(f"prompt file {path} has no prompts (only blank or # comment lines)")
    return entries


def check_args(args: argparse.Namespace, mode: Mode) -> None:
    """Checks that need no model: each failure is one line that names the value and the fix."""
    for name in ("n_samples", "n_iter", "ddim_steps"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.max_batch_size is not None and args.max_batch_size != "auto":
        try:
            args.max_batch_size = int(args.max_batch_size)
        except ValueError:
            raise UsageError(f"--max_batch_size must be a positive integer or auto, got {args.max_batch_size!r}") from None
        if args.max_batch_size < 1:
            raise UsageError(f"--max_batch_size must be a positive integer or auto, got {args.max_batch_size}")
    if args.max_memory is not None and not (math.isfinite(args.max_memory) and args.max_memory > 0):
        raise UsageError(f"--max_memory must be a positive number of GB, got {args.max_memory}")
    try:
        args.tile_settings = TileSettings(args.vae_tiling, args.vae_tile, args.vae_tile_overlap)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.n_rows < 0:
        raise UsageError(f"--n_rows must be 0 (= n_samples) or positive, got {args.n_rows}")
    if args.C < 1 or args.f < 1:
        raise UsageError(f"--C and --f must be positive, got {args.C} and {args.f}")
    if args.plms and args.sampler not in (None, "plms"):
        raise UsageError(f"--plms conflicts with --sampler {args.sampler}; give one of them")
    args.sampler = "plms" if args.plms else (args.sampler or "ddim")
    try:
        info = get_sampler(args.sampler)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.ddim_eta is None:
        args.ddim_eta = info.default_eta
    elif args.ddim_eta != 0 and not info.uses_eta:
        raise UsageError(f"sampler {args.sampler} is deterministic: --ddim_eta must be 0, got {args.ddim_eta}")
    if not math.isfinite(args.ddim_eta) or args.ddim_eta < 0:
        raise UsageError(f"--ddim_eta must be a finite number >= 0, got {args.ddim_eta}")
    if args.scale is not None and not math.isfinite(args.scale):
        raise UsageError(f"--scale must be a finite number, got {args.scale}")
    if mode == "img2img":
        if not args.init_img:
            raise UsageError("img2img needs --init-img PATH")
        if not Path(args.init_img).is_file():
            raise UsageError(f"init image not found: {args.init_img}")
        check_image_file(args.init_img, "init image")
        if not 0.0 < args.strength <= 1.0:
            raise UsageError(f"--strength must be in (0, 1], got {args.strength}")
    else:
        for name in ("H", "W"):
            value = getattr(args, name)
            if value is not None and value < 1:
                raise UsageError(f"--{name} must be positive, got {value}")
    if args.ckpt is not None and not Path(args.ckpt).is_file():
        raise UsageError(f"checkpoint not found: {args.ckpt}")
    if args.config is not None and not Path(args.config).is_file():
        raise UsageError(f"config not found: {args.config}")
    if args.attention_slicing is not None:
        try:
            resolve_backend(args.attention, args.attention_slicing)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if args.from_file:
        args.prompts = read_prompt_file(args.from_file)
    else:
        if args.prompt is None:
            raise UsageError("give --prompt TEXT or --from-file PATH")
        args.prompts = None
    outdir = Path(args.outdir)
    try:
        (outdir / "samples").mkdir(parents=True, exist_ok=True)
        probe = outdir / "samples" / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"output folder {outdir} cannot be written ({e.strerror or e})") from None


def check_image_file(path: str, what: str) -> None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UsageError(f"{what} {path} is not a readable image ({type(e).__name__}: {e})") from None


def round_size(value: int, multiple: int, name: str) -> int:
    rounded = max(multiple, value - value % multiple)
    if rounded != value:
        print(f"note: --{name} {value} is not a multiple of {multiple}; using {rounded}")
    return rounded


def make_plan(args: argparse.Namespace, mode: Mode, height: int, width: int) -> Plan:
    """The run's images: n_iter passes over the prompt batches; image i uses seed + i (with --fixed_code, image j of
    every batch reuses seed + j). Without a file, each batch is n_samples copies of --prompt; with one, each line is
    one image per pass and batches hold n_samples consecutive lines."""
    if args.prompts is None:
        batches = [[(args.prompt, None)] * args.n_samples]
    else:
        entries = args.prompts
        batches = [entries[i : i + args.n_samples] for i in range(0, len(entries), args.n_samples)]
    jobs: list[ImageJob] = []
    for _ in range(args.n_iter):
        for batch in batches:
            for j, (prompt, negative) in enumerate(batch):
                index = len(jobs)
                seed = args.seed + (j if args.fixed_code else index)
                jobs.append(ImageJob(index, prompt, seed, args.negative_prompt if negative is None else negative))
    settings = SamplingSettings(
        sampler=args.sampler,
        steps=args.ddim_steps,
        schedule=args.schedule,
        eta=args.ddim_eta,
        guidance_scale=args.scale,
        height=height,
        width=width,
        channels=args.C,
        factor=args.f,
        max_batch_size=args.max_batch_size if isinstance(args.max_batch_size, int) else args.n_samples,
        split_guidance=args.split_guidance,
        strength=getattr(args, "strength", None),
    )
    return Plan(jobs, settings, args.n_rows or args.n_samples)


def resolve_checkpoint(args: argparse.Namespace) -> tuple[Optional[Path], bool]:
    if args.ckpt is not None:
        return Path(args.ckpt), False
    if DEFAULT_CKPT.is_file():
        return DEFAULT_CKPT, False
    demo = demo_checkpoint()
    if demo is not None:
        print(
            f"No checkpoint at {DEFAULT_CKPT} and no --ckpt given: using the embedded demo model (64x64 shapes). "
            f"For Stable Diffusion, pass --ckpt path/to/sd-v1-x.ckpt (or .safetensors)."
        )
        return demo, True
    raise UsageError(f"no checkpoint: pass --ckpt path/to/model.ckpt (.ckpt or .safetensors), or place one at {DEFAULT_CKPT}")


def default_scale(loaded: LoadedModel, mode: Mode = "txt2img") -> float:
    """The guidance scale when --scale is not given: the model config's recommendation, else the script's default
    (the original's 7.5 for txt2img, 5.0 for img2img)."""
    if loaded.default_scale is not None:
        logger.info("guidance scale %g: the model config's default (sampling_defaults.scale); --scale sets another", loaded.default_scale)
        return loaded.default_scale
    return float(DEFAULTS[mode]["scale"])


def png_parameters(job: ImageJob, settings: SamplingSettings, loaded: LoadedModel, precision: str) -> str:
    """Generation parameters in the text format the popular web UIs write under the PNG key `parameters`."""
    fields = [
        f"Steps: {settings.steps}",
        f"Sampler: {settings.sampler}",
        f"Schedule: {settings.schedule_name()}",
        f"CFG scale: {settings.guidance_scale:g}",
        f"Seed: {job.seed}",
        f"Size: {settings.width}x{settings.height}",
        f"Model hash: {loaded.model_hash}",
        f"Eta: {settings.eta:g}",
        f"Precision: {precision}",
    ]
    if settings.strength is not None:
        fields.append(f"Denoising strength: {settings.strength:g}")
    lines = [job.prompt]
    if job.negative_prompt:
        lines.append(f"Negative prompt: {job.negative_prompt}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


@dataclass
class Session:
    """What a script has after checking its arguments and loading the model."""

    args: argparse.Namespace
    mode: str
    device: torch.device
    loaded: LoadedModel
    attention: Any

    @property
    def model(self) -> Any:
        return self.loaded.model


def prepare(args: argparse.Namespace, mode: Mode) -> Session:
    """Check the arguments (before any loading), then choose device, precision and attention, and load the model."""
    check_args(args, mode)
    device = parse_device(args.device)
    dtypes = choose_dtypes(args.precision, device)
    attention = resolve_backend(args.attention, args.attention_slicing, device)
    ckpt, is_demo = resolve_checkpoint(args)
    offload = args.offload != "none" and device.type != "cpu"
    loaded = load_model(
        ckpt, Path(args.config) if args.config else None, torch.device("cpu") if offload else device, dtypes, attention,
        use_ema=True if args.use_ema else None, is_demo=is_demo, parameterization=args.parameterization,
    )
    if args.scale is None:
        args.scale = default_scale(loaded, mode)
    model = loaded.model
    if offload:
        apply_offload(model, args.offload, device)
    logger.info("config: %s (%s); %s on %s", loaded.config_path, loaded.config_reason, dtypes.describe(), device)
    vae_factor = 2 ** (model.first_stage_model.encoder.num_resolutions - 1)
    if args.f != vae_factor or args.C != model.channels:
        raise UsageError(f"--C {args.C} / --f {args.f} do not match the model (C={model.channels}, f={vae_factor})")
    return Session(args, mode, device, loaded, attention)


def encode_init_image(session: Session, engine: Engine, path: str) -> tuple[int, int]:
    """Load, resize and VAE-encode an init image into engine.init_posterior; returns (height, width)."""
    multiple = session.loaded.size_multiple
    init, (w0, h0), (width, height) = load_init_image(Path(path), multiple)
    if (w0, h0) != (width, height):
        print(f"note: init image {w0}x{h0} resized to {width}x{height} (a multiple of {multiple})")
    tiles = engine.vae_tiling
    f = session.args.f
    with torch.no_grad():
        if tiles is not None and tiles.applies(height // f, width // f):
            engine.init_posterior = encode_tiled(session.model, init.to(session.device), tiles.tile, tiles.overlap, tiles.blend)
        else:
            engine.init_posterior = session.model.encode_first_stage(init.to(session.device))
    return height, width


def make_engine(session: Session) -> Engine:
    return Engine(session.model, session.device, vae_tiling=session.args.tile_settings)


def choose_auto_batch_size(session: Session, engine: Engine, plan: Plan) -> None:
    """--max_batch_size auto: measure the memory model on the real engine and pick the largest fitting B."""
    args = session.args
    if args.max_batch_size != "auto" or len(plan.jobs) < 2:
        return
    model = measure_memory_model(engine, plan.settings, plan.jobs[:2])
    budget = memory_budget(session.device, session.model, args.max_memory)
    plan.settings.max_batch_size = choose_batch_size(model, budget, min(len(plan.jobs), args.n_samples))
    print(f"--max_batch_size auto: {plan.settings.max_batch_size} images per micro-batch for a budget of {budget / 2**30:.2f} GB ({model.describe()})")


def execute(session: Session, engine: Engine, plan: Plan) -> int:
    """Run the plan through the engine, saving every micro-batch as soon as it is done; print the metrics."""
    args, device, loaded = session.args, session.device, session.loaded
    choose_auto_batch_size(session, engine, plan)
    outdir = Path(args.outdir)
    sample_path = outdir / "samples"
    settings = plan.settings
    metrics = RunMetrics(device=str(device), model_load_s=loaded.load_seconds)
    metrics.settings = {
        "mode": session.mode, "sampler": settings.sampler, "schedule": settings.schedule_name(), "steps": settings.steps,
        "eta": settings.eta, "scale": settings.guidance_scale, "height": settings.height, "width": settings.width,
        "n_samples": args.n_samples, "n_iter": args.n_iter, "images": len(plan.jobs), "max_batch_size": settings.max_batch_size,
        "precision": args.precision, "dtypes": loaded.dtypes.describe(), "attention": repr(session.attention), "seed": args.seed,
        "checkpoint": str(loaded.ckpt) if loaded.ckpt else None, "config": str(loaded.config_path),
    }
    grid_images = []
    next_free = next_number(sample_path)
    progress = _Progress(len(plan.jobs), quiet=args.quiet)

    def on_batch(batch: list[FinishedImage]) -> None:
        nonlocal next_free
        for done in batch:
            array = to_uint8(done.image)
            if not args.skip_save:
                text = {"parameters": png_parameters(done.job, settings, loaded, args.precision)}
                path = save_png_atomic(array, sample_path, next_free, text=text)
                next_free = int(path.stem) + 1
            if not args.skip_grid:
                grid_images.append(array)
            progress.image_done()
        metrics.batch_done(len(batch))

    stop = _StopOnSignal()

    def on_step(batch_index: int, info: dict) -> None:
        progress.step(batch_index, info)
        if stop.signum is not None:
            raise Interrupted(stop.signum)

    engine.step_callback = on_step
    reset_peak_memory(device)
    metrics.start()
    exit_code = 0
    with stop:
        try:
            metrics.final_max_batch_size = engine.run(plan.jobs, settings, on_batch)
        except Interrupted:
            exit_code = 128 + stop.signum
            metrics.interrupted = True
    progress.close()
    if not args.skip_grid and grid_images:
        save_grid(grid_images, outdir, plan.n_rows)
    metrics.finish(device)
    if exit_code:
        name = signal.Signals(exit_code - 128).name
        print(f"Stopped by {name} after {metrics.images} of {len(plan.jobs)} images; every finished image is saved in {outdir}")
    else:
        print(f"Your samples are ready and waiting for you here:\n{outdir}\n")
    print(metrics.report())
    if args.metrics_json:
        metrics.write_json(Path(args.metrics_json))
    return exit_code


class _StopOnSignal:
    """While active, SIGINT and SIGTERM ask the run to stop after the current sampler step (a second SIGINT stops
    at once). Only the main thread can install handlers; elsewhere this does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name} received: stopping after the current step (Ctrl-C again to stop now)", file=sys.stderr)

    def __enter__(self) -> "_StopOnSignal":
        try:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread
            self._previous.clear()
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


_FIELD = re.compile(r"\s*([A-Za-z][A-Za-z ]*):\s*([^,]*)")


def parse_png_parameters(text: str) -> dict[str, str]:
    """Inverse of png_parameters: {"prompt", "negative_prompt", and each "Key: value" field of the last line}."""
    lines = text.strip("\n").split("\n")
    if len(lines) < 2:
        raise ValueError("the parameters text has no settings line")
    fields = {m.group(1).strip(): m.group(2).strip() for m in _FIELD.finditer(lines[-1])}
    if "Seed" not in fields or "Steps" not in fields:
        raise ValueError("the parameters text has no Seed / Steps fields")
    body = lines[:-1]
    negative = ""
    for i, line in enumerate(body):
        if line.startswith("Negative prompt: "):
            negative = "\n".join([line[len("Negative prompt: "):], *body[i + 1 :]])
            body = body[:i]
            break
    fields["prompt"] = "\n".join(body)
    fields["negative_prompt"] = negative
    return fields


def apply_from_png(args: argparse.Namespace) -> None:
    """Take prompt, negative prompt, sampler, schedule, steps, scale, eta, seed, size and precision from a PNG
    written by these scripts (or the web UIs' `parameters` format); one image."""
    from PIL import Image

    check_image_file(args.from_png, "--from_png")
    with Image.open(args.from_png) as im:
        text = im.info.get("parameters")
    if not text:
        raise UsageError(f"{args.from_png} has no `parameters` text chunk to regenerate from")
    try:
        f = parse_png_parameters(text)
        width, height = (int(v) for v in f["Size"].split("x"))
        args.prompt, args.negative_prompt = f["prompt"], f["negative_prompt"]
        args.ddim_steps, args.seed, args.W, args.H = int(f["Steps"]), int(f["Seed"]), width, height
        if "CFG scale" in f:
            args.scale = float(f["CFG scale"])
        args.ddim_eta = float(f.get("Eta", 0.0))
    except (KeyError, ValueError) as e:
        raise UsageError(f"{args.from_png}: cannot read its parameters ({e})") from None
    args.sampler = f.get("Sampler", "ddim").lower()
    args.plms = False
    args.schedule = f.get("Schedule", args.schedule)
    if f.get("Precision") in ("full", "autocast"):
        args.precision = f["Precision"]
    args.n_samples, args.n_iter, args.fixed_code, args.from_file = 1, 1, False, None
    args.expected_model_hash = f.get("Model hash")


def run(args: argparse.Namespace, mode: Mode) -> int:
    if getattr(args, "from_png", None):
        apply_from_png(args)
    session = prepare(args, mode)
    expected = getattr(args, "expected_model_hash", None)
    if expected and expected != session.loaded.model_hash:
        print(f"note: {args.from_png} was made with model hash {expected}; this checkpoint's is {session.loaded.model_hash}")
    engine = make_engine(session)
    if mode == "img2img":
        height, width = encode_init_image(session, engine, args.init_img)
    else:
        native = session.model.image_size * args.f
        multiple = session.loaded.size_multiple
        height = round_size(args.H or native, multiple, "H")
        width = round_size(args.W or native, multiple, "W")
    return execute(session, engine, make_plan(args, mode, height, width))


class _Progress:
    """tqdm bars: images over the whole run, steps of the current micro-batch."""

    def __init__(self, total_images: int, quiet: bool):
        self.quiet = quiet
        self.images = None
        self.steps = None
        self._batch = -1
        if not quiet:
            from tqdm import tqdm

            self._tqdm = tqdm
            self.images = tqdm(total=total_images, desc="images", unit="img", position=0)

    def step(self, batch_index: int, info: dict) -> None:
        if self.quiet:
            return
        if self.steps is None or info["i"] == 0:
            if self.steps is not None:
                self.steps.close()
            self.steps = self._tqdm(desc="steps", unit="step", position=1, leave=False)
        self.steps.update(1)

    def image_done(self) -> None:
        if self.images is not None:
            self.images.update(1)

    def close(self) -> None:
        for bar in (self.steps, self.images):
            if bar is not None:
                bar.close()


def main_for(mode: Mode, description: str, argv: Optional[Sequence[str]] = None) -> int:
    """Parse, run, and turn expected failures into one line on stderr and a non-zero exit code."""
    parser = build_parser(mode, description)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return run(args, mode)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except (UsageError, CheckpointError, ValueError, FileNotFoundError) as e:
        if args.verbose:
            traceback.print_exc()
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - an unexpected failure still ends in one line and an exit code
        if args.verbose:
            traceback.print_exc()
        print(f"error: {type(e).__name__}: {_one_line(e)} (run with --verbose for the traceback)", file=sys.stderr)
        return 1


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:2000] if text else type(error).__name__
