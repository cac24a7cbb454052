"""The micro-batched denoising loop.

A run is a list of `ImageJob`s (one per output image, each with its own seed). Jobs go through the UNet in
micro-batches of at most `max_batch_size` images; each micro-batch is decoded and handed to `on_image` as soon as
it is finished, so the first image arrives after one micro-batch and peak memory depends on the micro-batch size,
not on the number of images.

Randomness: image i draws its start noise and then the noise of stochastic samplers from its own CPU
`torch.Generator` seeded with its seed, then moves it to the device. The img2img VAE posterior sample comes from a
second generator of its own (seed + INIT_SEED_OFFSET, mod 2^64), so it does not shift the first one's stream: at
strength 1 img2img equals txt2img from the same seed, for every sampler. The hires fix's second pass
(`microbatch.hires`) restarts each image's generator from its seed, as the web UI makes a new RNG for it, so that
pass is an img2img of the upscaled latent with the image's seed. So an image depends only on its seed and settings,
never on batching or device-side RNG.

Conditioning: prompts are in the web UI's prompt language (`microbatch.prompts`): emphasis, long prompts, BREAK,
prompt editing and alternation switch an image's context at its scheduled denoiser calls, and `a AND b:0.5` guides
towards several parts. `samplers.guidance.GuidedModel` runs rows whose contexts differ in length as separate UNet
calls (never padded), so an image with a long prompt is the same whichever prompts share its micro-batch.

SDXL (`sgm.models.diffusion.DiffusionEngine`): a row's conditioning is a dict {"crossattn": [77 k, C], "vector":
[adm]} from the model's conditioner with the run's micro-conditioning (original size, crop, target size; the
refiner's aesthetic score), each text encoded alone as for SD, in the same prompt language: both text encoders
chunk, weight and BREAK it as SD 1.x's does (`microbatch.prompts.get_learned_conditioning_sdxl`), and rows are
grouped by their crossattn's length. Clip skip is ignored, as the web UI does by default. On the base, an EMPTY
negative prompt zeroes the text parts of the unconditional rows (the published sampling's
force_zero_embeddings=["txt"], which diffusers applies only to an empty negative prompt too); a non-empty one is
encoded. The refiner encodes the empty text too, as published (see `zeroes_empty_negative`).
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from microbatch.devices import empty_cache, is_out_of_memory
from microbatch.hires import crop_latents, upscale_latents, upscale_pixels
from microbatch.loading import vae_factor_of
from microbatch.step_savings import step_savings, unet_of
from microbatch.vae_tiling import TileSettings, decode_tiled, encode_tiled
from ldm.modules.encoders.modules import LongPromptEncoder
from microbatch.prompts import (
    ScheduledPromptConditioning,
    cond_at,
    get_learned_conditioning,
    get_learned_conditioning_sdxl,
    get_multicond_prompt_list,
    is_sdxl,
    stack_conds,
)
from sgm.models.diffusion import DEFAULT_AESTHETIC_SCORE, DEFAULT_NEGATIVE_AESTHETIC_SCORE
from samplers import Denoiser, GuidedModel, get_sampler, get_sigmas, to_vp
from samplers.guidance import ConditioningSchedule, StepConditioning

logger = logging.getLogger(__name__)


@dataclass
class ImageJob:
    """One output image: its index in the run (0-based), prompt, negative prompt and seed."""

    index: int
    prompt: str
    seed: int
    negative_prompt: str = ""


@dataclass(frozen=True)
class MicroConditioning:
    """SDXL's size and crop conditioning (pixels: (height, width), (top, left)) and the refiner's aesthetic score."""

    original_size: tuple[int, int]
    crop_coords: tuple[int, int]
    target_size: tuple[int, int]
    aesthetic_score: float


def zeroes_empty_negative(model: Any) -> bool:
    """Whether an empty negative prompt gives zero text embeddings on this SDXL model: yes for the base (the
    published sampling's force_uc_zero_embeddings=["txt"]), no for the refiner, whose conditioner reads the aesthetic
    score (the published sampling runs it as a "legacy" model with no zeroed embeddings, and diffusers' refiner
    pipeline has force_zeros_for_empty_prompt false)."""
    return "aesthetic_score" not in getattr(model.conditioner, "input_keys", ())


@dataclass
class SamplingSettings:
    """What every image of a run shares.

    height/width are pixels; the latent is [channels, height // factor, width // factor]. `strength` (img2img)
    is the fraction of the schedule that is re-run from the noised init latent. `max_batch_size` counts images;
    with guidance each UNet call holds 2 x max_batch_size rows unless `split_guidance` is set.
    """

    sampler: str = "ddim"
    steps: int = 50
    schedule: Optional[str] = None
    eta: float = 0.0
    guidance_scale: float = 7.5
    height: int = 512
    width: int = 512
    channels: int = 4
    factor: int = 8
    max_batch_size: int = 1
    split_guidance: bool = False
    strength: Optional[float] = None
    # 1: the text encoder's last layer; N: the N-th from the end (SD 1.x; no effect on SD 2.x), see microbatch.prompts
    clip_skip: int = 1
    # (sigma_lo, sigma_hi): classifier-free guidance only at noise levels in it (GuidedModel.t_interval); None: always
    guidance_interval: Optional[tuple[float, float]] = None
    # Token merging ratio (ToMe for SD) and DeepCache interval, see microbatch.step_savings; None: off
    tome: Optional[float] = None
    deepcache: Optional[int] = None
    # SDXL micro-conditioning, in pixels (height, width) / (top, left); None: the published defaults (original and
    # target size = the image's size, crop (0, 0), aesthetic score 6.0 and 2.5 for the negative branch, refiner only)
    original_size: Optional[tuple[int, int]] = None
    crop_coords: Optional[tuple[int, int]] = None
    target_size: Optional[tuple[int, int]] = None
    aesthetic_score: Optional[float] = None
    negative_aesthetic_score: Optional[float] = None
    # img2img: run exactly the schedule's last `exact_steps` steps instead of int(strength x steps) (the hires fix's
    # second pass, whose schedule is int(exact_steps / min(strength, 0.999)) steps long, see microbatch.hires)
    exact_steps: Optional[int] = None
    # the hires fix's second pass: the first pass's prompt steps; prompt editing counts `[a:b:N]` from their end
    hires_base_steps: Optional[int] = None
    # txt2img with the hires fix: its second pass (microbatch.hires.HiresPass), run on every micro-batch
    hires: Optional[Any] = None
    # Base + refiner (microbatch.refiner): the switch fraction when a refiner takes the last steps; None: no refiner.
    refiner_switch: Optional[float] = None

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height // self.factor, self.width // self.factor)

    def micro_conditioning(self, negative: bool = False) -> "MicroConditioning":
        """The SDXL micro-conditioning of the positive (or negative) branch, defaults filled in."""
        if negative:
            score = DEFAULT_NEGATIVE_AESTHETIC_SCORE if self.negative_aesthetic_score is None else self.negative_aesthetic_score
        else:
            score = DEFAULT_AESTHETIC_SCORE if self.aesthetic_score is None else self.aesthetic_score
        size = (int(self.height), int(self.width))
        return MicroConditioning(
            tuple(self.original_size or size), tuple(self.crop_coords or (0, 0)), tuple(self.target_size or size), float(score)
        )

    def schedule_name(self) -> str:
        return self.schedule or get_sampler(self.sampler).default_schedule

    @property
    def prompt_steps(self) -> int:
        """The steps prompt editing counts (`[a:b:0.5]` switches half-way through them): denoiser calls, as the
        web UI counts them, so twice `steps` for samplers with two model calls per step (heun, dpm2, dpmpp_2s_a,
        dpmpp_sde, the web UI's "second order" ones). A pass with `exact_steps` (the hires fix's second pass) counts
        the steps it runs, as the web UI does there."""
        steps = self.steps if self.exact_steps is None else self.exact_steps
        return steps * get_sampler(self.sampler).nfe_per_step


@dataclass
class FinishedImage:
    job: ImageJob
    image: torch.Tensor  # [3, H, W] float in [0, 1], on the CPU
    latent: torch.Tensor  # [C, h, w] float32, on the CPU


class Interrupted(Exception):
    """Raised from a step callback to stop a run after the current step."""


class PerImageNoise:
    """noise(like) -> standard normal [B, ...] where row b comes from generator b (CPU, float32), then moved."""

    def __init__(self, generators: Sequence[torch.Generator]):
        self.generators = list(generators)

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        if like.shape[0] != len(self.generators):
            raise AssertionError("noise batch does not match the number of generators")
        rows = [torch.randn(tuple(like.shape[1:]), generator=g, dtype=torch.float32) for g in self.generators]
        noise = torch.stack(rows)
        if like.device.type == "cuda":
            # from pinned memory without blocking: the host does not wait for the GPU to drain at every step (a
            # pageable copy would); same values
            return noise.pin_memory().to(device=like.device, non_blocking=True).to(like.dtype)
        return noise.to(device=like.device, dtype=like.dtype)


# The img2img posterior sample's generator is seeded with (seed + INIT_SEED_OFFSET) mod 2^64 (2^64 / golden ratio,
# an arbitrary fixed odd constant), a stream apart from the image's main one.
INIT_SEED_OFFSET = 0x9E3779B97F4A7C15


def _make_generators(jobs: Sequence[ImageJob], offset: int = 0) -> list[torch.Generator]:
    return [torch.Generator(device="cpu").manual_seed((int(job.seed) + offset) % 2**64) for job in jobs]


@dataclass
class Engine:
    """Runs jobs through a loaded LatentDiffusion model.

    Args:
        model: the model, already on `device` with its components in their compute dtypes.
        device: where the UNet runs.
        init_posterior: img2img only: the VAE posterior of the init image (batch 1).
        step_callback: called after every sampler step with (micro-batch index, step info); may raise Interrupted.
        vae_fallback: decode in float32 when a half-precision decode gives non-finite values.
    """

    model: Any
    device: torch.device
    init_posterior: Optional[DiagonalGaussianDistribution] = None
    step_callback: Optional[Callable[[int, dict], None]] = None
    vae_fallback: bool = True
    # Hybrid (inpainting) models: extra UNet input channels [1, k, h, w] shared by cond and uncond (c_concat).
    concat_latents: Optional[torch.Tensor] = None
    # Latent blending for inpainting with an ordinary model: keep_mask [1, 1, h, w] (1 = keep the init latent).
    keep_mask: Optional[torch.Tensor] = None
    # Tiled VAE decoding (None: always whole), see microbatch.vae_tiling.
    vae_tiling: Optional[TileSettings] = None
    # Base + refiner: the refiner's stage (microbatch.refiner.RefinerStage), used when settings.refiner_switch is set.
    refiner: Optional[Any] = None
    # Cross-request batching (microbatch.batcher): called once per micro-batch, it returns a participant whose
    # apply_model the sampler loop uses instead of the model's, registered for the loop's duration (its rows then
    # share UNet calls with other engines' rows). None: the model's own apply_model.
    shared_unet: Optional[Callable[[], Any]] = None
    _cond_cache: dict = field(default_factory=dict)
    _warned_vae: bool = False
    _noted_sdxl_clip_skip: bool = False

    # -- conditioning --
    def clear_conditioning(self) -> None:
        """Forget the cached text conditioning (after the text encoder's weights changed, e.g. another LoRA set)."""
        self._cond_cache.clear()

    def prompt_schedule(
        self, text: str, steps: int, clip_skip: int = 1, micro: Optional[MicroConditioning] = None, negative: bool = False,
        hires_steps: Optional[int] = None,
    ) -> list[ScheduledPromptConditioning]:
        """One text's conditioning schedule [(end_at_step, cond [77 k, C]), ...] for a run counting `steps` prompt
        steps (see SamplingSettings.prompt_steps), in the web UI's prompt language; each (text, steps, clip_skip)
        is encoded once per engine and set of loaded textual-inversion embeddings.

        Texts are encoded one at a time, so an embedding never depends on which other texts shared its micro-batch
        (the text encoder's GEMMs may pick kernels by batch size). A plain text of at most 75 tokens gives exactly
        `model.get_learned_conditioning([text])[0]`. A model whose text encoder does not speak the prompt language
        gets that too, for every text.

        SDXL: each cond is {"crossattn": [77 k, C], "vector": [adm]} for `micro` (None: the model's native size);
        `negative` marks the unconditional branch, where an empty text gives zero text embeddings.

        `hires_steps`: the hires fix's second pass, of that many prompt steps after a first pass of `steps` (the
        web UI's hires prompt scheduling, see `microbatch.prompts.get_learned_conditioning_prompt_schedules`)."""
        if is_sdxl(self.model):
            return self._sdxl_schedule(text, steps, clip_skip, micro, negative, hires_steps)
        encoder = getattr(self.model, "cond_stage_model", None)
        # the loaded textual-inversion embeddings are part of the key: a reloaded folder re-encodes the texts
        key = (text, int(steps), int(clip_skip), hires_steps, getattr(encoder, "embeddings_version", 0))
        if key not in self._cond_cache:
            with torch.no_grad():
                if isinstance(encoder, LongPromptEncoder):
                    self._cond_cache[key] = get_learned_conditioning(self.model, [text], steps, clip_skip, hires_steps)[0]
                else:
                    if clip_skip != 1:
                        raise ValueError(f"clip_skip {clip_skip} needs a CLIP text encoder; this model's is {type(self.model.cond_stage_model).__name__}")
                    end = steps if hires_steps is None else hires_steps
                    self._cond_cache[key] = [ScheduledPromptConditioning(end, self.model.get_learned_conditioning([text])[0])]
        return self._cond_cache[key]

    def _sdxl_schedule(
        self, text: str, steps: int, clip_skip: int, micro: Optional[MicroConditioning], negative: bool, hires_steps: Optional[int] = None
    ) -> list[ScheduledPromptConditioning]:
        if clip_skip != 1 and not self._noted_sdxl_clip_skip:
            logger.warning("clip skip %d has no effect on SDXL (as in the web UI, whose 'Clip skip SDXL' is off by default); ignored", clip_skip)
            self._noted_sdxl_clip_skip = True
        zero_empty = negative and zeroes_empty_negative(self.model)
        versions = tuple(getattr(e, "embeddings_version", 0) for e in self.model.conditioner.embedders)
        key = ("sdxl", text, int(steps), int(clip_skip), micro, zero_empty, hires_steps, versions)
        if key not in self._cond_cache:

            def batch(texts: list[str]) -> dict:
                if micro is None:
                    return self.model.conditioning_batch(texts)
                return self.model.conditioning_batch(texts, micro.original_size, micro.crop_coords, micro.target_size, micro.aesthetic_score)

            with torch.no_grad():
                self._cond_cache[key] = get_learned_conditioning_sdxl(
                    self.model, [text], steps, clip_skip, hires_steps, conditioning_batch=batch, is_negative_prompt=zero_empty
                )[0]
        return self._cond_cache[key]

    def prompt_parts(
        self, prompt: str, steps: int, clip_skip: int = 1, micro: Optional[MicroConditioning] = None, hires_steps: Optional[int] = None
    ) -> list[tuple[list[ScheduledPromptConditioning], float]]:
        """A positive prompt's composable parts (split at AND, each with its `:weight`, default 1), each with its
        schedule (see prompt_schedule). A prompt without AND or a trailing weight is one part of weight 1."""
        indexes, texts, _ = get_multicond_prompt_list([prompt])
        return [(self.prompt_schedule(texts[i], steps, clip_skip, micro, hires_steps=hires_steps), weight) for i, weight in indexes[0]]

    def conditioning(self, prompts: Sequence[str], steps: int = 1, clip_skip: int = 1) -> Any:
        """Encode prompts ahead of a run (cached) and return their conditioning at step 0 [B, 77 k, C] (the first
        part of each; shorter rows extended as `microbatch.prompts.stack_conds` does); SDXL: a dict of those
        stacked, at the model's native size."""
        return stack_conds([cond_at(self.prompt_parts(p, steps, clip_skip)[0][0], 0) for p in prompts])

    def step_conditioning(self, jobs: Sequence[ImageJob], settings: SamplingSettings) -> ConditioningSchedule:
        """The micro-batch's ConditioningSchedule: at denoiser call k, each image's prompt parts and its negative
        prompt at prompt step k. Negative prompts are encoded only when guidance (or a composable prompt) uses
        them."""
        steps, clip_skip = settings.prompt_steps, settings.clip_skip
        hires_steps = None
        if settings.hires_base_steps is not None:  # the hires pass: its steps come after the first pass's
            steps, hires_steps = settings.hires_base_steps, steps
        micro = negative_micro = None
        if is_sdxl(self.model):
            micro, negative_micro = settings.micro_conditioning(), settings.micro_conditioning(negative=True)
        parts = [self.prompt_parts(j.prompt, steps, clip_skip, micro, hires_steps) for j in jobs]
        composable = any(len(p) != 1 or p[0][1] != 1.0 for p in parts)
        negatives = None
        if settings.guidance_scale != 1.0 or composable:
            negatives = [
                self.prompt_schedule(j.negative_prompt, steps, clip_skip, negative_micro, negative=True, hires_steps=hires_steps) for j in jobs
            ]

        def at(step: int) -> StepConditioning:
            rows: list[torch.Tensor] = []
            image_parts = []
            for image in parts:
                mine = []
                for schedule, weight in image:
                    mine.append((len(rows), weight))
                    rows.append(cond_at(schedule, step))
                image_parts.append(mine)
            uncond = None if negatives is None else [cond_at(n, step) for n in negatives]
            return StepConditioning(rows, image_parts, uncond)

        return at

    # -- decoding --
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, C, h, w] -> images [B, 3, H, W] in [0, 1], decoded one image at a time (VAE slicing)."""
        images = []
        for i in range(latents.shape[0]):
            images.append(self._decode_one(latents[i : i + 1]))
        return torch.cat(images)

    def _decode_one(self, z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = self._vae_decode(z)
            if self.vae_fallback and x.dtype != torch.float32 and not torch.isfinite(x).all():
                if not self._warned_vae:
                    logger.warning("half-precision VAE decode overflowed (NaN/inf); decoding in float32 from now on")
                    self._warned_vae = True
                self.model.first_stage_model.float()
                x = self._vae_decode(z.float())
        return torch.clamp((x.float() + 1.0) / 2.0, 0.0, 1.0).cpu()

    def _vae_decode(self, z: torch.Tensor) -> torch.Tensor:
        t = self.vae_tiling
        if t is not None and t.applies(*z.shape[-2:]):
            return decode_tiled(self.model, z, t.tile, t.overlap, t.blend)
        return self.model.decode_first_stage(z)

    # -- sampling --
    def guided_denoiser(
        self,
        jobs: Sequence[ImageJob],
        settings: SamplingSettings,
        init_latent: Optional[torch.Tensor] = None,
        apply_model: Optional[Callable] = None,
    ) -> tuple[Any, GuidedModel]:
        """(D(x, sigma) of this engine's model with guidance, conditioning, inpainting concat or blending; the
        GuidedModel inside it, whose `calls` count the denoiser calls that prompt editing follows). `apply_model`:
        what runs the UNet (a cross-request batcher's participant), default the model's own."""
        apply_model = apply_model if apply_model is not None else self.model.apply_model
        if self.concat_latents is not None:
            concat = self.concat_latents.to(self.device)

            def apply_model(x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor, _apply: Callable = apply_model) -> torch.Tensor:
                return _apply(x_t, t, {"c_concat": [concat.expand(x_t.shape[0], *concat.shape[1:])], "c_crossattn": [context]})

        schedule = self.step_conditioning(jobs, settings)
        guided = GuidedModel(apply_model, schedule, None, settings.guidance_scale, split=settings.split_guidance)
        denoiser: Any = Denoiser(guided, self.model.alphas_cumprod, self.model.parameterization)
        if self.keep_mask is not None:
            if init_latent is None:
                raise ValueError("latent blending needs an init image")
            denoiser = BlendedDenoiser(denoiser, init_latent, self.keep_mask.to(self.device))
        return denoiser, guided

    def sample_batch(
        self, jobs: Sequence[ImageJob], settings: SamplingSettings, batch_index: int = 0, init_latents: Optional[torch.Tensor] = None,
        step_offset: int = 0,
    ) -> torch.Tensor:
        """Latents [B, C, h, w] (float32, VP scaling, on the device) for one micro-batch: one pass (the hires fix's
        second pass is `sample_images`).

        init_latents: img2img from these latents [B, C, h, w] (scaled, one per job) instead of `init_posterior`.
        step_offset: added to the step index the step callback sees (the second pass counts on from the first).
        """
        info = get_sampler(settings.sampler)
        generators = _make_generators(jobs)
        noise = PerImageNoise(generators)
        shape = (len(jobs), *settings.latent_shape)
        like = torch.empty(shape, dtype=torch.float32, device=self.device)

        # The start noise is the first draw of each image's generator, as in txt2img.
        start_noise = noise(like)
        init_latent = None
        if init_latents is not None:
            init_latent = init_latents.to(device=self.device, dtype=torch.float32)
            if tuple(init_latent.shape) != shape:
                raise AssertionError(f"init latents {tuple(init_latent.shape)} do not match {shape}")
        elif self.init_posterior is not None:
            # The posterior sample comes from a stream of its own, so the sampler's noise continues as in txt2img.
            post_noise = PerImageNoise(_make_generators(jobs, INIT_SEED_OFFSET))
            mean = self.init_posterior.mean.expand(len(jobs), *self.init_posterior.mean.shape[1:])
            std = self.init_posterior.std.expand_as(mean)
            init_latent = self.model.scale_factor * (mean.float() + std.float() * post_noise(mean.float()))
            if tuple(init_latent.shape[1:]) != settings.latent_shape:
                raise AssertionError(f"init latent {tuple(init_latent.shape)} does not match {settings.latent_shape}")

        participant = self.shared_unet() if self.shared_unet is not None else None
        denoiser, guided = self.guided_denoiser(jobs, settings, init_latent, participant.apply_model if participant is not None else None)
        sigmas = get_sigmas(settings.schedule_name(), denoiser, settings.steps)
        if settings.guidance_interval is not None:
            lo, hi = settings.guidance_interval
            guided.t_interval = guidance_t_interval(denoiser, lo, hi)

        if init_latent is None:
            x = start_noise * math.sqrt(float(sigmas[0]) ** 2 + 1.0)
        else:
            sigmas, x = img2img_start(sigmas, init_latent, start_noise, settings.strength, settings.exact_steps)
            if len(sigmas) < 2:
                return init_latent

        def callback(step: dict) -> None:
            if self.step_callback is not None:
                self.step_callback(batch_index, dict(step, i=int(step.get("i", 0)) + step_offset) if step_offset else step)

        # the step savings count this micro-batch's denoiser calls: GuidedModel counts a call before the UNet runs
        savings: Any = contextlib.nullcontext()
        if settings.tome is not None or settings.deepcache is not None:
            if self.shared_unet is not None:
                # they are set on the model, which a cross-request batcher shares with other requests' rows
                raise ValueError("--tome and --deepcache are not available with cross-request batching (the server's); run without them")
            savings = step_savings(unet_of(self.model), lambda: guided.calls - 1, settings.tome, settings.deepcache)
        # The participant is registered only around the loop: text encoding above and decoding after it never
        # hold up the other engines' rounds.
        with torch.no_grad(), savings, (participant if participant is not None else contextlib.nullcontext()):
            if self.refiner is not None and settings.refiner_switch is not None:
                x = self.refiner.sample(self, info.fn, denoiser, guided, x, sigmas, jobs, settings, noise, callback, init_latent)
            else:
                x = info.fn(denoiser, x, sigmas, eta=settings.eta, noise=noise, callback=callback)
        x = to_vp(x, float(sigmas[-1]))
        if self.keep_mask is not None:
            x = self.keep_mask * init_latent + (1 - self.keep_mask) * x
        return x

    def sample_images(self, jobs: Sequence[ImageJob], settings: SamplingSettings, batch_index: int = 0) -> torch.Tensor:
        """Final latents of one micro-batch: `sample_batch`, then the hires fix's second pass when settings has one."""
        latents = self.sample_batch(jobs, settings, batch_index)
        if settings.hires is None:
            return latents
        return self.hires_pass(jobs, settings, latents, batch_index)

    def hires_pass(self, jobs: Sequence[ImageJob], settings: SamplingSettings, latents: torch.Tensor, batch_index: int = 0) -> torch.Tensor:
        """The hires fix's second pass over first-pass latents [B, C, h, w] (see microbatch.hires): upscale (in latent
        space, or decode, resize the 8-bit pixels and encode), crop, then img2img at the larger size with each
        image's own seed, so its generator restarts: fresh start noise, then the sampler's noise, from the seed."""
        hires = settings.hires
        second = hires.settings
        factor = second.factor
        if hires.latent_mode is not None:
            init = upscale_latents(latents.float(), hires.size, hires.latent_mode, factor)
        else:
            pixels = upscale_pixels(self.decode(latents), hires.size, hires.upscaler)
            init = crop_latents(self.encode_latents(pixels, jobs), hires.size.crop)
        return self.sample_batch(jobs, second, batch_index, init_latents=init, step_offset=self.steps_run(settings))

    def steps_run(self, settings: SamplingSettings) -> int:
        """The sampler steps of one pass (the callback's step index counts them)."""
        return pass_steps(self.model, settings)

    def encode_latents(self, pixels: torch.Tensor, jobs: Sequence[ImageJob]) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] -> scaled latents [B, C, H/f, W/f], each image's posterior sample drawn from
        its INIT_SEED_OFFSET stream (as img2img's); tiled when `vae_tiling` applies at this size."""
        rows = []
        t, f = self.vae_tiling, vae_factor_of(self.model)
        for i, job in enumerate(jobs):
            x = (2.0 * pixels[i : i + 1] - 1.0).to(self.device)
            with torch.no_grad():
                if t is not None and t.applies(x.shape[-2] // f, x.shape[-1] // f):
                    posterior = encode_tiled(self.model, x, t.tile, t.overlap, t.blend)
                else:
                    posterior = self.model.encode_first_stage(x)
            noise = PerImageNoise(_make_generators([job], INIT_SEED_OFFSET))
            mean = posterior.mean.float()
            rows.append(self.model.scale_factor * (mean + posterior.std.float() * noise(mean)))
        return torch.cat(rows)

    def run(
        self,
        jobs: Sequence[ImageJob],
        settings: SamplingSettings,
        on_batch: Callable[[list[FinishedImage]], None],
        on_batch_size_change: Optional[Callable[[int, int], None]] = None,
    ) -> int:
        """Generate every job in micro-batches, calling on_batch with each finished micro-batch, in job order.

        An out-of-memory error halves the micro-batch size for the rest of the run and retries the same jobs
        (their generators are re-seeded, so the result is unchanged). Returns the final micro-batch size.
        """
        batch_size = max(1, int(settings.max_batch_size))
        pos = 0
        batch_index = 0
        while pos < len(jobs):
            batch = list(jobs[pos : pos + batch_size])
            try:
                latents = self.sample_images(batch, settings, batch_index)
                images = self.decode(latents)
            except Exception as e:  # noqa: BLE001 - only out-of-memory is handled, the rest re-raised
                if not is_out_of_memory(e) or batch_size == 1:
                    raise
                empty_cache(self.device)
                new_size = max(1, batch_size // 2)
                logger.warning("out of memory with %d images per micro-batch; retrying with %d", batch_size, new_size)
                if on_batch_size_change is not None:
                    on_batch_size_change(batch_size, new_size)
                batch_size = new_size
                continue
            on_batch([FinishedImage(job, image, latent.float().cpu()) for job, image, latent in zip(batch, images, latents)])
            pos += len(batch)
            batch_index += 1
        return batch_size


class BlendedDenoiser:
    """Inpainting with an ordinary model: the known region of every denoised estimate is replaced by the init
    latent, D' = keep * x0_init + (1 - keep) * D, so the sampler only invents the masked region."""

    def __init__(self, denoiser: Denoiser, init_latent: torch.Tensor, keep_mask: torch.Tensor):
        self.denoiser = denoiser
        self.init_latent = init_latent
        self.keep_mask = keep_mask

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        denoised = self.denoiser(x, sigma)
        return self.keep_mask * self.init_latent + (1 - self.keep_mask) * denoised

    def __getattr__(self, name: str):
        return getattr(self.denoiser, name)


def guidance_t_interval(denoiser: Any, sigma_lo: float, sigma_hi: float) -> tuple[float, float]:
    """The timesteps (t_lo, t_hi) of the noise levels [sigma_lo, sigma_hi], for GuidedModel.t_interval. Beyond the
    model's own sigma range the bounds become infinite (sigma_to_t clamps, which would put sigma_max inside an
    interval that starts above it)."""
    lo = -math.inf if sigma_lo <= denoiser.sigma_min else (math.inf if sigma_lo > denoiser.sigma_max else denoiser.sigma_to_t(sigma_lo))
    hi = math.inf if sigma_hi >= denoiser.sigma_max else (-math.inf if sigma_hi < denoiser.sigma_min else denoiser.sigma_to_t(sigma_hi))
    return lo, hi


def pass_steps(model: Any, settings: SamplingSettings) -> int:
    """Sampler steps one pass of `settings` runs: the schedule's length, cut to int(strength x steps) for img2img
    or to exact_steps (the hires fix's second pass). The second pass is not counted here."""
    denoiser = Denoiser(None, model.alphas_cumprod, model.parameterization)
    n = len(get_sigmas(settings.schedule_name(), denoiser, settings.steps)) - 1
    if settings.strength is None:
        return n
    return min(n, int(settings.exact_steps)) if settings.exact_steps is not None else int(settings.strength * n)


def img2img_start(
    sigmas: torch.Tensor, init_latent: torch.Tensor, noise: torch.Tensor, strength: Optional[float], exact_steps: Optional[int] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncate a schedule for img2img and noise the init latent to its first level.

    strength in (0, 1] is the fraction of the schedule's steps that is re-run: int(strength * steps) steps (the
    original's t_enc), or exactly `exact_steps` of them when given (at most all). The init latent is noised to
    exactly the level where those steps start, x = x0 + sigma * z. When every step is re-run the start is pure
    noise, so img2img equals txt2img from the same noise.
    """
    if strength is None or not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    n = len(sigmas) - 1
    t_enc = int(strength * n) if exact_steps is None else min(n, int(exact_steps))
    sub = sigmas[n - t_enc :]
    if t_enc == 0:
        return sub, init_latent
    sigma0 = float(sub[0])
    if t_enc == n:
        return sub, noise * math.sqrt(sigma0**2 + 1.0)
    return sub, init_latent + sigma0 * noise
