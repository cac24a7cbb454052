"""What to generate and with which model: typed, frozen requests, validated once.

A `GenerationRequest` is everything that decides the images (prompts, seeds, sampler, size, strength, batching);
a `ModelOptions` is everything that decides the loaded model (checkpoint, config, VAE, device, precision,
attention). The scripts turn flags into them, the Python API (`microbatch.Pipeline`) turns keyword arguments into
them, `--from_png` turns a PNG's `parameters` text into them; all three meet here, so the same settings give equal
objects and the same one-line errors. Nothing here loads a model.

Messages name the command-line flag (`--n_samples must be a positive integer, got 0`), since most users meet
them there; the Python keyword is the flag's name without dashes, except where noted in `Pipeline`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Optional, Union

from ldm.modules.attention_backends import BACKENDS, AttentionBackend, resolve_backend
from microbatch.engine import ImageJob, SamplingSettings
from microbatch.vae_tiling import TileSettings
from samplers import SCHEDULES, get_sampler

Mode = Literal["txt2img", "img2img", "inpaint"]
MODES: tuple[str, ...] = ("txt2img", "img2img", "inpaint")
# Strength when none is given: the original img2img's 0.75; inpainting repaints from pure noise.
DEFAULT_STRENGTH = {"img2img": 0.75, "inpaint": 1.0}
PromptEntry = tuple[str, Optional[str]]  # (prompt, its own negative prompt or None for the request's)


class UsageError(ValueError):
    """Bad input from the user: reported as one line (exit code 2 in the scripts)."""


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"--{name} must be a positive integer, got {value}")


def _finite(name: str, value: Optional[float], what: str = "a finite number") -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
        raise UsageError(f"--{name} must be {what}, got {value}")


def check_image_file(path: Union[str, Path], what: str) -> None:
    """A one-line UsageError unless `path` is an image file PIL can read."""
    from PIL import Image

    if not Path(path).is_file():
        raise UsageError(f"{what} not found: {path}")
    try:
        with Image.open(path) as im:
            im.verify()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UsageError(f"{what} {path} is not a readable image ({type(e).__name__}: {e})") from None


def read_prompt_file(path: Union[str, Path]) -> tuple[PromptEntry, ...]:
    """(prompt, negative or None) per non-blank, non-comment line; a UTF-8 byte-order mark is not part of a prompt."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
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
    return tuple(entries)


ImageInput = Union[str, Path, Any]  # a path, or a PIL image (Python API)


@dataclass(frozen=True)
class GenerationRequest:
    """One run's images and how to make them.

    Images: `n_iter` passes over the prompt batches. Without `prompt_file`, a batch is `n_samples` copies of
    `prompt`; with it, each entry is one image per pass and batches hold `n_samples` consecutive entries. Image i
    of the run uses seed + i (with `fixed_code`, image j of every batch uses seed + j).

    `scale` None means the model's default (its config's recommendation, else 7.5 for txt2img and 5.0 for
    img2img / inpaint), decided by the pipeline once the model is known. `height` / `width` None mean the model's
    native size (txt2img) or the init image's size (img2img, inpaint). `eta` None becomes the sampler's own
    default, `schedule` None the sampler's own schedule and `strength` None the mode's, here. `max_batch_size` None lets the pipeline choose (see
    `Pipeline.plan`); "auto" picks the largest micro-batch that fits the memory budget (`max_memory` GB or the
    device's free memory).

    Prompts are in the web UI's prompt language (README, "Prompt syntax"). `clip_skip` N > 1 conditions on the text
    encoder's N-th layer from the end (SD 1.x; no effect on SD 2.x); its upper bound, the encoder's layer count, is
    checked by `Pipeline.plan`.

    `loras`: (file, unet weight, te weight) networks merged for every image (`--lora`; also given as a path or
    (path, weight), normalised here); `<lora:NAME:W>` tags in the prompts add their own, looked up in `lora_dir`
    (see `microbatch.lora_jobs`).

    `embeddings_dir`: the textual-inversion embeddings a prompt may name (`microbatch.embeddings`); a folder that
    does not exist holds none, unless it was named explicitly (anything but the default), which is an error.
    Hires fix (txt2img only; `microbatch.hires`, the web UI's fields): `hr_scale` or `hr_resize_x` / `hr_resize_y`
    (0 or None: unset; one of them alone keeps the aspect ratio) turn it on; `hr_upscaler` (our name or the web UI's,
    default latent), `hr_steps` (None or 0: the first pass's steps), `hr_denoising_strength` (default 0.7).
    """

    mode: Mode = "txt2img"
    prompt: str = ""
    negative_prompt: str = ""
    prompt_file: Optional[tuple[PromptEntry, ...]] = None
    n_samples: int = 1
    n_iter: int = 1
    seed: int = 42
    fixed_code: bool = False
    sampler: str = "ddim"
    steps: int = 50
    schedule: Optional[str] = None
    eta: Optional[float] = None
    scale: Optional[float] = None
    height: Optional[int] = None
    width: Optional[int] = None
    strength: Optional[float] = None
    init_image: Optional[ImageInput] = None
    mask: Optional[ImageInput] = None
    max_batch_size: Union[int, Literal["auto"], None] = None
    max_memory: Optional[float] = None
    split_guidance: bool = False
    vae_tiling: TileSettings = field(default_factory=TileSettings)
    clip_skip: int = 1
    # Guidance only at noise levels sigma in [lo, hi] (README, "Step savings"); None: at every step.
    guidance_interval: Optional[tuple[float, float]] = None
    # Token merging ratio (ToMe for SD) and DeepCache interval (README, "Step savings"); None: off.
    tome: Optional[float] = None
    deepcache: Optional[int] = None
    # SDXL micro-conditioning (README, "SDXL"); None: the published defaults. Pixels: (height, width), (top, left).
    original_size: Optional[tuple[int, int]] = None
    crop_coords: Optional[tuple[int, int]] = None
    target_size: Optional[tuple[int, int]] = None
    aesthetic_score: Optional[float] = None
    negative_aesthetic_score: Optional[float] = None
    loras: tuple[tuple[str, float, float], ...] = ()
    lora_dir: str = "models/Lora"
    embeddings_dir: str = "embeddings"
    hr_scale: Optional[float] = None
    hr_resize_x: Optional[int] = None
    hr_resize_y: Optional[int] = None
    hr_upscaler: Optional[str] = None
    hr_steps: Optional[int] = None
    hr_denoising_strength: Optional[float] = None
    # Base + refiner (microbatch.refiner): the refiner takes over at this fraction of the training schedule, in
    # (0, 1]; None: 0.8 when the pipeline has a refiner (ModelOptions.refiner); 1: the base alone.
    refiner_switch: Optional[float] = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UsageError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name, flag in (("n_samples", "n_samples"), ("n_iter", "n_iter"), ("steps", "ddim_steps")):
            _positive_int(flag, getattr(self, name))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise UsageError(f"--seed must be an integer, got {self.seed!r}")
        if not isinstance(self.prompt, str) or not isinstance(self.negative_prompt, str):
            raise UsageError("--prompt and --negative_prompt must be text")
        try:
            info = get_sampler(self.sampler)
        except ValueError as e:
            raise UsageError(str(e)) from None
        if self.schedule is None:
            object.__setattr__(self, "schedule", info.default_schedule)
        elif self.schedule not in SCHEDULES:
            raise UsageError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(sorted(SCHEDULES))}")
        if self.eta is None:
            object.__setattr__(self, "eta", info.default_eta)
        elif self.eta != 0 and not info.uses_eta:
            raise UsageError(f"sampler {self.sampler} is deterministic: --ddim_eta must be 0, got {self.eta}")
        _finite("ddim_eta", self.eta, "a finite number >= 0")
        if self.eta < 0:
            raise UsageError(f"--ddim_eta must be a finite number >= 0, got {self.eta}")
        _finite("scale", self.scale)
        if isinstance(self.clip_skip, bool) or not isinstance(self.clip_skip, int) or self.clip_skip < 1:
            raise UsageError(f"--clip_skip must be a positive integer (1 = the text encoder's last layer), got {self.clip_skip!r}")
        if self.guidance_interval is not None:
            gi = self.guidance_interval
            if len(gi) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) for v in gi) or not 0 <= gi[0] < gi[1]:
                raise UsageError(f"--guidance_interval needs SIGMA_LO SIGMA_HI with 0 <= SIGMA_LO < SIGMA_HI (inf allowed), got {gi}")
            object.__setattr__(self, "guidance_interval", (float(gi[0]), float(gi[1])))
        if self.tome is not None:
            if isinstance(self.tome, bool) or not isinstance(self.tome, (int, float)) or not 0.0 <= self.tome <= 0.75:
                raise UsageError(f"--tome must be a ratio in [0, 0.75] (tokens merged away; 0.5 is the published maximum), got {self.tome!r}")
            object.__setattr__(self, "tome", float(self.tome))
        if self.deepcache is not None:
            _positive_int("deepcache", self.deepcache)
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise UsageError(f"--{name[0].upper()} must be positive, got {value}")
        self._check_micro_conditioning()
        if self.refiner_switch is not None:
            _finite("refiner_switch", self.refiner_switch, "a fraction in (0, 1]")
            if not 0.0 < self.refiner_switch <= 1.0:
                raise UsageError(f"--refiner_switch must be a fraction in (0, 1], got {self.refiner_switch}")
        self._check_batching()
        self._check_images()
        self._check_hires()
        self._check_loras()
        self._check_embeddings_dir()

    def _check_embeddings_dir(self) -> None:
        if not isinstance(self.embeddings_dir, (str, Path)):
            raise UsageError(f"embeddings_dir must be a folder path, got {self.embeddings_dir!r}")
        folder = Path(self.embeddings_dir)
        object.__setattr__(self, "embeddings_dir", str(folder))
        if folder.exists() and not folder.is_dir():
            raise UsageError(f"--embeddings_dir {folder} is a file, not a folder")
        if not folder.exists() and folder != Path("embeddings"):
            raise UsageError(f"--embeddings_dir {folder}: no such folder")

    @property
    def hires(self) -> bool:
        """Whether the hires fix is on (hr_scale or a resize target given)."""
        return self.hr_scale is not None or bool(self.hr_resize_x) or bool(self.hr_resize_y)

    def _check_hires(self) -> None:
        from microbatch.hires import DEFAULT_HIRES_STRENGTH, DEFAULT_UPSCALER, upscaler_name

        for name in ("hr_resize_x", "hr_resize_y", "hr_steps"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                what = "0 (the first pass's steps)" if name == "hr_steps" else "0 (unset)"
                raise UsageError(f"--{name} must be a positive integer or {what}, got {value!r}")
            if value == 0:  # the web UI's "unset"
                object.__setattr__(self, name, None)
        if self.hr_scale is not None:
            _finite("hr_scale", self.hr_scale, "a number > 0")
            if self.hr_scale <= 0:
                raise UsageError(f"--hr_scale must be a number > 0, got {self.hr_scale}")
            object.__setattr__(self, "hr_scale", float(self.hr_scale))
        if not self.hires:
            given = [f"--{n}" for n in ("hr_upscaler", "hr_steps", "hr_denoising_strength") if getattr(self, n) is not None]
            if given:
                raise UsageError(f"{', '.join(given)}: the hires fix needs --hr_scale S or --hr_resize_x / --hr_resize_y")
            return
        if self.mode != "txt2img":
            raise UsageError(f"the hires fix (--hr_scale, --hr_resize_x, --hr_resize_y) applies to txt2img only, not {self.mode}")
        if self.hr_scale is not None and (self.hr_resize_x or self.hr_resize_y):
            raise UsageError(
                f"give --hr_scale or --hr_resize_x / --hr_resize_y, not both (got --hr_scale {self.hr_scale:g} and "
                f"--hr_resize_x {self.hr_resize_x or 0} --hr_resize_y {self.hr_resize_y or 0})"
            )
        try:
            object.__setattr__(self, "hr_upscaler", upscaler_name(self.hr_upscaler or DEFAULT_UPSCALER))
        except ValueError as e:
            raise UsageError(str(e)) from None
        strength = DEFAULT_HIRES_STRENGTH if self.hr_denoising_strength is None else self.hr_denoising_strength
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
            raise UsageError(f"--hr_denoising_strength must be in (0, 1], got {strength}")
        object.__setattr__(self, "hr_denoising_strength", float(strength))

    def _check_loras(self) -> None:
        """Normalise `loras` to ((file, unet weight, te weight), ...): an entry may be a path, (path,),
        (path, weight) or (path, unet weight, te weight or None); a path that is no file is looked up by name in
        `lora_dir` as a prompt tag would be."""
        from microbatch.lora import find_lora

        object.__setattr__(self, "lora_dir", str(self.lora_dir))
        if isinstance(self.loras, (str, Path)) or not isinstance(self.loras, (list, tuple)):
            raise UsageError(f"loras must be a list of (file, weight) pairs, got {self.loras!r}")
        out = []
        for entry in self.loras:
            entry = (entry,) if isinstance(entry, (str, Path)) else tuple(entry)
            if not 1 <= len(entry) <= 3 or not isinstance(entry[0], (str, Path)):
                raise UsageError(f"--lora takes FILE[:WEIGHT] (Python: (file, weight) or (file, unet weight, te weight)), got {entry!r}")
            unet = entry[1] if len(entry) > 1 else 1.0
            te = entry[2] if len(entry) > 2 and entry[2] is not None else unet
            for w in (unet, te):
                _finite("lora", w, "a finite weight")
            path = Path(entry[0])
            if not path.is_file():
                path = find_lora(str(entry[0]), self.lora_dir) or path
            if not path.is_file():
                raise UsageError(f"--lora {entry[0]}: no such file (nor a LoRA of that name in --lora_dir {self.lora_dir})")
            out.append((str(path), float(unet), float(te)))
        object.__setattr__(self, "loras", tuple(out))

    def _check_micro_conditioning(self) -> None:
        for name, least in (("original_size", 1), ("crop_coords", 0), ("target_size", 1)):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2 or any(
                isinstance(v, bool) or not isinstance(v, int) or v < least for v in value
            ):
                what = "TOP LEFT, two integers >= 0" if name == "crop_coords" else "H W, two positive integers"
                raise UsageError(f"--{name} must be {what}, got {value!r}")
            object.__setattr__(self, name, (int(value[0]), int(value[1])))
        for name in ("aesthetic_score", "negative_aesthetic_score"):
            _finite(name, getattr(self, name))

    def micro_conditioning_given(self) -> list[str]:
        """The SDXL micro-conditioning flags this request sets (for the message when the model is not SDXL)."""
        names = ("original_size", "crop_coords", "target_size", "aesthetic_score", "negative_aesthetic_score")
        return [f"--{name}" for name in names if getattr(self, name) is not None]

    def _check_batching(self) -> None:
        size = self.max_batch_size
        if size is not None and size != "auto" and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise UsageError(f"--max_batch_size must be a positive integer or auto, got {size!r}")
        if self.max_memory is not None and not (
            isinstance(self.max_memory, (int, float)) and math.isfinite(self.max_memory) and self.max_memory > 0
        ):
            raise UsageError(f"--max_memory must be a positive number of GB, got {self.max_memory}")
        if not isinstance(self.vae_tiling, TileSettings):
            raise UsageError(f"vae_tiling must be a TileSettings, got {type(self.vae_tiling).__name__}")

    def _check_images(self) -> None:
        if self.mode == "txt2img":
            for name in ("init_image", "mask", "strength"):
                if getattr(self, name) is not None:
                    raise UsageError(f"txt2img takes no {name}; use img2img or inpaint")
            return
        if self.height is not None or self.width is not None:
            raise UsageError(f"{self.mode} makes images of the init image's size: it takes no --H / --W")
        flag = "--init-img PATH" if self.mode == "img2img" else "--init-img PATH (the image to repaint)"
        if self.init_image is None or (isinstance(self.init_image, (str, Path)) and not str(self.init_image)):
            raise UsageError(f"{self.mode} needs {flag}")
        if isinstance(self.init_image, (str, Path)):
            check_image_file(self.init_image, "init image")
        if self.mode == "inpaint":
            if self.mask is None or (isinstance(self.mask, (str, Path)) and not str(self.mask)):
                raise UsageError("inpainting needs --mask PATH (white = repaint)")
            if isinstance(self.mask, (str, Path)):
                if not Path(self.mask).is_file():
                    raise UsageError(f"mask not found: {self.mask}")
                check_image_file(self.mask, "mask")
        elif self.mask is not None:
            raise UsageError("img2img takes no mask; use inpaint")
        if self.strength is None:
            object.__setattr__(self, "strength", DEFAULT_STRENGTH[self.mode])
        if isinstance(self.strength, bool) or not isinstance(self.strength, (int, float)) or not 0.0 < self.strength <= 1.0:
            raise UsageError(f"--strength must be in (0, 1], got {self.strength}")

    # -- what the request expands to --
    def jobs(self) -> list[ImageJob]:
        """The run's images in order, each with its index, prompt, negative prompt and seed."""
        if self.prompt_file is None:
            batches: list[list[PromptEntry]] = [[(self.prompt, None)] * self.n_samples]
        else:
            entries = list(self.prompt_file)
            batches = [entries[i : i + self.n_samples] for i in range(0, len(entries), self.n_samples)]
        jobs: list[ImageJob] = []
        for _ in range(self.n_iter):
            for batch in batches:
                for j, (prompt, negative) in enumerate(batch):
                    index = len(jobs)
                    seed = self.seed + (j if self.fixed_code else index)
                    jobs.append(ImageJob(index, prompt, seed, self.negative_prompt if negative is None else negative))
        return jobs

    def settings(self, height: int, width: int, scale: float, max_batch_size: int, channels: int = 4, factor: int = 8) -> SamplingSettings:
        """The engine's settings once the pipeline has decided size, scale and micro-batch size."""
        return SamplingSettings(
            sampler=self.sampler, steps=self.steps, schedule=self.schedule, eta=float(self.eta), guidance_scale=float(scale),
            height=height, width=width, channels=channels, factor=factor, max_batch_size=max_batch_size,
            split_guidance=self.split_guidance, strength=self.strength, clip_skip=self.clip_skip, guidance_interval=self.guidance_interval,
            tome=self.tome, deepcache=self.deepcache,
            original_size=self.original_size, crop_coords=self.crop_coords, target_size=self.target_size,
            aesthetic_score=self.aesthetic_score, negative_aesthetic_score=self.negative_aesthetic_score,
        )

    def with_changes(self, **changes: Any) -> "GenerationRequest":
        """A copy with some fields changed, validated again (a new sampler brings its own eta and schedule unless
        they are given too)."""
        if "sampler" in changes:
            changes.setdefault("eta", None)
            changes.setdefault("schedule", None)
        return replace(self, **changes)


Precision = Literal["autocast", "full"]
Offload = Literal["none", "model", "sequential"]


@dataclass(frozen=True)
class ModelOptions:
    """Which model to load and how to run it.

    ckpt None: the original default path (`models/ldm/stable-diffusion-v1/model.ckpt`) when it exists, else the
    embedded demo model. config None: the yaml beside the checkpoint, else inferred from the weights. vae None: a
    `<checkpoint stem>.vae.{pt,ckpt,safetensors}` beside the checkpoint when there is one, else the checkpoint's own.
    refiner: an SDXL refiner checkpoint loaded beside an SDXL base, taking the last steps (microbatch.refiner).
    """

    ckpt: Optional[str] = None
    config: Optional[str] = None
    vae: Optional[str] = None
    device: str = "auto"
    precision: Precision = "autocast"
    attention: str = "auto"
    attention_slicing: Optional[str] = None
    offload: Offload = "none"
    use_ema: bool = False
    parameterization: Literal["auto", "eps", "v"] = "auto"
    refiner: Optional[str] = None
    # exact speed-ups (microbatch.speedups): torch.compile of the UNet and VAE decoder; NHWC convolutions
    compile: bool = False
    channels_last: bool = False

    def __post_init__(self) -> None:
        for name, what in (("ckpt", "checkpoint"), ("config", "config"), ("refiner", "refiner")):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, str(value))
                if not Path(value).is_file():
                    raise UsageError(f"{what} not found: {value}")
        if self.vae is not None:
            from microbatch.loading import check_vae_path

            try:
                object.__setattr__(self, "vae", str(check_vae_path(Path(self.vae))))
            except ValueError as e:
                raise UsageError(str(e)) from None
        if self.precision not in ("autocast", "full"):
            raise UsageError(f"--precision must be autocast or full, got {self.precision!r}")
        if self.offload not in ("none", "model", "sequential"):
            raise UsageError(f"--offload must be none, model or sequential, got {self.offload!r}")
        if self.parameterization not in ("auto", "eps", "v"):
            raise UsageError(f"--parameterization must be auto, eps or v, got {self.parameterization!r}")
        if self.attention not in BACKENDS:
            raise UsageError(f"unknown attention backend {self.attention!r}; choose one of {', '.join(BACKENDS)}")
        if self.attention_slicing is not None:
            object.__setattr__(self, "attention_slicing", str(self.attention_slicing))
            self.attention_backend()
        if self.compile:
            from microbatch.speedups import compile_supported

            why = compile_supported()
            if why is not None:
                raise UsageError(f"--compile: {why}")
            if self.offload == "sequential":
                raise UsageError("--compile does not combine with --offload sequential (its hooks move weights inside the UNet's forward)")

    def attention_backend(self, device: Any = None) -> AttentionBackend:
        try:
            return resolve_backend(self.attention, self.attention_slicing, device)
        except ValueError as e:
            raise UsageError(str(e)) from None
