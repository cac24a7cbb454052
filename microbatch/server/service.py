"""From a web UI API payload to a `GenerationRequest`, and from the pipeline's images to the web UI's answer.

`Service.build` checks a payload against the server's limits and turns it into a `GenerationRequest` (the same
object the scripts build from flags, so the same settings give the CLI's pixels); `Service.run` runs it in
its task's thread, one `n_iter` batch per `Pipeline.run` call (micro-batches batched across requests by
`microbatch.server.scheduler`), and returns the response body: base64 PNGs with
their `parameters` chunk, the request echoed, and `info` (a JSON string with the seeds, prompts and infotexts).
"""
from __future__ import annotations

import json
import logging
import math
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from PIL import Image, ImageOps

from microbatch.embeddings import loaded_embeddings
from microbatch.parameters import parse_png_parameters
from microbatch.pipeline import GeneratedImage, Pipeline, Plan
from microbatch.request import GenerationRequest, UsageError
from microbatch.server.codec import decode_image, encode_png, png_text
from microbatch.hires import hires_size
from microbatch.server.payloads import Img2ImgRequest, OptionsUpdate, Txt2ImgRequest, refused_fields
from microbatch.server.webui import api_message, resolve_sampler, webui_sampler_name
from microbatch.server.scheduler import Scheduler
from microbatch.server.worker import TaskControl
from samplers import get_sampler

logger = logging.getLogger(__name__)

VERSION = "microbatch-diffusion 0.1.0"


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask for. Beyond any of them: HTTP 422 (413 for the body size, 503 for the queue)."""

    max_pixels: int = 1024 * 1024  # width x height of an output image
    max_steps: int = 150
    max_images: int = 16  # batch_size x n_iter
    max_body_bytes: int = 32 * 2**20
    max_input_pixels: int = 4096 * 4096  # a decoded init image or mask
    max_queue: int = 64  # requests waiting behind the running one

    def __post_init__(self) -> None:
        for name in ("max_pixels", "max_steps", "max_images", "max_body_bytes", "max_input_pixels", "max_queue"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"--{name} must be a positive integer, got {value!r}")


@dataclass
class ServerOptions:
    """The web UI options this server applies (GET / POST /sdapi/v1/options, a request's override_settings)."""

    eta_ddim: float = 0.0
    eta_ancestral: float = 1.0


@dataclass
class BuiltRequest:
    """A checked payload: the request to run, the payload echoed (the web UI's `parameters`), what `info` needs."""

    request: GenerationRequest
    echo: dict[str, Any]
    send_images: bool
    job: str


# Options a client may send that change images if ignored, with the only value this server honours.
_FIXED_OPTIONS = {"CLIP_stop_at_last_layers": 1, "samples_format": "png"}


class Service:
    """The server's state around one loaded `Pipeline`: limits, options and the translations both ways."""

    def __init__(
        self, pipeline: Pipeline, limits: ServerLimits, max_batch_size: Any = None, embeddings_dir: str = "embeddings", batching: bool = True
    ) -> None:
        self.pipeline = pipeline
        self.limits = limits
        self.max_batch_size = max_batch_size
        self.scheduler = Scheduler(pipeline, max_batch_size, batching)
        self.options = ServerOptions()
        self._options_lock = threading.Lock()
        self.embeddings_dir = str(embeddings_dir)
        # loaded before the first request, so that /sdapi/v1/embeddings lists them; requests reload changed files
        notes: list[str] = []
        pipeline.prepare_embeddings(self.embeddings_dir, [], 1, notes)
        for text in notes:
            logger.info("%s", text)

    def embeddings(self) -> dict[str, Any]:
        """{"loaded": {name: record}, "skipped": {name: record}}, records as the web UI's /sdapi/v1/embeddings."""
        loaded, skipped = loaded_embeddings(self.pipeline.model)
        return {"loaded": {n: r.api() for n, r in loaded.items()}, "skipped": {n: r.api() for n, r in skipped.items()}}

    # -- the model, as the web UI lists it --
    @property
    def model_file(self) -> str:
        ckpt = self.pipeline.loaded.ckpt
        return Path(ckpt).name if ckpt is not None else "random-weights"

    @property
    def model_title(self) -> str:
        return f"{self.model_file} [{self.pipeline.loaded.model_hash}]"

    def sd_models(self) -> list[dict[str, Any]]:
        loaded = self.pipeline.loaded
        config = Path(loaded.config_path).name if loaded.config_path else None
        # File names only: the server's folders are none of a client's business.
        return [{
            "title": self.model_title, "model_name": Path(self.model_file).stem, "hash": loaded.model_hash, "sha256": None,
            "filename": self.model_file, "config": config,
        }]

    def sd_vaes(self) -> list[dict[str, Any]]:
        name = self.pipeline.loaded.vae_name
        return [] if name is None else [{"model_name": name, "filename": name}]

    def _is_this_model(self, name: str) -> bool:
        loaded = self.pipeline.loaded
        return name in (self.model_title, self.model_file, Path(self.model_file).stem, loaded.model_hash)

    # -- options --
    def get_options(self) -> dict[str, Any]:
        with self._options_lock:
            return {
                "sd_model_checkpoint": self.model_title, "sd_checkpoint_hash": self.pipeline.loaded.model_hash,
                "sd_vae": self.pipeline.loaded.vae_name or "Automatic", "eta_ddim": self.options.eta_ddim,
                "eta_ancestral": self.options.eta_ancestral, **_FIXED_OPTIONS,
            }

    def set_options(self, update: OptionsUpdate) -> None:
        """Apply what the server supports; a value it cannot honour (another model...) is a UsageError and
        changes nothing."""
        values = self._checked_options(update.model_dump(exclude_unset=True))
        with self._options_lock:
            for key, value in values.items():
                setattr(self.options, key, value)

    def _checked_options(self, values: dict[str, Any]) -> dict[str, float]:
        """The eta options among `values` as floats, after checking the others name what the server has."""
        out: dict[str, float] = {}
        for key, value in values.items():
            if key == "sd_model_checkpoint" and value is not None and not self._is_this_model(str(value)):
                raise UsageError(f"model {value!r} is not loaded; this server serves {self.model_title!r} (see /sdapi/v1/sd-models)")
            elif key == "sd_vae" and value not in (None, "Automatic", "None", self.pipeline.loaded.vae_name):
                raise UsageError(f"VAE {value!r} is not loaded; this server uses {self.pipeline.loaded.vae_name or 'Automatic'}")
            elif key in ("eta_ddim", "eta_ancestral") and value is not None:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                    raise UsageError(f"{key} must be a finite number >= 0, got {value!r}")
                out[key] = float(value)
            elif key in _FIXED_OPTIONS and value is not None and value != _FIXED_OPTIONS[key]:
                raise UsageError(f"{key} {value!r} is not supported; this server uses {_FIXED_OPTIONS[key]!r}")
            elif key not in ("sd_model_checkpoint", "sd_vae", "eta_ddim", "eta_ancestral", *_FIXED_OPTIONS):
                logger.debug("option %s ignored (not used by this server)", key)
        return out

    # -- payload -> request (a request thread) --
    def build(self, payload: Txt2ImgRequest, mode: str) -> BuiltRequest:
        """Check `payload` (mode "txt2img" or "img2img") and build its GenerationRequest; UsageError on bad input,
        its message naming the API's fields."""
        try:
            return self._build(payload, mode)
        except UsageError as e:
            raise UsageError(api_message(str(e))) from None

    def _build(self, payload: Txt2ImgRequest, mode: str) -> BuiltRequest:
        reason = refused_fields(payload)
        if reason:
            raise UsageError(reason)
        overrides = self._checked_options(payload.override_settings)
        with self._options_lock:
            eta_ddim = overrides.get("eta_ddim", self.options.eta_ddim)
            eta_ancestral = overrides.get("eta_ancestral", self.options.eta_ancestral)
        sampler, schedule = resolve_sampler(payload.sampler_name or payload.sampler_index, payload.scheduler)
        info = get_sampler(sampler)
        eta = None
        if info.uses_eta:  # the web UI ignores eta for deterministic samplers; so do we
            eta = payload.eta if payload.eta is not None else (eta_ddim if sampler == "ddim" else eta_ancestral)
        self._check_limits(payload)
        seed = payload.seed if payload.seed != -1 else random.SystemRandom().randrange(2**32)
        fields: dict[str, Any] = dict(
            prompt=payload.prompt, negative_prompt=payload.negative_prompt, n_samples=payload.batch_size, n_iter=payload.n_iter,
            seed=seed, sampler=sampler, steps=payload.steps, schedule=schedule, eta=eta, scale=payload.cfg_scale,
            max_batch_size=self.max_batch_size, embeddings_dir=self.embeddings_dir,
        )
        echo = payload.model_dump()
        if mode == "txt2img":
            width, height = payload.width or self._native(), payload.height or self._native()
            self._check_size(width, height)
            if payload.enable_hr:
                fields.update(self._hires_fields(payload, width, height))
            request = GenerationRequest(mode="txt2img", width=payload.width, height=payload.height, **fields)
            return BuiltRequest(request, echo, payload.send_images, "txt2img")
        assert isinstance(payload, Img2ImgRequest)
        init, mask = self._images(payload)
        if not payload.include_init_images:
            echo["init_images"] = echo["mask"] = None
        request = GenerationRequest(
            mode="inpaint" if mask is not None else "img2img", init_image=init, mask=mask, strength=payload.denoising_strength, **fields
        )
        return BuiltRequest(request, echo, payload.send_images, "img2img")

    def _hires_fields(self, payload: Txt2ImgRequest, width: int, height: int) -> dict[str, Any]:
        """enable_hr -> the request's hires fields (a resize target wins over hr_scale, as in the web UI), the second
        pass's size and steps checked against the limits."""
        resize = bool(payload.hr_resize_x or payload.hr_resize_y)
        out = dict(
            hr_scale=None if resize else payload.hr_scale, hr_resize_x=payload.hr_resize_x, hr_resize_y=payload.hr_resize_y,
            hr_upscaler=payload.hr_upscaler, hr_steps=payload.hr_second_pass_steps, hr_denoising_strength=payload.denoising_strength,
        )
        if payload.hr_second_pass_steps > self.limits.max_steps:
            raise UsageError(f"hr_second_pass_steps {payload.hr_second_pass_steps} is more than this server's limit of {self.limits.max_steps} (--max_steps)")
        if not resize and not payload.hr_scale > 0:
            raise UsageError(f"hr_scale must be a number > 0, got {payload.hr_scale}")
        if width >= 1 and height >= 1:
            loaded = self.pipeline.loaded
            size = hires_size(width, height, out["hr_scale"], payload.hr_resize_x, payload.hr_resize_y, loaded.size_multiple, loaded.vae_factor)
            self._check_size(size.width, size.height, "the hires pass's ")
        return out

    def _native(self) -> int:
        return int(self.pipeline.model.image_size) * self.pipeline.vae_factor

    def _check_limits(self, payload: Txt2ImgRequest) -> None:
        lim = self.limits
        if payload.steps > lim.max_steps:
            raise UsageError(f"steps {payload.steps} is more than this server's limit of {lim.max_steps} (--max_steps)")
        if payload.batch_size >= 1 and payload.n_iter >= 1 and payload.batch_size * payload.n_iter > lim.max_images:
            raise UsageError(
                f"batch_size {payload.batch_size} x n_iter {payload.n_iter} = {payload.batch_size * payload.n_iter} images is more "
                f"than this server's limit of {lim.max_images} per request (--max_images)"
            )

    def _check_size(self, width: int, height: int, what: str = "") -> None:
        if width >= 1 and height >= 1 and width * height > self.limits.max_pixels:
            raise UsageError(f"{what}{width}x{height} = {width * height} pixels is more than this server's limit of {self.limits.max_pixels} (--max_pixels)")

    def _images(self, payload: Img2ImgRequest) -> tuple[Image.Image, Optional[Image.Image]]:
        """The decoded init image (resized to width x height when they are given and differ) and mask."""
        if not payload.init_images:
            raise UsageError("img2img needs init_images: a list with one base64 image")
        if len(payload.init_images) > 1:
            raise UsageError(f"one init image per request, got {len(payload.init_images)}; send one request per image")
        init = decode_image(payload.init_images[0], "init_images[0]", self.limits.max_input_pixels).convert("RGB")
        w0, h0 = init.size
        width, height = payload.width or w0, payload.height or h0
        if width < 1 or height < 1:
            raise UsageError(f"width and height must be positive, got {width}x{height}")
        self._check_size(width, height)
        if (width, height) != (w0, h0):
            if payload.resize_mode != 0:
                raise UsageError(f"resize_mode {payload.resize_mode} is not supported; 0 (just resize) resizes the init image to width x height")
            init = init.resize((width, height), resample=Image.LANCZOS)
        mask = None
        if payload.mask:
            mask = decode_image(payload.mask, "mask", self.limits.max_input_pixels).convert("L")
            if payload.inpainting_mask_invert:
                mask = ImageOps.invert(mask)
        return init, mask

    # -- running (the task's thread) --
    def run(self, built: BuiltRequest, control: TaskControl) -> dict[str, Any]:
        """Make the request's images, one n_iter batch per `Pipeline.run` call, its micro-batches admitted and
        batched with other requests' by the scheduler; returns the response body."""
        request = built.request
        jobs = request.jobs()
        per_batch = request.n_samples
        images: list[GeneratedImage] = []
        plan: Optional[Plan] = None
        interrupted = False
        with self.scheduler.ticket() as ticket:
            sampling = self.scheduler.sampling(ticket, control.should_stop, control.mark_admitted)
            for k in range(request.n_iter):
                if control.interrupted or control.disconnected:
                    interrupted = True
                    break
                control.batch_no, control.skipped = k, False
                result = self.pipeline.run(request, jobs=jobs[k * per_batch : (k + 1) * per_batch], progress=control.set_progress,
                                           cancelled=control.should_stop, sampling=sampling)
                images += result.images
                plan = result.plan
                if result.interrupted and (control.interrupted or control.disconnected):
                    interrupted = True
                    break
        encoded = [encode_png(image.array, {"parameters": image.parameters}) for image in images] if built.send_images else []
        return {"images": encoded, "parameters": built.echo, "info": json.dumps(self.info(built, images, plan, interrupted))}

    def info(self, built: BuiltRequest, images: list[GeneratedImage], plan: Optional[Plan], interrupted: bool) -> dict[str, Any]:
        """The web UI's `info` object for the images made (its lists hold one entry per returned image)."""
        request, loaded = built.request, self.pipeline.loaded
        settings = plan.settings if plan is not None else None
        seeds = [image.job.seed for image in images]
        return {
            "prompt": request.prompt, "all_prompts": [image.job.prompt for image in images],
            "negative_prompt": request.negative_prompt, "all_negative_prompts": [image.job.negative_prompt for image in images],
            "seed": seeds[0] if seeds else request.seed, "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * len(images),
            "subseed_strength": 0, "width": settings.width if settings else request.width, "height": settings.height if settings else request.height,
            "sampler_name": webui_sampler_name(request.sampler), "scheduler": settings.schedule_name() if settings else request.schedule,
            "cfg_scale": settings.guidance_scale if settings else request.scale, "steps": request.steps, "batch_size": request.n_samples,
            "n_iter": request.n_iter, "eta": request.eta,
            "denoising_strength": request.strength if request.mode != "txt2img" else request.hr_denoising_strength,
            "restore_faces": False, "face_restoration_model": None, "sd_model_name": Path(self.model_file).stem,
            "sd_model_hash": loaded.model_hash, "sd_vae_name": loaded.vae_name, "sd_vae_hash": loaded.vae_hash,
            "seed_resize_from_w": -1, "seed_resize_from_h": -1, "clip_skip": 1, "styles": [], "extra_generation_params": {},
            "index_of_first_image": 0, "infotexts": [image.parameters for image in images], "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
            "is_using_inpainting_conditioning": request.mode == "inpaint" and loaded.unet.in_channels != self.pipeline.model.channels,
            "version": VERSION, "interrupted": interrupted,
        }

    # -- png-info --
    def png_info(self, data: str) -> dict[str, Any]:
        image = decode_image(data, "image", self.limits.max_input_pixels)
        text, items = png_text(image)
        if not text:
            return {"info": "", "items": items, "parameters": {}}
        try:
            fields = parse_png_parameters(text)
        except ValueError:
            return {"info": text, "items": items, "parameters": {"Prompt": text}}
        parameters: dict[str, Any] = {"Prompt": fields.pop("prompt"), "Negative prompt": fields.pop("negative_prompt")}
        for key, value in fields.items():
            if key == "Size" and "x" in value:
                parameters["Size-1"], parameters["Size-2"] = value.split("x", 1)
            else:
                parameters[key] = value
        return {"info": text, "items": items, "parameters": parameters}
