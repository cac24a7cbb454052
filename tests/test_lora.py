"""LoRA / LyCORIS merging (microbatch.lora) against independent references.

Tiny LoRA files are written here with layer names taken from diffusers' and transformers' own modules (not from
our name mapping); diffusers (with peft) loads and fuses them into the diffusers UNet and the transformers text
encoder converted from the same tiny checkpoint, and our merged model must give the same outputs. LoHa, LoKr and
LoCon's Tucker form are checked against their formulas written out here.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import logging

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from microbatch.lora import apply_lora, applied_loras, extract_lora_tags, find_lora, lora_hash, lora_hashes, remove_all_loras, set_loras
from tests.conftest import REPO, TINY_CONFIG, build_tiny

TINY_V2 = REPO / "configs" / "tiny" / "tiny-v2.yaml"


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _flat(name: str) -> str:
    return name.replace(".", "_")


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_bit_equal(model: torch.nn.Module, reference: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert set(now) == set(reference)
    changed = [k for k in reference if not torch.equal(now[k], reference[k])]
    assert not changed, changed[:5]


@pytest.fixture()
def model_v1(tiny_model):
    return copy.deepcopy(tiny_model)


@pytest.fixture(scope="module")
def model_v2_base():
    return build_tiny(TINY_V2, seed=3)


# ----------------------------------------------------------------------------------------------------------------
# diffusers references


def _diffusers_models(model: torch.nn.Module, config_path):
    sfu = pytest.importorskip("diffusers.loaders.single_file_utils")
    from diffusers import UNet2DConditionModel

    config = OmegaConf.to_container(OmegaConf.load(config_path), resolve=True)
    sd = model.state_dict()
    unet_cfg = sfu.create_unet_diffusers_config_from_ldm(config, sd)
    unet = UNet2DConditionModel(**unet_cfg)
    unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(sd, unet_cfg), strict=True)
    return unet.eval()


def _transformers_text_encoder(model: torch.nn.Module):
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.modules.encoders.modules import VIT_L14_TEXT_CONFIG

    text_cfg = dict(OmegaConf.to_container(OmegaConf.load(TINY_CONFIG).model.params.cond_stage_config.params.text_config))
    te = CLIPTextModel(CLIPTextConfig(**{**VIT_L14_TEXT_CONFIG, **text_cfg}))
    sd = sfu.convert_ldm_clip_checkpoint(model.state_dict())
    if not any(k.startswith("text_model.") for k in te.state_dict()):  # transformers 5 dropped the nesting
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    missing, unexpected = te.load_state_dict(sd, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    return te.eval()


def _te_name(name: str) -> str:
    return name if name.startswith("text_model.") else "text_model." + name


def _kohya_file(unet, te, seed: int = 0, rank: int = 4, convs: bool = True) -> dict[str, torch.Tensor]:
    """A kohya LoRA (LoCon when `convs`) over every attention / feed-forward linear layer and every resnet conv
    (3x3 included) of the diffusers UNet, and every linear layer of the text encoder's transformer layers."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}

    def add(key: str, down_shape, up_shape, alpha: float) -> None:
        out[key + ".lora_down.weight"] = 0.1 * torch.randn(down_shape, generator=g)
        out[key + ".lora_up.weight"] = 0.1 * torch.randn(up_shape, generator=g)
        out[key + ".alpha"] = torch.tensor(alpha)

    for name, mod in unet.named_modules():
        key = "lora_unet_" + _flat(name)
        if isinstance(mod, torch.nn.Linear) and ("attentions" in name):
            add(key, (rank, mod.in_features), (mod.out_features, rank), 2.0)
        elif convs and isinstance(mod, torch.nn.Conv2d) and "resnets" in name:
            add(key, (rank, mod.in_channels, *mod.kernel_size), (mod.out_channels, rank, 1, 1), 2.0)
    if te is not None:
        for name, mod in te.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".layers." in name:
                add("lora_te_" + _flat(_te_name(name)), (rank, mod.in_features), (mod.out_features, rank), 3.0)
    return out


def _diffusers_fuse(path, unet, te, weight: float, te_weight: float) -> None:
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as Loader
    from peft.tuners.tuners_utils import BaseTunerLayer

    state_dict, alphas = Loader.lora_state_dict(str(path))
    Loader.load_lora_into_unet(state_dict, alphas, unet)
    unet.fuse_lora(lora_scale=weight)
    if te is not None and any(k.startswith("text_encoder.") for k in state_dict):
        Loader.load_lora_into_text_encoder(state_dict, alphas, te, prefix="text_encoder")
        merged = 0
        for mod in te.modules():
            if isinstance(mod, BaseTunerLayer):
                mod.scale_layer(te_weight)
                mod.merge()
                merged += 1
        assert merged


def _outputs(model, unet=None, te=None):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, 32, generator=g)
    ts = torch.tensor([10, 700])
    prompts = ["a photograph of a cat", ""]
    with torch.no_grad():
        ours = (model.apply_model(x, ts, ctx), model.get_learned_conditioning(prompts))
        theirs = None
        if unet is not None:
            ids = model.cond_stage_model.tokenize(prompts)
            theirs = (unet(x, ts, encoder_hidden_states=ctx).sample, te(input_ids=ids).last_hidden_state if te is not None else None)
    return ours, theirs


# ----------------------------------------------------------------------------------------------------------------
# name mapping


@pytest.mark.parametrize("config", [TINY_CONFIG, TINY_V2], ids=["v1", "v2"])
def test_every_diffusers_unet_layer_maps_to_the_same_weight(config):
    """Each weight of diffusers' converted UNet, found through our index under its flattened diffusers name, is
    our parameter with the same values."""
    sfu = pytest.importorskip("diffusers.loaders.single_file_utils")
    from microbatch.lora import _layer_index

    model = build_tiny(config)
    cfg = OmegaConf.to_container(OmegaConf.load(config), resolve=True)
    sd = model.state_dict()
    converted = sfu.convert_ldm_unet_checkpoint(sd, sfu.create_unet_diffusers_config_from_ldm(cfg, sd))
    index = _layer_index(model)
    params = dict(model.named_parameters())
    layers = [k for k, v in converted.items() if k.endswith(".weight") and v.dim() in (2, 4)]
    assert len(layers) > 100
    for key in layers:
        target = index["unet:" + _flat(key[: -len(".weight")])]
        assert torch.equal(params[target.param].reshape(converted[key].shape), converted[key]), key


def test_full_size_v1_names_and_shapes_on_meta():
    """The published v1 layout (meta device, nothing allocated): every UNet layer diffusers has is indexed with
    the same shape, and the text encoder's 12 layers x 6 linears are there."""
    sfu = pytest.importorskip("diffusers.loaders.single_file_utils")
    from ldm.util import instantiate_from_config
    from microbatch.lora import _layer_index

    config = OmegaConf.load(REPO / "configs" / "stable-diffusion" / "v1-inference.yaml")
    with torch.device("meta"):
        model = instantiate_from_config(config.model)
    sd = model.state_dict()
    converted = sfu.convert_ldm_unet_checkpoint(sd, sfu.create_unet_diffusers_config_from_ldm(OmegaConf.to_container(config, resolve=True), sd))
    index = _layer_index(model)
    params = dict(model.named_parameters())
    layers = [k for k, v in converted.items() if k.endswith(".weight") and v.dim() in (2, 4)]
    for key in layers:
        target = index["unet:" + _flat(key[: -len(".weight")])]
        assert params[target.param].numel() == converted[key].numel(), key
    assert sum(1 for k in index if k.startswith("te:")) == 72


# ----------------------------------------------------------------------------------------------------------------
# parity with diffusers


@pytest.mark.parametrize("weight,te_weight", [(1.0, None), (0.7, 0.4)])
def test_kohya_locon_matches_diffusers_fuse_lora(model_v1, tmp_path, weight, te_weight):
    unet, te = _diffusers_models(model_v1, TINY_CONFIG), _transformers_text_encoder(model_v1)
    path = tmp_path / "style.safetensors"
    save_file(_kohya_file(unet, te), str(path))
    (base_unet, base_te), _ = _outputs(model_v1)
    handle = apply_lora(model_v1, path, weight=weight, te_weight=te_weight)
    assert handle.layers == sum(1 for k in _kohya_file(unet, te) if k.endswith(".alpha"))
    _diffusers_fuse(path, unet, te, weight, weight if te_weight is None else te_weight)
    (ours_unet, ours_te), (theirs_unet, theirs_te) = _outputs(model_v1, unet, te)
    assert _rel_err(ours_unet, base_unet) > 1e-2 and _rel_err(ours_te, base_te) > 1e-2  # the LoRA does something
    assert _rel_err(ours_unet, theirs_unet) < 1e-5
    assert _rel_err(ours_te, theirs_te) < 1e-5


def test_peft_and_attention_processor_files_match_diffusers(model_v1, tmp_path):
    """A diffusers / PEFT file (`unet.*.lora_A.weight`, `text_encoder.*.lora_B.weight`, no alphas) and the
    older attention-processor spelling that diffusers converts kohya files to (`processor.to_q_lora.down.weight`,
    `lora.down.weight`, `lora_linear_layer.down.weight`)."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as Loader

    unet, te = _diffusers_models(model_v1, TINY_CONFIG), _transformers_text_encoder(model_v1)
    g = torch.Generator().manual_seed(5)
    peft_file = {}
    for prefix, net, pick in (("unet.", unet, "attentions"), ("text_encoder.", te, ".layers.")):
        for name, mod in net.named_modules():
            if isinstance(mod, torch.nn.Linear) and pick in name:
                key = prefix + (_te_name(name) if prefix == "text_encoder." else name)
                peft_file[key + ".lora_A.weight"] = 0.1 * torch.randn(3, mod.in_features, generator=g)
                peft_file[key + ".lora_B.weight"] = 0.1 * torch.randn(mod.out_features, 3, generator=g)
    peft_path = tmp_path / "peft.safetensors"
    save_file(peft_file, str(peft_path))
    kohya = tmp_path / "kohya.safetensors"
    save_file(_kohya_file(unet, te, seed=9), str(kohya))
    converted, _ = Loader.lora_state_dict(str(kohya))
    assert any(".processor.to_q_lora.down." in k for k in converted) and any(".lora_linear_layer." in k for k in converted)
    assert any(k.endswith(".lora.down.weight") for k in converted)
    old_path = tmp_path / "processors.safetensors"
    save_file({k: v.contiguous() for k, v in converted.items()}, str(old_path))  # alphas dropped: scale 1
    for path in (peft_path, old_path):
        ours = copy.deepcopy(model_v1)
        u, t = copy.deepcopy(unet), copy.deepcopy(te)
        apply_lora(ours, path, weight=0.8)
        _diffusers_fuse(path, u, t, 0.8, 0.8)
        (ours_unet, ours_te), (theirs_unet, theirs_te) = _outputs(ours, u, t)
        (base_unet, base_te), _ = _outputs(model_v1)
        assert _rel_err(ours_unet, base_unet) > 1e-2 and _rel_err(ours_te, base_te) > 1e-2
        assert _rel_err(ours_unet, theirs_unet) < 1e-5, path.name
        assert _rel_err(ours_te, theirs_te) < 1e-5, path.name


def test_sd2_unet_matches_diffusers_and_text_lora_lands_on_in_proj_rows(model_v2_base, tmp_path):
    model = copy.deepcopy(model_v2_base)
    unet = _diffusers_models(model, TINY_V2)
    lora = _kohya_file(unet, None, seed=2)
    g = torch.Generator().manual_seed(4)
    width, layers = 32, 3
    te_factors = {}
    for i in range(layers):
        for proj, shape in (("self_attn_q_proj", (32, 32)), ("self_attn_v_proj", (32, 32)), ("mlp_fc2", (32, 64))):
            key = f"lora_te_text_model_encoder_layers_{i}_{proj}"
            down, up = 0.1 * torch.randn(2, shape[1], generator=g), 0.1 * torch.randn(shape[0], 2, generator=g)
            lora.update({key + ".lora_down.weight": down, key + ".lora_up.weight": up, key + ".alpha": torch.tensor(1.0)})
            te_factors[(i, proj)] = (up @ down) * 0.5
    path = tmp_path / "sd2.safetensors"
    save_file(lora, str(path))
    before = _state(model)
    apply_lora(model, path, weight=0.9, te_weight=0.6)
    _diffusers_fuse(path, unet, None, 0.9, 0.6)
    (ours_unet, _), (theirs_unet, _) = _outputs(model, unet, None)
    assert _rel_err(ours_unet, theirs_unet) < 1e-5
    after = model.state_dict()
    for i in range(layers):
        base = f"cond_stage_model.model.transformer.resblocks.{i}"
        expected = before[f"{base}.attn.in_proj_weight"].clone()
        expected[0:width] += 0.6 * te_factors[(i, "self_attn_q_proj")]
        expected[2 * width: 3 * width] += 0.6 * te_factors[(i, "self_attn_v_proj")]
        torch.testing.assert_close(after[f"{base}.attn.in_proj_weight"], expected, rtol=0, atol=1e-6)
        assert torch.equal(after[f"{base}.attn.in_proj_weight"][width: 2 * width], before[f"{base}.attn.in_proj_weight"][width: 2 * width])
        torch.testing.assert_close(after[f"{base}.mlp.c_proj.weight"], before[f"{base}.mlp.c_proj.weight"] + 0.6 * te_factors[(i, "mlp_fc2")], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# LyCORIS formulas

_ATTN = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"  # [32, 32]
_ATTN_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
_CONV = "model.diffusion_model.input_blocks.3.0.in_layers.2.weight"  # [64, 32, 3, 3]
_CONV_K = "lora_unet_down_blocks_1_resnets_0_conv1"
_FF = "model.diffusion_model.output_blocks.0.1.transformer_blocks.0.ff.net.2.weight"  # [64, 256]
_FF_K = "lora_unet_up_blocks_0_attentions_0_transformer_blocks_0_ff_net_2"


def _r(*shape, g):
    return 0.2 * torch.randn(*shape, generator=g)


def test_lycoris_deltas_follow_their_formulas(model_v1, tmp_path):
    g = torch.Generator().manual_seed(7)
    f = {}
    expected = {}
    # LoHa on a linear layer: (w1a w1b) * (w2a w2b) * alpha / r
    w1a, w1b, w2a, w2b = _r(32, 4, g=g), _r(4, 32, g=g), _r(32, 4, g=g), _r(4, 32, g=g)
    f.update({f"{_ATTN_K}.hada_w1_a": w1a, f"{_ATTN_K}.hada_w1_b": w1b, f"{_ATTN_K}.hada_w2_a": w2a, f"{_ATTN_K}.hada_w2_b": w2b, f"{_ATTN_K}.alpha": torch.tensor(2.0)})
    expected[_ATTN] = (w1a @ w1b) * (w2a @ w2b) * (2.0 / 4)
    # LoKr on a conv: kron(w1, w2a w2b) with w1 full [4, 4] and w2 [16, 8, 3, 3] of rank 2: scale alpha / 2
    w1, k2a, k2b = _r(4, 4, g=g), _r(16, 2, g=g), _r(2, 8 * 9, g=g)
    f.update({f"{_CONV_K}.lokr_w1": w1, f"{_CONV_K}.lokr_w2_a": k2a, f"{_CONV_K}.lokr_w2_b": k2b, f"{_CONV_K}.alpha": torch.tensor(1.0)})
    w2 = (k2a @ k2b).reshape(16, 8, 3, 3)
    kron = torch.zeros(64, 32, 3, 3)
    for a in range(4):
        for b in range(4):
            kron[a * 16:(a + 1) * 16, b * 8:(b + 1) * 8] = w1[a, b] * w2
    expected[_CONV] = kron * 0.5
    # LoKr on a linear layer with both factors low-rank: scale alpha / rank of w1
    l1a, l1b, l2a, l2b = _r(8, 2, g=g), _r(2, 16, g=g), _r(8, 3, g=g), _r(3, 16, g=g)
    f.update({f"{_FF_K}.lokr_w1_a": l1a, f"{_FF_K}.lokr_w1_b": l1b, f"{_FF_K}.lokr_w2_a": l2a, f"{_FF_K}.lokr_w2_b": l2b, f"{_FF_K}.alpha": torch.tensor(3.0)})
    expected[_FF] = torch.kron(l1a @ l1b, l2a @ l2b) * 1.5
    path = tmp_path / "lycoris.safetensors"
    save_file(f, str(path))
    before = _state(model_v1)
    handle = apply_lora(model_v1, path, weight=0.5)
    after = model_v1.state_dict()
    assert handle.layers == 3
    for name, delta in expected.items():
        torch.testing.assert_close(after[name], before[name] + 0.5 * delta, rtol=0, atol=1e-6)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == set(expected)
    handle.remove()
    _assert_bit_equal(model_v1, before)


def test_tucker_forms_locon_mid_and_loha_t(model_v1, tmp_path):
    """LoCon with `lora_mid` (1x1 down, k x k core, 1x1 up) and LoHa with `hada_t1` / `hada_t2`: the merged
    kernel equals composing the convolutions, checked by running them on an input."""
    g = torch.Generator().manual_seed(8)
    down, mid, up = _r(4, 32, 1, 1, g=g), _r(4, 4, 3, 3, g=g), _r(64, 4, 1, 1, g=g)
    t1, t2 = _r(3, 3, 3, 3, g=g), _r(3, 3, 3, 3, g=g)
    out_conv = "model.diffusion_model.output_blocks.2.0.out_layers.3.weight"  # [32, 32, 3, 3]
    out_key = "lora_unet_up_blocks_1_resnets_0_conv2"
    o1a, o1b, o2a, o2b = _r(3, 32, g=g), _r(3, 32, g=g), _r(3, 32, g=g), _r(3, 32, g=g)
    f = {f"{_CONV_K}.lora_down.weight": down, f"{_CONV_K}.lora_mid.weight": mid, f"{_CONV_K}.lora_up.weight": up, f"{_CONV_K}.alpha": torch.tensor(4.0)}
    f.update({f"{out_key}.hada_w1_a": o1a, f"{out_key}.hada_w1_b": o1b, f"{out_key}.hada_w2_a": o2a, f"{out_key}.hada_w2_b": o2b, f"{out_key}.hada_t1": t1, f"{out_key}.hada_t2": t2})
    path = tmp_path / "tucker.safetensors"
    save_file(f, str(path))
    before = _state(model_v1)
    apply_lora(model_v1, path)
    after = model_v1.state_dict()
    x = torch.randn(1, 32, 9, 9, generator=g)
    conv = torch.nn.functional.conv2d
    composed = conv(conv(conv(x, down), mid, padding=1), up)
    merged = conv(x, after[_CONV] - before[_CONV], padding=1)
    torch.testing.assert_close(merged, composed, rtol=0, atol=1e-4)
    # hada with Tucker cores: each factor is [r, out] x core x [r, in]; the delta is their elementwise product
    w1 = torch.einsum("ijhw,jc,io->ochw", t1, o1b, o1a)
    w2 = torch.einsum("ijhw,jc,io->ochw", t2, o2b, o2a)
    torch.testing.assert_close(after[out_conv] - before[out_conv], w1 * w2, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# weights, stacking and removal


def _small_file(unet, path, seed):
    save_file(_kohya_file(unet, None, seed=seed, convs=seed % 2 == 0), str(path))
    return path


def test_weight_zero_is_bit_identical_and_te_weight_zero_keeps_the_text_encoder(model_v1, tmp_path):
    unet, te = _diffusers_models(model_v1, TINY_CONFIG), _transformers_text_encoder(model_v1)
    path = tmp_path / "a.safetensors"
    save_file(_kohya_file(unet, te), str(path))
    before = _state(model_v1)
    handle = apply_lora(model_v1, path, weight=0.0)
    assert handle.layers == 0
    _assert_bit_equal(model_v1, before)
    apply_lora(model_v1, path, weight=1.0, te_weight=0.0)
    after = model_v1.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith("cond_stage_model."))
    assert any(not torch.equal(after[k], before[k]) for k in before if k.startswith("model.diffusion_model."))
    remove_all_loras(model_v1)
    _assert_bit_equal(model_v1, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_stacked_networks_remove_in_any_order(tiny_model, tmp_path, dtype):
    unet = _diffusers_models(tiny_model, TINY_CONFIG)
    paths = [_small_file(unet, tmp_path / f"n{i}.safetensors", seed=i) for i in range(3)]
    weights = [1.0, -0.5, 0.8]
    base = copy.deepcopy(tiny_model).to(dtype)
    original = _state(base)
    for order in itertools.permutations(range(3)):
        model = copy.deepcopy(base)
        handles = [apply_lora(model, p, weight=w) for p, w in zip(paths, weights)]
        assert applied_loras(model) == handles
        remaining = [0, 1, 2]
        for i in order[:-1]:
            handles[i].remove()
            remaining.remove(i)
            fresh = copy.deepcopy(base)
            for j in remaining:
                apply_lora(fresh, paths[j], weight=weights[j])
            _assert_bit_equal(model, fresh.state_dict())  # the same bits as applying only the rest
        handles[order[-1]].remove()
        handles[order[-1]].remove()  # a second remove is a no-op
        _assert_bit_equal(model, original)
        assert applied_loras(model) == []


def test_set_loras_switches_sets_with_the_bits_of_a_fresh_application(model_v1, tmp_path):
    unet = _diffusers_models(model_v1, TINY_CONFIG)
    a, b, c = (_small_file(unet, tmp_path / f"{n}.safetensors", seed=i) for i, n in enumerate("abc"))
    original = _state(model_v1)
    first = set_loras(model_v1, [(a, 1.0, None), (b, 0.5, 0.2)])
    second = set_loras(model_v1, [(a, 1.0, None), (c, 0.7, None)])
    assert second[0] is first[0] and not first[1].applied  # a kept, b removed
    fresh = copy.deepcopy(model_v1)  # a copy carries the merged weights but not the record of applied networks
    assert applied_loras(fresh) == []
    fresh.load_state_dict(original)
    apply_lora(fresh, a)
    apply_lora(fresh, c, weight=0.7)
    _assert_bit_equal(model_v1, fresh.state_dict())
    assert set_loras(model_v1, []) == []
    _assert_bit_equal(model_v1, original)


# ----------------------------------------------------------------------------------------------------------------
# bad input


def test_sdxl_file_is_a_one_line_error_naming_file_and_family(model_v1, tmp_path):
    path = tmp_path / "xl.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file({
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(4, 768, generator=g),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(768, 4, generator=g),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(4, 1280, generator=g),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(1280, 4, generator=g),
    }, str(path))
    before = _state(model_v1)
    with pytest.raises(ValueError) as e:
        apply_lora(model_v1, path)
    assert "\n" not in str(e.value) and str(path) in str(e.value) and "SDXL" in str(e.value)
    _assert_bit_equal(model_v1, before)


def test_text_width_mismatch_is_a_one_line_error_and_changes_nothing(model_v1, tmp_path):
    path = tmp_path / "sd2_for_sd1.safetensors"
    g = torch.Generator().manual_seed(0)
    f = {}
    # a valid UNet layer first, so an error after it would leave a half-applied model if checks came late
    f[f"{_ATTN_K}.lora_down.weight"], f[f"{_ATTN_K}.lora_up.weight"] = torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g)
    key = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    f[key + ".lora_down.weight"], f[key + ".lora_up.weight"] = torch.randn(4, 1024, generator=g), torch.randn(1024, 4, generator=g)
    save_file(f, str(path))
    before = _state(model_v1)
    with pytest.raises(ValueError) as e:
        apply_lora(model_v1, path)
    message = str(e.value)
    assert "\n" not in message and str(path) in message and "SD 2.x" in message and "1024" in message
    _assert_bit_equal(model_v1, before)
    assert applied_loras(model_v1) == []


def test_unmatched_keys_are_one_warning_with_a_count(model_v1, tmp_path, caplog):
    g = torch.Generator().manual_seed(0)
    f = {f"{_ATTN_K}.lora_down.weight": torch.randn(2, 32, generator=g), f"{_ATTN_K}.lora_up.weight": torch.randn(32, 2, generator=g)}
    for i in range(7):
        f[f"lora_unet_nowhere_{i}.lora_down.weight"] = torch.randn(2, 8, generator=g)
        f[f"lora_unet_nowhere_{i}.lora_up.weight"] = torch.randn(8, 2, generator=g)
    f["some_other_tensor"] = torch.zeros(3)
    path = tmp_path / "partial.safetensors"
    save_file(f, str(path))
    with caplog.at_level(logging.WARNING, logger="microbatch.lora"):
        handle = apply_lora(model_v1, path)
    records = [r for r in caplog.records if r.name == "microbatch.lora"]
    assert len(records) == 1
    text = records[0].getMessage()
    assert "8 keys" in text and "lora_unet_nowhere_0" in text and str(path) in text
    assert handle.layers == 1


def test_not_a_lora_file_and_dora_are_errors(model_v1, tmp_path):
    path = tmp_path / "junk.safetensors"
    save_file({"foo": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="no LoRA"):
        apply_lora(model_v1, path)
    dora = tmp_path / "dora.safetensors"
    save_file({f"{_ATTN_K}.lora_down.weight": torch.ones(2, 32), f"{_ATTN_K}.lora_up.weight": torch.ones(32, 2), f"{_ATTN_K}.dora_scale": torch.ones(32, 1)}, str(dora))
    with pytest.raises(ValueError, match="DoRA"):
        apply_lora(model_v1, dora)


# ----------------------------------------------------------------------------------------------------------------
# prompt tags, lookup, hashes


def test_extract_lora_tags_as_the_web_ui():
    prompt, tags = extract_lora_tags("a cat <lora:style:0.8>, <lora:detail:0.5:1.2> red <lyco:loha> <lora:x:te=0.3:unet=0.9>")
    assert prompt == "a cat ,  red  "
    assert tags == [("style", 0.8, 0.8), ("detail", 0.5, 1.2), ("loha", 1.0, 1.0), ("x", 0.3, 0.9)]
    assert extract_lora_tags("no tags (here:1.2)") == ("no tags (here:1.2)", [])
    assert extract_lora_tags("<hypernet:h:1>x") == ("x", [])
    with pytest.raises(ValueError, match="<lora:a:strong>"):
        extract_lora_tags("<lora:a:strong>")


def test_find_lora(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.pt").write_bytes(b"x")
    (tmp_path / "a.safetensors").write_bytes(b"x")
    (tmp_path / "sub" / "b.ckpt").write_bytes(b"x")
    assert find_lora("a", tmp_path) == tmp_path / "a.safetensors"
    assert find_lora("b", tmp_path) == tmp_path / "sub" / "b.ckpt"
    assert find_lora("a.pt", tmp_path) == tmp_path / "a.pt"
    assert find_lora("c", tmp_path) is None
    assert find_lora("a", tmp_path / "missing") is None


def test_lora_hashes_are_the_web_uis(tmp_path):
    tensors = {"lora_unet_x.lora_down.weight": torch.arange(6.0).reshape(2, 3)}
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(tensors, str(a), metadata={"ss_output_name": "a"})
    save_file(tensors, str(b), metadata={"ss_output_name": "something much longer"})
    raw = a.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert lora_hash(a) == hashlib.sha256(raw[8 + n:]).hexdigest() == lora_hash(b)  # metadata does not count
    assert lora_hash(a) != hashlib.sha256(raw).hexdigest()
    pt = tmp_path / "c.pt"
    torch.save(tensors, pt)
    assert lora_hash(pt) == hashlib.sha256(pt.read_bytes()).hexdigest()
    text = lora_hashes([("a", a), ("we:ird,name", pt)])
    assert text == f"a: {lora_hash(a)[:12]}, weirdname: {lora_hash(pt)[:12]}"
