"""SDXL checkpoints: recognising base and refiner files from their keys and choosing the shipped config.

Layouts (the published `sd_xl_base_1.0.safetensors` / `sd_xl_refiner_1.0.safetensors`):
- base: CLIP ViT-L at `conditioner.embedders.0.transformer.*` and OpenCLIP ViT-bigG at `conditioner.embedders.1.model.*`,
  2048-wide context, adm vector of 2816 (`model.diffusion_model.label_emb.0.0.weight` [1280, 2816]).
- refiner: OpenCLIP ViT-bigG alone at `conditioner.embedders.0.model.*`, 1280-wide context, adm vector of 2560.
A candidate config is accepted when the model it builds (on the meta device: nothing allocated) has every weight of
the file with the same shape.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal, Optional

import torch

from ldm.checkpoint import CheckpointError
from ldm.util import load_config
from microbatch.loading import builtin_config, layout_differences

logger = logging.getLogger(__name__)

SDXLKind = Literal["base", "refiner"]
# Tried in order: the published config, then the tiny test model of the same layout.
SDXL_CANDIDATES: dict[str, tuple[str, ...]] = {
    "base": ("sdxl/sd_xl_base.yaml", "tiny/tiny-sdxl-base.yaml"),
    "refiner": ("sdxl/sd_xl_refiner.yaml", "tiny/tiny-sdxl-refiner.yaml"),
}
_CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
_LABEL_EMB = "model.diffusion_model.label_emb.0.0.weight"
_CLIP_L_TOKENS = "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"
_BIGG_TOKENS = {"base": "conditioner.embedders.1.model.token_embedding.weight", "refiner": "conditioner.embedders.0.model.token_embedding.weight"}


def sdxl_kind(state_dict: dict[str, torch.Tensor]) -> Optional[SDXLKind]:
    """"base" or "refiner" from the text encoders' keys, None for a file without SDXL's conditioner."""
    if _CLIP_L_TOKENS in state_dict and _BIGG_TOKENS["base"] in state_dict:
        return "base"
    if _BIGG_TOKENS["refiner"] in state_dict and _CLIP_L_TOKENS not in state_dict:
        return "refiner"
    return None


def _describe(kind: SDXLKind, state_dict: dict[str, torch.Tensor]) -> str:
    encoders = "CLIP ViT-L + OpenCLIP (conditioner.embedders.0 / .1)" if kind == "base" else "OpenCLIP alone (conditioner.embedders.0)"
    parts = [encoders]
    ctx = state_dict.get("model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight")
    if ctx is not None:
        parts.append(f"{ctx.shape[1]}-wide context")
    if _LABEL_EMB in state_dict:
        parts.append(f"adm vector of {state_dict[_LABEL_EMB].shape[1]}")
    return ", ".join(parts)


def infer_sdxl_config(state_dict: dict[str, torch.Tensor], source: str = "the checkpoint") -> Optional[tuple[Path, str]]:
    """(config path, reason) for an SDXL base or refiner checkpoint; None when the file is not SDXL.

    Raises CheckpointError when the keys say SDXL but no shipped config fits every weight shape.
    """
    kind = sdxl_kind(state_dict)
    if kind is None:
        return None
    what = _describe(kind, state_dict)
    conv_in = state_dict.get(_CONV_IN)
    tried = []
    for name in SDXL_CANDIDATES[kind]:
        path = builtin_config(name)
        unet = load_config(path).model.params.network_config.params
        if conv_in is not None and tuple(conv_in.shape[:2]) != (unet.model_channels, unet.in_channels):
            tried.append(f"{name}: UNet conv_in {tuple(conv_in.shape[:2])} vs ({unet.model_channels}, {unet.in_channels})")
            continue
        problems, compared = layout_differences(path, state_dict)
        if not problems:
            reason = f"{what}: SDXL {kind}; all {compared} tensor shapes match {name}"
            logger.info("config for %s: %s", source, reason)
            return path, reason
        tried.append(f"{name}: {len(problems)} differences, e.g. {problems[0]}")
    raise CheckpointError(
        f"cannot infer the model config of {source}: SDXL {kind} layout ({what}) but no shipped config fits. "
        f"Tried {'; '.join(tried)}. Pass --config with the matching yaml."
    )
