"""Training the embedded demo model from scratch on the procedural shapes data (CPU, about an hour on 2 cores).

The model is `configs/demo/shapes-64.yaml`: the SD v1 architecture at toy size (64x64 images, 8x8x4 latents).
Stages, as in the original latent-diffusion recipe:

a. Autoencoder: AutoencoderKL on freshly rendered images, loss = L1 + kl_weight * KL with the original's relative
   weighting (per-image sums of |x - x_rec| and of the KL, so kl_weight multiplies a sum over 256 latent values
   against a sum over 12,288 pixel values); AdamW with a cosine-decayed learning rate. No perceptual or GAN loss:
   flat-coloured shapes do not need them.
b. Scale factor: 1 / std of posterior samples of encoded training images (the original's `scale_by_std`, measured
   once on `scale_images` images and then fixed).
c. UNet: a fixed set of `n_latents` images is encoded once and stored as posterior mean and std; every training
   step draws a fresh posterior sample z = mean + std * noise (what the original does when it encodes each batch,
   at a fraction of the cost). Epsilon prediction on the SD schedule, uniform timesteps, MSE; 10% of captions are
   replaced by the empty prompt for classifier-free guidance. The text encoder stays frozen at its (seeded) random
   initialisation, so the context of each of the 54 captions and of "" is computed once. AdamW with warm-up, then
   a constant learning rate by default (unet_lr_floor 1.0; below 1 it decays on a cosine), gradient clipping at
   norm 1, and an EMA of the UNet weights that is exported in place of the raw weights (as sd-v1-x.ckpt). With a
   constant rate every snapshot's EMA is a usable model, so a run can be stopped when its time is up.

Every weight is rounded to float16 before it is used downstream (the frozen parts before their outputs are
cached, the UNet's EMA at export), because the shipped file stores float16: what was trained against is what ships.
Randomness comes from `seed` only (numpy generators for the data, torch generators for the training noise).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, get_args

import numpy as np
import torch
from torch import nn

from ldm.models.diffusion.ddpm import SCHEDULE_BUFFERS
from ldm.util import instantiate_from_config, load_config, load_model_from_config
from microbatch.demo.shapes import all_combinations, caption, make_dataset

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "demo" / "shapes-64.yaml"
SHIPPED_DIR = REPO_ROOT / "microbatch" / "assets"  # the weights the scripts use without --ckpt
DEFAULT_OUT = REPO_ROOT / "outputs" / "demo-train"  # a new run never replaces the shipped weights by default
CHECKPOINT_NAME = "demo-shapes"
FROZEN_FILE = "stage-a-frozen.safetensors"  # the trained autoencoder and the text encoder, float16-rounded
STATE_FILE = "unet-state.pt"  # resumable UNet training state
# Seed offsets keep the data streams of the stages disjoint.
_AE_DATA, _LATENT_DATA, _HELDOUT_DATA = 1_000_000, 2_000_000, 3_000_000
AeAutocast = Literal["auto", "on", "off"]
AE_AUTOCAST_MODES: tuple[str, ...] = get_args(AeAutocast)


@dataclass
class TrainSettings:
    """Everything that decides the result. Steps and sizes are sized for a 2-core CPU and ~1 hour in total."""

    config: Path = DEFAULT_CONFIG
    out: Path = DEFAULT_OUT
    workdir: Path = REPO_ROOT / "outputs" / "train-demo"
    seed: int = 0
    threads: int = 2  # on an idle 2-core machine; one thread wins when it is shared (see scripts/train_demo.py)
    # (a) autoencoder
    ae_steps: int = 2400
    ae_batch: int = 8
    ae_lr: float = 1e-3
    kl_weight: float = 1e-6
    ae_from: Optional[Path] = None  # load the autoencoder (and text encoder) from this stage-a file; ae_steps 0 skips stage a
    ae_warmup: int = 50
    # bf16 autocast for stage a (weights, optimizer and loss stay float32): 0.38 s instead of 0.77 s per step of 8
    # images on 2 threads of a CPU with AVX512-BF16. "auto" uses it where microbatch.devices.cpu_has_fast_bf16().
    ae_autocast: AeAutocast = "auto"
    # (b) scale factor
    scale_images: int = 1024
    # (c) UNet
    n_latents: int = 12288
    unet_steps: int = 5000
    unet_batch: int = 64
    unet_lr: float = 4e-4
    unet_lr_floor: float = 0.1  # cosine decay to 0.1 of the peak; 1.0: constant after warm-up
    warmup_steps: int = 200
    ema_decay: float = 0.999
    uncond_prob: float = 0.1
    snapshot_every: int = 250
    resume: bool = False
    log_every: int = 50
    replace_shipped: bool = False  # allow `out` to be the shipped weights' folder

    def __post_init__(self) -> None:
        check_out_folder(self.out, self.replace_shipped)
        for name in ("ae_batch", "unet_batch", "threads", "n_latents", "scale_images", "log_every", "snapshot_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("ae_steps", "unet_steps", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.ae_steps == 0 and self.ae_from is None:
            raise ValueError("ae_steps 0 needs ae_from (a saved stage-a file) to skip the autoencoder stage")
        if self.ae_autocast not in AE_AUTOCAST_MODES:
            raise ValueError(f"ae_autocast must be one of {', '.join(AE_AUTOCAST_MODES)}, got {self.ae_autocast!r}")
        if not 0.0 <= self.uncond_prob < 1.0:
            raise ValueError(f"uncond_prob must be in [0, 1), got {self.uncond_prob}")
        if self.scale_images > self.n_latents:
            raise ValueError(f"scale_images ({self.scale_images}) must not exceed n_latents ({self.n_latents})")


def check_out_folder(out: Path, replace_shipped: bool = False) -> None:
    """Refuse to write into the folder of the shipped demo weights (which every script without --ckpt uses) unless
    `replace_shipped` says so."""
    shipped = SHIPPED_DIR / f"{CHECKPOINT_NAME}.safetensors"
    if not replace_shipped and shipped.is_file() and Path(out).resolve() == SHIPPED_DIR.resolve():
        raise ValueError(f"--out {out} holds the shipped demo weights ({shipped.name}); pass --replace_shipped to overwrite them")


# -- small helpers ------------------------------------------------------------------------------------------------


def to_model_input(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def round_to_half(module: nn.Module) -> None:
    """Round floating-point parameters to float16 and back in place (the precision of the shipped file)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.half().float())


def cosine_lr(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up to `peak`, then cosine decay to floor * peak at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: Optional[dict[str, str]] = None) -> None:
    """safetensors file written atomically (temporary name, then rename)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    tmp.chmod(0o644)  # safetensors creates 0600 files; the shipped asset must be readable by all
    tmp.replace(path)


def ae_autocast(mode: AeAutocast) -> Any:
    """The autocast context of stage a: bf16 on CPUs with fast bf16 (mode "auto") or always ("on")."""
    from microbatch.devices import cpu_has_fast_bf16

    enabled = mode == "on" or (mode == "auto" and cpu_has_fast_bf16())
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def build_model(settings: TrainSettings) -> nn.Module:
    """The LatentDiffusion of the config, its random initialisation a function of the seed."""
    torch.manual_seed(settings.seed)
    return instantiate_from_config(load_config(settings.config).model)


# -- stage a: autoencoder -------------------------------------------------------------------------------------------


def heldout_images(settings: TrainSettings, n: int = 256) -> tuple[np.ndarray, list]:
    images, _, labels = make_dataset(n, seed=_HELDOUT_DATA + settings.seed)
    return images, labels


def reconstruction_report(ae: nn.Module, settings: TrainSettings) -> dict[str, float]:
    """Held-out L1 (pixels in [-1, 1]) and the analyzer's accuracy on reconstructions: an upper bound for what the
    diffusion model can reach through this decoder."""
    from microbatch.demo.analyze import score

    images, labels = heldout_images(settings)
    x = to_model_input(images)
    with torch.no_grad():
        rec = ae.decode(ae.encode(x).mode()).clamp(-1, 1)
    out = ((rec + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    scores = [score(img, label) for img, label in zip(out, labels)]
    report = {"l1": float((rec - x).abs().mean())}
    for key in ("color", "shape", "background", "all"):
        report[key] = float(np.mean([s[key] for s in scores]))
    return report


def train_autoencoder(ae: nn.Module, settings: TrainSettings, from_scratch: bool = True) -> dict[str, float]:
    if from_scratch:
        # At the default initialisation the posterior std is ~1 against latent means of ~1: the decoder sees mostly
        # noise and the encoder needs thousands of steps to raise the signal. Starting the log-variance at -10
        # (std 0.007) gives the near-deterministic posterior that a 1e-6 KL weight ends at anyway.
        with torch.no_grad():
            ae.quant_conv.bias[ae.embed_dim :].fill_(-10.0)
    ae.train()
    for p in ae.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(ae.parameters(), lr=settings.ae_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(settings.seed)
    start = time.perf_counter()
    running: dict[str, float] = {"l1": 0.0, "kl": 0.0}
    for step in range(settings.ae_steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, settings.ae_steps, settings.ae_lr, warmup=settings.ae_warmup)
        images, _, _ = make_dataset(settings.ae_batch, seed=_AE_DATA + settings.seed * 100_000 + step)
        x = to_model_input(images)
        with ae_autocast(settings.ae_autocast):
            posterior = ae.encode(x)
            rec = ae.decode(posterior.sample(torch.randn(posterior.mean.shape, generator=generator)))
        l1 = (rec.float() - x).abs().mean()
        kl = posterior.kl().float().mean()
        # The original: sum |x - rec| per image + kl_weight * KL per image; here divided by the pixel values.
        loss = l1 + settings.kl_weight * kl / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # Clipping keeps the occasional Adam spike at this learning rate from undoing the reconstruction.
        torch.nn.utils.clip_grad_norm_(ae.parameters(), 1.0)
        opt.step()
        running["l1"] += float(l1.detach())
        running["kl"] += float(kl.detach())
        if (step + 1) % settings.log_every == 0 or step + 1 == settings.ae_steps:
            n = settings.log_every if (step + 1) % settings.log_every == 0 else (step + 1) % settings.log_every
            elapsed = time.perf_counter() - start
            logger.info(
                "ae step %d/%d  l1 %.4f  kl %.1f  lr %.2e  %.2f s/step  %.0f s",
                step + 1, settings.ae_steps, running["l1"] / n, running["kl"] / n, opt.param_groups[0]["lr"],
                elapsed / (step + 1), elapsed,
            )
            running = {"l1": 0.0, "kl": 0.0}
    ae.eval()
    for p in ae.parameters():
        p.requires_grad_(False)
    return {"seconds": time.perf_counter() - start}


# -- stage b + c: latents, scale factor, UNet ------------------------------------------------------------------------


def encode_latents(ae: nn.Module, settings: TrainSettings, chunk: int = 512) -> dict[str, torch.Tensor]:
    """The fixed UNet training set: posterior mean and std [N, 4, 8, 8] (unscaled) and the label index [N] into
    all_combinations()."""
    index = {label: i for i, label in enumerate(all_combinations())}
    means, stds, labels = [], [], []
    with torch.no_grad():
        for first in range(0, settings.n_latents, chunk):
            n = min(chunk, settings.n_latents - first)
            images, _, batch_labels = make_dataset(n, seed=_LATENT_DATA + settings.seed * 100_000 + first // chunk)
            posterior = ae.encode(to_model_input(images))
            means.append(posterior.mean.clone())
            stds.append(posterior.std.clone())
            labels.extend(index[label] for label in batch_labels)
    return {"mean": torch.cat(means), "std": torch.cat(stds), "label": torch.tensor(labels, dtype=torch.long)}


def cached_latents(ae: nn.Module, settings: TrainSettings) -> dict[str, torch.Tensor]:
    """encode_latents, reused from the workdir when the autoencoder weights, seed and count are the same."""
    import hashlib

    fingerprint = hashlib.sha256((settings.workdir / FROZEN_FILE).read_bytes()).hexdigest()
    key = f"{fingerprint}-{settings.seed}-{settings.n_latents}"
    path = settings.workdir / "latents.pt"
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("key") == key:
            logger.info("reusing the encoded latents of %s", path)
            return saved["latents"]
    latents = encode_latents(ae, settings)
    torch.save({"key": key, "latents": latents}, path)
    return latents


def measure_scale_factor(latents: dict[str, torch.Tensor], n: int, seed: int) -> float:
    """1 / std of posterior samples of the first n encoded images (the original measures its first batch)."""
    generator = torch.Generator().manual_seed(seed)
    mean, std = latents["mean"][:n], latents["std"][:n]
    z = mean + std * torch.randn(mean.shape, generator=generator)
    return float(1.0 / z.flatten().std())


def caption_contexts(model: nn.Module) -> torch.Tensor:
    """Text contexts [55, 77, D]: row i for caption i of all_combinations(), the last row for the empty prompt."""
    prompts = [caption(*label) for label in all_combinations()] + [""]
    with torch.no_grad():
        return model.get_learned_conditioning(prompts).float()


class Ema:
    """Exponential moving average of parameters with the original LitEma's warm-up: decay min(d, (1+n)/(10+n))."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = {k: p.detach().clone() for k, p in module.named_parameters()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, p in module.named_parameters():
            self.shadow[k].mul_(d).add_(p.detach(), alpha=1 - d)

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = state["updates"]
        self.shadow = state["shadow"]


def train_unet(model: nn.Module, latents: dict[str, torch.Tensor], contexts: torch.Tensor, settings: TrainSettings) -> tuple[Ema, dict[str, float]]:
    unet = model.model.diffusion_model
    unet.train()
    opt = torch.optim.AdamW(unet.parameters(), lr=settings.unet_lr, weight_decay=0.01)
    ema = Ema(unet, settings.ema_decay)
    generator = torch.Generator().manual_seed(settings.seed + 1)
    first_step = 0
    state_path = settings.workdir / STATE_FILE
    if settings.resume and state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        unet.load_state_dict(state["unet"])
        opt.load_state_dict(state["opt"])
        ema.load_state_dict(state["ema"])
        generator.set_state(state["generator"])
        first_step = int(state["step"])
        logger.info("resumed the UNet stage at step %d from %s", first_step, state_path)
    n, empty = len(latents["label"]), contexts.shape[0] - 1
    scale = model.scale_factor
    start = time.perf_counter()
    running, count = 0.0, 0
    for step in range(first_step, settings.unet_steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, settings.unet_steps, settings.unet_lr, settings.warmup_steps, settings.unet_lr_floor)
        idx = torch.randint(0, n, (settings.unet_batch,), generator=generator)
        mean, std = latents["mean"][idx], latents["std"][idx]
        z = scale * (mean + std * torch.randn(mean.shape, generator=generator))
        labels = latents["label"][idx]
        drop = torch.rand(settings.unet_batch, generator=generator) < settings.uncond_prob
        context = contexts[torch.where(drop, torch.full_like(labels, empty), labels)]
        t = torch.randint(0, model.num_timesteps, (settings.unet_batch,), generator=generator)
        noise = torch.randn(z.shape, generator=generator)
        x_t = model.q_sample(z, t, noise)
        loss = (unet(x_t, t, context=context) - noise).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        ema.update(unet)
        running += float(loss.detach())
        count += 1
        done = step + 1
        if done % settings.log_every == 0 or done == settings.unet_steps:
            elapsed = time.perf_counter() - start
            logger.info(
                "unet step %d/%d  loss %.4f  lr %.2e  %.2f s/step  %.0f s",
                done, settings.unet_steps, running / count, opt.param_groups[0]["lr"], elapsed / (done - first_step), elapsed,
            )
            running, count = 0.0, 0
        if done % settings.snapshot_every == 0 and done < settings.unet_steps:
            state = {"unet": unet.state_dict(), "opt": opt.state_dict(), "ema": ema.state_dict(), "generator": generator.get_state(), "step": done}
            torch.save(state, settings.workdir / (STATE_FILE + ".partial"))
            (settings.workdir / (STATE_FILE + ".partial")).replace(state_path)
            export_checkpoint(model, ema, settings.workdir / f"{CHECKPOINT_NAME}-snapshot.safetensors", settings, {"unet_step": str(done)})
    unet.eval()
    return ema, {"seconds": time.perf_counter() - start}


# -- export ---------------------------------------------------------------------------------------------------------


def export_checkpoint(model: nn.Module, ema: Ema, path: Path, settings: TrainSettings, metadata: dict[str, str]) -> None:
    """The whole LatentDiffusion in the original key layout, the UNet keys holding the EMA weights; parameters in
    float16, schedule buffers and `scale_factor` in float32. The yaml beside it is the config with the measured
    scale factor."""
    tensors: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key.startswith("model.diffusion_model."):
            value = ema.shadow.get(key[len("model.diffusion_model."):], value)
        if value.is_floating_point() and key not in SCHEDULE_BUFFERS:
            value = value.half()
        tensors[key] = value
    tensors["scale_factor"] = torch.tensor(float(model.scale_factor), dtype=torch.float32)
    meta = {"description": "microbatch-diffusion demo model: 64x64 shapes, trained from scratch by scripts/train_demo.py", **metadata}
    save_tensors(tensors, path, meta)
    path.with_suffix(".yaml").write_text(config_with_scale(settings.config, float(model.scale_factor)), encoding="utf-8")


def config_with_scale(config: Path, scale_factor: float) -> str:
    """The config's text (comments kept) with `scale_factor:` set to the measured value."""
    text = config.read_text(encoding="utf-8")
    new, count = re.subn(r"(?m)^(\s*scale_factor:\s*)\S+", lambda m: f"{m.group(1)}{scale_factor:.5f}", text)
    if count != 1:
        raise ValueError(f"{config} must have exactly one scale_factor line, found {count}")
    return new


def verify_checkpoint(path: Path, model: nn.Module, ema: Ema) -> None:
    """Load the file back through the normal loader (strict key check) and compare with what was exported."""
    loaded = load_model_from_config(path.with_suffix(".yaml"), path)
    if abs(loaded.scale_factor - float(model.scale_factor)) > 1e-4:
        raise AssertionError(f"scale factor {loaded.scale_factor} != {model.scale_factor}")
    own = loaded.state_dict()
    for key, value in ema.shadow.items():
        if not torch.equal(own["model.diffusion_model." + key], value.half().float()):
            raise AssertionError(f"{key} does not round-trip")
    for key, value in model.state_dict().items():
        if not key.startswith("model.diffusion_model.") and value.is_floating_point() and not torch.allclose(own[key], value, atol=1e-3, rtol=1e-3):
            raise AssertionError(f"{key} does not round-trip")


# -- the whole run --------------------------------------------------------------------------------------------------


def train(settings: TrainSettings) -> dict[str, Any]:
    """Run stages a to c, export `<out>/demo-shapes.safetensors` + `.yaml`, verify it, and return a summary."""
    # Zero-initialised output convs give subnormal gradient statistics early on; on x86 CPUs those cost up to 10x.
    # The flag is process-wide, so it is switched off again afterwards (callers in the same process, e.g. tests).
    torch.set_flush_denormal(True)
    try:
        return _train(settings)
    finally:
        torch.set_flush_denormal(False)


def _train(settings: TrainSettings) -> dict[str, Any]:
    torch.set_num_threads(settings.threads)
    settings.workdir.mkdir(parents=True, exist_ok=True)
    total_start = time.perf_counter()
    summary: dict[str, Any] = {"settings": {k: str(v) for k, v in dataclasses.asdict(settings).items()}}
    model = build_model(settings)
    model.eval()
    for name, part in (("unet", model.model), ("autoencoder", model.first_stage_model), ("text encoder", model.cond_stage_model)):
        summary[f"params_{name}"] = sum(p.numel() for p in part.parameters())
        logger.info("%s: %.2fM parameters", name, summary[f"params_{name}"] / 1e6)

    # (a) autoencoder, or a saved one
    round_to_half(model.cond_stage_model)
    if settings.ae_from is not None:
        from safetensors.torch import load_file

        saved = load_file(str(settings.ae_from))
        own = model.state_dict()
        frozen_keys = [k for k in own if k.startswith(("first_stage_model.", "cond_stage_model.")) and own[k].is_floating_point()]
        missing = [k for k in frozen_keys if k not in saved]
        if any(k.startswith("first_stage_model.") for k in missing):
            raise ValueError(f"{settings.ae_from} lacks autoencoder weights, e.g. {missing[:3]}")
        model.load_state_dict({k: saved[k] for k in frozen_keys if k in saved}, strict=False)
        logger.info("autoencoder%s loaded from %s", "" if missing else " and text encoder", settings.ae_from)
        summary["ae"] = {"seconds": 0.0, "from": str(settings.ae_from)}
    if settings.ae_steps > 0:
        # With ae_from this continues training the loaded autoencoder (a fresh learning-rate schedule).
        logger.info("stage a: autoencoder, %d steps of %d images", settings.ae_steps, settings.ae_batch)
        summary["ae"] = {**summary.get("ae", {}), **train_autoencoder(model.first_stage_model, settings, from_scratch=settings.ae_from is None)}
    round_to_half(model.first_stage_model)
    frozen = {k: v for k, v in model.state_dict().items() if k.startswith(("first_stage_model.", "cond_stage_model.")) and v.is_floating_point()}
    save_tensors({k: v.half() for k, v in frozen.items()}, settings.workdir / FROZEN_FILE)
    summary["ae"].update(reconstruction_report(model.first_stage_model, settings))
    logger.info("autoencoder held-out: %s", json.dumps({k: round(v, 4) for k, v in summary["ae"].items() if isinstance(v, float)}))

    # (b) + (c) latents and scale factor
    t0 = time.perf_counter()
    latents = cached_latents(model.first_stage_model, settings)
    model.scale_factor = measure_scale_factor(latents, settings.scale_images, settings.seed)
    contexts = caption_contexts(model)
    summary["latents"] = {"seconds": time.perf_counter() - t0, "count": settings.n_latents, "scale_factor": model.scale_factor}
    logger.info("encoded %d latents in %.0f s; scale factor %.5f", settings.n_latents, summary["latents"]["seconds"], model.scale_factor)

    logger.info("stage c: UNet, %d steps of %d latents", settings.unet_steps, settings.unet_batch)
    ema, summary["unet"] = train_unet(model, latents, contexts, settings)

    path = settings.out / f"{CHECKPOINT_NAME}.safetensors"
    export_checkpoint(model, ema, path, settings, {"unet_step": str(settings.unet_steps), "scale_factor": f"{model.scale_factor:.5f}"})
    verify_checkpoint(path, model, ema)
    summary["checkpoint"] = {"path": str(path), "megabytes": path.stat().st_size / 2**20}
    summary["total_seconds"] = time.perf_counter() - total_start
    logger.info("wrote %s (%.1f MB), verified through ldm.util.load_model_from_config; total %.0f s", path, summary["checkpoint"]["megabytes"], summary["total_seconds"])
    (settings.workdir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary


# -- stage d: decoder fine-tune on a frozen latent space --------------------------------------------------------------


def finetune_decoder(checkpoint: Path, out: Path, steps: int, batch: int = 16, lr: float = 3e-4, seed: int = 0, threads: int = 1) -> dict[str, float]:
    """Fine-tune only the VAE decoder (and post_quant_conv) of a finished demo checkpoint on L1 reconstruction of
    fresh images from their posterior-mean latents, then write the checkpoint again.

    The encoder, and so the latent space the UNet learned, stays fixed: the UNet needs no retraining. This recovers
    what a short autoencoder stage leaves behind (its decoder confused red / green / orange on white while the
    latents still told them apart).
    """
    from ldm.util import load_model_from_config

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = load_model_from_config(checkpoint.with_suffix(".yaml"), checkpoint)
    ae = model.first_stage_model
    trainable = list(ae.decoder.parameters()) + list(ae.post_quant_conv.parameters())
    for p in trainable:
        p.requires_grad_(True)
    ae.decoder.train()
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    images, _, _ = make_dataset(steps * batch, seed=seed + 4242)
    start = time.perf_counter()
    for step in range(steps):
        x = to_model_input(images[step * batch : (step + 1) * batch])
        with torch.no_grad():
            z = ae.encode(x).mode()
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup=20)
        loss = (ae.decode(z) - x).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            logger.info("decoder step %d/%d  l1 %.4f  %.0f s", step + 1, steps, float(loss.detach()), time.perf_counter() - start)
    ae.decoder.eval()
    report = reconstruction_report(ae, TrainSettings(seed=seed))
    logger.info("decoder fine-tune held-out: %s", report)
    tensors = {k: (v.half() if v.is_floating_point() and k not in SCHEDULE_BUFFERS else v) for k, v in model.state_dict().items()}
    tensors["scale_factor"] = torch.tensor(float(model.scale_factor), dtype=torch.float32)
    save_tensors(tensors, out, {"description": "microbatch-diffusion demo model: 64x64 shapes, trained from scratch by scripts/train_demo.py"})
    if out.with_suffix(".yaml") != checkpoint.with_suffix(".yaml"):
        out.with_suffix(".yaml").write_text(checkpoint.with_suffix(".yaml").read_text(encoding="utf-8"), encoding="utf-8")
    load_model_from_config(out.with_suffix(".yaml"), out)  # strict reload check
    return report
