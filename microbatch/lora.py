"""LoRA and LyCORIS networks merged into an SD 1.x / 2.x or SDXL model's weights, removable bit-exactly.

Formats: kohya LoRA (`lora_unet_*` / `lora_te_*`, SDXL `lora_te1_*` / `lora_te2_*`, with `.lora_down` /
`.lora_up` / `.alpha`, LoCon convolutions with `.lora_mid`), LyCORIS LoHa (`.hada_w1_a` ...) and LoKr
(`.lokr_w1` ...), and diffusers / PEFT files (`unet.*` / `text_encoder.*`, SDXL also `text_encoder_2.*`, with
`.lora_A` / `.lora_B`, `.lora.down` / `.lora.up`, `.lora_linear_layer.*`).

Kohya's SD 1.x / 2.x files name layers by the diffusers module path with dots flattened to underscores
(`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`); its SDXL files by the original sgm path
(`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`, `lora_unet_label_emb_0_0`), as the web UI reads
them. Our modules keep the original names, so both spellings are indexed: the ldm name itself and the diffusers
name derived from the UNet's block layout (per-level residual block counts; SDXL's first level has no attention,
`label_emb.0.0` / `.0.2` is `add_embedding.linear_1` / `_2`). Text encoders: SD 1.x's CLIP and SDXL's CLIP ViT-L
(`lora_te1_`, diffusers `text_encoder.`) are transformers' CLIPTextModel, named as the trainers see them; the
OpenCLIP towers of SD 2.x and SDXL (ViT-bigG: `lora_te2_`, `text_encoder_2.`) keep q, k and v in one
`in_proj_weight` [3W, W], so a LoRA trained on the transformers text model's separate `q_proj` / `k_proj` /
`v_proj` lands on row slices of it, `out_proj` on `attn.out_proj`, `mlp.fc1` / `fc2` on `mlp.c_fc` / `c_proj`.
The SDXL refiner's only text encoder (bigG, `conditioner.embedders.0`) is `te2` as well.

Merging, not hooking: applying computes each layer's delta once (W' = W + multiplier * scale * delta) and a step
costs nothing extra. The original of every touched weight is kept (by default in CPU memory); each change
recomputes W' = W + the deltas of the networks still applied, in application order, so removing networks in any
order gives the same bits as applying only the rest, and removing the last one copies the original back.
Measured (CPU, 1 thread): the tiny test model, a 103-layer LoCon file: apply 46 ms with the file read, remove
3 ms, a step unchanged. Full-size SD 1.x in float32 (`python scripts/benchmark.py --kinds lora --precision fp32
--repeats 4 --threads 2`: random weights, a random rank-32 kohya file at kohya's default targets, applied and
removed 5 times, file read included): a LoRA touches 264 weights (192 UNet transformer layers, 72 text; 352 M
values, so 1.3 GB of float32 originals kept) and takes 1.45 s per application (median; the first 3.8 s), 0.13 s to
remove; a LoCon 350 weights (also every ResBlock, down- and upsampler layer; 942 M values, 3.6 GB kept): 5.7 s
(first 11.1 s), 0.38 s to remove; the weights come back bit-identical. Full-size SDXL base, kohya's
default targets (every transformer block's linears and proj_in / proj_out, both text encoders' attention and MLP
linears: 986 layers on 922 weights, bigG's q / k / v sharing in_proj_weight): 2.92 G values, nearly the whole
UNet, so 5.4 GiB of bf16 / fp16 originals kept; measured the same way (`--cases sdxl --kinds lora --repeats 2`,
bf16, 2 threads): 10.4 s per application (the first 18.4 s), 0.50 s to remove, bit-identical after; a LoCon
(988 weights, 3.27 G values) 9.2 s (first 21.8 s), 0.56 s to remove.
Deltas are made on the weight's device (a GPU model merges on the GPU).
"""
from __future__ import annotations

import functools
import hashlib
import logging
import math
import re
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

logger = logging.getLogger(__name__)

DEFAULT_LORA_DIR = Path("models/Lora")
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")

# Factor names after a layer's key, longest first so that ".lora_A.weight" wins over shorter endings.
_SUFFIXES = (
    "lora_linear_layer.down.weight", "lora_linear_layer.up.weight",
    "lora_down.weight", "lora_up.weight", "lora_mid.weight",
    "lora.down.weight", "lora.up.weight", "lora_A.weight", "lora_B.weight",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
    "alpha", "scale", "dora_scale",
    "down.weight", "up.weight",  # diffusers' attention-processor files: `attn1.processor.to_q_lora.down.weight`
)
_SUFFIXES = tuple(sorted(_SUFFIXES, key=len, reverse=True))
# Canonical factor names: the diffusers / PEFT spellings of down and up.
_CANON = {
    "lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
    "lora.down.weight": "lora_down.weight", "lora.up.weight": "lora_up.weight",
    "lora_linear_layer.down.weight": "lora_down.weight", "lora_linear_layer.up.weight": "lora_up.weight",
    "down.weight": "lora_down.weight", "up.weight": "lora_up.weight",
}
_FAMILY_BY_WIDTH = {768: "SD 1.x", 1024: "SD 2.x", 1280: "SDXL", 2048: "SDXL"}


# ----------------------------------------------------------------------------------------------------------------
# Layer names


@dataclass(frozen=True)
class _Target:
    """Where a network layer lands: a parameter of the model, whole or a block of rows (q, k or v of OpenCLIP's
    in_proj_weight), and whether it belongs to the text encoder (te multiplier) or the UNet."""

    param: str
    rows: Optional[tuple[int, int]]
    text: bool


def _resblock_names(prefix: str) -> dict[str, str]:
    return {
        "in_layers.0": f"{prefix}.norm1", "in_layers.2": f"{prefix}.conv1", "emb_layers.1": f"{prefix}.time_emb_proj",
        "out_layers.0": f"{prefix}.norm2", "out_layers.3": f"{prefix}.conv2", "skip_connection": f"{prefix}.conv_shortcut",
    }


def _unet_block_prefixes(unet: torch.nn.Module) -> dict[str, str]:
    """ldm block path -> diffusers block path, from the UNet's per-level residual block counts: level L of the
    input side holds `num_res_blocks[L]` blocks then a downsampler (all but the last level); up block u (level
    `levels - 1 - u`) holds `num_res_blocks + 1` blocks, the last one ending in an upsampler (all but level 0)."""
    nrb = list(unet.num_res_blocks)
    levels = len(nrb)
    out = {"input_blocks.0.0": "conv_in"}
    idx = 1
    for level in range(levels):
        for j in range(nrb[level]):
            out[f"input_blocks.{idx}.0"] = f"down_blocks.{level}.resnets.{j}"
            out[f"input_blocks.{idx}.1"] = f"down_blocks.{level}.attentions.{j}"
            idx += 1
        if level != levels - 1:
            out[f"input_blocks.{idx}.0"] = f"down_blocks.{level}.downsamplers.0"
            idx += 1
    out.update({"middle_block.0": "mid_block.resnets.0", "middle_block.1": "mid_block.attentions.0", "middle_block.2": "mid_block.resnets.1"})
    idx = 0
    for up in range(levels):
        level = levels - 1 - up
        for j in range(nrb[level] + 1):
            out[f"output_blocks.{idx}.0"] = f"up_blocks.{up}.resnets.{j}"
            out[f"output_blocks.{idx}.1"] = f"up_blocks.{up}.attentions.{j}"
            if level and j == nrb[level]:
                # the upsampler is the block's last child: .1 without attention at this level, .2 with it
                out[f"output_blocks.{idx}.1@up"] = f"up_blocks.{up}.upsamplers.0"
                out[f"output_blocks.{idx}.2"] = f"up_blocks.{up}.upsamplers.0"
            idx += 1
    return out


def _unet_diffusers_name(ldm_name: str, unet: torch.nn.Module, blocks: dict[str, str]) -> Optional[str]:
    """The diffusers module path of an ldm UNet module path (relative to `diffusion_model`), or None."""
    top = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
           "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",  # SDXL's adm MLP
           "out.0": "conv_norm_out", "out.2": "conv_out", "input_blocks.0.0": "conv_in"}
    if ldm_name in top:
        return top[ldm_name]
    parts = ldm_name.split(".")
    if parts[0] == "middle_block":
        block, rest = ".".join(parts[:2]), parts[2:]
    elif parts[0] in ("input_blocks", "output_blocks"):
        block, rest = ".".join(parts[:3]), parts[3:]
    else:
        return None
    child = unet.get_submodule(block)
    kind = type(child).__name__
    if kind in ("Upsample", "Downsample"):
        key = block + "@up" if kind == "Upsample" and block.endswith(".1") else block
        prefix = blocks.get(key)
        return f"{prefix}.conv" if prefix and rest in (["conv"], ["op"]) else None
    prefix = blocks.get(block)
    if prefix is None:
        return None
    rest_name = ".".join(rest)
    if kind == "ResBlock":
        return _resblock_names(prefix).get(rest_name)
    return f"{prefix}.{rest_name}"


def _flat(name: str) -> str:
    return name.replace(".", "_")


def is_sdxl_model(model: torch.nn.Module) -> bool:
    """Whether `model` is an SDXL DiffusionEngine (base or refiner): text encoders under `conditioner.embedders`."""
    return hasattr(model, "conditioner") and hasattr(model.conditioner, "embedders")


def _text_encoders(model: torch.nn.Module) -> list[tuple[str, str, torch.nn.Module]]:
    """(index prefix, parameter path, module) of each text encoder: SD 1.x / 2.x's `cond_stage_model` as "te";
    SDXL's CLIP ViT-L as "te1" and OpenCLIP bigG as "te2" at their `conditioner.embedders.N` paths (the
    refiner has bigG only, at N = 0)."""
    if not is_sdxl_model(model):
        return [("te", "cond_stage_model", model.cond_stage_model)]
    out = []
    for i, embedder in enumerate(model.conditioner.embedders):
        if hasattr(embedder, "transformer"):
            out.append(("te1", f"conditioner.embedders.{i}", embedder))
        elif hasattr(getattr(embedder, "model", None), "transformer"):
            out.append(("te2", f"conditioner.embedders.{i}", embedder))
    return out


def _layer_index(model: torch.nn.Module) -> dict[str, _Target]:
    """Flattened layer name (kohya style, without `lora_unet_` / `lora_te_`) -> target parameter. UNet layers
    appear under their diffusers name and their ldm name (kohya's SDXL files use the latter); text-encoder layers
    under the transformers CLIP name (`text_model_encoder_layers_0_self_attn_q_proj`), keyed "te:" (SD 1.x /
    2.x), "te1:" (SDXL's CLIP ViT-L) or "te2:" (SDXL's OpenCLIP bigG)."""
    index: dict[str, _Target] = {}
    unet = model.model.diffusion_model
    blocks = _unet_block_prefixes(unet)
    for name, module in unet.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() not in (2, 4):
            continue
        target = _Target(f"model.diffusion_model.{name}.weight", None, False)
        index["unet:" + _flat(name)] = target
        diffusers = _unet_diffusers_name(name, unet, blocks)
        if diffusers is not None:
            index["unet:" + _flat(diffusers)] = target
    for kind, path, encoder in _text_encoders(model):
        if hasattr(encoder, "transformer"):  # transformers' CLIPTextModel, names as the LoRA trainers see them
            for name, module in encoder.transformer.named_modules():
                if isinstance(module, torch.nn.Linear) and ".layers." in name:
                    flat = _flat(name if name.startswith("text_model.") else "text_model." + name)
                    index[f"{kind}:{flat}"] = _Target(f"{path}.transformer.{name}.weight", None, True)
        else:  # OpenCLIP resblocks: q / k / v are row blocks of in_proj_weight
            for i, block in enumerate(encoder.model.transformer.resblocks):
                base = f"{path}.model.transformer.resblocks.{i}"
                width = block.attn.in_proj_weight.shape[1]
                te = f"{kind}:text_model_encoder_layers_{i}_"
                for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                    index[te + "self_attn_" + proj] = _Target(f"{base}.attn.in_proj_weight", (j * width, (j + 1) * width), True)
                index[te + "self_attn_out_proj"] = _Target(f"{base}.attn.out_proj.weight", None, True)
                index[te + "mlp_fc1"] = _Target(f"{base}.mlp.c_fc.weight", None, True)
                index[te + "mlp_fc2"] = _Target(f"{base}.mlp.c_proj.weight", None, True)
    return index


# kohya prefixes and the text encoder they name; diffusers' `text_encoder.` is "te" on SD 1.x / 2.x, "te1" on SDXL
_KOHYA_PREFIXES = (("lora_unet_", "unet"), ("lora_te1_", "te1"), ("lora_te2_", "te2"), ("lora_te_", "te"))
_SDXL_PREFIXES = ("lora_te1_", "lora_te2_", "text_encoder_2.")


def _layer_key(file_key: str, sdxl: bool = False) -> Optional[str]:
    """The index key ("unet:..." / "te:..." / "te1:..." / "te2:...") of a file's layer name, or None for an
    unknown prefix. `sdxl`: the model is SDXL, where diffusers' `text_encoder.` is CLIP ViT-L."""
    for prefix, part in _KOHYA_PREFIXES:
        if file_key.startswith(prefix):
            return f"{part}:{file_key[len(prefix):]}"
    for prefix, part in (("unet.", "unet"), ("text_encoder_2.", "te2"), ("text_encoder.", "te1" if sdxl else "te")):
        if file_key.startswith(prefix):
            name = file_key[len(prefix):]
            # attention-processor files: attn1.processor.to_q_lora -> attn1.to_q, to_out_lora -> to_out.0; in
            # the text encoder self_attn.to_q_lora -> self_attn.q_proj, to_out_lora -> out_proj
            name = re.sub(r"\.processor\.(to_[qkv])_lora$", r".\1", name)
            name = re.sub(r"\.processor\.to_out_lora$", ".to_out.0", name)
            name = re.sub(r"\.self_attn\.to_([qkv])_lora$", r".self_attn.\1_proj", name)
            name = re.sub(r"\.self_attn\.to_out_lora$", ".self_attn.out_proj", name)
            if part != "unet" and not name.startswith("text_model."):
                name = "text_model." + name
            return f"{part}:{_flat(name)}"
    return None


# ----------------------------------------------------------------------------------------------------------------
# Deltas


def _rebuild_tucker(core: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """W[o, c, kh, kw] = sum_ab up[o, a] core[a, b, kh, kw] down[b, c] (a 1x1 conv, a k x k core, a 1x1 conv)."""
    return torch.einsum("abhw,bc,oa->ochw", core, down, up)


def _delta_numel(factors: dict[str, torch.Tensor], where: str) -> int:
    """The number of weights a layer's factors make, without building them."""
    f = factors
    if "lora_down.weight" in f and "lora_up.weight" in f:
        down, out = f["lora_down.weight"], f["lora_up.weight"].shape[0]
        if "lora_mid.weight" in f:
            return out * down.shape[1] * math.prod(f["lora_mid.weight"].shape[2:])
        return out * math.prod(down.shape[1:])
    if all(k in f for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")):
        if "hada_t1" in f:
            return f["hada_w1_a"].shape[1] * f["hada_w1_b"].shape[1] * math.prod(f["hada_t1"].shape[2:])
        return f["hada_w1_a"].shape[0] * f["hada_w1_b"].shape[1]
    if ("lokr_w1" in f or "lokr_w1_a" in f) and ("lokr_w2" in f or "lokr_w2_a" in f):
        w1 = f["lokr_w1"].numel() if "lokr_w1" in f else f["lokr_w1_a"].shape[0] * f["lokr_w1_b"].shape[1]
        if "lokr_w2" in f:
            w2 = f["lokr_w2"].numel()
        elif "lokr_t2" in f:
            w2 = f["lokr_w2_a"].shape[1] * f["lokr_w2_b"].shape[1] * math.prod(f["lokr_t2"].shape[2:])
        else:
            w2 = f["lokr_w2_a"].shape[0] * f["lokr_w2_b"].shape[1]
        return w1 * w2
    raise ValueError(f"{where}: incomplete layer, factors {sorted(factors)}")


def _delta(factors: dict[str, torch.Tensor], shape: torch.Size, where: str, device: Optional[torch.device] = None) -> torch.Tensor:
    """The float32 weight delta of one layer, times its scale (alpha / rank where the file gives alpha), in the
    target's shape."""
    f = {k: v.to(device=device, dtype=torch.float32) for k, v in factors.items()}  # products on the weight's device
    rank: Optional[int] = None
    if "lora_down.weight" in f and "lora_up.weight" in f:
        down, up = f["lora_down.weight"], f["lora_up.weight"]
        rank = down.shape[0]
        if "lora_mid.weight" in f:
            delta = _rebuild_tucker(f["lora_mid.weight"], down.flatten(1), up.flatten(1))
        else:
            delta = up.flatten(1) @ down.flatten(1)
            if down.dim() == 4:
                delta = delta.reshape(up.shape[0], *down.shape[1:])
    elif all(k in f for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")):
        w1a, w1b, w2a, w2b = f["hada_w1_a"], f["hada_w1_b"], f["hada_w2_a"], f["hada_w2_b"]
        rank = w1b.shape[0]
        if "hada_t1" in f and "hada_t2" in f:
            # LyCORIS Tucker form: w*_a [r, out], w*_b [r, in], t* [r, r, kh, kw]
            delta = _rebuild_tucker(f["hada_t1"], w1b, w1a.t()) * _rebuild_tucker(f["hada_t2"], w2b, w2a.t())
        else:
            delta = (w1a @ w1b) * (w2a @ w2b)
    elif ("lokr_w1" in f or "lokr_w1_a" in f) and ("lokr_w2" in f or "lokr_w2_a" in f):
        w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
        if "lokr_w2" in f:
            w2 = f["lokr_w2"]
        elif "lokr_t2" in f:
            w2 = _rebuild_tucker(f["lokr_t2"], f["lokr_w2_b"], f["lokr_w2_a"].t())
        else:
            w2 = f["lokr_w2_a"] @ f["lokr_w2_b"]
        rank = f["lokr_w1_b"].shape[0] if "lokr_w1_b" in f else f["lokr_w2_b"].shape[0] if "lokr_w2_b" in f else None
        if w2.dim() == 4 and w1.dim() == 2:
            w1 = w1[:, :, None, None]
        delta = torch.kron(w1, w2)
    else:
        raise ValueError(f"{where}: incomplete layer, factors {sorted(factors)}")
    if "scale" in f:
        scale = float(f["scale"])
    elif "alpha" in f and rank:
        scale = float(f["alpha"]) / rank
    else:
        scale = 1.0
    return delta.reshape(shape) * scale


# ----------------------------------------------------------------------------------------------------------------
# Reading and checking a file


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from ldm.checkpoint import read_checkpoint

    state_dict, _ = read_checkpoint(path)
    metadata: dict[str, str] = {}
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            metadata = dict(f.metadata() or {})
    return state_dict, metadata


def _group(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """{layer name in the file: {canonical factor name: tensor}} and the keys that fit no known factor."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in state_dict.items():
        suffix = next((s for s in _SUFFIXES if key.endswith("." + s)), None)
        if suffix is None:
            unknown.append(key)
            continue
        groups.setdefault(key[: -len(suffix) - 1], {})[_CANON.get(suffix, suffix)] = value
    return groups, unknown


def _model_family(model: torch.nn.Module) -> tuple[str, int]:
    """(family, text width of the UNet's cross-attention) of a model, from its structure: SDXL (a conditioner;
    "SDXL refiner" without CLIP ViT-L), SD 2.x (an OpenCLIP text encoder), SD 1.x (CLIP)."""
    width = int(model.model.diffusion_model.context_dim)
    if is_sdxl_model(model):
        kinds = {kind for kind, _, _ in _text_encoders(model)}
        return ("SDXL" if "te1" in kinds else "SDXL refiner"), width
    encoder = getattr(model, "cond_stage_model", None)
    if hasattr(encoder, "transformer"):
        return "SD 1.x", width
    if hasattr(getattr(encoder, "model", None), "transformer"):
        return "SD 2.x", width
    return _FAMILY_BY_WIDTH.get(width, "a custom model"), width


def _width(groups: dict[str, dict[str, torch.Tensor]], pattern: str, names: Callable[[str], bool] = lambda n: True) -> Optional[int]:
    """The input width of the first layer whose name matches `pattern` (and `names`), from its down factor."""
    for name, factors in groups.items():
        if re.search(pattern, name) and names(name):
            for k in ("lora_down.weight", "hada_w1_b"):
                if k in factors:
                    return int(factors[k].shape[1])
    return None


def _file_family(groups: dict[str, dict[str, torch.Tensor]], metadata: dict[str, str]) -> tuple[Optional[bool], str, str]:
    """(True for an SDXL file, False for an SD 1.x / 2.x one, None when it does not say; its family as an error
    message names it; what says so). SDXL: text-encoder keys `lora_te1_` / `lora_te2_` / `text_encoder_2.`,
    kohya's `ss_base_model_version: sdxl...`, or cross-attention reading SDXL's text width (2048, refiner 1280).
    SD 1.x / 2.x: `lora_te_` keys or cross-attention reading 768 / 1024-wide text. The width named is the
    cross-attention's (key / value input) or else the text encoder's (q / k / v input)."""
    cross = _width(groups, r"attn2[._]to_[kv]$")
    text = _width(groups, r"self_attn[._][qkv]_proj$", lambda n: not n.startswith(_SDXL_PREFIXES))
    version = str(metadata.get("ss_base_model_version", ""))
    xl_keys = sorted({p for k in groups for p in _SDXL_PREFIXES if k.startswith(p)})
    if xl_keys or version.startswith("sdxl") or cross in (1280, 2048):
        why = f"{' / '.join(xl_keys)} text-encoder keys" if xl_keys else f"ss_base_model_version {version}" if version.startswith("sdxl") else f"cross-attention reading {cross}-wide text"
        return True, "SDXL" + (f" (text width {cross})" if cross else ""), why
    width = cross or text
    sd_keys = any(k.startswith("lora_te_") for k in groups)
    family = _FAMILY_BY_WIDTH.get(width, "SD 1.x / 2.x" if sd_keys else "another model")
    name = f"{family} (text width {width})" if width else "SD 1.x / 2.x" if sd_keys else "another model"
    if sd_keys:
        return False, name, "lora_te_ text-encoder keys (SDXL files name lora_te1_ / lora_te2_)"
    if cross in (768, 1024):
        return False, name, f"cross-attention reading {cross}-wide text"
    return None, name, ""


def _family_error(path: Path, model: torch.nn.Module, groups: dict[str, dict[str, torch.Tensor]], metadata: dict[str, str], detail: str) -> ValueError:
    ours, our_width = _model_family(model)
    _, theirs, _ = _file_family(groups, metadata)
    return ValueError(f"{path}: a LoRA for {theirs}, the model is {ours} (text width {our_width}): {detail}")


# ----------------------------------------------------------------------------------------------------------------
# Applying and removing


@dataclass
class _Patch:
    param: str
    rows: Optional[tuple[int, int]]
    delta: Callable[[torch.device], torch.Tensor]  # float32, target's shape, on that device; made on demand


@dataclass
class _ModelState:
    """The networks applied to one model: the original of every touched parameter and, per parameter, the
    patches of the applied networks in application order."""

    originals: dict[str, torch.Tensor] = field(default_factory=dict)
    applied: list["LoraHandle"] = field(default_factory=list)


_STATES: "weakref.WeakKeyDictionary[torch.nn.Module, _ModelState]" = weakref.WeakKeyDictionary()


@dataclass(eq=False)
class LoraHandle:
    """One network merged into a model. `remove()` takes it out again; the weights are then exactly those of the
    model with only the other applied networks (the original bits when none is left)."""

    path: Path
    weight: float
    te_weight: float
    layers: int  # number of model weights this network changes
    _model: "weakref.ReferenceType[torch.nn.Module]"
    _patches: list[_Patch]

    @property
    def applied(self) -> bool:
        model = self._model()
        return model is not None and self in _STATES.get(model, _ModelState()).applied

    def remove(self) -> None:
        """Take this network out of the model's weights (no-op when already removed)."""
        model = self._model()
        if model is None:
            return
        state = _STATES.get(model)
        if state is None or self not in state.applied:
            return
        state.applied.remove(self)
        _rewrite(model, state, {p.param for p in self._patches})


@torch.no_grad()
def _rewrite(model: torch.nn.Module, state: _ModelState, params: set[str]) -> None:
    """Set each named parameter to its original plus the deltas of the networks still applied, in order; the
    original itself, copied back, when none touches it."""
    for name in params:
        param = model.get_parameter(name)
        original = state.originals[name]
        patches = [p for handle in state.applied for p in handle._patches if p.param == name]
        if not patches:
            param.copy_(original)
            del state.originals[name]
            continue
        merged = original.to(param.device, torch.float32, copy=True)
        for patch in patches:
            delta = patch.delta(param.device)
            if patch.rows is None:
                merged += delta
            else:
                merged[patch.rows[0]: patch.rows[1]] += delta
        param.copy_(merged.to(param.dtype))


def apply_lora(model: torch.nn.Module, path: Union[str, Path], weight: float = 1.0, te_weight: Optional[float] = None, backup_device: Union[str, torch.device] = "cpu") -> LoraHandle:
    """Merge the LoRA / LyCORIS file at `path` into `model` (an SD 1.x / 2.x LatentDiffusion or an SDXL
    DiffusionEngine, base or refiner).

    Args:
        weight: multiplier of the UNet layers (the web UI's `<lora:name:te:unet>` unet weight).
        te_weight: multiplier of the text-encoder layers (SDXL: both); None means `weight`.
        backup_device: where the originals of the touched weights are kept until the last network is removed.
    Returns a handle whose `remove()` restores the weights. A multiplier of 0 leaves those layers untouched (the
    weights stay bit-identical). File keys that match no layer are logged in one warning (once per file and
    process); a file made for another model family (SDXL on SD 1.x / 2.x, SD 1.x / 2.x on SDXL, a base LoRA on the
    refiner, another text width) raises a one-line ValueError naming the file and both families.
    """
    path = Path(path)
    te_weight = weight if te_weight is None else te_weight
    patches = _prepare(model, path, weight, te_weight)
    params = dict(model.named_parameters())
    handle = LoraHandle(path, float(weight), float(te_weight), len({p.param for p in patches}), weakref.ref(model), patches)
    state = _STATES.setdefault(model, _ModelState())
    touched = {p.param for p in patches}
    with torch.no_grad():
        for name in touched:
            if name not in state.originals:
                state.originals[name] = params[name].detach().to(backup_device, copy=True)
    state.applied.append(handle)
    _rewrite(model, state, touched)
    return handle


def check_lora(model: torch.nn.Module, path: Union[str, Path]) -> int:
    """Every check `apply_lora` makes (readable file, LoRA layers, model family, layer shapes) without changing
    the model: raises the same one-line ValueError, logs the same unmatched-keys warning. Returns the number of
    model weights the file changes. For a run that must fail before its first image."""
    return len({p.param for p in _prepare(model, Path(path), 1.0, 1.0)})


_WARNED: set[tuple[str, int, int]] = set()  # (file, size, mtime) whose unmatched keys were logged


def _prepare(model: torch.nn.Module, path: Path, weight: float, te_weight: float) -> list[_Patch]:
    """Read and check the file; its patches for the given multipliers (deltas computed lazily)."""
    state_dict, metadata = _read(path)  # CheckpointError (a ValueError) for a file that is no checkpoint
    groups, unknown = _group(state_dict)
    if not groups:
        raise ValueError(f"{path}: no LoRA / LyCORIS layers found (keys like {sorted(state_dict)[:3]})")
    sdxl = is_sdxl_model(model)
    sdxl_file, _, why = _file_family(groups, metadata)
    if sdxl_file is not None and sdxl_file != sdxl:
        raise _family_error(path, model, groups, metadata, why)
    if sdxl and _model_family(model)[0] == "SDXL refiner" and any(k.startswith("lora_te1_") or k.startswith("text_encoder.") for k in groups):
        raise _family_error(path, model, groups, metadata, "CLIP ViT-L keys (lora_te1_ / text_encoder.): a LoRA for the base, the refiner has OpenCLIP bigG only")
    dora = [name for name, factors in groups.items() if "dora_scale" in factors]
    if dora:
        raise ValueError(f"{path}: DoRA layers (dora_scale, e.g. {dora[0]}) are not supported")
    index = _layer_index(model)
    params = dict(model.named_parameters())
    unmatched = list(unknown)
    patches: list[_Patch] = []
    for name, factors in groups.items():
        key = _layer_key(name, sdxl)
        target = index.get(key) if key else None
        if target is None:
            unmatched.append(name)
            continue
        multiplier = te_weight if target.text else weight
        param = params[target.param]
        shape = param.shape if target.rows is None else torch.Size((target.rows[1] - target.rows[0], *param.shape[1:]))
        numel = _delta_numel(factors, f"{path}: {name}")  # shapes checked before any weight changes
        if numel != shape.numel():
            raise _family_error(path, model, groups, metadata, f"layer {name} has {numel} weights, the model's {tuple(shape)}")
        if multiplier == 0:
            continue
        patches.append(_Patch(target.param, target.rows, _scaled_delta(factors, shape, multiplier, f"{path}: {name}")))
    if unmatched:
        stat = path.stat()
        seen = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if seen not in _WARNED:
            _WARNED.add(seen)
            logger.warning("%s: %d keys match no layer of the model, ignored: %s%s", path, len(unmatched), ", ".join(unmatched[:5]), " ..." if len(unmatched) > 5 else "")
    return patches


def _scaled_delta(factors: dict[str, torch.Tensor], shape: torch.Size, multiplier: float, where: str) -> Callable[[torch.device], torch.Tensor]:
    return lambda device: _delta(factors, shape, where, device) * multiplier


def applied_loras(model: torch.nn.Module) -> list[LoraHandle]:
    """The networks merged into `model`, in application order."""
    state = _STATES.get(model)
    return list(state.applied) if state else []


def remove_all_loras(model: torch.nn.Module) -> None:
    """Take every applied network out: the model's weights are the original bits again."""
    for handle in reversed(applied_loras(model)):
        handle.remove()


def set_loras(model: torch.nn.Module, loras: Sequence[tuple[Union[str, Path], float, Optional[float]]]) -> list[LoraHandle]:
    """Make the networks applied to `model` exactly `loras`, given as (file, unet weight, te weight or None for
    the unet weight), in that order: the applied networks that already match a leading part of the list stay,
    the others are removed and the rest applied. The weights are then bit-identical to applying the list to the
    bare model; an empty list restores the original. For an engine that runs micro-batches grouped by LoRA set."""
    wanted = [(Path(p).resolve(), float(w), float(w if t is None else t)) for p, w, t in loras]
    current = applied_loras(model)
    keep = 0
    while keep < min(len(current), len(wanted)) and (current[keep].path.resolve(), current[keep].weight, current[keep].te_weight) == wanted[keep]:
        keep += 1
    for handle in reversed(current[keep:]):
        handle.remove()
    return current[:keep] + [apply_lora(model, p, weight=w, te_weight=t) for p, w, t in wanted[keep:]]


# ----------------------------------------------------------------------------------------------------------------
# Prompt tags, files and hashes

_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")


def extract_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float, float]]]:
    """Remove every `<kind:args>` extra-network tag from `prompt`, as the AUTOMATIC1111 web UI does before encoding
    (the tag text goes, the spaces around it stay), and return the LoRA ones (`lora`, and its alias `lyco`) as
    (name, te_weight, unet_weight).

    `<lora:NAME>` is weight 1, `<lora:NAME:W>` te = unet = W, `<lora:NAME:TE:UNET>` separate weights; named
    `te=` / `unet=` items override the positional ones. A weight that is no number raises ValueError naming the
    tag. Tags of other kinds (`<hypernet:...>`) are removed and logged as not supported."""
    found: list[tuple[str, float, float]] = []

    def take(m: re.Match) -> str:
        kind, items = m.group(1), m.group(2).split(":")
        if kind not in ("lora", "lyco"):
            logger.warning("extra-network tag %s is not supported; removed from the prompt", m.group(0))
            return ""
        positional, named = [], {}
        for item in items:
            parts = item.split("=", 2)
            if len(parts) == 2:
                named[parts[0]] = parts[1]
            else:
                positional.append(item)
        if not positional or not positional[0]:
            raise ValueError(f"LoRA tag without a name: {m.group(0)}")
        try:
            te = float(positional[1]) if len(positional) > 1 else 1.0
            te = float(named.get("te", te))
            unet = float(positional[2]) if len(positional) > 2 else te
            unet = float(named.get("unet", unet))
        except ValueError:
            raise ValueError(f"LoRA tag with a weight that is not a number: {m.group(0)}") from None
        found.append((positional[0], te, unet))
        return ""

    return _EXTRA_NETWORK.sub(take, prompt), found


def find_lora(name: str, lora_dir: Union[str, Path] = DEFAULT_LORA_DIR) -> Optional[Path]:
    """The file of the network called `name` in `lora_dir` (searched recursively, as the web UI lists its
    folder): `<name>.safetensors`, `.pt` or `.ckpt`, first in that order; a name with a suffix or a folder part
    is taken as it is under `lora_dir`. None when there is none."""
    root = Path(lora_dir)
    direct = root / name
    if direct.suffix.lower() in LORA_SUFFIXES and direct.is_file():
        return direct
    for suffix in LORA_SUFFIXES:
        candidate = root / (name + suffix)
        if candidate.is_file():
            return candidate
    if root.is_dir():
        for suffix in LORA_SUFFIXES:
            for candidate in sorted(root.rglob("*" + suffix)):
                if candidate.stem == name and candidate.is_file():
                    return candidate
    return None


def list_loras(lora_dir: Union[str, Path] = DEFAULT_LORA_DIR) -> list[dict]:
    """The networks in `lora_dir` (searched recursively) as the web UI's /sdapi/v1/loras lists them: name (the
    file's stem, what a `<lora:NAME:W>` tag says), alias (the training run's `ss_output_name`, else the name), path
    (relative to the folder) and the file's safetensors metadata (strings)."""
    root = Path(lora_dir)
    if not root.is_dir():
        return []
    out = []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in LORA_SUFFIXES and p.is_file()):
        metadata: dict[str, str] = {}
        if path.suffix.lower() == ".safetensors":
            try:
                from safetensors import safe_open

                with safe_open(str(path), "pt") as f:
                    metadata = dict(f.metadata() or {})
            except Exception:  # noqa: BLE001 - a damaged file is listed without metadata; using it gives the error
                metadata = {}
        out.append({"name": path.stem, "alias": metadata.get("ss_output_name") or path.stem, "path": str(path.relative_to(root)), "metadata": metadata})
    return out


def lora_hash(path: Union[str, Path]) -> str:
    """The web UI's LoRA hash, full sha256 hex: for .safetensors the sha256 of the bytes after the header (kohya's
    "addnet" hash, unchanged by editing the metadata), for other files the sha256 of the whole file. Remembered
    per (file, size, modification time), since a run writes it into every image's parameters."""
    path = Path(path)
    stat = path.stat()
    return _file_hash(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _file_hash(name: str, size: int, mtime_ns: int) -> str:
    path = Path(name)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if path.suffix.lower() == ".safetensors":
            header = int.from_bytes(f.read(8), "little")
            f.seek(8 + header)
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def lora_hashes(loras: list[tuple[str, Union[str, Path]]]) -> str:
    """The value of the web UI's `Lora hashes` parameter for (name as written in the prompt, file) pairs:
    `name: first 12 hex digits of lora_hash, ...`, names without ':' and ','. Written quoted in the parameters
    text (`Lora hashes: "a: 0123456789ab, b: ..."`) since it holds commas and colons."""
    parts = []
    for name, path in loras:
        clean = name.replace(":", "").replace(",", "")
        if clean:
            parts.append(f"{clean}: {lora_hash(path)[:12]}")
    return ", ".join(parts)
