"""The command lines of txt2img, img2img, inpaint and batch_gen: flags in, files out.

A script parses its flags (`build_parser`), turns them into a `ModelOptions` and a `GenerationRequest`
(`from_args`; `--from_png` fills what the user did not give from a PNG's parameters), loads a `Pipeline` and runs
the request, saving each image as soon as its micro-batch is done. Everything that decides images lives in
`microbatch.request` and `microbatch.pipeline`, shared with the Python API. Flags keep the original CompVis names
and meanings; new ones are documented in the README.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from ldm.checkpoint import CheckpointError
from ldm.modules.attention_backends import BACKENDS
from microbatch.engine import ImageJob, SamplingSettings
from microbatch.hires import DEFAULT_HIRES_STRENGTH, UPSCALERS
from microbatch.images import next_number, save_grid, save_png_atomic
from microbatch.job import item_path, job_settings, remove_partials
from microbatch.loading import DEFAULT_CKPT, LoadedModel, file_hash, find_vae_beside, load_model
from microbatch.parameters import FLAG_OF, HIRES_FIELDS, lora_hash_notes, read_png_settings, ti_hash_notes
from microbatch.pipeline import SCRIPT_SCALE, GeneratedImage, Pipeline, ProgressEvent, default_scale, micro_batch_size, resolve_checkpoint
from microbatch.runner import JobStopped, Rank, gather, init_rank, job_metrics, launched_by_torchrun, leave_rank_process, prepare_job, rank_device, run_job, set_cpu_threads
from microbatch.request import GenerationRequest, ModelOptions, UsageError, read_prompt_file
from microbatch.vae_tiling import TileSettings
from samplers import SAMPLERS, SCHEDULES

logger = logging.getLogger(__name__)

Mode = Literal["txt2img", "img2img", "inpaint", "batch_gen"]

DEFAULTS = {
    "txt2img": dict(outdir="outputs/txt2img-samples", n_iter=2, n_samples=3),
    "img2img": dict(outdir="outputs/img2img-samples", n_iter=1, n_samples=2),
    "inpaint": dict(outdir="outputs/inpaint-samples", n_iter=1, n_samples=2),
    "batch_gen": dict(outdir="outputs/batch_gen-samples", n_iter=1, n_samples=9),
}
DESCRIPTIONS = {
    "txt2img": "Generate images from a text prompt.",
    "img2img": "Generate images from an init image and a text prompt.",
    "inpaint": "Repaint the white region of a mask in an image, guided by a text prompt.",
    "batch_gen": "Generate exactly --n_samples images in micro-batches of at most --max_batch_size.",
}
_UNSET = object()

__all__ = ["UsageError", "build_parser", "from_args", "run", "main_for", "check_args", "make_plan", "default_scale"]


def request_mode(mode: str) -> str:
    """The request mode of a script: batch_gen makes txt2img images."""
    return "txt2img" if mode == "batch_gen" else mode


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's lines; adds "(default: X)" to a flag's help once, only where the default says something."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default in (None, False, "", argparse.SUPPRESS) or action.nargs == 0:
            return text
        return f"{text} (default: {default})"


class _Repeatable(argparse.Action):
    """A repeatable flag collecting its values in a list (argparse's "append" would append to any default,
    including the marker `explicit_flags` sets)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option_string: Optional[str] = None) -> None:
        current = getattr(namespace, self.dest, None)
        setattr(namespace, self.dest, [*(current if isinstance(current, list) else []), values])


class OneLineParser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage block) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser(mode: Mode, description: Optional[str] = None) -> argparse.ArgumentParser:
    d = DEFAULTS[mode]
    samplers = "\n".join(f"  {s.name:<13} {s.description} [schedule: {s.default_schedule}]" for s in SAMPLERS.values())
    p = OneLineParser(description=description or DESCRIPTIONS[mode], formatter_class=_HelpFormatter, epilog=f"samplers (--sampler NAME):\n{samplers}")
    image_mode = mode in ("img2img", "inpaint")

    g = p.add_argument_group("prompt")
    g.add_argument("--prompt", type=str, nargs="?", default="a painting of a virus monster playing guitar", help="the prompt to render")
    g.add_argument("--negative_prompt", type=str, default="", help="replaces the empty prompt of classifier-free guidance")
    g.add_argument("--from-file", dest="from_file", type=str, help="read prompts from this file, one per line ('prompt || negative' gives a line its own negative prompt)")
    if mode in ("txt2img", "img2img"):
        g.add_argument("--from_png", type=str, default=None, help="regenerate the image whose `parameters` metadata this PNG holds; flags you give override the PNG's values")
    if image_mode:
        g = p.add_argument_group("input image")
        g.add_argument("--init-img", dest="init_img", type=str, help="path to the input image")
        if mode == "inpaint":
            g.add_argument("--mask", type=str, help="mask image, same size as --init-img: white (>= 50%% luminance) = repaint, black = keep")
        strength = 1.0 if mode == "inpaint" else 0.75
        g.add_argument("--strength", type=float, default=strength, help="fraction of the schedule re-run from the noised input: 1.0 ignores the input")

    g = p.add_argument_group("sampling")
    g.add_argument("--ddim_steps", "--steps", dest="ddim_steps", type=int, default=50, help="number of sampling steps")
    g.add_argument("--sampler", type=str, default=None, help="sampler name (list below; default ddim)")
    g.add_argument("--plms", action="store_true", help="use PLMS sampling (same as --sampler plms)")
    g.add_argument("--schedule", type=str, default=None, choices=sorted(SCHEDULES), help="noise schedule (default: the sampler's own; uniform for ddim and plms)")
    g.add_argument("--ddim_eta", "--eta", dest="ddim_eta", type=float, default=None, help="noise of DDIM / ancestral / SDE samplers, 0 = deterministic (default: the sampler's own: 0 for ddim, 1 for ancestral and SDE samplers)")
    g.add_argument(
        "--scale", type=float, default=None,
        help="unconditional guidance scale: eps = eps(x, empty) + scale * (eps(x, cond) - eps(x, empty)); "
        f"default: the model config's sampling_defaults.scale if it sets one (the demo model: 2), else {SCRIPT_SCALE[request_mode(mode)]:g}",
    )
    g.add_argument("--seed", type=int, default=42, help="seed of image 0; image i uses seed + i")
    g.add_argument("--fixed_code", action="store_true", help="reuse the same start noise for every iteration and prompt batch")
    g.add_argument("--lora", type=str, action=_Repeatable, default=None, metavar="FILE[:WEIGHT]", help="merge a LoRA / LyCORIS file into the model for this run (repeatable); FILE:TE:UNET weights the text encoder and the UNet apart, a name without a file is looked up in --lora_dir. Prompts may also say <lora:NAME:WEIGHT> or <lora:NAME:TE:UNET>")
    g.add_argument("--lora_dir", type=str, default="models/Lora", help="where <lora:NAME:...> prompt tags find their files (NAME.safetensors, .pt or .ckpt, searched recursively)")
    g.add_argument("--embeddings_dir", type=str, default="embeddings", help="textual-inversion embeddings (.pt, .bin, .safetensors, searched recursively): a prompt or negative prompt uses one by writing its file name without the suffix")
    g.add_argument("--guidance_interval", type=float, nargs=2, metavar=("SIGMA_LO", "SIGMA_HI"), default=None, help="classifier-free guidance only at noise levels sigma in [SIGMA_LO, SIGMA_HI] (inf allowed); elsewhere the unconditional half is not computed (faster, approximate; README \"Step savings\")")
    g.add_argument("--tome", type=float, default=None, metavar="RATIO", help="token merging (ToMe for SD): merge RATIO of the tokens before self-attention in the highest-resolution transformer blocks (0 < RATIO <= 0.75; 0.5 is the published maximum; faster, approximate; README \"Step savings\")")
    g.add_argument("--deepcache", type=int, default=None, metavar="N", help="DeepCache: run the whole UNet every N-th denoiser call and only its shallowest blocks with the cached deep features in between (faster, approximate; README \"Step savings\")")
    g.add_argument("--clip_skip", type=int, default=1, help="condition on the text encoder's N-th layer from the end, as the web UI's Clip skip (SD 1.x; no effect on SD 2.x); 1 = the last layer")
    g.add_argument("--refiner_switch", type=float, default=None, help="with --refiner: the fraction of the noise schedule after which the refiner takes over (the web UI's 'Switch at'; 1 = the base alone; default 0.8)")

    g = p.add_argument_group("hires fix (txt2img only): a second pass, img2img over the upscaled image, as the web UI's")
    g.add_argument("--hr_scale", type=float, default=None, metavar="S", help="turn the hires fix on: the second pass is S times the size (the web UI's Upscale by)")
    g.add_argument("--hr_resize_x", type=int, default=None, metavar="W", help="turn the hires fix on: the second pass's width (0 or unset with --hr_resize_y: keep the aspect ratio; with both, the image is upscaled to cover W x H and cropped)")
    g.add_argument("--hr_resize_y", type=int, default=None, metavar="H", help="turn the hires fix on: the second pass's height (see --hr_resize_x)")
    g.add_argument("--hr_upscaler", type=str, default=None, help=f"latent upscalers interpolate the latent; pixel ones decode, resize and encode: {', '.join(UPSCALERS)} or the web UI's names (Latent, Latent (nearest), Lanczos, ...) (default: latent)")
    g.add_argument("--hr_steps", type=int, default=None, help="steps the second pass runs (default / 0: --ddim_steps), out of a schedule of int(steps / strength) as the web UI")
    g.add_argument("--hr_denoising_strength", type=float, default=None, help=f"the second pass's denoising strength (default {DEFAULT_HIRES_STRENGTH}, the web UI's)")

    g = p.add_argument_group("SDXL micro-conditioning (SDXL models only; unset: the published values)")
    g.add_argument("--original_size", type=int, nargs=2, metavar=("H", "W"), default=None, help="the size the model is told the training image had (default: the output size)")
    g.add_argument("--crop_coords", type=int, nargs=2, metavar=("TOP", "LEFT"), default=None, help="the crop's top-left corner the model is told (default: 0 0)")
    g.add_argument("--target_size", type=int, nargs=2, metavar=("H", "W"), default=None, help="the target size the model is told (base only; default: the output size)")
    g.add_argument("--aesthetic_score", type=float, default=None, help="aesthetic score of the positive branch (refiner only; default 6.0)")
    g.add_argument("--negative_aesthetic_score", type=float, default=None, help="aesthetic score of the negative branch (refiner only; default 2.5)")

    g = p.add_argument_group("size and count")
    if not image_mode:
        g.add_argument("--H", type=int, default=None, help="image height in pixels (default: the model's native size)")
        g.add_argument("--W", type=int, default=None, help="image width in pixels (default: the model's native size)")
    g.add_argument("--n_samples", type=int, default=d["n_samples"], help="how many samples to produce for each given prompt (the batch size)")
    g.add_argument("--n_iter", type=int, default=d["n_iter"], help="sample this often")
    g.add_argument("--C", type=int, default=4, help="latent channels (checked against the model)")
    g.add_argument("--f", type=int, default=8, help="downsampling factor (checked against the model)")

    g = p.add_argument_group("model")
    g.add_argument("--ckpt", type=str, default=None, help=f"checkpoint (.ckpt or .safetensors); default {DEFAULT_CKPT}, else the embedded demo model")
    g.add_argument("--config", type=str, default=None, help="model yaml (default: the yaml beside the checkpoint, else inferred from the checkpoint)")
    g.add_argument("--vae", type=str, default=None, help="a VAE file (.pt, .ckpt, .safetensors; VAE-only or a full checkpoint) replacing the checkpoint's own (default: <checkpoint stem>.vae.{pt,ckpt,safetensors} beside the checkpoint, if any)")
    g.add_argument("--refiner", type=str, default=None, help="an SDXL refiner checkpoint: the SDXL base hands its latents to it for the last steps (--refiner_switch); loaded once, both on the device unless --offload")
    g.add_argument("--use_ema", action="store_true", help="use the EMA weights of a full checkpoint")
    g.add_argument("--parameterization", type=str, choices=["auto", "eps", "v"], default="auto", help="what the UNet predicts; auto: the config's, measured from the checkpoint when the config is inferred")
    g.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda, cuda:N or mps")
    g.add_argument("--precision", type=str, choices=["full", "autocast"], default="autocast", help="autocast: half precision where it is safe and fast; full: float32")

    g = p.add_argument_group("memory and speed")
    g.add_argument("--max_batch_size", type=str, default=None, help="most images per UNet micro-batch, or auto: the largest that fits the device's free memory (or --max_memory), from a measured memory model (default: n_samples, at most 8 and fewer for large images: 3 at 512x512 on a CPU, 4 on a GPU)")
    g.add_argument("--max_memory", type=float, default=None, help="with --max_batch_size auto: the peak memory to stay under, in GB (weights included)")
    g.add_argument("--split_guidance", action="store_true", help="run the unconditional and conditional halves of guidance as separate UNet calls")
    g.add_argument("--attention", type=str, default="auto", choices=list(BACKENDS), help="attention kernel")
    g.add_argument("--attention_slicing", type=str, default=None, help="auto, max or N: compute attention in slices (implies --attention sliced)")
    g.add_argument("--compile", action="store_true", help="torch.compile the UNet and the VAE decoder (static shapes: the first micro-batch of each shape compiles, then cached on disk in TORCHINDUCTOR_CACHE_DIR, default ~/.cache/microbatch/inductor); same images up to float rounding")
    g.add_argument("--channels_last", action="store_true", help="convolutions in NHWC order (faster on oneDNN CPUs and tensor-core GPUs; same images up to float rounding)")
    g.add_argument("--offload", type=str, default="none", choices=["none", "model", "sequential"], help="GPU memory saving: model keeps only the component in use on the GPU; sequential streams the UNet's blocks one at a time (no-ops on CPU)")
    g.add_argument("--vae_tiling", type=str, default="auto", choices=["auto", "on", "off"], help="decode (and encode) through the VAE in overlapping, blended tiles; auto: for latents above 128 (images above 1024 px)")
    g.add_argument("--vae_tile", type=int, default=64, help="VAE tile side in latents (x f pixels)")
    g.add_argument("--vae_tile_overlap", type=int, default=16, help="overlap of neighbouring VAE tiles in latents")

    g = p.add_argument_group("output")
    g.add_argument("--outdir", type=str, nargs="?", default=d["outdir"], help="dir to write results to")
    g.add_argument("--skip_grid", action="store_true", help="do not save a grid, only individual samples")
    g.add_argument("--skip_save", action="store_true", help="do not save individual samples (for speed measurements)")
    g.add_argument("--n_rows", type=int, default=0, help="rows in the grid (default 0: one row per prompt batch of n_samples images, as the original)")
    g.add_argument("--metrics_json", type=str, default=None, help="also write the run's metrics and settings as JSON here")
    if mode in ("txt2img", "batch_gen"):
        g.add_argument("--resume", action="store_true", help="complete the job in --outdir: skip the images its manifest records intact, make the rest (see 'Many GPUs and machines' in the README)")
    if mode == "batch_gen":
        g = p.add_argument_group("Ray (pip install -e \".[ray]\")")
        g.add_argument("--ray", type=str, default=None, help="run the job on Ray: local (a Ray instance on this machine), auto (the running cluster) or a cluster ADDRESS")
        g.add_argument("--ray_workers", type=int, default=2, help="with --ray: actors, each loading the model once")
        g.add_argument("--ray_gpus_per_worker", type=float, default=0.0, help="with --ray: GPUs per actor (0: CPU actors)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.add_argument("--verbose", action="store_true", help="show tracebacks and debug logs")
    return p


def explicit_flags(mode: Mode, argv: Optional[Sequence[str]]) -> set[str]:
    """The destinations of the flags given on the command line (as opposed to defaults)."""
    p = build_parser(mode)
    p.set_defaults(**{a.dest: _UNSET for a in p._actions if a.dest != "help"})
    ns = p.parse_args(sys.argv[1:] if argv is None else list(argv))
    return {dest for dest, value in vars(ns).items() if value is not _UNSET}


@dataclass(frozen=True)
class OutputOptions:
    """What the scripts do with the images: folder, grid, metrics file, progress bars."""

    outdir: str
    skip_save: bool = False
    skip_grid: bool = False
    n_rows: int = 0
    metrics_json: Optional[str] = None
    quiet: bool = False


def _int_or_auto(value: Optional[str]) -> Any:
    if value is None or value == "auto" or isinstance(value, int):
        return value
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"--max_batch_size must be a positive integer or auto, got {value!r}") from None


def _pair(value: Optional[Sequence[Any]], kind: Callable[[Any], Any] = int) -> Optional[tuple[Any, Any]]:
    return None if value is None else (kind(value[0]), kind(value[1]))


def parse_lora_flag(value: str) -> tuple[str, float, Optional[float]]:
    """`--lora FILE[:WEIGHT]` or `FILE:TE:UNET` -> (file, unet weight, te weight or None for the unet weight).
    Only trailing numbers are weights, so a path with colons (C:\\loras\\x.safetensors) stays whole."""
    parts = value.split(":")
    weights: list[float] = []
    while len(parts) > 1 and len(weights) < 2:
        try:
            weights.insert(0, float(parts[-1]))
        except ValueError:
            break
        parts.pop()
    path = ":".join(parts)
    if not path:
        raise UsageError(f"--lora takes FILE[:WEIGHT] or FILE:TE:UNET, got {value!r}")
    if len(weights) == 2:
        return path, weights[1], weights[0]
    return path, weights[0] if weights else 1.0, None


def _request_fields(args: argparse.Namespace, mode: Mode) -> dict[str, Any]:
    """GenerationRequest fields from the flags (nothing checked yet; the request checks)."""
    if args.plms and args.sampler not in (None, "plms"):
        raise UsageError(f"--plms conflicts with --sampler {args.sampler}; give one of them")
    fields: dict[str, Any] = dict(
        mode=request_mode(mode), prompt=args.prompt, negative_prompt=args.negative_prompt, n_samples=args.n_samples, n_iter=args.n_iter,
        seed=args.seed, fixed_code=args.fixed_code, sampler="plms" if args.plms else (args.sampler or "ddim"), steps=args.ddim_steps,
        schedule=args.schedule, eta=args.ddim_eta, scale=args.scale, max_batch_size=_int_or_auto(args.max_batch_size),
        max_memory=args.max_memory, split_guidance=args.split_guidance, clip_skip=args.clip_skip,
        guidance_interval=_pair(args.guidance_interval, float), tome=args.tome, deepcache=args.deepcache,
        original_size=_pair(args.original_size), crop_coords=_pair(args.crop_coords), target_size=_pair(args.target_size),
        aesthetic_score=args.aesthetic_score, negative_aesthetic_score=args.negative_aesthetic_score,
        loras=tuple(parse_lora_flag(v) for v in args.lora or ()), lora_dir=args.lora_dir,
        embeddings_dir=args.embeddings_dir,
        hr_scale=args.hr_scale, hr_resize_x=args.hr_resize_x, hr_resize_y=args.hr_resize_y, hr_upscaler=args.hr_upscaler,
        hr_steps=args.hr_steps, hr_denoising_strength=args.hr_denoising_strength,
        refiner_switch=args.refiner_switch,
    )
    if mode in ("img2img", "inpaint"):
        fields.update(init_image=args.init_img or None, strength=args.strength)
        if mode == "inpaint":
            fields["mask"] = args.mask or None
    else:
        fields.update(height=args.H, width=args.W)
    try:
        fields["vae_tiling"] = TileSettings(args.vae_tiling, args.vae_tile, args.vae_tile_overlap)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.from_file:
        fields["prompt_file"] = read_prompt_file(args.from_file)
    elif args.prompt is None:
        raise UsageError("give --prompt TEXT or --from-file PATH")
    return fields


def _model_fields(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        ckpt=args.ckpt, config=args.config, vae=args.vae, device=args.device, precision=args.precision, attention=args.attention,
        attention_slicing=args.attention_slicing, offload=args.offload, use_ema=args.use_ema, parameterization=args.parameterization,
        refiner=args.refiner, compile=args.compile, channels_last=args.channels_last,
    )


def _apply_png(args: argparse.Namespace, mode: Mode, explicit: set[str], request: dict[str, Any], model: dict[str, Any], notes: list[str]) -> Optional[str]:
    """Fill the request from `--from_png`: its values, except where a flag was given (flags win, with a note).
    Returns the PNG's model hash."""
    png = read_png_settings(args.from_png)
    if mode == "txt2img" and png.made_by == "img2img":
        raise UsageError(
            f"{args.from_png} was made by img2img (Denoising strength {png.fields['strength']:g}): regenerate it with "
            f"scripts/img2img.py --from_png {args.from_png} --init-img THE_INPUT_IMAGE"
        )
    if args.from_file:
        raise UsageError("--from_png regenerates one PNG's prompt: it cannot be combined with --from-file")
    notes.extend(png.notes)
    notes.extend(lora_hash_notes(png.lora_hashes, request.get("lora_dir", "models/Lora")))
    notes.extend(ti_hash_notes(png.ti_hashes, request.get("embeddings_dir", "embeddings")))
    if png.hires and mode != "txt2img":
        notes.append(f"note: {args.from_png} used the hires fix, which applies to txt2img only: {mode} ignores it")
    # A hires size given as a flag replaces the PNG's (scale or resize), which would otherwise conflict with it.
    hires_size_given = bool({"hr_scale", "hr_resize_x", "hr_resize_y"} & explicit)
    overridden = []
    for name, value in png.fields.items():
        flag = FLAG_OF[name]
        if (name == "strength" and mode == "txt2img") or (name in ("width", "height") and mode != "txt2img"):
            continue
        if name in HIRES_FIELDS and mode != "txt2img":
            continue
        if hires_size_given and name in ("hr_scale", "hr_resize_x", "hr_resize_y") and flag not in explicit:
            overridden.append(f"--{name} (PNG: {value})")
            continue
        given = flag in explicit or (name == "sampler" and "plms" in explicit)
        target = model if name == "precision" else request
        if given:
            if target.get(name) != value:
                overridden.append(f"--{flag} {target.get(name)} (PNG: {value})")
            continue
        target[name] = value
    if png.refiner is not None:
        _apply_png_refiner(png, explicit, request, model, notes)
    if {"sampler", "plms"} & explicit:  # another sampler than the PNG's: its own eta and schedule unless given
        for name, flag in (("eta", "ddim_eta"), ("schedule", "schedule")):
            if flag not in explicit:
                request[name] = None
    for name, value in (("n_samples", 1), ("n_iter", 1), ("fixed_code", False)):
        if name not in explicit:
            request[name] = value
    if overridden:
        notes.append(f"note: flags given override {args.from_png}'s parameters: {', '.join(overridden)}")
    return png.model_hash


def _apply_png_refiner(png: Any, explicit: set[str], request: dict[str, Any], model: dict[str, Any], notes: list[str]) -> None:
    """A PNG's `Refiner: NAME [hash]` and `Refiner switch at`: the refiner NAME.safetensors / .ckpt beside the
    checkpoint unless --refiner is given (missing: a note, and the base alone)."""
    from microbatch.refiner import find_refiner

    if "refiner" not in explicit:
        folder = Path(model["ckpt"]).parent if model.get("ckpt") else DEFAULT_CKPT.parent
        path, note = find_refiner(png.refiner, folder)
        if note:
            notes.append(note)
        if path is None:
            return
        model["refiner"] = str(path)
    if png.refiner_switch is not None and "refiner_switch" not in explicit:
        request["refiner_switch"] = png.refiner_switch


def check_output(out: OutputOptions) -> None:
    """The output folder and metrics file can be written: checked before any work."""
    outdir = Path(out.outdir)
    try:
        (outdir / "samples").mkdir(parents=True, exist_ok=True)
        probe = outdir / "samples" / f".write-test-{os.getpid()}"  # one per process: ranks share the folder
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"output folder {outdir} cannot be written ({e.strerror or e})") from None
    if out.n_rows < 0:
        raise UsageError(f"--n_rows must be 0 (one row per prompt batch) or positive, got {out.n_rows}")
    if out.metrics_json:
        path = Path(out.metrics_json)
        if path.is_dir():
            raise UsageError(f"--metrics_json {path} is a folder; give a file name")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"--metrics_json {path}: its folder cannot be made ({e.strerror or e})") from None
        if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise UsageError(f"--metrics_json {path} cannot be written")


@dataclass
class CommandLine:
    """A parsed and checked command line."""

    mode: Mode
    options: ModelOptions
    request: GenerationRequest
    output: OutputOptions
    notes: list
    png_model_hash: Optional[str] = None
    png_path: Optional[str] = None
    C: int = 4
    f: int = 8


def from_args(args: argparse.Namespace, mode: Mode, explicit: Optional[set[str]] = None) -> CommandLine:
    """Flags (and --from_png) -> model options, request and output options, every check that needs no model made."""
    if args.C < 1 or args.f < 1:
        raise UsageError(f"--C and --f must be positive, got {args.C} and {args.f}")
    request = _request_fields(args, mode)
    model = _model_fields(args)
    notes: list[str] = []
    png_hash = None
    if getattr(args, "from_png", None):
        png_hash = _apply_png(args, mode, explicit if explicit is not None else set(), request, model, notes)
    options = ModelOptions(**model)
    req = GenerationRequest(**request)
    if req.refiner_switch is not None and not options.refiner:
        raise UsageError(f"--refiner_switch {req.refiner_switch:g} needs a refiner: --refiner FILE")
    output = OutputOptions(args.outdir, args.skip_save, args.skip_grid, args.n_rows, args.metrics_json, args.quiet)
    check_output(output)
    return CommandLine(mode, options, req, output, notes, png_hash, getattr(args, "from_png", None), args.C, args.f)


def grid_columns(n_rows: int, n_samples: int, images: int) -> int:
    """Images per grid row: one prompt batch per row by default (as the original), else enough for n_rows rows."""
    if n_rows <= 0:
        return n_samples
    return max(1, -(-images // n_rows))


def is_job(args: argparse.Namespace, mode: Mode) -> bool:
    """batch_gen always runs as a job (files named by item, manifest, resume); txt2img with --resume or torchrun."""
    return mode == "batch_gen" or (mode == "txt2img" and (getattr(args, "resume", False) or launched_by_torchrun()))


def load_pipeline(cmd: CommandLine, on_note: Any = print) -> Pipeline:
    pipeline = Pipeline.load(cmd.options, on_note=on_note, loader=load_model)
    model = pipeline.model
    if cmd.f != pipeline.vae_factor or cmd.C != model.channels:
        raise UsageError(f"--C {cmd.C} / --f {cmd.f} do not match the model (C={model.channels}, f={pipeline.vae_factor})")
    if cmd.png_model_hash and cmd.png_model_hash != pipeline.loaded.model_hash:
        print(f"note: {cmd.png_path} was made with model hash {cmd.png_model_hash}; this checkpoint's is {pipeline.loaded.model_hash}")
    return pipeline


def run(args: argparse.Namespace, mode: Mode, explicit: Optional[set[str]] = None) -> int:
    if is_job(args, mode):
        return run_job_command(args, mode, explicit)
    cmd = from_args(args, mode, explicit)
    for text in cmd.notes:
        print(text)
    return execute(load_pipeline(cmd), cmd)


GRID_LIMIT = 1024  # a job's grid is made from its files up to this many images


def run_job_command(args: argparse.Namespace, mode: Mode, explicit: Optional[set[str]]) -> int:
    """A job on one process or on every torchrun rank: the same items, files and manifest either way."""
    rank = init_rank()
    try:
        return _run_job_command(args, mode, explicit, rank)
    except JobStopped as e:
        return e.code
    finally:
        if rank.distributed:
            import torch.distributed as dist

            dist.destroy_process_group()


def _run_job_command(args: argparse.Namespace, mode: Mode, explicit: Optional[set[str]], rank: Rank) -> int:
    ray_address = getattr(args, "ray", None)
    if ray_address is not None:
        from microbatch.ray_runner import import_ray

        import_ray()  # one line naming the install command when Ray is missing
        if rank.distributed:
            raise UsageError("--ray runs the job on a Ray cluster: start it with python, not torchrun")
        if args.skip_save:
            raise UsageError("--ray runs a job whose actors save every image: it cannot be combined with --skip_save")
        if args.ray_workers < 1 or not args.ray_gpus_per_worker >= 0:
            raise UsageError(f"--ray_workers must be a positive integer and --ray_gpus_per_worker >= 0, got {args.ray_workers} and {args.ray_gpus_per_worker}")
    lead = rank.rank == 0
    note = print if lead else (lambda text: logger.debug("%s: %s", rank.name, text))
    cmd = from_args(args, mode, explicit)
    if rank.distributed:
        cmd.options = dataclasses.replace(cmd.options, device=rank_device(rank, cmd.options.device))
        if cmd.options.device == "cpu":
            set_cpu_threads(rank)
    for text in cmd.notes if lead else []:
        print(text)
    ckpt, _, _ = resolve_checkpoint(cmd.options.ckpt)
    vae = Path(cmd.options.vae) if cmd.options.vae else find_vae_beside(ckpt)
    settings = job_settings(cmd.request, file_hash(ckpt), cmd.options.precision, file_hash(vae) if vae else None)
    if cmd.options.refiner:
        settings["refiner_hash"] = file_hash(Path(cmd.options.refiner))
    outdir = Path(cmd.output.outdir)
    if cmd.output.skip_save:
        # A speed measurement: no files, no manifest, so no job to record or resume; every rank makes its share.
        if args.resume:
            raise UsageError("--resume completes a job's files: it cannot be combined with --skip_save")
        todo = cmd.request.jobs()
    else:
        todo = prepare_job(rank, outdir, cmd.request, settings, args.resume, note)
    if not todo:
        note(f"nothing to do: all {len(cmd.request.jobs())} images of the job in {outdir} are done")
        return 0
    stop = _StopOnSignal()
    if ray_address is not None:
        reports, load_s, settings, device = _run_on_ray(args, cmd, outdir, todo, note, stop)
        wall = max((r.wall_s for r in reports), default=0.0)  # from the first micro-batch, once the actors are loaded
    else:
        pipeline = load_pipeline(cmd, note)
        progress = _Progress(quiet=cmd.output.quiet or not lead)
        stop.on_stop = pipeline.cancel
        start = time.perf_counter()
        with stop:
            try:
                report = run_job(
                    pipeline, rank, cmd.request, outdir, todo, callback=progress.event, save_images=not cmd.output.skip_save,
                    should_stop=lambda: stop.signum is not None,
                )
            finally:
                progress.close()
        reports = gather(rank, report)
        if not lead:
            return 128 + stop.signum if report.interrupted and stop.signum else 0
        settings = dict(pipeline.last_result.metrics.settings) if pipeline.last_result else {}
        load_s, device = pipeline.loaded.load_seconds, str(pipeline.device)
        settings.update(world_size=rank.world_size)
        wall = time.perf_counter() - start
    items = cmd.request.jobs()
    if not cmd.output.skip_save:
        remove_partials(outdir)  # every rank / actor has finished; a killed one may have left a temporary file
    settings.update(images=len(items), resumed=len(items) - len(todo))
    metrics = job_metrics(reports, load_s, settings, wall)
    metrics.device = device
    out = cmd.output
    finished = [p for p in (item_path(outdir, item.index) for item in items) if p.is_file()]
    if not out.skip_grid and finished and len(finished) == len(items):
        if len(items) <= GRID_LIMIT:
            arrays = [np.asarray(Image.open(p).convert("RGB")) for p in finished]
            save_grid(arrays, outdir, grid_columns(out.n_rows, cmd.request.n_samples, len(arrays)))
        else:
            print(f"note: no grid for {len(items)} images (more than {GRID_LIMIT})")
    return _close_run(
        metrics, out, stop.signum, metrics.interrupted,
        f"after {metrics.images} new images; {len(finished)} of {len(items)} are in {outdir} (--resume completes the job)",
        "(--skip_save)" if out.skip_save else None,
    )


def _run_on_ray(args: argparse.Namespace, cmd: CommandLine, outdir: Path, todo: list, note: Any, stop: "_StopOnSignal") -> tuple[list, float, dict, str]:
    from microbatch.ray_runner import connect, run_ray_job

    connect(args.ray, args.ray_workers)
    with stop:
        reports, load_s = run_ray_job(
            cmd.options, cmd.request, outdir, todo, args.ray_workers, args.ray_gpus_per_worker, lambda: stop.signum is not None, note
        )
    settings = {"ray": args.ray, "ray_workers": args.ray_workers, "sampler": cmd.request.sampler, "steps": cmd.request.steps, "seed": cmd.request.seed}
    return reports, load_s, settings, f"ray ({args.ray_workers} workers)"


def execute(pipeline: Pipeline, cmd: CommandLine) -> int:
    """Run the request, saving every image as soon as its micro-batch is done; print the metrics."""
    out = cmd.output
    outdir = Path(out.outdir)
    sample_path = outdir / "samples"
    grid_images = []
    next_free = next_number(sample_path)
    progress = _Progress(quiet=out.quiet)

    def on_image(image: GeneratedImage) -> None:
        nonlocal next_free
        if not out.skip_save:
            path = save_png_atomic(image.array, sample_path, next_free, text={"parameters": image.parameters})
            next_free = int(path.stem) + 1
        if not out.skip_grid:
            grid_images.append(image.array)

    stop = _StopOnSignal(pipeline)
    with stop:
        try:
            result = pipeline.generate(cmd.request, on_image=on_image, callback=progress.event)
        finally:
            progress.close()
    if not out.skip_grid and grid_images:
        save_grid(grid_images, outdir, grid_columns(out.n_rows, cmd.request.n_samples, len(grid_images)))
    metrics = result.metrics
    return _close_run(
        metrics, out, stop.signum, result.interrupted,
        f"after {metrics.images} of {len(result.plan.jobs)} images; every finished image is saved in {outdir}",
        "(--skip_save --skip_grid)" if out.skip_save and out.skip_grid else None,
    )


def _close_run(metrics: Any, out: OutputOptions, signum: Optional[int], interrupted: bool, stopped: str, nothing_saved: Optional[str]) -> int:
    """The closing lines of every run (how it ended, the metrics, the metrics file) and its exit code."""
    if interrupted:
        print(f"Stopped by {signal.Signals(signum).name if signum else 'cancel'} {stopped}")
    elif nothing_saved:
        print(f"Made {metrics.images} images; nothing saved {nothing_saved}\n")
    else:
        print(f"Your samples are ready and waiting for you here:\n{out.outdir}\n")
    print(metrics.report())
    if out.metrics_json:
        metrics.write_json(Path(out.metrics_json))
    return 128 + (signum or signal.SIGINT) if interrupted else 0


class _StopOnSignal:
    """While active, SIGINT and SIGTERM cancel the run (`pipeline.cancel()`, else `on_stop()`) after the current
    sampler step (a second SIGINT stops at once). Only the main thread can install handlers; elsewhere this does
    nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, pipeline: Optional[Pipeline] = None, on_stop: Optional[Any] = None) -> None:
        self.on_stop = pipeline.cancel if pipeline is not None else (on_stop or (lambda: None))
        self.signum: Optional[int] = None
        self._previous: dict = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        self.on_stop()
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


class _Progress:
    """tqdm bars: images over the whole run, steps of the current micro-batch (with totals, so both show an ETA)."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.images = None
        self.steps = None
        self._batch = None

    def event(self, e: ProgressEvent) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        if self.images is None:
            self.images = tqdm(total=e.images_total, desc="images", unit="img", position=0)
        if e.kind == "image":
            self.images.update(1)
            return
        if self.steps is None or e.batch_index != self._batch:
            if self.steps is not None:
                self.steps.close()
            self.steps = tqdm(total=e.steps_total, desc=f"steps (micro-batch {e.batch_index + 1})", unit="step", position=1, leave=False)
            self._batch = e.batch_index
        self.steps.update(1)

    def close(self) -> None:
        for bar in (self.steps, self.images):
            if bar is not None:
                bar.close()
        self.steps = self.images = None


def main_for(mode: Mode, description: Optional[str] = None, argv: Optional[Sequence[str]] = None) -> int:
    """Parse, run, and turn expected failures into one line on stderr and a non-zero exit code."""
    parser = build_parser(mode, description)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        code = run(args, mode, explicit_flags(mode, argv))
    except BaseException as e:  # noqa: BLE001 - reported by exit_code_for, which re-raises SystemExit
        code = exit_code_for(e, args.verbose)
    if launched_by_torchrun():
        leave_rank_process(code)
    return code


def exit_code_for(error: BaseException, verbose: bool) -> int:
    """The scripts' one error boundary: print `error: ...` on one line (the traceback too with --verbose) and return
    the exit code: 130 interrupted, 2 bad input (UsageError, CheckpointError, ValueError, a missing file), 1 else."""
    if isinstance(error, (SystemExit, GeneratorExit)):
        raise error
    if isinstance(error, KeyboardInterrupt):
        print("error: interrupted", file=sys.stderr)
        return 130
    if verbose:
        traceback.print_exception(type(error), error, error.__traceback__)
    if isinstance(error, (UsageError, CheckpointError, ValueError, FileNotFoundError)):
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    print(f"error: {type(error).__name__}: {one_line(error)} (run with --verbose for the traceback)", file=sys.stderr)
    return 1


def one_line(error: BaseException) -> str:
    """An exception's message on one line (for the scripts' `error: ...`)."""
    text = " ".join(str(error).split())
    return text[:2000] if text else type(error).__name__


# -- for code written against the 0.1 internals of this module ------------------------------------------------------


def check_args(args: argparse.Namespace, mode: Mode) -> CommandLine:
    """Every check that needs no model (one UsageError line on failure); the namespace is not changed."""
    return from_args(args, mode)


@dataclass
class CommandPlan:
    jobs: list[ImageJob]
    settings: SamplingSettings
    n_rows: int


def make_plan(args: argparse.Namespace, mode: Mode, height: int, width: int) -> CommandPlan:
    """The images a command line asks for at a given size, without a model (guidance scale: --scale or the
    script's default; the micro-batch size `Pipeline.plan` starts from on a CPU)."""
    request = GenerationRequest(**_request_fields(args, mode))
    scale = request.scale if request.scale is not None else SCRIPT_SCALE[request.mode]
    settings = request.settings(height, width, scale, 1)
    settings.max_batch_size = micro_batch_size(request, torch.device("cpu"), settings)
    return CommandPlan(request.jobs(), settings, args.n_rows)


@dataclass
class Session:
    """A loaded model and its device (what `microbatch.inpaint.setup_inpainting` reads: `.model`, `.device`)."""

    args: Any
    mode: str
    device: torch.device
    loaded: LoadedModel
    attention: Any

    @property
    def model(self) -> Any:
        return self.loaded.model
