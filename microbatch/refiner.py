"""Base and refiner in one run: SDXL's ensemble of experts (Podell et al. 2023, "SDXL", sec. 2.5).

The base model denoises the first part of the schedule and hands its latents, still noisy, to the refiner without
decoding them (both models share the SDXL VAE's latent space); the refiner, trained on the last 200 of the 1000
training timesteps, takes the remaining steps with its own conditioning (OpenCLIP bigG; original size, crop and
aesthetic score). The base's VAE decodes the result, as diffusers' documented ensemble passes `vae=base.vae` to the
refiner, so `--vae`, the VAE hash in the PNG, tiling and the float32 fallback are the base's.

Where it switches (`refiner_switch_step`): at the first sampler step whose noise level sigma has its nearest
training timestep t (the table entry closest to sigma) with (999 - t) / 1000 >= switch: t <= 199 at 0.8. That is
the AUTOMATIC1111 web UI's rule since its 1.8 (refiner switchover by model timesteps, its PR #14978; its 1.6 and
1.7, or its option "Refiner switch by sampling steps", switch at the denoiser call where calls / steps >= switch),
and for fractions with at most three decimals it equals diffusers' `denoising_end` / `denoising_start` split, which
runs the base on the timesteps t >= round(1000 (1 - switch)) and the refiner on the rest. A noise-level rule gives
the refiner the levels it was trained on for every schedule (30 karras steps reach t = 199 after 19 steps, 50
uniform ones after 40) and for img2img, whose truncated schedule is split by the same rule. The switch is at a
step boundary (the web UI checks before every denoiser call, so a second-order step may switch in its middle).

The sampler runs twice: over sigmas[:k + 1] with the base's guided denoiser, then over sigmas[k:] with the
refiner's. A multistep sampler (DPM++ 2M, PLMS, LMS, UniPC) starts its history afresh with the refiner, as diffusers'
refiner pipeline does (the web UI swaps the model under its running sampler and keeps the history). Stochastic
samplers keep drawing from each image's own generator after the switch, continuing its stream, so an image depends
only on its seed and settings, never on micro-batching. Prompt editing counts on: the refiner's first call is the
denoiser call after the base's last.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from microbatch.engine import Engine, ImageJob, SamplingSettings, img2img_start, is_sdxl
from microbatch.offload import offload_state
from microbatch.request import UsageError
from samplers import Denoiser, GuidedModel, get_sigmas

logger = logging.getLogger(__name__)

# The web UI's default "Switch at" and the 0.8 of diffusers' ensemble example (`high_noise_frac`).
DEFAULT_REFINER_SWITCH = 0.8
REFINER_SUFFIXES = (".safetensors", ".ckpt")


def refiner_switch_step(sigmas: torch.Tensor, table: torch.Tensor, switch: float) -> int:
    """Index k of the first step the refiner takes: steps 0..k-1 (sigmas[0] -> sigmas[k]) are the base's, steps
    k..n-1 the refiner's; n = len(sigmas) - 1 when the refiner takes none.

    Args:
        sigmas: the run's descending noise levels [n + 1] (img2img: the truncated schedule).
        table: the model's sigma for each training timestep [T] (`Denoiser.sigmas`), ascending.
        switch: the fraction of the training schedule after which the refiner takes over, in (0, 1].
    """
    steps = len(sigmas) - 1
    T = int(table.shape[0])
    for i in range(steps):
        t = int(torch.argmin((table - float(sigmas[i])).abs()))
        # the web UI's completed ratio (999 - t) / 1000, for T = 1000
        if (T - 1 - t) / T >= switch:
            return i
    return steps


def run_sigmas(model: Any, settings: SamplingSettings) -> torch.Tensor:
    """The noise levels a micro-batch visits for `settings` (img2img: truncated by the strength), as the engine
    computes them."""
    denoiser = Denoiser(None, model.alphas_cumprod, model.parameterization)
    sigmas = get_sigmas(settings.schedule_name(), denoiser, settings.steps)
    if settings.strength is not None:
        sigmas, _ = img2img_start(sigmas, torch.zeros(1), torch.zeros(1), settings.strength)
    return sigmas


def refiner_steps(model: Any, settings: SamplingSettings, switch: float) -> tuple[int, int]:
    """(the step the refiner starts at, the steps of the run) for `settings` on the base `model`."""
    sigmas = run_sigmas(model, settings)
    table = Denoiser(None, model.alphas_cumprod, model.parameterization).sigmas
    return refiner_switch_step(sigmas, table, switch), len(sigmas) - 1


def release_device(model: Any) -> None:
    """With offloading, take the component `model` has on the device off it (no-op without offloading), so that
    only the model in use holds device memory."""
    state = offload_state(model)
    if state is not None:
        state.use_component(None)


@dataclass
class RefinerStage:
    """The refiner's part of a micro-batch: `engine` runs on the refiner model (its conditioning is cached there);
    the base engine's inpainting blend, if any, applies to it too."""

    engine: Engine
    base_model: Any

    def sample(
        self,
        base: Engine,
        fn: Callable[..., torch.Tensor],
        denoiser: Any,
        guided: GuidedModel,
        x: torch.Tensor,
        sigmas: torch.Tensor,
        jobs: Sequence[ImageJob],
        settings: SamplingSettings,
        noise: Callable[[torch.Tensor], torch.Tensor],
        callback: Callable[[dict], None],
        init_latent: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """Run the sampler `fn` from x at sigmas[0] to sigmas[-1]: the base's `denoiser` up to the switch step,
        the refiner's after it (x [B, C, h, w] in sigma-space scaling, as every sampler takes it)."""
        n = len(sigmas) - 1
        k = refiner_switch_step(sigmas, denoiser.sigmas, float(settings.refiner_switch))
        if k > 0:
            x = fn(denoiser, x, sigmas[: k + 1], eta=settings.eta, noise=noise, callback=callback)
        if k == n:
            return x
        release_device(self.base_model)
        self.engine.keep_mask = base.keep_mask
        refined, refined_guided = self.engine.guided_denoiser(jobs, settings, init_latent)
        refined_guided.calls = guided.calls  # prompt editing counts denoiser calls across the switch

        def shifted(step: dict) -> None:
            callback({**step, "i": int(step["i"]) + k})

        x = fn(refined, x, sigmas[k:], eta=settings.eta, noise=noise, callback=shifted)
        release_device(self.engine.model)
        return x


def short_title(path: Path, digest: str) -> str:
    """The web UI's name of a checkpoint in the parameters text: `stem [first 10 hex digits of its sha256]`."""
    return f"{Path(path).stem} [{digest}]"


def _header_state_dict(path: Path) -> Optional[dict[str, torch.Tensor]]:
    """A .safetensors file's names and shapes as meta tensors (nothing read but the header); None otherwise."""
    if Path(path).suffix != ".safetensors":
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    except Exception:  # noqa: BLE001 - an unreadable file is reported by the loader, with its own message
        return None


def _not_sdxl(path: Path, what: str) -> UsageError:
    return UsageError(
        f"--refiner {path} is {what}, not an SDXL model: the refiner must be an SDXL refiner (or another SDXL model) "
        f"sharing the base's latent space"
    )


def precheck_refiner(path: Path) -> None:
    """A one-line UsageError before anything loads when a .safetensors `--refiner` file is clearly not SDXL (no
    `conditioner.*` keys); other files are checked once loaded (`check_refiner`)."""
    from ldm.checkpoint import describe_family

    state = _header_state_dict(path)
    if state is not None and not any(k.startswith("conditioner.") for k in state):
        raise _not_sdxl(path, describe_family(state) or "a checkpoint without SDXL's conditioner")


def check_refiner(base: Any, refiner: Any, path: Path, base_name: str) -> None:
    """One-line UsageErrors unless the loaded `refiner` can take over the loaded SDXL `base`'s latents: both SDXL,
    the same latent channels and VAE factor."""
    if not is_sdxl(refiner):
        raise _not_sdxl(path, type(refiner).__name__)
    if not is_sdxl(base):
        raise UsageError(f"--refiner needs an SDXL base model; {base_name} is {type(base).__name__}")
    for what, a, b in (("latent channels", base.channels, refiner.channels), ("VAE factor", base.vae_scale, refiner.vae_scale)):
        if a != b:
            raise UsageError(f"--refiner {path} has {b} {what}, the base {a}: they do not share a latent space")
    if refiner.model.diffusion_model.in_channels != refiner.channels:
        raise UsageError(f"--refiner {path} is an inpainting model ({refiner.model.diffusion_model.in_channels} UNet input channels): not supported as a refiner")


def find_refiner(title: str, folder: Path) -> tuple[Optional[Path], Optional[str]]:
    """A PNG's `Refiner: NAME [hash]` -> (the file NAME.safetensors / NAME.ckpt in `folder`, or None; a note for
    the user when it is missing or its hash differs)."""
    name, _, rest = title.partition(" [")
    name, digest = name.strip(), rest.rstrip("]").strip()
    for suffix in REFINER_SUFFIXES:
        candidate = Path(folder) / f"{name}{suffix}"
        if candidate.is_file():
            if digest:
                from microbatch.loading import file_hash

                ours = file_hash(candidate)
                if not ours.startswith(digest.lower()):
                    return candidate, f"note: refiner {candidate} has hash {ours}, the PNG's was {digest}: the image will differ"
            return candidate, None
    return None, f"note: the PNG used the refiner {title}, not found as {name}.safetensors / .ckpt in {folder}: regenerating without it (give --refiner FILE)"
