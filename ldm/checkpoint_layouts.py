"""The key layouts that checkpoint files come in, brought to the one our modules load strictly, and the files that
are not full checkpoints (a VAE, a UNet, a LoRA, an embedding) told apart with a one-line error.

Layouts accepted for a full checkpoint:
- the CompVis / Lightning layout (`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*`);
- the SD v1 text encoder without `text_model.` in its keys (`cond_stage_model.transformer.embeddings.*`, as saved
  by older transformers and many merges): renamed here, as the web UIs do on load;
- `position_ids` absent, stored as float, or corrupted by merging: dropped, the model uses arange (one note);
- fp16 / bf16 pruned files and EMA-only files (handled when loading: `ldm.checkpoint.load_weights_into`).

A separate VAE (`vae_weights`, `load_vae_file`) is a VAE-only file or a full checkpoint, its keys with or without
`first_stage_model.`; `loss.*` and `model_ema.*` keys are ignored.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Union

import torch

from ldm.checkpoint import CheckpointError, read_checkpoint

logger = logging.getLogger(__name__)

# Text-encoder prefixes of SD v1 files saved without CLIPTextModel's `text_model.` level.
_TE_ROOT = "cond_stage_model.transformer."
_TE_RENAMES = tuple(f"{_TE_ROOT}{part}" for part in ("embeddings.", "encoder.", "final_layer_norm."))

_UNET = "model.diffusion_model."
_VAE = "first_stage_model."
_TEXT = "cond_stage_model."
# Keys of a VAE saved on its own (AutoencoderKL's attribute names), and their loss / EMA bookkeeping.
_BARE_VAE = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
_VAE_IGNORED = ("loss.", "model_ema.")
# A UNet saved on its own, without `model.diffusion_model.`.
_BARE_UNET = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.")


def normalize_layout(state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The state dict with the SD v1 text encoder under `text_model.` and every `position_ids` key dropped.

    `position_ids` is arange(77) by definition and the model computes it; files hold it absent, as int64, as float
    (fp16 pruning) or corrupted (merges that averaged it, e.g. 75.9999 rounding down to 75, which shifts every
    position embedding after it). One note is logged when a stored copy is not an integer arange.
    """
    out: dict[str, torch.Tensor] = {}
    renamed = 0
    for key, value in state_dict.items():
        if key.startswith(_TE_RENAMES):
            new = _TE_ROOT + "text_model." + key[len(_TE_ROOT):]
            if new not in state_dict:
                key, renamed = new, renamed + 1
        out[key] = value
    if renamed:
        logger.info("%s: renamed %d text-encoder keys to cond_stage_model.transformer.text_model.* (the layout "
                    "without text_model., as the web UIs do)", source, renamed)
    bad = []
    for key in [k for k in out if k.endswith("position_ids")]:
        value = out.pop(key)
        problem = _position_ids_problem(value)
        if problem:
            bad.append(f"{key} {problem}")
    if bad:
        logger.info("%s: %s; using arange instead, as the model computes it", source, "; ".join(bad))
    return out


def _position_ids_problem(value: torch.Tensor) -> Optional[str]:
    """None when `value` is an integer arange [1, N] or [N]; else what is wrong with it."""
    flat = value.reshape(-1)
    expected = torch.arange(flat.numel())
    parts = []
    if value.is_floating_point():
        parts.append(f"is stored as {str(value.dtype).replace('torch.', '')}")
    wrong = (flat.double() != expected.double()).nonzero().reshape(-1)
    if wrong.numel():
        first = int(wrong[0])
        parts.append(f"differs from arange at {wrong.numel()} positions (position {first} holds {float(flat[first]):.6g})")
    return " and ".join(parts) or None


def _has(state_dict: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> int:
    return sum(1 for k in state_dict if k.startswith(prefixes))


def _lora_kind(state_dict: dict[str, torch.Tensor]) -> Optional[str]:
    keys = list(state_dict)
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys):
        return "kohya lora_unet_* / lora_te_* keys"
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        return "PEFT *.lora_A / *.lora_B keys"
    if any(part in k for k in keys for part in ("lora_down.", "lora_up.", "lora.down.", "lora.up.", "lora_linear_layer.")):
        return "lora_down / lora_up keys"
    if any(k.endswith((".hada_w1_a", ".lokr_w1")) for k in keys):
        return "LyCORIS LoHa / LoKr keys"
    return None


def what_file_is(state_dict: dict[str, torch.Tensor]) -> Optional[tuple[str, str]]:
    """(what the file is, what to do with it) for files that hold a part of a model or an add-on rather than a
    full checkpoint; None for a full checkpoint (or a damaged one, left to the strict key check to explain)."""
    unet = _has(state_dict, (_UNET, "model_ema.diffusion_model"))
    vae = _has(state_dict, (_VAE,))
    text = _has(state_dict, (_TEXT,))
    if _has(state_dict, ("control_model.",)):
        return "a ControlNet model (control_model.*)", "pass a full checkpoint"
    if unet and vae:
        return None  # a full model, perhaps with stray keys: the strict key check names them
    lora = _lora_kind(state_dict)
    if lora:
        return f"a LoRA ({lora})", "it modifies a base model; pass the base model's checkpoint"
    if "emb_params" in state_dict or ({"clip_l", "clip_g"} & set(state_dict) and len(state_dict) <= 2):
        key = "emb_params" if "emb_params" in state_dict else "clip_l / clip_g"
        return f"a textual-inversion embedding ({key})", "pass a full checkpoint"
    if not (unet or vae or text):
        if _has(state_dict, ("encoder.down_blocks.", "decoder.up_blocks.")):
            return "a VAE in the diffusers layout (encoder.down_blocks.*)", "convert it to the original layout to use it with --vae"
        if _has(state_dict, _BARE_VAE) and not _has(state_dict, _BARE_UNET):
            return "a VAE-only file", "pass it with --vae"
        if _has(state_dict, _BARE_UNET):
            return "a UNet-only file (input_blocks.* without model.diffusion_model.)", "pass a full checkpoint"
        if _has(state_dict, ("down_blocks.",)) and _has(state_dict, ("time_embedding.",)):
            return "a UNet in the diffusers layout (down_blocks.*)", "pass a full checkpoint in the original layout"
        if _has(state_dict, ("text_model.",)):
            return "a text-encoder-only file (text_model.*)", "pass a full checkpoint"
        return None
    if vae and not unet and not text:
        return "a VAE-only file (first_stage_model.*)", "pass it with --vae"
    if unet and not vae and not text:
        return "a UNet-only file (model.diffusion_model.*, no VAE or text encoder)", "pass a full checkpoint"
    if text and not unet and not vae:
        return "a text-encoder-only file (cond_stage_model.*)", "pass a full checkpoint"
    return None


def refuse_partial_checkpoint(state_dict: dict[str, torch.Tensor], source: str) -> None:
    """CheckpointError "x.safetensors is a VAE-only file, not a full checkpoint: pass it with --vae" (or a UNet,
    LoRA, embedding, ...) when `state_dict` is not a full model."""
    kind = what_file_is(state_dict)
    if kind is not None:
        what, advice = kind
        raise CheckpointError(f"{source} is {what}, not a full checkpoint: {advice}")


def read_model_checkpoint(path: Union[str, Path]) -> dict[str, torch.Tensor]:
    """Read a full checkpoint for building a model: `read_checkpoint`, refuse files that are not a full model,
    and bring the keys to the canonical layout (`normalize_layout`). Logs the global step when present."""
    state_dict, meta = read_checkpoint(path)
    if "global_step" in meta:
        logger.info("Global Step: %s", meta["global_step"])
    refuse_partial_checkpoint(state_dict, str(path))
    return normalize_layout(state_dict, str(path))


# ----------------------------------------------------------------------------------------------------------------
# A separate VAE


def vae_weights(state_dict: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The VAE part of a VAE-only file or a full checkpoint, keyed as AutoencoderKL's own state dict
    (`encoder.conv_in.weight`, ...): `first_stage_model.` stripped when present, `loss.*` and `model_ema.*`
    dropped. CheckpointError when the file holds no VAE in the original layout."""
    if any(k.startswith(_VAE) for k in state_dict):
        weights = {k[len(_VAE):]: v for k, v in state_dict.items() if k.startswith(_VAE)}
    else:
        weights = dict(state_dict)
    weights = {k: v for k, v in weights.items() if not k.startswith(_VAE_IGNORED)}
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in weights):
        raise CheckpointError(f"{source} holds no VAE weights (it is a VAE in the diffusers layout, encoder.down_blocks.*): convert it to the original layout")
    if not any(k.startswith(_BARE_VAE) for k in weights):
        kind = what_file_is(state_dict)
        what = f" (it is {kind[0]})" if kind else ""
        raise CheckpointError(f"{source} holds no VAE weights{what}: a VAE file has encoder.* / decoder.* keys, with or without first_stage_model.")
    return weights


def check_vae_fits(vae: torch.nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """Strict key and shape check of VAE `weights` against the model's VAE module; one-line CheckpointError."""
    own = vae.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    mismatched = [f"{k}: file {tuple(weights[k].shape)} vs model {tuple(own[k].shape)}" for k in own if k in weights and weights[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} weights missing, e.g. {', '.join(missing[:3])}")
    if mismatched:
        problems.append(f"{len(mismatched)} weights have the wrong shape, e.g. {'; '.join(mismatched[:2])}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected weights, e.g. {', '.join(unexpected[:3])}")
    if problems:
        raise CheckpointError(f"VAE {source} does not fit the model's VAE: {'; '.join(problems)}")


def load_vae_file(model: torch.nn.Module, path: Union[str, Path]) -> int:
    """Replace the VAE weights of `model` (a LatentDiffusion: `model.first_stage_model`) with those of the file
    at `path` (.ckpt / .pt / .safetensors; a VAE-only file or a full checkpoint). Returns the number of tensors
    loaded; tensors are cast to the VAE's dtype."""
    state_dict, _ = read_checkpoint(path)
    weights = vae_weights(state_dict, str(path))
    check_vae_fits(model.first_stage_model, weights, str(path))
    model.first_stage_model.load_state_dict(weights, strict=True)
    logger.info("VAE weights from %s (%d tensors) replace the checkpoint's", path, len(weights))
    return len(weights)
