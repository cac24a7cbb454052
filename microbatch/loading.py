"""Finding, configuring and loading a model for the scripts: checkpoint path, config (given, beside the file, or
inferred from the weights' shapes: the one place of config inference), a separate VAE (given, or
`<stem>.vae.*` beside the checkpoint), precision per component and the attention backend. Reading and building go
through the one loader in `ldm` (`ldm.checkpoint_layouts.read_model_checkpoint`, `ldm.util.build_model`)."""
from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ldm.checkpoint import CheckpointError, describe_family
from ldm.checkpoint_layouts import read_model_checkpoint
from ldm.modules.attention_backends import AttentionBackend
from ldm.util import build_model, instantiate_from_config, load_config
from microbatch.devices import Dtypes, peak_memory_mb

logger = logging.getLogger(__name__)

DEFAULT_CKPT = Path("models/ldm/stable-diffusion-v1/model.ckpt")
_REPO_ROOT = Path(__file__).resolve().parents[1]


def configs_dir() -> Path:
    """The shipped configs: installed package data, or the repository's configs/ folder."""
    installed = Path(__file__).resolve().parent / "configs"
    return installed if (installed / "stable-diffusion").is_dir() else _REPO_ROOT / "configs"


def builtin_config(name: str) -> Path:
    return configs_dir() / name


def demo_checkpoint() -> Optional[Path]:
    """The embedded demo model, when this installation has it."""
    path = Path(__file__).resolve().parent / "assets" / "demo-shapes.safetensors"
    return path if path.is_file() else None


# Shipped configs by text-encoder family and UNet input channels (4 plain, 9 inpainting), tried in order: the
# published one, then the tiny test model of the same layout. All are eps configs; the v-prediction variant is
# chosen after loading (see below).
SD1_CANDIDATES: dict[int, tuple[str, ...]] = {
    4: ("stable-diffusion/v1-inference.yaml", "tiny/tiny-v1.yaml"),
    9: ("stable-diffusion/v1-inpainting-inference.yaml", "tiny/tiny-v1-inpainting.yaml"),
}
SD2_CANDIDATES: dict[int, tuple[str, ...]] = {
    4: ("stable-diffusion/v2-inference.yaml", "tiny/tiny-v2.yaml"),
    9: ("stable-diffusion/v2-inpainting-inference.yaml", "tiny/tiny-v2-inpainting.yaml"),
}
# eps config -> (its v-prediction variant, native latent size of the v models or None to keep the config's).
# SD 2.x v models are the 768 ones: the published v2-inference-v.yaml keeps image_size 64 (the original scripts
# are run with --H 768 --W 768), so an inferred v config gets image_size 96 to make 768 the default size.
V_VARIANTS: dict[str, tuple[str, Optional[int]]] = {
    "stable-diffusion/v2-inference.yaml": ("stable-diffusion/v2-inference-v.yaml", 96),
    "tiny/tiny-v2.yaml": ("tiny/tiny-v2-v.yaml", None),
}
_UNET_CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
_UNET_CONTEXT = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
_OPENCLIP_TOKENS = "cond_stage_model.model.token_embedding.weight"
_CLIP_TOKENS = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"


def layout_differences(config: Path, state_dict: dict[str, torch.Tensor]) -> tuple[list[str], int]:
    """Build `config`'s model on the meta device (nothing allocated) and compare its state dict's names and shapes
    with the file's: (differences, tensors compared). Buffers the model computes itself may be absent from the file."""
    with torch.device("meta"):
        model = instantiate_from_config(load_config(config).model)
    computed = {name for name, _ in model.named_buffers()}
    problems, compared = [], 0
    for key, value in model.state_dict().items():
        if key not in state_dict:
            if key not in computed:
                problems.append(f"{key} missing")
            continue
        compared += 1
        if tuple(state_dict[key].shape) != tuple(value.shape):
            problems.append(f"{key}: file {tuple(state_dict[key].shape)} vs config {tuple(value.shape)}")
    return problems, compared


def _shape_mismatches(config: Path, state_dict: dict[str, torch.Tensor]) -> Optional[tuple[list[str], int]]:
    """`layout_differences` of an SD 1 / 2 yaml, or None when its UNet cannot fit (checked first, cheaply)."""
    cfg = load_config(config)
    unet = cfg.model.params.unet_config.params
    conv_in, ctx = state_dict[_UNET_CONV_IN], state_dict.get(_UNET_CONTEXT)
    if (unet.model_channels, unet.in_channels) != tuple(conv_in.shape[:2]) or (ctx is not None and unet.context_dim != ctx.shape[1]):
        return None
    return layout_differences(config, state_dict)


def infer_config(state_dict: dict[str, torch.Tensor], ckpt: Path) -> tuple[Path, str]:
    """(config path, reason) from the checkpoint's keys and shapes (keys in the canonical layout, as
    `read_model_checkpoint` returns them).

    The text encoder names the family: CLIP's (`cond_stage_model.transformer.text_model.*`) SD v1.x, OpenCLIP's
    (`cond_stage_model.model.*`) SD 2.x. The UNet's input channels pick plain (4) or inpainting (9: latent, mask,
    masked-image latent), and the candidate whose every weight shape matches (built on the meta device) wins. eps
    vs v is decided after loading.
    """
    from microbatch.sdxl import infer_sdxl_config  # SDXL base / refiner (conditioner.embedders.*)

    if (sdxl := infer_sdxl_config(state_dict, str(ckpt))) is not None:
        return sdxl
    ctx = state_dict.get(_UNET_CONTEXT)
    conv_in = state_dict.get(_UNET_CONV_IN)
    families = (
        (_CLIP_TOKENS, SD1_CANDIDATES, "CLIP text encoder (cond_stage_model.transformer.*)", "SD v1.x"),
        (_OPENCLIP_TOKENS, SD2_CANDIDATES, "OpenCLIP text encoder (cond_stage_model.model.*)", "SD 2.x"),
    )
    for tokens, candidates, encoder, family in families:
        if tokens not in state_dict or conv_in is None or int(conv_in.shape[1]) not in candidates:
            continue
        in_ch = int(conv_in.shape[1])
        kind = "inpainting UNet (9 input channels: latent, mask, masked-image latent)" if in_ch == 9 else "4-channel UNet"
        width = f"{ctx.shape[1]}-wide context" if ctx is not None else "no cross-attention"
        tried = []
        for name in candidates[in_ch]:
            result = _shape_mismatches(builtin_config(name), state_dict)
            if result is None:
                continue
            problems, compared = result
            if not problems:
                return builtin_config(name), f"{encoder}, {width}, {kind}: {family} layout; all {compared} tensor shapes match {name}"
            tried.append(f"{name}: {len(problems)} differences, e.g. {problems[0]}")
        detail = f" Tried {'; '.join(tried)}." if tried else ""
        raise CheckpointError(f"cannot infer the model config of {ckpt}: {family} layout ({width}, {kind}) but no shipped config fits.{detail} Pass --config with the matching yaml.")
    family = describe_family(state_dict)
    what = f" It looks like {family}." if family else ""
    raise CheckpointError(f"cannot infer the model config of {ckpt}.{what} Pass --config with the matching yaml.")


# -- eps or v: one UNet evaluation on pure noise --------------------------------------------------------------------
#
# At t = 999 (alphas_cumprod a = 0.00466) the UNet input x_t is almost pure noise. The statistic is the slope of the
# least-squares fit of the output on the input, slope = <out, x_t> / <x_t, x_t>, for one x_t ~ N(0, I).
#   eps model: the noise is nearly all of x_t. For data of std s the ideal output is E[eps | x_t] =
#     sqrt(1 - a) x_t / (a s^2 + 1 - a): slope 0.998 at s = 1, above 0.5 for any s < ~14.
#   v model: v = sqrt(a) eps - sqrt(1 - a) x0; its noise part is scaled by sqrt(a) = 0.068 and its x0 part hardly
#     depends on the noise. Ideal output for Gaussian data: sqrt(a (1 - a)) (1 - s^2) / (a s^2 + 1 - a) x_t, so the
#     slope is 0 at s = 1, at most 0.068 for any s, and negative for s > 1.
# SD latents are scaled to std ~1. The threshold sits halfway: slope >= 0.5 -> eps, else v.
DETECTION_TIMESTEP = 999
EPS_SLOPE_THRESHOLD = 0.5


def output_input_slope(model_fn: Any, x_t: torch.Tensor, t: int = DETECTION_TIMESTEP) -> float:
    """<out, x_t> / <x_t, x_t> for out = model_fn(x_t, timesteps [B] = t), accumulated in float64."""
    timesteps = torch.full((x_t.shape[0],), t, dtype=torch.long, device=x_t.device)
    with torch.no_grad():
        out = model_fn(x_t, timesteps)
    x, out = x_t.double(), out.double()
    return float((out * x).sum() / (x * x).sum())


def parameterization_from_slope(slope: float) -> str:
    if not math.isfinite(slope):
        raise ValueError(f"cannot tell eps from v: the UNet output on pure noise is not finite (slope {slope})")
    return "eps" if slope >= EPS_SLOPE_THRESHOLD else "v"


def detect_parameterization(model: Any, seed: int = 0) -> tuple[str, float]:
    """("eps" or "v", slope) for a loaded LatentDiffusion, from one UNet call at t = 999 on seeded N(0, I) latents
    (up to 32x32) with the empty prompt as context; inpainting models get all-zero extra channels."""
    unet = model.model.diffusion_model
    multiple = 2 ** (len(unet.channel_mult) - 1)
    size = max(multiple, min(int(model.image_size), 32) // multiple * multiple)
    generator = torch.Generator().manual_seed(seed)
    x_t = torch.randn((1, model.channels, size, size), generator=generator).to(model.device)
    with torch.no_grad():
        context = model.get_learned_conditioning([""])
    cond: Any = context
    if unet.in_channels != model.channels:
        extra = torch.zeros((1, unet.in_channels - model.channels, size, size), device=model.device)
        cond = {"c_concat": [extra], "c_crossattn": [context]}
    slope = output_input_slope(lambda x, t: model.apply_model(x, t, cond), x_t)
    return parameterization_from_slope(slope), slope


def settle_parameterization(
    model: Any, config: Path, reason: str, inferred: bool, requested: Optional[str], ckpt: Optional[Path]
) -> tuple[Path, str]:
    """Set model.parameterization: as requested, else detected when the config was inferred, else the config's.
    For an inferred config, a v model reports the config's v variant and takes its family's native size."""
    if requested in (None, "auto"):
        if not inferred:
            return config, reason
        start = time.perf_counter()
        choice, slope = detect_parameterization(model)
        why = (
            f"{choice}-prediction: UNet output/input slope {slope:.3f} on pure noise at t={DETECTION_TIMESTEP} "
            f"(eps ~1, v ~0; threshold {EPS_SLOPE_THRESHOLD}; --parameterization overrides)"
        )
        logger.info("parameterization of %s: %s, measured in %.1f s", ckpt, why, time.perf_counter() - start)
    else:
        choice, why = requested, f"{requested}-prediction (given with --parameterization)"
    if model.parameterization != choice:
        logger.info("using %s-prediction instead of the config's %s", choice, model.parameterization)
    model.parameterization = choice
    if inferred and choice == "v":
        name = next((n for n in V_VARIANTS if builtin_config(n) == config), None)
        if name is not None:
            v_name, native = V_VARIANTS[name]
            config = builtin_config(v_name)
            if native is not None and model.image_size != native:
                model.image_size = native
                why += f"; native size {native * vae_factor_of(model)} (768-v family)"
    return config, f"{reason}; {why}"


def vae_factor_of(model: Any) -> int:
    """The VAE's downsampling factor f of a LatentDiffusion (8 for SD): images [B, 3, H, W] <-> latents
    [B, C, H/f, W/f]. The one place it is computed."""
    return 2 ** (model.first_stage_model.encoder.num_resolutions - 1)


def file_sha256(path: Path) -> str:
    """The file's sha256 as hex, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_hash(path: Path) -> str:
    """First 10 hex digits of the file's sha256: the web UIs' "Model hash" and "VAE hash"."""
    return file_sha256(path)[:10]


VAE_SUFFIXES = (".pt", ".ckpt", ".safetensors")


def find_vae_beside(ckpt: Path) -> Optional[Path]:
    """`<checkpoint without its suffix>.vae.{pt,ckpt,safetensors}` beside the checkpoint, first found in that
    order, as the AUTOMATIC1111 web UI picks a model's own VAE; None when there is none."""
    for suffix in VAE_SUFFIXES:
        candidate = ckpt.with_name(ckpt.stem + ".vae" + suffix)
        if candidate.is_file():
            return candidate
    return None


def check_vae_path(path: Path) -> Path:
    """A `--vae` path checked before loading (exists, a non-empty file, a .pt / .ckpt / .safetensors name);
    CheckpointError with one line otherwise. The weights themselves are checked when loading."""
    path = Path(path)
    if path.suffix not in VAE_SUFFIXES + (".pth", ".bin"):
        raise CheckpointError(f"--vae {path}: expected a .pt, .ckpt or .safetensors file")
    if not path.is_file():
        raise CheckpointError(f"VAE file not found: {path}" if not path.exists() else f"VAE path is not a file: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"VAE file is empty: {path}")
    return path


@dataclass
class LoadedModel:
    model: Any
    ckpt: Optional[Path]
    config_path: Optional[Path]
    config_reason: str
    dtypes: Dtypes
    load_seconds: float
    is_demo: bool = False
    default_scale: Optional[float] = None  # the config's sampling_defaults.scale, when it recommends one
    peak_memory_mb: Optional[float] = None  # the device's peak memory up to the end of the load (RSS on a CPU)
    _hash: Optional[str] = None
    vae_path: Optional[Path] = None  # a separate VAE file whose weights replaced the checkpoint's
    _vae_hash: Optional[str] = None

    @property
    def model_hash(self) -> str:
        """First 10 hex digits of the checkpoint file's sha256 (the web UIs' "Model hash"), computed once."""
        if self._hash is None:
            self._hash = "random" if self.ckpt is None else file_hash(self.ckpt)
        return self._hash

    @property
    def vae_hash(self) -> Optional[str]:
        """First 10 hex digits of the separate VAE file's sha256, as the AUTOMATIC1111 web UI's "VAE hash" (its
        `sd_vae.get_loaded_vae_hash`: sha256 of the whole file, [0:10]); None without a separate VAE."""
        if self.vae_path is None:
            return None
        if self._vae_hash is None:
            self._vae_hash = file_hash(self.vae_path)
        return self._vae_hash

    @property
    def vae_name(self) -> Optional[str]:
        """The separate VAE's file name (the web UI's "VAE" field), None without one."""
        return self.vae_path.name if self.vae_path is not None else None

    @property
    def unet(self) -> Any:
        """The UNet module (`model.model.diffusion_model`)."""
        return self.model.model.diffusion_model

    @property
    def vae_factor(self) -> int:
        """Images are this many times larger than latents on each side (8 for SD)."""
        return vae_factor_of(self.model)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE factor times the UNet's total downsampling."""
        return self.vae_factor * 2 ** (len(self.unet.channel_mult) - 1)


def load_model(
    ckpt: Optional[Path],
    config: Optional[Path],
    device: torch.device,
    dtypes: Dtypes,
    attention: Optional[AttentionBackend] = None,
    use_ema: Optional[bool] = None,
    is_demo: bool = False,
    parameterization: Optional[str] = None,
    vae: Optional[Path] = None,
    vae_beside: bool = True,
) -> LoadedModel:
    """Read the checkpoint once, choose the config, build, load strictly, cast per component and move.

    `parameterization` ("eps" or "v") overrides the config's; None / "auto" keeps a given config's and, when the
    config is inferred from the checkpoint, measures it with one UNet evaluation (`detect_parameterization`).
    `vae`: a VAE-only file or a full checkpoint whose VAE replaces the checkpoint's; None picks up
    `<checkpoint stem>.vae.{pt,ckpt,safetensors}` beside the checkpoint (logged) unless `vae_beside` is False.
    """
    if parameterization not in (None, "auto", "eps", "v"):
        raise ValueError(f"parameterization must be auto, eps or v, got {parameterization!r}")
    start = time.perf_counter()
    if vae is not None:
        vae = check_vae_path(Path(vae))
    elif ckpt is not None and vae_beside:
        vae = find_vae_beside(Path(ckpt))
        if vae is not None:
            logger.info("using the VAE beside the checkpoint: %s", vae)
    state_dict = read_model_checkpoint(ckpt) if ckpt is not None else None
    inferred = False
    if config is not None:
        reason = "given with --config"
    elif ckpt is not None and ckpt.with_suffix(".yaml").is_file():
        config, reason = ckpt.with_suffix(".yaml"), "the yaml beside the checkpoint"
    elif state_dict is not None:
        config, reason = infer_config(state_dict, ckpt)
        inferred = True
    else:
        raise ValueError("no checkpoint and no config: nothing to build")
    cfg = load_config(config)
    if "model" not in cfg:
        raise ValueError(f"config {config} has no `model` section")
    default_scale = recommended_scale(cfg, config)
    model = build_model(cfg, state_dict, source=str(ckpt), use_ema=use_ema, vae=vae)
    del state_dict
    model.model.to(dtypes.unet)
    model.cond_stage_model.to(dtypes.text)
    model.first_stage_model.to(dtypes.vae)
    model.to(device)
    if attention is not None:
        model.set_attention(attention)
    config, reason = settle_parameterization(model, Path(config), reason, inferred, parameterization, ckpt)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return LoadedModel(model, ckpt, Path(config), reason, dtypes, seconds, is_demo, default_scale, peak_memory_mb=peak_memory_mb(device)[0], vae_path=vae)


def recommended_scale(cfg: Any, config: Any) -> Optional[float]:
    """A config's own default guidance scale: the optional top-level block `sampling_defaults: {scale: S}` (not
    in the published configs; the demo model's yaml has one). The scripts use it when --scale is not given."""
    block = cfg.get("sampling_defaults")
    if block is None:
        return None
    if not hasattr(block, "keys") or set(block.keys()) - {"scale"}:
        raise ValueError(f"config {config}: sampling_defaults may only set `scale`, got {block}")
    if "scale" not in block:
        return None
    scale = block["scale"]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"config {config}: sampling_defaults.scale must be a finite number, got {scale!r}")
    return float(scale)
