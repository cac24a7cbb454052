"""Finding, configuring and loading a model for the scripts: checkpoint path, config (given, beside the file, or
inferred from the weights' shapes), precision per component and the attention backend."""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ldm.checkpoint import CheckpointError, describe_family, load_weights_into, read_checkpoint
from ldm.modules.attention_backends import AttentionBackend
from ldm.util import instantiate_from_config, load_config
from microbatch.devices import Dtypes

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


def infer_config(state_dict: dict[str, torch.Tensor], ckpt: Path) -> tuple[Path, str]:
    """(config path, reason) from the checkpoint's keys and shapes."""
    token = state_dict.get("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight")
    ctx = state_dict.get("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    conv_in = state_dict.get("model.diffusion_model.input_blocks.0.0.weight")
    if token is not None and ctx is not None and conv_in is not None:
        if tuple(token.shape) == (49408, 768) and ctx.shape[1] == 768 and tuple(conv_in.shape[:2]) == (320, 4):
            return builtin_config("stable-diffusion/v1-inference.yaml"), "CLIP ViT-L/14 text encoder, 768-wide context and a 320-channel 4-in UNet: SD v1.x"
    family = describe_family(state_dict)
    what = f" It looks like {family}." if family else ""
    raise CheckpointError(f"cannot infer the model config of {ckpt}.{what} Pass --config with the matching yaml.")


@dataclass
class LoadedModel:
    model: Any
    ckpt: Optional[Path]
    config_path: Optional[Path]
    config_reason: str
    dtypes: Dtypes
    load_seconds: float
    is_demo: bool = False
    _hash: Optional[str] = None

    @property
    def model_hash(self) -> str:
        """First 10 hex digits of the checkpoint file's sha256 (the web UIs' "Model hash"), computed once."""
        if self._hash is None:
            if self.ckpt is None:
                self._hash = "random"
            else:
                h = hashlib.sha256()
                with open(self.ckpt, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
                self._hash = h.hexdigest()[:10]
        return self._hash

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE factor times the UNet's total downsampling."""
        unet = self.model.model.diffusion_model
        vae_levels = self.model.first_stage_model.encoder.num_resolutions
        return 2 ** (vae_levels - 1) * 2 ** (len(unet.channel_mult) - 1)


def load_model(
    ckpt: Optional[Path],
    config: Optional[Path],
    device: torch.device,
    dtypes: Dtypes,
    attention: Optional[AttentionBackend] = None,
    use_ema: Optional[bool] = None,
    is_demo: bool = False,
) -> LoadedModel:
    """Read the checkpoint once, choose the config, build, load strictly, cast per component and move."""
    start = time.perf_counter()
    state_dict: Optional[dict[str, torch.Tensor]] = None
    if ckpt is not None:
        state_dict, meta = read_checkpoint(ckpt)
        if "global_step" in meta:
            logger.info("Global Step: %s", meta["global_step"])
    if config is not None:
        reason = "given with --config"
    elif ckpt is not None and ckpt.with_suffix(".yaml").is_file():
        config, reason = ckpt.with_suffix(".yaml"), "the yaml beside the checkpoint"
    elif state_dict is not None:
        config, reason = infer_config(state_dict, ckpt)
    else:
        raise ValueError("no checkpoint and no config: nothing to build")
    cfg = load_config(config)
    if "model" not in cfg:
        raise ValueError(f"config {config} has no `model` section")
    model = instantiate_from_config(cfg.model)
    if state_dict is not None:
        load_weights_into(model, state_dict, use_ema=model.use_ema if use_ema is None else use_ema, source=str(ckpt))
        del state_dict
    model.requires_grad_(False).eval()
    model.model.to(dtypes.unet)
    model.cond_stage_model.to(dtypes.text)
    model.first_stage_model.to(dtypes.vae)
    model.to(device)
    if attention is not None:
        model.set_attention(attention)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return LoadedModel(model, ckpt, Path(config), reason, dtypes, time.perf_counter() - start, is_demo)
