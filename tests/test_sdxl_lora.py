"""SDXL LoRAs (microbatch.lora): kohya (`lora_unet_` / `lora_te1_` / `lora_te2_`) and diffusers / PEFT
(`unet.` / `text_encoder.` / `text_encoder_2.`) files merged into the tiny SDXL base and refiner, against diffusers.

Independent reference: diffusers' SDXL pipeline (`StableDiffusionXLPipeline`, assembled offline from the UNet, VAE
and transformers text encoders that diffusers' single-file converters make from the same tiny checkpoint, see
tests/test_sdxl.py) loads the same file with `load_lora_weights` (its own kohya key conversion: sgm block names
to diffusers names from the UNet config, `lora_te1_` to `text_encoder`, `lora_te2_` to `text_encoder_2`) and
merges it with `fuse_lora`; our merged model must give the same UNet output and both text encoders' outputs
within 1e-5 (relative to the largest value). The LoRA files are written here from diffusers' / transformers' own
module names, or from the original sgm module names as kohya's SDXL trainer writes them.
"""
from __future__ import annotations

import copy
import logging
import re

import pytest
import torch
from safetensors.torch import save_file

from microbatch.lora import _layer_index, apply_lora, applied_loras, remove_all_loras
from tests.conftest import build_tiny

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

from tests.test_sdxl import TINY, Reference, time_ids_for  # noqa: E402  (after the importorskip)

TOL = 1e-5
PROMPTS = ["a professional photograph of an astronaut riding a horse", "", "a red circle"]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12))


def _flat(name: str) -> str:
    return name.replace(".", "_")


def _te_name(name: str) -> str:
    return name if name.startswith("text_model.") else "text_model." + name


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_bit_equal(model: torch.nn.Module, reference: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    changed = [k for k in reference if not torch.equal(now[k], reference[k])]
    assert not changed, changed[:5]


class _Factors:
    """Random kohya factors (down, up, alpha) for linear and conv layers."""

    def __init__(self, seed: int, rank: int = 4):
        self.g = torch.Generator().manual_seed(seed)
        self.rank = rank
        self.out: dict[str, torch.Tensor] = {}

    def add(self, key: str, module: torch.nn.Module, alpha: float) -> None:
        r, g = self.rank, self.g
        if isinstance(module, torch.nn.Conv2d):
            down, up = (r, module.in_channels, *module.kernel_size), (module.out_channels, r, 1, 1)
        else:
            down, up = (r, module.in_features), (module.out_features, r)
        self.out[key + ".lora_down.weight"] = 0.1 * torch.randn(down, generator=g)
        self.out[key + ".lora_up.weight"] = 0.1 * torch.randn(up, generator=g)
        self.out[key + ".alpha"] = torch.tensor(alpha)


def _unet_layers(unet: torch.nn.Module):
    return [(n, m) for n, m in unet.named_modules() if type(m).__name__ in ("Linear", "RowwiseLinear", "Conv2d")]


def kohya_file(model, ref: Reference, seed: int = 0, unet_names: str = "sgm") -> dict[str, torch.Tensor]:
    """A kohya LoCon over every linear and conv layer of the UNet (named by the original sgm modules, as kohya's
    SDXL trainer does, or by diffusers' modules), and every linear layer of both text encoders' transformer
    layers (named by transformers' modules: `lora_te1_` CLIP ViT-L, `lora_te2_` OpenCLIP bigG)."""
    f = _Factors(seed)
    if unet_names == "sgm":
        for name, module in _unet_layers(model.model.diffusion_model):
            f.add("lora_unet_" + _flat(name), module, 2.0)
    else:
        for name, module in _unet_layers(ref.unet):
            if not name.startswith("add_embedding."):  # diffusers' kohya converter misreads add_embedding_linear_1
                f.add("lora_unet_" + _flat(name), module, 2.0)
    for prefix, te in (("lora_te1_", ref.text_1), ("lora_te2_", ref.text_2)):
        if te is None:
            continue
        for name, module in te.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                f.add(prefix + _flat(_te_name(name)), module, 3.0)
    return f.out


def _diffusers_pipe(ref: Reference):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(vae=ref.vae, text_encoder=ref.text_1, text_encoder_2=ref.text_2, tokenizer=None,
                                     tokenizer_2=None, unet=ref.unet, scheduler=EulerDiscreteScheduler())


def _outputs(model, ref: Reference | None = None) -> dict[str, torch.Tensor]:
    """UNet output on fixed latents / context / vector, CLIP ViT-L's last and penultimate hidden states, bigG's
    penultimate hidden state and pooled projection; ours, or diffusers' from `ref`."""
    g = torch.Generator().manual_seed(11)
    unet = model.model.diffusion_model
    x = torch.randn(3, 4, 16, 16, generator=g)
    t = torch.tensor([999, 500, 1])
    ctx = torch.randn(3, 77, unet.context_dim, generator=g)
    kind = "base" if len(model.conditioner.embedders) == 5 else "refiner"
    text_embeds = torch.randn(3, 24, generator=g)
    embedders = model.conditioner.embedders
    clip = embedders[0] if kind == "base" else None
    bigg = embedders[1] if kind == "base" else embedders[0]
    out = {}
    with torch.no_grad():
        time_ids = time_ids_for(kind)
        if ref is None:
            vector = torch.cat([text_embeds, _time_embeds(model, time_ids)], dim=-1)
            out["unet"] = model.apply_model(x, t, {"crossattn": ctx, "vector": vector})
            if clip is not None:
                hidden = clip.transformer(input_ids=clip.tokenize(PROMPTS), output_hidden_states=True)
                out["te1"], out["te1_penultimate"] = hidden.last_hidden_state, hidden.hidden_states[-2]
            out["te2"], out["te2_pooled"] = bigg(PROMPTS)
        else:
            out["unet"] = ref.unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}).sample
            if clip is not None:
                hidden = ref.text_1(input_ids=clip.tokenize(PROMPTS), output_hidden_states=True)
                out["te1"], out["te1_penultimate"] = hidden.last_hidden_state, hidden.hidden_states[-2]
            theirs = ref.text_2(input_ids=bigg.tokenize(PROMPTS), output_hidden_states=True)
            out["te2"], out["te2_pooled"] = theirs.hidden_states[-2], theirs.text_embeds
    return out


def _time_embeds(model, time_ids: torch.Tensor) -> torch.Tensor:
    """Our size / aesthetic-score embedding of diffusers' add_time_ids rows (the conditioner's embedders 1..)."""
    from ldm.modules.diffusionmodules.util import timestep_embedding

    outdim = model.conditioner.embedders[-1].outdim
    flat = timestep_embedding(time_ids.flatten(), outdim)
    return flat.reshape(time_ids.shape[0], -1)


@pytest.fixture(scope="module", params=["base", "refiner"])
def pair(request):
    kind = request.param
    model = build_tiny(TINY[kind], seed=31 if kind == "base" else 32)
    return kind, model


# ----------------------------------------------------------------------------------------------------------------
# parity with diffusers


@pytest.mark.parametrize("unet_names", ["sgm", "diffusers"])
def test_kohya_sdxl_lora_matches_diffusers_load_lora_weights_and_fuse(pair, tmp_path, unet_names, caplog):
    kind, base = pair
    model = copy.deepcopy(base)
    ref = Reference(kind, model)
    path = tmp_path / "xl.safetensors"
    tensors = kohya_file(model, ref, seed=1, unet_names=unet_names)
    save_file(tensors, str(path))
    before = _outputs(model)
    assert all(_rel_err(a, b) < TOL for a, b in zip(before.values(), _outputs(model, ref).values()))  # converted alike
    weight, te_weight = 0.7, 0.4
    with caplog.at_level(logging.WARNING, logger="microbatch.lora"):
        handle = apply_lora(model, path, weight=weight, te_weight=te_weight)
    assert not caplog.records  # every layer matched
    # every file layer is one weight, but bigG's q, k and v share its in_proj_weight (3 layers of 3 transformer layers)
    assert handle.layers == sum(1 for k in tensors if k.endswith(".alpha")) - 2 * 3
    pipe = _diffusers_pipe(ref)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(components=["unet"], lora_scale=weight)
    pipe.fuse_lora(components=["text_encoder", "text_encoder_2"], lora_scale=te_weight)
    ours, theirs = _outputs(model), _outputs(model, ref)
    for key in ours:
        assert _rel_err(ours[key], before[key]) > 1e-2, key  # the LoRA does something
        assert _rel_err(ours[key], theirs[key]) < TOL, key


def test_peft_sdxl_file_matches_diffusers(pair, tmp_path):
    """A diffusers / PEFT SDXL file (`unet.*`, `text_encoder.*` for CLIP ViT-L, `text_encoder_2.*` for bigG with
    `.lora_A` / `.lora_B`, no alphas), as diffusers' SDXL trainers save it."""
    kind, base = pair
    model = copy.deepcopy(base)
    ref = Reference(kind, model)
    g = torch.Generator().manual_seed(5)
    tensors = {}
    parts = [("unet.", ref.unet, "attentions"), ("text_encoder.", ref.text_1, ".layers."), ("text_encoder_2.", ref.text_2, ".layers.")]
    for prefix, net, pick in parts:
        if net is None:
            continue
        for name, module in net.named_modules():
            if isinstance(module, torch.nn.Linear) and pick in name:
                key = prefix + (name if prefix == "unet." else _te_name(name))
                tensors[key + ".lora_A.weight"] = 0.1 * torch.randn(3, module.in_features, generator=g)
                tensors[key + ".lora_B.weight"] = 0.1 * torch.randn(module.out_features, 3, generator=g)
    path = tmp_path / "peft.safetensors"
    save_file(tensors, str(path))
    before = _outputs(model)
    apply_lora(model, path, weight=0.8)
    pipe = _diffusers_pipe(ref)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(components=["unet", "text_encoder", "text_encoder_2"] if kind == "base" else ["unet", "text_encoder_2"], lora_scale=0.8)
    ours, theirs = _outputs(model), _outputs(model, ref)
    for key in ours:
        assert _rel_err(ours[key], before[key]) > 1e-2, key
        assert _rel_err(ours[key], theirs[key]) < TOL, key


# ----------------------------------------------------------------------------------------------------------------
# weights, removal, errors


def test_weight_zero_te_weight_zero_and_remove_are_bit_identical(pair, tmp_path):
    kind, base = pair
    model = copy.deepcopy(base)
    ref = Reference(kind, model)
    path = tmp_path / "xl.safetensors"
    save_file(kohya_file(model, ref, seed=2), str(path))
    before = _state(model)
    assert apply_lora(model, path, weight=0.0).layers == 0
    _assert_bit_equal(model, before)
    handle = apply_lora(model, path, weight=1.0, te_weight=0.0)
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith("conditioner."))
    assert any(not torch.equal(after[k], before[k]) for k in before if k.startswith("model.diffusion_model."))
    handle.remove()
    _assert_bit_equal(model, before)
    text_only = apply_lora(model, path, weight=0.0, te_weight=1.0)
    after = model.state_dict()
    changed = {k.split(".")[2] for k in before if not torch.equal(after[k], before[k])}
    assert changed == ({"0", "1"} if kind == "base" else {"0"})  # conditioner.embedders.N: every text encoder
    assert all(torch.equal(after[k], before[k]) for k in before if not k.startswith("conditioner."))
    apply_lora(model, path, weight=-0.5)
    text_only.remove()
    remove_all_loras(model)
    _assert_bit_equal(model, before)
    assert applied_loras(model) == []


def _one_line(error: pytest.ExceptionInfo, *words: str) -> str:
    message = str(error.value)
    assert "\n" not in message and all(w in message for w in words), message
    return message


def test_family_errors_both_ways(tmp_path, tiny_model):
    """SD 1.x / 2.x files on SDXL and SDXL files on SD 1.x: one line naming the file and both families, the
    model untouched. The files each have a valid layer of the target first, so a late check would half-apply."""
    xl = build_tiny(TINY["base"], seed=33)
    sd1 = copy.deepcopy(tiny_model)
    g = torch.Generator().manual_seed(0)

    def lora(name, width_in, width_out):
        return {f"{name}.lora_down.weight": torch.randn(2, width_in, generator=g), f"{name}.lora_up.weight": torch.randn(width_out, 2, generator=g)}

    xl_attn = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"  # [64, 64] in the tiny SDXL base
    sd_attn = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # [32, 32] in tiny SD 1.x
    files = {
        # kohya SD 1.x: lora_te_ keys (the tiny SD 1.x text width, 32)
        "sd1_te.safetensors": (xl, {**lora(xl_attn, 64, 64), **lora("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 32, 32)}, ("SD 1.x", "SDXL", "lora_te_")),
        # a full-size SD 1.x UNet-only file: cross-attention reading 768-wide text
        "sd1_unet.safetensors": (xl, {**lora(xl_attn, 64, 64), **lora("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", 768, 640)}, ("SD 1.x (text width 768)", "SDXL")),
        "sd2_unet.safetensors": (xl, lora("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", 1024, 640), ("SD 2.x (text width 1024)", "SDXL")),
        # SDXL files on SD 1.x: te1 / te2 keys, diffusers' text_encoder_2, a 2048-wide UNet-only file, metadata
        "xl_te.safetensors": (sd1, {**lora(sd_attn, 32, 32), **lora("lora_te2_text_model_encoder_layers_0_mlp_fc1", 48, 96)}, ("SDXL", "SD 1.x", "lora_te2_")),
        "xl_peft.safetensors": (sd1, {"text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_A.weight": torch.randn(2, 48), "text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_B.weight": torch.randn(96, 2)}, ("SDXL", "SD 1.x", "text_encoder_2.")),
        "xl_unet.safetensors": (sd1, {**lora(sd_attn, 32, 32), **lora("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 2048, 640)}, ("SDXL (text width 2048)", "SD 1.x")),
    }
    for name, (model, tensors, words) in files.items():
        path = tmp_path / name
        save_file(tensors, str(path))
        before = _state(model)
        with pytest.raises(ValueError) as e:
            apply_lora(model, path)
        _one_line(e, str(path), *words)
        _assert_bit_equal(model, before)
        assert applied_loras(model) == []
    meta = tmp_path / "meta.safetensors"
    save_file(lora(sd_attn, 32, 32), str(meta), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    with pytest.raises(ValueError) as e:
        apply_lora(sd1, meta)
    _one_line(e, "SDXL", "SD 1.x", "ss_base_model_version")
    # a base LoRA on the refiner: its CLIP ViT-L layers have nowhere to go (full size, its UNet shapes differ too)
    base_file = tmp_path / "base.safetensors"
    save_file({**lora(xl_attn, 64, 64), **lora("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 32, 32)}, str(base_file))
    refiner = build_tiny(TINY["refiner"], seed=34)
    with pytest.raises(ValueError) as e:
        apply_lora(refiner, base_file)
    _one_line(e, str(base_file), "SDXL", "SDXL refiner", "lora_te1_")


# ----------------------------------------------------------------------------------------------------------------
# the full-size layouts (meta device)


@pytest.mark.parametrize("name", ["sd_xl_base", "sd_xl_refiner"])
def test_full_size_names_match_diffusers_conversions(name):
    """On the published layouts (nothing allocated): every layer of diffusers' converted UNet is indexed under its
    flattened diffusers name with the same shape; the text encoders have 12 x 6 (CLIP ViT-L) and 32 x 6 (bigG)
    layer names; and (base) every sgm-named kohya layer, converted by diffusers' own kohya converter
    (`_maybe_map_sgm_blocks_to_diffusers` + `_convert_non_diffusers_lora_to_diffusers`), lands on the weight that
    our index gives its sgm name."""
    from types import SimpleNamespace

    from diffusers.loaders import single_file_utils as sfu
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers, _maybe_map_sgm_blocks_to_diffusers
    from omegaconf import OmegaConf

    from ldm.util import instantiate_from_config, load_config
    from tests.conftest import REPO

    config = load_config(REPO / "configs" / "sdxl" / f"{name}.yaml")
    with torch.device("meta"):
        model = instantiate_from_config(config.model)
    sd = model.state_dict()
    unet_cfg = sfu.create_unet_diffusers_config_from_ldm(OmegaConf.to_container(config, resolve=True), sd)
    converted = sfu.convert_ldm_unet_checkpoint(sd, unet_cfg)
    index = _layer_index(model)
    params = dict(model.named_parameters())
    layers = [k for k, v in converted.items() if k.endswith(".weight") and v.dim() in (2, 4)]
    assert len(layers) > 700 if name == "sd_xl_base" else len(layers) > 500
    for key in layers:
        target = index["unet:" + _flat(key[: -len(".weight")])]
        assert params[target.param].shape == converted[key].shape, key

    kinds = [k.split(":")[0] for k in index if not k.startswith("unet:")]
    assert kinds.count("te1") == (72 if name == "sd_xl_base" else 0) and kinds.count("te2") == 32 * 6
    if name == "sd_xl_refiner":
        return  # diffusers' sgm block mapper finds input_blocks_1's keys by substring, so it fails on blocks 10, 11
    unet = model.model.diffusion_model
    kohya = {}
    for layer, _ in _unet_layers(unet):
        kohya[f"lora_unet_{_flat(layer)}.lora_down.weight"] = torch.zeros(1)
        kohya[f"lora_unet_{_flat(layer)}.lora_up.weight"] = torch.zeros(1)
    mapped = _maybe_map_sgm_blocks_to_diffusers(dict(kohya), SimpleNamespace(layers_per_block=unet_cfg["layers_per_block"]))
    mapped, _ = _convert_non_diffusers_lora_to_diffusers(mapped)
    ours_by_diffusers = {}
    for key in mapped:
        if key.endswith(".down.weight"):  # unet.X.lora.down.weight, attention: unet.Y.processor.to_q_lora.down.weight
            module = re.sub(r"(\.lora|_lora)\.down\.weight$", "", key[len("unet."):]).replace(".processor.", ".")
            module = re.sub(r"\.to_out$", ".to_out.0", module)
            ours_by_diffusers[module] = index.get("unet:" + _flat(module))
    assert len(ours_by_diffusers) == len(kohya) // 2
    wrong = [m for m, target in ours_by_diffusers.items() if target is None]
    assert not wrong, wrong[:5]
    # the same weights: each diffusers name's target is the sgm name's target
    sgm_targets = sorted(index["unet:" + _flat(layer)].param for layer, _ in _unet_layers(unet))
    assert sorted(t.param for t in ours_by_diffusers.values()) == sgm_targets
