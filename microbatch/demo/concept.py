"""Teaching the demo model what it does not know: a new shape (a cross) by a kohya LoRA, a new word for a colour
(`demo-scarlet`, the data's red) by a textual-inversion embedding.

The demo model (`microbatch/assets/demo-shapes.safetensors`) was trained on circles, squares and triangles only, with
captions "a {color} {shape} on a {background} background"; `microbatch.demo.shapes` also draws a cross (EXTRA_SHAPES)
and `microbatch.demo.analyze` recognises one. Each file is trained on freshly rendered images encoded by the model's
own autoencoder, with the SD epsilon loss at uniform timesteps (as the base model was trained, see
`microbatch.demo.train`):

- a LoRA `demo-cross` (LoCon: every Linear and Conv2d of the UNet but the timestep embedding, rank `lora_rank`),
  trained on "a {color} cross on a {background} background" mixed with a replay of the base model's own data and
  captions (`replay_fraction` of each batch; 10% of all captions empty, as in the base training) so that the old
  prompts keep working. The text encoder stays untouched. Saved in the kohya format the web UI and `microbatch.lora`
  read: `lora_unet_{layer}.lora_down.weight` / `.lora_up.weight` / `.alpha`, float16, with the layer named by its ldm
  module path (`lora_unet_input_blocks_1_1_proj_in`), the form the web UI maps for any UNet layout (its diffusers
  name table assumes SD's two residual blocks per level; this UNet has one).
- a textual-inversion embedding `demo-scarlet` (`ti_vectors` vectors of the text encoder's width, 64 here), with the
  whole model frozen, trained on red circles, squares and triangles captioned "a demo-scarlet {shape} on a
  {background} background"; saved in the web UI's `.pt` format (`string_to_param: {"*": [n, 64]}`, with `name`,
  `step`, `sd_checkpoint_name`). A frozen model can only be steered among what it already draws, so an embedding
  names something it can render (a colour) and cannot teach it a shape: an embedding trained the same way on crosses
  ("a {color} demo-cross ...") drew none (0% in scripts/eval_demo.py, README "A shape the demo model does not know").

Both are trained in float32 against the shipped float16 weights; the files store float16 (LoRA) and float32
(embedding, as the web UI writes). Randomness comes from `seed` only.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, get_args

import numpy as np
import torch
from torch import nn

from microbatch.demo.shapes import SHAPES, all_combinations, caption, make_dataset, shape_combinations
from microbatch.demo.train import REPO_ROOT, SHIPPED_DIR, cosine_lr, save_tensors, to_model_input

logger = logging.getLogger(__name__)

CONCEPT_SHAPE = "cross"  # the LoRA's new shape
LORA_NAME = "demo-cross"  # the LoRA's file stem (its <lora:...> tag)
EMBEDDING_COLOR = "red"  # what the embedding's new word means
EMBEDDING_NAME = "demo-scarlet"  # the embedding's file stem: the new word in prompts
LORA_SUBDIR, EMBEDDING_SUBDIR = "lora", "embeddings"
DEFAULT_OUT = REPO_ROOT / "outputs" / "demo-concept"
# Seed offsets keep these data streams apart from each other and from the base model's.
_CONCEPT_DATA, _REPLAY_DATA, _EMBEDDING_DATA = 5_000_000, 6_000_000, 7_000_000
Which = Literal["both", "lora", "embedding"]
WHICH: tuple[str, ...] = get_args(Which)


def lora_path(folder: Path) -> Path:
    return Path(folder) / LORA_SUBDIR / f"{LORA_NAME}.safetensors"


def embedding_path(folder: Path) -> Path:
    return Path(folder) / EMBEDDING_SUBDIR / f"{EMBEDDING_NAME}.pt"


def concept_prompt(color: str, background: str, word: str = CONCEPT_SHAPE) -> str:
    """The caption of a cross, with `word` for the shape ("cross", the LoRA's word)."""
    return caption(color, CONCEPT_SHAPE, background).replace(f" {CONCEPT_SHAPE} ", f" {word} ")


def embedding_labels() -> list[tuple[str, str, str]]:
    """The 3 * 3 = 9 (EMBEDDING_COLOR, shape, background) triples the embedding's word is trained and measured on."""
    return [label for label in all_combinations() if label[0] == EMBEDDING_COLOR]


def embedding_prompt(shape: str, background: str, word: str = EMBEDDING_NAME) -> str:
    """The caption of a red shape with `word` in the colour slot: "a demo-scarlet circle on a white background"."""
    return caption(EMBEDDING_COLOR, shape, background).replace(f" {EMBEDDING_COLOR} ", f" {word} ", 1)


@dataclass
class ConceptSettings:
    """Everything that decides the two files. Sized for a few minutes on a 2-core CPU."""

    ckpt: Optional[Path] = None  # the base model (default: the shipped demo model)
    out: Path = DEFAULT_OUT  # writes out/lora/demo-cross.safetensors and out/embeddings/demo-scarlet.pt
    which: Which = "both"
    seed: int = 0
    threads: int = 2
    n_concept: int = 1024  # crosses encoded once (posterior mean and std), a fresh posterior sample every step
    n_replay: int = 1024  # base-model images for the LoRA's replay
    n_embedding: int = 512  # red shapes (of the base data) encoded once for the embedding
    # LoRA
    lora_steps: int = 600
    lora_batch: int = 32
    lora_lr: float = 2e-3
    lora_rank: int = 8
    lora_alpha: float = 8.0
    replay_fraction: float = 0.5
    uncond_prob: float = 0.1
    # embedding
    ti_steps: int = 150
    ti_batch: int = 32
    ti_lr: float = 1e-2
    ti_vectors: int = 1  # the colour slot is one token ("red") in every caption the UNet learned: one vector keeps the words after it where they were
    ti_init: str = "*"  # the vectors start as this word's token embedding (repeated); the web UI's default
    warmup_steps: int = 20
    log_every: int = 50
    replace_shipped: bool = False  # allow `out` to be microbatch/assets

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if not self.replace_shipped and self.out.resolve() == SHIPPED_DIR.resolve():
            raise ValueError(f"--out {self.out} holds the shipped demo files; pass --replace_shipped to overwrite them")
        if self.which not in WHICH:
            raise ValueError(f"which must be one of {', '.join(WHICH)}, got {self.which!r}")
        for name in ("threads", "n_concept", "n_replay", "n_embedding", "lora_batch", "lora_rank", "ti_batch", "ti_vectors", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lora_steps", "ti_steps", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.replay_fraction < 1.0:
            raise ValueError(f"replay_fraction must be in [0, 1), got {self.replay_fraction}")
        if not 0.0 <= self.uncond_prob < 1.0:
            raise ValueError(f"uncond_prob must be in [0, 1), got {self.uncond_prob}")
        if self.ti_vectors > 16:
            raise ValueError(f"ti_vectors must be at most 16, got {self.ti_vectors}")


# -- data ----------------------------------------------------------------------------------------------------------


def load_base(ckpt: Optional[Path]) -> nn.Module:
    """The demo model in float32, eval mode, every parameter frozen."""
    from ldm.util import load_model_from_config
    from microbatch.loading import demo_checkpoint

    ckpt = Path(ckpt) if ckpt is not None else demo_checkpoint()
    if ckpt is None or not ckpt.is_file():
        raise FileNotFoundError(f"no demo checkpoint at {ckpt}: train one with scripts/train_demo.py")
    model = load_model_from_config(ckpt.with_suffix(".yaml"), ckpt).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def encode_images(model: nn.Module, n: int, seed: int, shapes: tuple[str, ...], labels: list, chunk: int = 256, colors: Optional[tuple[str, ...]] = None) -> dict[str, torch.Tensor]:
    """n rendered images of `shapes` (in `colors`, default all) -> posterior mean and std [n, 4, 8, 8] (unscaled)
    and each image's index into `labels`."""
    index = {label: i for i, label in enumerate(labels)}
    means, stds, ids = [], [], []
    with torch.no_grad():
        for first in range(0, n, chunk):
            images, _, batch_labels = make_dataset(min(chunk, n - first), seed=seed + first // chunk, shapes=shapes, colors=colors)
            posterior = model.first_stage_model.encode(to_model_input(images))
            means.append(posterior.mean.clone())
            stds.append(posterior.std.clone())
            ids.extend(index[label] for label in batch_labels)
    return {"mean": torch.cat(means), "std": torch.cat(stds), "label": torch.tensor(ids, dtype=torch.long)}


def sample_batch(model: nn.Module, data: dict[str, torch.Tensor], n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n latents (fresh posterior samples, scaled) and their label indices."""
    idx = torch.randint(0, len(data["label"]), (n,), generator=generator)
    mean, std = data["mean"][idx], data["std"][idx]
    return model.scale_factor * (mean + std * torch.randn(mean.shape, generator=generator)), data["label"][idx]


def eps_loss(model: nn.Module, z: torch.Tensor, context: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The base training's loss: MSE of the UNet's eps at uniform timesteps."""
    t = torch.randint(0, model.num_timesteps, (z.shape[0],), generator=generator)
    noise = torch.randn(z.shape, generator=generator)
    return (model.model.diffusion_model(model.q_sample(z, t, noise), t, context=context) - noise).pow(2).mean()


# -- LoRA ----------------------------------------------------------------------------------------------------------


class LoraNetwork(nn.Module):
    """Trainable low-rank deltas on the UNet's Linear and Conv2d layers, added by forward hooks:
    y = layer(x) + (alpha / rank) * up(down(x)), down with the layer's kernel, stride and padding (LoCon for 3x3
    convolutions), up 1x1 and zero at the start (so training starts from the base model)."""

    def __init__(self, unet: nn.Module, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.rank, self.alpha = rank, float(alpha)
        self.targets: dict[str, nn.Module] = {}
        self.down, self.up = nn.ModuleDict(), nn.ModuleDict()
        for name, module in unet.named_modules():
            if name.startswith("time_embed") or not isinstance(module, (nn.Linear, nn.Conv2d)):
                continue
            key = name.replace(".", "_")
            if isinstance(module, nn.Linear):
                down, up = nn.Linear(module.in_features, rank, bias=False), nn.Linear(rank, module.out_features, bias=False)
            else:
                down = nn.Conv2d(module.in_channels, rank, module.kernel_size, module.stride, module.padding, bias=False)
                up = nn.Conv2d(rank, module.out_channels, 1, bias=False)
            # kohya's init: down as torch's default (kaiming uniform, a = sqrt 5), up zero
            bound = 1.0 / math.sqrt(down.weight[0].numel())
            with torch.no_grad():
                down.weight.copy_((torch.rand(down.weight.shape, generator=generator) * 2 - 1) * bound)
                up.weight.zero_()
            self.targets[key], self.down[key], self.up[key] = module, down, up
        self._handles: list[Any] = []

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def attach(self) -> None:
        for key, module in self.targets.items():
            down, up = self.down[key], self.up[key]
            self._handles.append(module.register_forward_hook(lambda m, inp, out, d=down, u=up: out + self.scale * u(d(inp[0]))))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def kohya_state_dict(self) -> dict[str, torch.Tensor]:
        """kohya keys, float16: lora_unet_{ldm layer path}.lora_down.weight / .lora_up.weight / .alpha."""
        out: dict[str, torch.Tensor] = {}
        for key in self.targets:
            prefix = f"lora_unet_{key}"
            out[f"{prefix}.lora_down.weight"] = self.down[key].weight.detach().half()
            out[f"{prefix}.lora_up.weight"] = self.up[key].weight.detach().half()
            out[f"{prefix}.alpha"] = torch.tensor(self.alpha, dtype=torch.float16)
        return out


def train_lora(model: nn.Module, concept: dict, replay: dict, contexts: torch.Tensor, settings: ConceptSettings) -> tuple[LoraNetwork, dict[str, Any]]:
    """Train the LoRA; `contexts` [L, 77, C]: rows 0..17 the cross captions, then the 54 base captions, last "".
    Concept label indices are rows as they are; replay label indices are offset by the 18 concept rows."""
    generator = torch.Generator().manual_seed(settings.seed + 1)
    network = LoraNetwork(model.model.diffusion_model, settings.lora_rank, settings.lora_alpha, generator)
    params = list(network.parameters())
    opt = torch.optim.AdamW(params, lr=settings.lora_lr, weight_decay=0.0)
    n_replay = int(round(settings.lora_batch * settings.replay_fraction))
    n_concept = settings.lora_batch - n_replay
    offset, empty = len(shape_combinations(CONCEPT_SHAPE)), contexts.shape[0] - 1
    network.attach()
    start, running, count, last_loss = time.perf_counter(), 0.0, 0, float("nan")
    try:
        for step in range(settings.lora_steps):
            for group in opt.param_groups:
                group["lr"] = cosine_lr(step, settings.lora_steps, settings.lora_lr, settings.warmup_steps)
            z_c, l_c = sample_batch(model, concept, n_concept, generator)
            z_r, l_r = sample_batch(model, replay, n_replay, generator)
            z, labels = torch.cat([z_c, z_r]), torch.cat([l_c, l_r + offset])
            drop = torch.rand(len(labels), generator=generator) < settings.uncond_prob
            context = contexts[torch.where(drop, torch.full_like(labels, empty), labels)]
            loss = eps_loss(model, z, context, generator)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            running, count = running + float(loss.detach()), count + 1
            if (step + 1) % settings.log_every == 0 or step + 1 == settings.lora_steps:
                elapsed = time.perf_counter() - start
                logger.info("lora step %d/%d  loss %.4f  lr %.2e  %.2f s/step", step + 1, settings.lora_steps, running / count, opt.param_groups[0]["lr"], elapsed / (step + 1))
                last_loss, running, count = running / count, 0.0, 0
    finally:
        network.detach()
    return network, {"seconds": time.perf_counter() - start, "parameters": sum(p.numel() for p in params), "final_loss": last_loss}


def save_lora(network: LoraNetwork, path: Path, settings: ConceptSettings) -> None:
    metadata = {
        # the kohya trainer's keys the web UI shows (and reads for the network's dim / alpha)
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(network.rank),
        "ss_network_alpha": f"{network.alpha:g}",
        "ss_network_args": json.dumps({"conv_dim": str(network.rank), "conv_alpha": f"{network.alpha:g}"}),
        "ss_output_name": LORA_NAME,
        "ss_sd_model_name": "demo-shapes",
        "ss_base_model_version": "sd_v1",
        "ss_steps": str(settings.lora_steps),
        "ss_training_comment": f"microbatch-diffusion demo: teaches the demo model the shape '{CONCEPT_SHAPE}' (scripts/train_demo_lora.py)",
    }
    save_tensors(network.kohya_state_dict(), path, metadata)


# -- textual inversion ---------------------------------------------------------------------------------------------


def train_embedding(model: nn.Module, data: dict, settings: ConceptSettings) -> tuple[torch.Tensor, dict[str, Any]]:
    """Train `ti_vectors` vectors [n, C] for the word EMBEDDING_NAME with the model frozen, on `data` (encoded red
    shapes, label indices into embedding_labels()). Returns them (float32)."""
    from microbatch.embeddings import text_encoder

    encoder = text_encoder(model)
    tok = encoder.tokenizer
    table = encoder.embeddings()
    embedding = encoder.token_embedding_module()
    init_ids = tok.encode(settings.ti_init)
    if not init_ids:
        raise ValueError(f"ti_init {settings.ti_init!r} has no tokens")
    init = embedding.weight[[init_ids[k % len(init_ids)] for k in range(settings.ti_vectors)]].detach().clone()
    # The table turns the name in a caption into placeholder ids, exactly as at inference; the vectors are written
    # into the token-embedding output at those positions by a hook that keeps their gradient.
    entry = table.add(EMBEDDING_NAME, tok.encode(EMBEDDING_NAME), init)
    try:
        rows = [encoder.tokenize_weighted([[embedding_prompt(shape, background), 1.0]]).tokens[0] for _, shape, background in embedding_labels()]
    finally:
        table.remove(EMBEDDING_NAME)
    tokens = torch.tensor(rows, dtype=torch.long)
    placeholders = tokens >= table.vocab_size
    slots = tokens[placeholders] - entry.ids[0]
    if not bool((placeholders.sum(dim=1) == settings.ti_vectors).all()):
        raise AssertionError("every caption must hold the embedding's vectors once")
    vectors = nn.Parameter(init.clone())

    def put_vectors(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        output[placeholders] = vectors[slots].to(output.dtype)
        return output

    generator = torch.Generator().manual_seed(settings.seed + 2)
    opt = torch.optim.AdamW([vectors], lr=settings.ti_lr, weight_decay=0.0)
    handle = embedding.register_forward_hook(put_vectors)
    start, running, count, last_loss = time.perf_counter(), 0.0, 0, float("nan")
    try:
        for step in range(settings.ti_steps):
            for group in opt.param_groups:
                group["lr"] = cosine_lr(step, settings.ti_steps, settings.ti_lr, settings.warmup_steps)
            contexts = encoder.encode_chunk_tokens(tokens.masked_fill(placeholders, 0))
            z, labels = sample_batch(model, data, settings.ti_batch, generator)
            loss = eps_loss(model, z, contexts[labels], generator)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running, count = running + float(loss.detach()), count + 1
            if (step + 1) % settings.log_every == 0 or step + 1 == settings.ti_steps:
                elapsed = time.perf_counter() - start
                logger.info("embedding step %d/%d  loss %.4f  lr %.2e  %.2f s/step", step + 1, settings.ti_steps, running / count, opt.param_groups[0]["lr"], elapsed / (step + 1))
                last_loss, running, count = running / count, 0.0, 0
    finally:
        handle.remove()
    return vectors.detach().clone(), {"seconds": time.perf_counter() - start, "vectors": settings.ti_vectors, "final_loss": last_loss}


def save_embedding(vectors: torch.Tensor, path: Path, settings: ConceptSettings) -> None:
    """The web UI's .pt format (what its Train tab writes), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": vectors.detach().float().cpu()},
        "name": EMBEDDING_NAME,
        "step": settings.ti_steps,
        "sd_checkpoint": None,
        "sd_checkpoint_name": "demo-shapes",
    }
    tmp = path.with_name(path.name + ".partial")
    torch.save(data, tmp)
    tmp.chmod(0o644)
    tmp.replace(path)


# -- the whole run -------------------------------------------------------------------------------------------------


def train_concept(settings: ConceptSettings) -> dict[str, Any]:
    """Train the LoRA and / or the embedding and write them under `settings.out`; returns a summary."""
    torch.set_flush_denormal(True)  # see microbatch.demo.train.train: zero-initialised factors, subnormal grads
    try:
        return _train_concept(settings)
    finally:
        torch.set_flush_denormal(False)


def _train_concept(settings: ConceptSettings) -> dict[str, Any]:
    torch.set_num_threads(settings.threads)
    total = time.perf_counter()
    summary: dict[str, Any] = {"settings": {k: str(v) for k, v in dataclasses.asdict(settings).items()}}
    model = load_base(settings.ckpt)
    summary["encode_seconds"] = 0.0
    if settings.which in ("both", "lora"):
        concept_labels = shape_combinations(CONCEPT_SHAPE)
        t0 = time.perf_counter()
        concept = encode_images(model, settings.n_concept, _CONCEPT_DATA + settings.seed * 100_000, (CONCEPT_SHAPE,), concept_labels)
        logger.info("encoded %d %s images in %.0f s", settings.n_concept, CONCEPT_SHAPE, time.perf_counter() - t0)
        replay = encode_images(model, settings.n_replay, _REPLAY_DATA + settings.seed * 100_000, SHAPES, all_combinations())
        prompts = [caption(*label) for label in concept_labels] + [caption(*label) for label in all_combinations()] + [""]
        with torch.no_grad():
            contexts = model.get_learned_conditioning(prompts).float()
        summary["encode_seconds"] += time.perf_counter() - t0
        network, summary["lora"] = train_lora(model, concept, replay, contexts, settings)
        path = lora_path(settings.out)
        save_lora(network, path, settings)
        summary["lora"].update(path=str(path), kilobytes=path.stat().st_size / 1024)
        logger.info("wrote %s (%.0f KB, %d parameters) in %.0f s", path, summary["lora"]["kilobytes"], summary["lora"]["parameters"], summary["lora"]["seconds"])
    if settings.which in ("both", "embedding"):
        t0 = time.perf_counter()
        data = encode_images(model, settings.n_embedding, _EMBEDDING_DATA + settings.seed * 100_000, SHAPES, embedding_labels(), colors=(EMBEDDING_COLOR,))
        summary["encode_seconds"] += time.perf_counter() - t0
        logger.info("encoded %d %s shapes in %.0f s", settings.n_embedding, EMBEDDING_COLOR, time.perf_counter() - t0)
        vectors, summary["embedding"] = train_embedding(model, data, settings)
        path = embedding_path(settings.out)
        save_embedding(vectors, path, settings)
        summary["embedding"].update(path=str(path), kilobytes=path.stat().st_size / 1024)
        logger.info("wrote %s (%.1f KB) in %.0f s", path, summary["embedding"]["kilobytes"], summary["embedding"]["seconds"])
    summary["total_seconds"] = time.perf_counter() - total
    return summary
