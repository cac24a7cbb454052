"""The application layer: one loaded model and the one path from a request to images.

    from microbatch import Pipeline

    pipe = Pipeline.from_checkpoint("v1-5-pruned-emaonly.safetensors")   # no ckpt: the demo model
    images = pipe.txt2img("a photograph of a cat", n=4, steps=30, seed=7)  # list of PIL images
    images[0].info["parameters"]                                          # the web UI's parameters text

The scripts, the Python API and (later) a server all go through `Pipeline.generate(request)`: the request is
validated when it is built (`microbatch.request`), and this module decides, once each, the image size, the
guidance scale and the micro-batch size (`Pipeline.plan`), prepares img2img / inpainting, runs the micro-batched
engine and turns finished latents into images with their parameters text.

Threads: one `generate` call runs at a time (others wait on a lock); `progress()` and `cancel()` may be called from
any other thread while it runs. `cancel()` stops after the current sampler step; the call then returns the images
finished so far and `last_result.interrupted` is True. `run` is the same work without the lock and the shared
progress, for a caller that runs many requests at once and arranges model access itself (the server's
`microbatch.server.scheduler`, whose requests share UNet calls).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import numpy as np
import torch

from microbatch.devices import choose_dtypes, keep_freed_cpu_memory, parse_device, reset_peak_memory
from microbatch.embeddings import (
    EmbeddingFileError, check_prompts_for_broken, embeddings_used, find_embedding_files, sync_embeddings_dir, text_encoder, ti_hashes,
)
from microbatch.engine import Engine, FinishedImage, ImageJob, Interrupted, SamplingSettings, is_sdxl, pass_steps
from microbatch.hires import UPSCALERS, HiresPass, hires_size, hires_steps
from microbatch.images import load_init_image, to_uint8
from microbatch.loading import DEFAULT_CKPT, LoadedModel, demo_checkpoint, load_model
from microbatch.lora import applied_loras, check_lora, lora_hashes, set_loras
from microbatch.lora_jobs import JobLoras, group_by_set, prompt_with_flag_loras, resolve_jobs
from microbatch.memory import choose_batch_size, default_max_batch_size, measure_memory_model, memory_budget
from microbatch.metrics import RunMetrics
from microbatch.offload import apply_offload
from microbatch.parameters import png_parameters
from microbatch import refiner as refiners
from microbatch.request import GenerationRequest, ModelOptions, UsageError
from microbatch.speedups import apply_speedups, compile_seconds
from microbatch.vae_tiling import encode_tiled

logger = logging.getLogger(__name__)

# The original scripts' guidance scale when neither the request nor the model's config gives one.
SCRIPT_SCALE = {"txt2img": 7.5, "img2img": 5.0, "inpaint": 5.0}


@dataclass
class Plan:
    """What `Pipeline.plan` decided: the images, the engine's settings, the sampler steps each micro-batch runs,
    notes for the user (sizes rounded, steps img2img re-runs...), and each image's LoRAs (aligned with `jobs`;
    empty when no image uses one)."""

    jobs: list[ImageJob]
    settings: SamplingSettings
    steps_run: int
    notes: list[str] = field(default_factory=list)
    loras: list[JobLoras] = field(default_factory=list)

    @property
    def engine_jobs(self) -> list[ImageJob]:
        """The jobs as the engine encodes them: LoRA tags removed from the prompts."""
        return [item.job for item in self.loras] if self.loras else self.jobs


@dataclass
class GeneratedImage:
    """One finished image: its job (index, prompt, negative prompt, seed), pixels and parameters text."""

    job: ImageJob
    array: np.ndarray  # [H, W, 3] uint8
    latent: torch.Tensor  # [C, h, w] float32, CPU
    parameters: str

    def pil(self) -> Any:
        """A PIL image whose info["parameters"] holds the parameters text (saved as a PNG text chunk by `save`)."""
        from PIL import Image

        image = Image.fromarray(self.array)
        image.info["parameters"] = self.parameters
        return image


@dataclass(frozen=True)
class ProgressEvent:
    """Passed to a callback after every sampler step (kind "step") and every finished image (kind "image")."""

    kind: Literal["step", "image"]
    images_done: int
    images_total: int
    step: int  # steps finished in the current micro-batch
    steps_total: int  # steps of one micro-batch
    batch_index: int
    image: Optional[GeneratedImage] = None
    # "step": the sampler's current estimate of the micro-batch's first image ([1, C, h, w] latent, for previews)
    denoised: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class Progress:
    """A snapshot for another thread: state, images and steps done, elapsed seconds, and an ETA when known."""

    state: Literal["idle", "running", "done", "cancelled", "failed"]
    images_done: int = 0
    images_total: int = 0
    step: int = 0
    steps_total: int = 0
    elapsed_s: float = 0.0
    batch_images: int = 0  # images in the micro-batch being sampled

    @property
    def fraction(self) -> float:
        """Done share of the run: finished images plus the sampled share of the current micro-batch."""
        if self.images_total == 0:
            return 0.0
        if self.state in ("done", "cancelled"):
            return self.images_done / self.images_total
        sampled = self.batch_images * (self.step / self.steps_total if self.steps_total else 0.0)
        return min(1.0, (self.images_done + sampled) / self.images_total)

    @property
    def eta_s(self) -> Optional[float]:
        f = self.fraction
        return None if f <= 0 else self.elapsed_s * (1 - f) / f


@dataclass
class RunResult:
    images: list[GeneratedImage]
    plan: Plan
    metrics: RunMetrics
    interrupted: bool = False


def resolve_checkpoint(ckpt: Optional[str]) -> tuple[Optional[Path], bool, Optional[str]]:
    """(checkpoint path, is it the demo model, a note for the user)."""
    if ckpt is not None:
        return Path(ckpt), False, None
    if DEFAULT_CKPT.is_file():
        return DEFAULT_CKPT, False, None
    demo = demo_checkpoint()
    if demo is not None:
        return demo, True, (
            f"No checkpoint at {DEFAULT_CKPT} and no --ckpt given: using the embedded demo model (64x64 shapes). "
            f"For Stable Diffusion, pass --ckpt path/to/sd-v1-x.ckpt (or .safetensors)."
        )
    raise UsageError(f"no checkpoint: pass --ckpt path/to/model.ckpt (.ckpt or .safetensors), or place one at {DEFAULT_CKPT}")


def default_scale(loaded: LoadedModel, mode: str = "txt2img") -> float:
    """The guidance scale when the request gives none: the model config's recommendation (sampling_defaults),
    else the original script's (7.5 for txt2img, 5.0 for img2img and inpainting)."""
    if loaded.default_scale is not None:
        logger.info("guidance scale %g: the model config's default (sampling_defaults.scale); --scale sets another", loaded.default_scale)
        return loaded.default_scale
    return SCRIPT_SCALE["txt2img" if mode == "batch_gen" else mode]


def micro_batch_size(request: GenerationRequest, device: torch.device, settings: SamplingSettings) -> int:
    """The micro-batch size before any measurement: the request's number, else a prompt batch of n_samples images
    as far as `microbatch.memory.default_max_batch_size` allows for this size and device ("auto" starts here too
    and is then measured, see `Pipeline.generate`)."""
    if isinstance(request.max_batch_size, int):
        return request.max_batch_size
    return default_max_batch_size(device, settings, request.n_samples)


def round_size(value: int, multiple: int, name: str, notes: list[str]) -> int:
    rounded = max(multiple, value - value % multiple)
    if rounded != value:
        notes.append(f"note: --{name} {value} is not a multiple of {multiple}; using {rounded}")
    return rounded


class Pipeline:
    """A loaded model and the settings it was loaded with. Build it with `from_checkpoint` or `load`."""

    def __init__(
        self, loaded: LoadedModel, device: torch.device, options: ModelOptions, on_note: Optional[Callable[[str], None]] = None,
        refiner: Optional[LoadedModel] = None,
    ):
        self.loaded = loaded
        self.refiner = refiner  # the SDXL refiner loaded with `options.refiner` (microbatch.refiner), or None
        self.device = device
        self.options = options
        self.attention = options.attention_backend(device)
        self.on_note: Callable[[str], None] = on_note or (lambda text: logger.info("%s", text))
        self.last_result: Optional[RunResult] = None
        self._run_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._cancel = threading.Event()
        self._progress = Progress("idle")
        self._started = 0.0

    # -- loading --
    @classmethod
    def from_checkpoint(
        cls,
        ckpt: Union[str, Path, None] = None,
        config: Union[str, Path, None] = None,
        device: str = "auto",
        precision: str = "autocast",
        vae: Union[str, Path, None] = None,
        **options: Any,
    ) -> "Pipeline":
        """Load a checkpoint (.ckpt / .safetensors). No ckpt: the original default path if it exists, else the
        embedded demo model. Other keyword arguments are `ModelOptions` fields (attention, attention_slicing,
        offload, use_ema, parameterization, compile, channels_last)."""
        opts = ModelOptions(
            ckpt=None if ckpt is None else str(ckpt), config=None if config is None else str(config), vae=None if vae is None else str(vae),
            device=device, precision=precision, **options,
        )
        return cls.load(opts)

    @classmethod
    def load(cls, options: ModelOptions, on_note: Optional[Callable[[str], None]] = None, loader: Callable[..., LoadedModel] = load_model) -> "Pipeline":
        """Load the model `options` name. `on_note` receives notes for the user (default: logged); `loader` is
        `microbatch.loading.load_model` or a stand-in with its signature."""
        note = on_note or (lambda text: logger.info("%s", text))
        try:
            device = parse_device(options.device)
            dtypes = choose_dtypes(options.precision, device)
        except ValueError as e:
            raise UsageError(str(e)) from None
        attention = options.attention_backend(device)
        ckpt, is_demo, demo_note = resolve_checkpoint(options.ckpt)
        if demo_note:
            note(demo_note)
        if options.refiner:
            refiners.precheck_refiner(Path(options.refiner))
        offload = options.offload != "none" and device.type != "cpu"
        loaded = loader(
            ckpt, Path(options.config) if options.config else None, torch.device("cpu") if offload else device, dtypes, attention,
            use_ema=True if options.use_ema else None, is_demo=is_demo, parameterization=options.parameterization,
            vae=Path(options.vae) if options.vae else None,
        )
        if loaded.vae_path is not None:
            note(f"VAE: {loaded.vae_path}" + ("" if options.vae else " (found beside the checkpoint)"))
        if offload:
            apply_offload(loaded.model, options.offload, device)
        for text in apply_speedups(loaded.model, options.compile, options.channels_last):
            note(text)
        keep_freed_cpu_memory()  # opt-in; after the load, whose tensors all stay: for the sampling's temporaries
        logger.info("config: %s (%s); %s on %s", loaded.config_path, loaded.config_reason, dtypes.describe(), device)
        refiner = None
        if options.refiner:
            path = Path(options.refiner)
            refiner = loader(path, None, torch.device("cpu") if offload else device, dtypes, attention, parameterization=options.parameterization)
            refiners.check_refiner(loaded.model, refiner.model, path, str(ckpt))
            # The base's VAE decodes (see microbatch.refiner): the refiner's own waits on the CPU, unused.
            refiner.model.first_stage_model.to("cpu")
            if offload:
                apply_offload(refiner.model, options.offload, device)
            apply_speedups(refiner.model, options.compile, options.channels_last)
            logger.info("refiner: %s (%s)", path, refiner.config_reason)
        return cls(loaded, device, options, on_note, refiner)

    @property
    def model(self) -> Any:
        return self.loaded.model

    @property
    def vae_factor(self) -> int:
        return self.loaded.vae_factor

    def default_scale(self, mode: str = "txt2img") -> float:
        return default_scale(self.loaded, mode)

    # -- deciding --
    def steps_run(self, settings: SamplingSettings) -> int:
        """Sampler steps one micro-batch runs: the schedule's length, cut to int(strength x steps) for img2img; with
        the hires fix, plus its second pass's steps."""
        steps = pass_steps(self.model, settings)
        if settings.hires is not None:
            steps += pass_steps(self.model, settings.hires.settings)
        return steps

    def hires_pass(self, request: GenerationRequest, settings: SamplingSettings, notes: list[str]) -> HiresPass:
        """The hires fix's second pass for a first pass of `settings` (microbatch.hires): its size (as the web UI
        computes it, rounded down to the model's size multiple with a note) and its settings: the larger size,
        `hr_denoising_strength`, exactly N = hr_steps (or steps) steps of an int(N / min(strength, 0.999))-step
        schedule, prompt editing counted on from the first pass."""
        size = hires_size(
            settings.width, settings.height, request.hr_scale, request.hr_resize_x, request.hr_resize_y, self.loaded.size_multiple, self.vae_factor
        )
        notes.extend(size.notes)
        strength = float(request.hr_denoising_strength)
        schedule_steps, run = hires_steps(request.steps, request.hr_steps, strength)
        second = replace(
            settings, width=size.width, height=size.height, steps=schedule_steps, strength=strength, exact_steps=run,
            hires_base_steps=settings.prompt_steps, hires=None,
        )
        resize = None if request.hr_scale is not None else (request.hr_resize_x or 0, request.hr_resize_y or 0)
        hires = HiresPass(request.hr_upscaler, size, second, request.hr_scale, resize, request.hr_steps)
        run = pass_steps(self.model, second)
        notes.append(
            f"hires fix: {settings.width}x{settings.height} -> {size.width}x{size.height} ({UPSCALERS[hires.upscaler][0]} upscaler), "
            f"then {run} steps of a {schedule_steps}-step schedule at denoising strength {strength:g}"
        )
        return hires

    def plan(self, request: GenerationRequest, image_size: Optional[tuple[int, int]] = None, jobs: Optional[list[ImageJob]] = None) -> Plan:
        """Decide size, guidance scale and micro-batch size for `request`. `image_size` (height, width) is the
        prepared init image's size for img2img / inpainting (already a multiple of the model's size multiple);
        `jobs` the images to make (default: all of `request.jobs()`)."""
        notes: list[str] = []
        if image_size is not None:
            height, width = image_size
        else:
            native = self.model.image_size * self.vae_factor
            multiple = self.loaded.size_multiple
            height = round_size(request.height or native, multiple, "H", notes)
            width = round_size(request.width or native, multiple, "W", notes)
        scale = request.scale if request.scale is not None else self.default_scale(request.mode)
        self.check_clip_skip(request.clip_skip)
        jobs = request.jobs() if jobs is None else list(jobs)
        settings = request.settings(height, width, scale, 1, channels=self.model.channels, factor=self.vae_factor)
        self.plan_refiner(request, settings, notes)
        self.check_micro_conditioning(request, settings, notes)
        if request.hires:
            settings.hires = self.hires_pass(request, settings, notes)
        # the micro-batch size that fits the larger pass
        settings.max_batch_size = micro_batch_size(request, self.device, settings if settings.hires is None else settings.hires.settings)
        steps = self.steps_run(settings)
        if request.mode != "txt2img":
            if steps == 0:
                notes.append(
                    f"note: --strength {request.strength:g} of {request.steps} steps re-runs 0 steps: the outputs are the init "
                    f"image through the VAE; raise --strength or --ddim_steps"
                )
            else:
                notes.append(f"{request.mode}: --strength {request.strength:g} re-runs {steps} of {request.steps} steps")
        try:
            loras, missing = resolve_jobs(jobs, request.loras, request.lora_dir)
        except ValueError as e:
            raise UsageError(str(e)) from None
        if missing:
            notes.append(f"note: LoRA not found in --lora_dir {request.lora_dir}, skipped: {', '.join(missing)}")
        if not any(item.loras or item.job is not job for item, job in zip(loras, jobs)):
            loras = []
        plan = Plan(jobs, settings, steps, notes, loras)
        self.prepare_embeddings(request.embeddings_dir, plan.engine_jobs, settings.prompt_steps, notes)
        return plan

    def prepare_embeddings(self, folder: str, jobs: list[ImageJob], steps: int, notes: list[str]) -> None:
        """Load the textual-inversion embeddings of `folder` into the text encoder (again only when its files
        changed; warnings for skipped files go to on_note when it is loaded) and check that no prompt names a file
        that could not be read (one-line UsageError). SDXL and other encoders: a note when the folder has files."""
        try:
            text_encoder(self.model)
        except ValueError as e:
            if find_embedding_files(folder):
                notes.append(f"note: {e}: the files in --embeddings_dir {folder} are not used")
            return
        for message in sync_embeddings_dir(self.model, folder):
            self.on_note(message)
        if self.refiner is not None:  # the refiner's bigG takes the clip_g parts of the same files
            sync_embeddings_dir(self.refiner.model, folder)
        try:
            check_prompts_for_broken(self.model, [text for job in jobs for text in (job.prompt, job.negative_prompt)], steps)
        except EmbeddingFileError as e:
            raise UsageError(str(e)) from None

    def check_micro_conditioning(self, request: GenerationRequest, settings: SamplingSettings, notes: list[str]) -> None:
        """A one-line UsageError for SDXL micro-conditioning flags on another model; on an SDXL model, the flags
        its conditioner does not read (the base has no aesthetic score, the refiner no target size) are noted and
        dropped from `settings` (so the PNG parameters do not claim them)."""
        given = request.micro_conditioning_given()
        if not given:
            return
        if not is_sdxl(self.model):
            raise UsageError(f"{', '.join(given)}: SDXL micro-conditioning, but this model is not SDXL ({type(self.model).__name__})")
        keys = set(self.model.conditioner.input_keys)
        if settings.refiner_switch is not None:  # the refiner reads its own (the aesthetic score)
            keys |= set(self.refiner.model.conditioner.input_keys)
        reads = {
            "original_size": "original_size_as_tuple" in keys, "crop_coords": "crop_coords_top_left" in keys,
            "target_size": "target_size_as_tuple" in keys, "aesthetic_score": "aesthetic_score" in keys,
            "negative_aesthetic_score": "aesthetic_score" in keys,
        }
        unread = [f"--{name}" for name, read in reads.items() if not read and getattr(settings, name) is not None]
        for flag in unread:
            setattr(settings, flag[2:], None)
        if unread:
            notes.append(f"note: this SDXL model's conditioner does not read {', '.join(unread)}: ignored")

    def plan_refiner(self, request: GenerationRequest, settings: SamplingSettings, notes: list[str]) -> None:
        """Set `settings.refiner_switch` when the refiner takes at least one step of this run (a note says which);
        a one-line UsageError for a switch without a refiner."""
        if self.refiner is None:
            if request.refiner_switch is not None:
                raise UsageError(f"--refiner_switch {request.refiner_switch:g} needs a refiner: --refiner FILE (Python: Pipeline.from_checkpoint(..., refiner=FILE))")
            return
        switch = refiners.DEFAULT_REFINER_SWITCH if request.refiner_switch is None else float(request.refiner_switch)
        k, n = refiners.refiner_steps(self.model, settings, switch)
        if k == n:
            if switch < 1.0:
                notes.append(f"note: --refiner_switch {switch:g}: the refiner takes none of the {n} steps (their timesteps stay above the switch); the base alone")
            return
        settings.refiner_switch = switch
        notes.append(f"refiner {Path(self.refiner.ckpt).name} takes steps {k + 1}-{n} of {n} (switch at {switch:g} of the noise schedule)")

    def check_clip_skip(self, clip_skip: int) -> None:
        """A one-line UsageError when clip_skip exceeds the text encoder's layers."""
        layers = getattr(getattr(self.model, "cond_stage_model", None), "num_layers", None)
        if layers is not None and clip_skip > layers:
            raise UsageError(f"--clip_skip {clip_skip} exceeds the {layers} layers of this model's text encoder")

    def auto_batch_size(self, engine: Engine, plan: Plan, request: GenerationRequest) -> int:
        """max_batch_size "auto": measure the memory model on the real engine and return the largest micro-batch
        (at most the plan's images and n_samples) that fits the budget (`max_memory` GB, else the free memory)."""
        # with the hires fix, its second pass is the larger one
        settings = plan.settings if plan.settings.hires is None else plan.settings.hires.settings
        model = measure_memory_model(engine, settings, plan.engine_jobs[:2])
        budget = memory_budget(self.device, self.model, request.max_memory)
        size = choose_batch_size(model, budget, min(len(plan.jobs), request.n_samples))
        self.on_note(f"--max_batch_size auto: {size} images per micro-batch for a budget of {budget / 2**30:.2f} GB ({model.describe()})")
        return size

    def measure_batch_size(self, request: GenerationRequest) -> int:
        """The "auto" micro-batch size for `request` on this device, measured once (job runners use it)."""
        engine, image_size = self._engine_for(request)
        plan = self.plan(request, image_size)
        return self.auto_batch_size(engine, plan, request) if len(plan.jobs) >= 2 else 1

    # -- preparing img2img and inpainting --
    def _engine_for(self, request: GenerationRequest) -> tuple[Engine, Optional[tuple[int, int]]]:
        if request.mode == "txt2img":
            return Engine(self.model, self.device, vae_tiling=request.vae_tiling), None
        if request.mode == "img2img":
            engine = Engine(self.model, self.device, vae_tiling=request.vae_tiling)
            multiple = self.loaded.size_multiple
            init, (w0, h0), (width, height) = load_init_image(request.init_image, multiple)
            if (w0, h0) != (width, height):
                self.on_note(f"note: init image {w0}x{h0} resized to {width}x{height} (a multiple of {multiple})")
            tiles = request.vae_tiling
            f = self.vae_factor
            with torch.no_grad():
                if tiles.applies(height // f, width // f):
                    engine.init_posterior = encode_tiled(self.model, init.to(self.device), tiles.tile, tiles.overlap, tiles.blend)
                else:
                    engine.init_posterior = self.model.encode_first_stage(init.to(self.device))
            return engine, (height, width)
        return self._inpaint_engine(request)

    def _inpaint_engine(self, request: GenerationRequest) -> tuple[Engine, tuple[int, int]]:
        from microbatch.inpaint import CroppingEngine, load_image_and_mask, setup_inpainting

        image, mask, (w, h), notes = load_image_and_mask(request.init_image, request.mask, self.loaded.size_multiple)
        for text in notes:
            self.on_note(text)
        if not mask.any():
            self.on_note("note: the mask has no white pixels: nothing to repaint")
        engine = CroppingEngine(self.model, self.device, vae_tiling=request.vae_tiling)
        engine.crop = (h, w)
        if setup_inpainting(self, engine, image, mask) == "blend":
            self.on_note(
                f"note: {self.loaded.ckpt or 'the model'} is not an inpainting model (its UNet takes "
                f"{self.model.channels} channels): inpainting by blending the known region's latent at every step"
            )
        return engine, (int(image.shape[-2]), int(image.shape[-1]))

    # -- running --
    def generate(
        self,
        request: GenerationRequest,
        on_image: Optional[Callable[[GeneratedImage], None]] = None,
        callback: Optional[Callable[[ProgressEvent], None]] = None,
        jobs: Optional[list[ImageJob]] = None,
    ) -> RunResult:
        """Make the request's images, micro-batched. `on_image` gets each image as soon as its micro-batch is
        decoded (the scripts save it there); `callback` gets a ProgressEvent after every step and image. `jobs`:
        only these of the request's images (a job runner's share), default all."""
        with self._run_lock:
            self._cancel.clear()
            self._set_progress(Progress("running"))
            try:
                result = self.run(request, on_image, callback, jobs, progress=self._set_progress, cancelled=self._cancel.is_set)
            except BaseException:
                self._set_progress(replace(self.progress(), state="failed"))
                raise
            self.last_result = result
            self._set_progress(replace(self.progress(), state="cancelled" if result.interrupted else "done", batch_images=0))
            return result

    def run(
        self,
        request: GenerationRequest,
        on_image: Optional[Callable[[GeneratedImage], None]] = None,
        callback: Optional[Callable[[ProgressEvent], None]] = None,
        jobs: Optional[list[ImageJob]] = None,
        *,
        progress: Optional[Callable[[Progress], None]] = None,
        cancelled: Optional[Callable[[], bool]] = None,
        sampling: Optional[Callable[[Engine, Plan, Callable[[list[FinishedImage]], None]], int]] = None,
    ) -> RunResult:
        """`generate` without its lock and shared state, for callers that run several requests at once (the
        server): `progress` receives this run's Progress snapshots, `cancelled()` true stops it after the current
        sampler step (as `cancel()`), and `sampling(engine, plan, on_batch)` (returning the final micro-batch size)
        replaces the micro-batched run of the plan's LoRA groups: it must hand every finished micro-batch to
        `on_batch` and arrange the model's LoRA state itself (the server's cross-request scheduler,
        `microbatch.server.scheduler`). With `sampling`, max_batch_size "auto" is the sampling's business."""
        progress = progress or (lambda snapshot: None)
        cancelled = cancelled or (lambda: False)
        engine, image_size = self._engine_for(request)
        plan = self.plan(request, image_size, jobs)
        for text in plan.notes:
            self.on_note(text)
        if plan.settings.refiner_switch is not None:
            if engine.concat_latents is not None:
                raise UsageError("--refiner with an inpainting model (9-channel UNet) is not supported: the refiner cannot read the mask")
            engine.refiner = refiners.RefinerStage(Engine(self.refiner.model, self.device, vae_tiling=request.vae_tiling), self.model)
        if request.max_batch_size == "auto" and len(plan.jobs) >= 2 and sampling is None:
            plan.settings.max_batch_size = self.auto_batch_size(engine, plan, request)
        settings, total = plan.settings, len(plan.jobs)
        metrics = RunMetrics(device=str(self.device), model_load_s=self.loaded.load_seconds + (self.refiner.load_seconds if self.refiner else 0.0))
        metrics.settings = self._metrics_settings(request, plan)
        images: list[GeneratedImage] = []
        progress(Progress("running", 0, total, 0, plan.steps_run))

        def on_step(batch_index: int, info: dict) -> None:
            step = int(info.get("i", 0)) + 1
            rows = int(info["x"].shape[0]) if "x" in info else 0
            progress(Progress("running", len(images), total, step, plan.steps_run, batch_images=rows))
            if callback is not None:
                denoised = info.get("denoised")
                preview = denoised[:1].detach() if isinstance(denoised, torch.Tensor) else None
                callback(ProgressEvent("step", len(images), total, step, plan.steps_run, batch_index, denoised=preview))
            if cancelled():
                raise Interrupted()

        # Images are handed out in job order: with LoRAs, a later set's group may finish an image before an
        # earlier image of another set, which then waits here.
        order = {job.index: pos for pos, job in enumerate(plan.jobs)}
        pending: dict[int, GeneratedImage] = {}
        next_pos = 0

        def emit(image: GeneratedImage) -> None:
            images.append(image)
            if on_image is not None:
                on_image(image)
            progress(Progress("running", len(images), total, 0, plan.steps_run))
            if callback is not None:
                callback(ProgressEvent("image", len(images), total, plan.steps_run, plan.steps_run, -1, image))

        def on_batch(batch: list[FinishedImage]) -> None:
            nonlocal next_pos
            for done in batch:
                pos = order[done.job.index]
                job = plan.jobs[pos]
                parameters = self.parameters(job, settings, plan.loras[pos] if plan.loras else None, request.loras, done.job)
                pending[pos] = GeneratedImage(job, to_uint8(done.image), done.latent, parameters)
            while next_pos in pending:
                emit(pending.pop(next_pos))
                next_pos += 1
            metrics.batch_done(len(batch))

        engine.step_callback = on_step
        metrics.peak_memory_load_mb = self.loaded.peak_memory_mb
        metrics.sampling_peak_reset = reset_peak_memory(self.device)
        compiled_before = compile_seconds() if self.options.compile else None
        metrics.start()
        interrupted = False
        try:
            metrics.final_max_batch_size = (sampling or self._run_groups)(engine, plan, on_batch)
        except Interrupted:
            interrupted = metrics.interrupted = True
            for pos in sorted(pending):  # finished images of other LoRA sets
                emit(pending.pop(pos))
        metrics.finish(self.device)
        if compiled_before is not None:
            metrics.compile_s = compile_seconds() - compiled_before
        return RunResult(images, plan, metrics, interrupted)

    def _run_groups(self, engine: Engine, plan: Plan, on_batch: Callable[[list[FinishedImage]], None]) -> int:
        """Run the plan's images one LoRA set at a time (`microbatch.lora_jobs`), merging each set into the model
        on top of the networks already applied before the run, and taking the run's networks out again at the
        end, also on errors and cancel. Every file is checked before the first image. Returns the final
        micro-batch size."""
        settings = plan.settings
        if not any(item.loras for item in plan.loras):
            return engine.run(plan.engine_jobs, settings, on_batch)
        base = [(h.path, h.weight, h.te_weight) for h in applied_loras(self.model)]
        try:
            for path in sorted({spec[0] for item in plan.loras for spec in item.loras}):
                check_lora(self.model, path)
        except ValueError as e:
            raise UsageError(str(e)) from None
        applied: tuple = ()
        try:
            for loras, positions in group_by_set(plan.loras):
                if loras != applied:
                    set_loras(self.model, base + list(loras))
                    # cached text conditioning was encoded under the previous set's text-encoder weights
                    engine.clear_conditioning()
                    applied = loras
                    logger.info("LoRA set for %d images: %s", len(positions), ", ".join(f"{Path(p).name} (unet {u:g}, te {t:g})" for p, u, t in loras) or "none")
                settings.max_batch_size = engine.run([plan.loras[i].job for i in positions], settings, on_batch)
        finally:
            if applied:
                set_loras(self.model, base)
        return settings.max_batch_size

    def parameters(
        self, job: ImageJob, settings: SamplingSettings, loras: Optional[JobLoras] = None, flag_loras: Any = (), encoded: Optional[ImageJob] = None
    ) -> str:
        """The image's parameters text: its prompt with its LoRA tags (and the `--lora` files as tags) and, when
        it used LoRAs, their `Lora hashes`; when its prompts (`encoded`: as the encoder saw them, LoRA tags removed;
        default `job`) used textual-inversion embeddings, their `TI hashes` (the prompt's first, then the negative
        prompt's)."""
        loaded = self.loaded
        hashes = ""
        encoded = job if encoded is None else encoded
        used = embeddings_used(self.model, [encoded.prompt, encoded.negative_prompt], settings.prompt_steps)
        if loras is not None and loras.named:
            job = replace(job, prompt=prompt_with_flag_loras(job.prompt, flag_loras))
            hashes = lora_hashes(list(dict.fromkeys(loras.named)))
        refiner = None
        if settings.refiner_switch is not None:
            refiner = refiners.short_title(self.refiner.ckpt, self.refiner.model_hash)
        return png_parameters(
            job, settings, loaded.model_hash, self.options.precision, loaded.vae_hash, loaded.vae_name, lora_hashes=hashes,
            ti_hashes=ti_hashes(self.model, used), refiner=refiner,
        )

    def _metrics_settings(self, request: GenerationRequest, plan: Plan) -> dict[str, Any]:
        """The run's settings as plain JSON values."""
        s = plan.settings
        a = self.attention
        attention = a.name if a.name != "sliced" else f"sliced:{a.slice_size or 'auto'}"
        return {
            "mode": request.mode, "sampler": s.sampler, "schedule": s.schedule_name(), "steps": s.steps, "eta": s.eta,
            "scale": s.guidance_scale, "height": s.height, "width": s.width, "n_samples": request.n_samples,
            "n_iter": request.n_iter, "images": len(plan.jobs), "max_batch_size": s.max_batch_size,
            "precision": self.options.precision, "dtypes": self.loaded.dtypes.describe(), "attention": attention,
            "compile": self.options.compile, "channels_last": self.options.channels_last,
            "seed": request.seed, "strength": s.strength, "clip_skip": s.clip_skip, "hires": self._hires_metrics(s),
            "guidance_interval": None if s.guidance_interval is None else f"{s.guidance_interval[0]:g} {s.guidance_interval[1]:g}",
            "tome": s.tome, "deepcache": s.deepcache,
            "checkpoint": str(self.loaded.ckpt) if self.loaded.ckpt else None, "config": str(self.loaded.config_path),
            "refiner": str(self.refiner.ckpt) if s.refiner_switch is not None else None, "refiner_switch": s.refiner_switch,
        }

    @staticmethod
    def _hires_metrics(settings: SamplingSettings) -> Optional[dict[str, Any]]:
        """The hires fix's settings for the metrics (None without it)."""
        h = settings.hires
        if h is None:
            return None
        s = h.settings
        return {
            "upscaler": h.upscaler, "width": s.width, "height": s.height, "scale": h.scale, "resize": list(h.resize) if h.resize else None,
            "steps": s.exact_steps, "schedule_steps": s.steps, "denoising_strength": s.strength,
        }

    # -- progress and cancellation (any thread) --
    def _set_progress(self, progress: Progress) -> None:
        """Store a snapshot, its elapsed time counted from the start of the running call."""
        with self._state_lock:
            now = time.perf_counter()
            if progress.state == "running" and self._progress.state != "running":
                self._started = now
            self._progress = replace(progress, elapsed_s=now - self._started)

    def progress(self) -> Progress:
        with self._state_lock:
            return self._progress

    def cancel(self) -> None:
        """Stop the running call after its current sampler step (no-op when idle)."""
        self._cancel.set()

    # -- the Python API --
    def txt2img(
        self,
        prompt: str,
        negative_prompt: str = "",
        n: int = 1,
        steps: int = 50,
        sampler: str = "ddim",
        schedule: Optional[str] = None,
        scale: Optional[float] = None,
        seed: int = 42,
        width: Optional[int] = None,
        height: Optional[int] = None,
        eta: Optional[float] = None,
        max_batch_size: Union[int, str, None] = None,
        callback: Optional[Callable[[ProgressEvent], None]] = None,
        **request_fields: Any,
    ) -> list[Any]:
        """n images of `prompt` (image i uses seed + i) as PIL images with info["parameters"]. scale None: the
        model's default; width / height None: its native size. Prompts use the web UI's prompt language (README,
        "Prompt syntax"). Other keyword arguments are GenerationRequest fields (clip_skip, n_iter, fixed_code,
        split_guidance, max_memory, vae_tiling, loras=[("x.safetensors", 0.8)], lora_dir, embeddings_dir, the hires
        fix: hr_scale=2 or hr_resize_x / hr_resize_y, hr_upscaler, hr_steps, hr_denoising_strength...)."""
        request = GenerationRequest(
            mode="txt2img", prompt=prompt, negative_prompt=negative_prompt, n_samples=n, steps=steps, sampler=sampler,
            schedule=schedule, scale=scale, seed=seed, width=width, height=height, eta=eta, max_batch_size=max_batch_size,
            **request_fields,
        )
        return [image.pil() for image in self.generate(request, callback=callback).images]

    def img2img(self, prompt: str, init_image: Any, strength: float = 0.75, callback: Optional[Callable[[ProgressEvent], None]] = None, **kwargs: Any) -> list[Any]:
        """Like txt2img, from `init_image` (a path or a PIL image) re-run for `strength` of the schedule."""
        return self._from_image("img2img", prompt, init_image, None, strength, callback, kwargs)

    def inpaint(self, prompt: str, init_image: Any, mask: Any, strength: float = 1.0, callback: Optional[Callable[[ProgressEvent], None]] = None, **kwargs: Any) -> list[Any]:
        """Repaint the white part of `mask` (a path or a PIL image) in `init_image`; outputs have the input's size."""
        return self._from_image("inpaint", prompt, init_image, mask, strength, callback, kwargs)

    def _from_image(self, mode: str, prompt: str, init_image: Any, mask: Any, strength: float, callback: Any, kwargs: dict) -> list[Any]:
        fields = {"n_samples": kwargs.pop("n", 1), "steps": kwargs.pop("steps", 50), "sampler": kwargs.pop("sampler", "ddim"), "seed": kwargs.pop("seed", 42)}
        if "width" in kwargs or "height" in kwargs:
            raise UsageError(f"{mode} makes images of the init image's size: it takes no width / height")
        request = GenerationRequest(mode=mode, prompt=prompt, init_image=init_image, mask=mask, strength=strength, **fields, **kwargs)
        return [image.pil() for image in self.generate(request, callback=callback).images]
