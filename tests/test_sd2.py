"""SD 2.x: the OpenCLIP text encoder, the v2 configs, v-prediction sampling and config / eps-v inference.

Independent references: transformers' CLIPTextModel and diffusers' UNet2DConditionModel loaded through diffusers'
own single-file converters (tiny random weights in the original layout; the full-size layout on the meta device),
DDIM and PLMS written here from the published equations, and the closed-form ideal denoiser of Gaussian (and
two-point) data for the eps / v detector.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ldm.modules.attention_backends import AttentionBackend, attention_math
from ldm.modules.diffusionmodules.util import make_ddim_timesteps
from ldm.modules.encoders.modules import FrozenOpenCLIPEmbedder
from ldm.util import instantiate_from_config, load_config
from microbatch.loading import (
    EPS_SLOPE_THRESHOLD,
    builtin_config,
    detect_parameterization,
    infer_config,
    load_model,
    output_input_slope,
    settle_parameterization,
)
from microbatch.devices import Dtypes
from samplers import DDIMSampler, Denoiser, GuidedModel, PLMSSampler, get_sigmas, sample_ddim, sample_plms, to_vp
from tests.conftest import REPO, build_tiny

TINY_V2 = REPO / "configs" / "tiny" / "tiny-v2.yaml"
TINY_V2_V = REPO / "configs" / "tiny" / "tiny-v2-v.yaml"
V2_CONFIGS = ("v2-inference.yaml", "v2-inference-v.yaml", "v2-inpainting-inference.yaml")
PROMPTS = ["a professional photograph of an astronaut riding a triceratops", "", "a red circle, " * 40]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _meta_model(name: str):
    with torch.device("meta"):
        return instantiate_from_config(load_config(REPO / "configs" / "stable-diffusion" / name).model)


@pytest.fixture(scope="module")
def tiny_v2():
    return build_tiny(TINY_V2, seed=3)


@pytest.fixture(scope="module")
def tiny_v2_v():
    return build_tiny(TINY_V2_V, seed=4)


# --- FrozenOpenCLIPEmbedder ------------------------------------------------------------------------------------


def test_openclip_keys_are_the_openclip_layout(tiny_v2):
    keys = {k for k in tiny_v2.state_dict() if k.startswith("cond_stage_model.")}
    prefix = "cond_stage_model.model."
    block = ["ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias",
             "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"]
    expected = {prefix + k for k in ("token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias", "text_projection", "logit_scale")}
    expected |= {f"{prefix}transformer.resblocks.{i}.{k}" for i in range(3) for k in block}
    assert keys == expected
    sd = tiny_v2.state_dict()
    assert tuple(sd[prefix + "transformer.resblocks.0.attn.in_proj_weight"].shape) == (96, 32)
    assert tuple(sd[prefix + "text_projection"].shape) == (32, 16)


def test_openclip_tokens_are_zero_padded(tiny_v2):
    tokens = tiny_v2.cond_stage_model.tokenize(["a photograph of a cat", ""])
    assert tokens.shape == (2, 77)
    assert tokens[0, :7].tolist() == [49406, 320, 8853, 539, 320, 2368, 49407]
    assert tokens[0, 7:].eq(0).all() and tokens[1, :2].tolist() == [49406, 49407] and tokens[1, 2:].eq(0).all()


@pytest.fixture(scope="module")
def hf_text_model(tiny_v2):
    """transformers' CLIPTextModel with all 3 layers, weights through diffusers' convert_open_clip_checkpoint."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                            max_position_embeddings=77, hidden_act="gelu", projection_dim=16)
    model = CLIPTextModel(config)
    converted = convert_open_clip_checkpoint(model, tiny_v2.state_dict(), prefix="cond_stage_model.model.")
    converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    model.load_state_dict(converted, strict=True)
    return model.eval()


@torch.no_grad()
@pytest.mark.parametrize("layer", ["penultimate", "last"])
def test_openclip_matches_transformers(tiny_v2, hf_text_model, layer):
    encoder = tiny_v2.cond_stage_model
    encoder.layer, encoder.layer_idx = layer, {"last": 0, "penultimate": 1}[layer]
    try:
        ours = encoder(PROMPTS)
    finally:
        encoder.layer, encoder.layer_idx = "penultimate", 1
    out = hf_text_model(input_ids=encoder.tokenize(PROMPTS), output_hidden_states=True)
    # diffusers' SD 2 text encoder drops the last layer; "penultimate" = final_layer_norm(hidden_states[-2])
    theirs = out.last_hidden_state if layer == "last" else hf_text_model.final_layer_norm(out.hidden_states[-2])
    assert ours.shape == (3, 77, 32)
    assert ours.abs().max() > 0.5
    assert _rel_err(ours, theirs) < 1e-5


@torch.no_grad()
def test_openclip_is_causal_and_penultimate_differs(tiny_v2):
    encoder = tiny_v2.cond_stage_model
    a, b = encoder(["a red circle on a gray background", "a red circle on a blue background"])
    n_same = 1 + len(encoder.tokenizer.encode("a red circle on a"))
    assert torch.equal(a[:n_same], b[:n_same])  # causal: a later token never changes an earlier position
    assert not torch.allclose(a[n_same:], b[n_same:])
    last = encoder.model.encode_tokens(encoder.tokenize([""]), stop_before=0)
    assert not torch.allclose(last, encoder([""]))


def test_openclip_config_checks():
    with pytest.raises(ValueError, match="layer"):
        FrozenOpenCLIPEmbedder(layer="pooled")
    with pytest.raises(ValueError, match="arch"):
        FrozenOpenCLIPEmbedder(arch="ViT-Q-99")
    with pytest.raises(ValueError, match="hidden_dropout"):
        FrozenOpenCLIPEmbedder(text_config={"hidden_dropout": 0.1})
    with torch.device("meta"):
        big = FrozenOpenCLIPEmbedder(layer="penultimate")
    tower = big.model
    assert tower.token_embedding.weight.shape == (49408, 1024) and tower.positional_embedding.shape == (77, 1024)
    assert len(tower.transformer.resblocks) == 24 and tower.transformer.resblocks[0].attn.heads == 16
    assert tower.transformer.resblocks[0].mlp.c_fc.out_features == 4096
    assert isinstance(tower.transformer.resblocks[0].mlp.gelu, torch.nn.GELU) and tower.transformer.resblocks[0].mlp.gelu.approximate == "none"
    assert not any(p.requires_grad for p in big.parameters())


# --- UNet and configs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", V2_CONFIGS)
def test_published_v2_configs_build_unchanged_on_meta(name):
    model = _meta_model(name)
    unet = model.model.diffusion_model
    assert type(model).__name__ == ("LatentInpaintDiffusion" if "inpainting" in name else "LatentDiffusion")
    assert model.parameterization == ("v" if name.endswith("-v.yaml") else "eps")
    assert model.image_size == 64 and model.scale_factor == 0.18215
    assert unet.in_channels == (9 if "inpainting" in name else 4)
    assert model.model.conditioning_key == ("hybrid" if "inpainting" in name else "crossattn")
    n_params = sum(p.numel() for p in model.model.parameters())
    assert n_params == (865_925_124 if "inpainting" in name else 865_910_724)
    # num_head_channels 64: heads = channels / 64; linear proj_in / proj_out; 1024-wide cross-attention context
    transformers = [m for m in unet.modules() if type(m).__name__ == "SpatialTransformer"]
    assert len(transformers) == 16
    for st in transformers:
        block = st.transformer_blocks[0]
        assert block.attn1.heads == st.in_channels // 64 and block.attn1.to_q.out_features == st.in_channels
        assert isinstance(st.proj_in, torch.nn.Linear) and isinstance(st.proj_out, torch.nn.Linear)
        assert block.attn2.to_k.in_features == 1024
    assert sorted({st.in_channels // 64 for st in transformers}) == [5, 10, 20]
    assert model.cond_stage_model.layer == "penultimate"
    assert unet.dtype == torch.float32  # use_fp16 does not decide the compute dtype; the pipeline does


def test_inpainting_config_training_sections_are_ignored():
    cfg = load_config(REPO / "configs" / "stable-diffusion" / "v2-inpainting-inference.yaml")
    assert "data" in cfg and "lightning" in cfg
    assert cfg.model.params.finetune_keys is None


@pytest.mark.parametrize("name", ["v2-inference.yaml", "v2-inpainting-inference.yaml"])
def test_full_size_layout_converts_to_diffusers_on_meta(name):
    """diffusers' converters accept our full-size SD 2 state dict (keys and shapes only) and every converted key
    and shape equals those of diffusers' own models built from that config: nothing is allocated."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel

    model = _meta_model(name)
    sd = model.state_dict()
    assert all(v.is_meta for v in sd.values())
    config = OmegaConf.to_container(load_config(REPO / "configs" / "stable-diffusion" / name), resolve=True)
    shapes = lambda d: {k: tuple(v.shape) for k, v in d.items()}  # noqa: E731

    unet_cfg = sfu.create_unet_diffusers_config_from_ldm(config, sd)
    assert unet_cfg["attention_head_dim"] == [5, 10, 20, 20] and unet_cfg["cross_attention_dim"] == 1024
    assert unet_cfg["use_linear_projection"] and unet_cfg["in_channels"] == (9 if "inpainting" in name else 4)
    vae_cfg = sfu.create_vae_diffusers_config_from_ldm(config, sd)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
        # diffusers' SD 2 text encoder: 23 layers (the penultimate layer), final LayerNorm
        text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                            num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512))
    assert shapes(sfu.convert_ldm_unet_checkpoint(sd, unet_cfg)) == shapes(unet.state_dict())
    assert shapes(sfu.convert_ldm_vae_checkpoint(sd, vae_cfg)) == shapes(vae.state_dict())
    converted = {k.removeprefix("text_model."): v for k, v in sfu.convert_open_clip_checkpoint(text, sd).items()}
    assert shapes(converted) == shapes(text.state_dict())
    assert len(unet.state_dict()) == 686


@pytest.fixture(scope="module")
def diffusers_unet(tiny_v2):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu

    sd = tiny_v2.state_dict()
    cfg = sfu.create_unet_diffusers_config_from_ldm(OmegaConf.to_container(OmegaConf.load(TINY_V2), resolve=True), sd)
    unet = UNet2DConditionModel(**cfg)
    unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(sd, cfg), strict=True)
    return unet.eval()


@torch.no_grad()
def test_tiny_v2_unet_matches_diffusers(tiny_v2, diffusers_unet):
    g = torch.Generator().manual_seed(5)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    for t in (1, 500, 999):
        ts = torch.tensor([t, t])
        ours = tiny_v2.apply_model(x, ts, ctx)
        theirs = diffusers_unet(x, ts, encoder_hidden_states=ctx).sample
        assert ours.abs().max() > 1e-2
        assert _rel_err(ours, theirs) < 1e-4


@torch.no_grad()
def test_math_attention_survives_fp16_score_overflow():
    """q.k of 64 x 40 x 40 = 102400 > 65504 (fp16 max): a naive half-precision product overflows to inf and the
    softmax gives NaN; the math backend computes scores in float32 and stays finite and accurate."""
    g = torch.Generator().manual_seed(0)
    q = (40.0 + torch.rand(1, 2, 6, 64, generator=g)).half()
    k = (40.0 + torch.rand(1, 2, 5, 64, generator=g)).half()
    v = torch.randn(1, 2, 5, 64, generator=g).half()
    naive_scores = torch.matmul(q, k.transpose(-1, -2))
    assert naive_scores.dtype == torch.float16 and torch.isinf(naive_scores).all()
    assert torch.isnan((naive_scores * 64**-0.5).softmax(-1)).all()
    ref = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 8.0, dim=-1) @ v.double()
    for out in (attention_math(q, k, v), AttentionBackend("sliced", 1, 64)(q, k, v)):
        assert out.dtype == torch.float16 and torch.isfinite(out).all()
        assert (out.double() - ref).abs().max() < 1e-2


# --- v-prediction sampling against the published equations -----------------------------------------------------


def _conditioning(model, batch: int):
    with torch.no_grad():
        return model.get_learned_conditioning(["a red circle"] * batch), model.get_learned_conditioning([""] * batch)


@torch.no_grad()
def reference_sample(model, x_T, cond, uncond, scale, steps, eta=0.0, noises=None, plms=False):
    """CompVis DDIM / PLMS in VP variables, float64, for a v model (SD 2's DDIM; PLMS with the same v -> eps
    conversion, which SD 2's PLMS lacked). Guidance on v: v = v_u + s (v_c - v_u); then
    x0 = sqrt(a) x_t - sqrt(1-a) v, eps = sqrt(a) v + sqrt(1-a) x_t,
    x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z."""
    ac = model.alphas_cumprod.double()
    ts = make_ddim_timesteps("uniform", steps, 1000)
    a = ac[ts]
    a_prev = torch.cat([ac[:1], ac[ts[:-1]]])
    sig = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
    b = x_T.shape[0]

    def eps_of(x, t):
        tt = torch.full((b,), int(t), dtype=torch.long)
        v_u, v_c = model.apply_model(torch.cat([x, x]).float(), torch.cat([tt, tt]), torch.cat([uncond, cond])).double().chunk(2)
        v = v_u + scale * (v_c - v_u)
        return ac[t].sqrt() * v + (1 - ac[t]).sqrt() * x

    def step(x, e, index):
        x0 = (x - (1 - a[index]).sqrt() * e) / a[index].sqrt()
        out = a_prev[index].sqrt() * x0 + (1 - a_prev[index] - sig[index] ** 2).sqrt() * e
        return out + sig[index] * noises[len(ts) - 1 - index] if eta > 0 else out

    x, old = x_T.double(), []
    order = ts[::-1]
    for i, t in enumerate(order):
        index = len(ts) - 1 - i
        e = eps_of(x, t)
        if not plms:
            x = step(x, e, index)
            continue
        if not old:
            t_next = order[min(i + 1, len(order) - 1)]
            e_prime = (e + eps_of(step(x, e, index), t_next)) / 2
        elif len(old) == 1:
            e_prime = (3 * e - old[-1]) / 2
        elif len(old) == 2:
            e_prime = (23 * e - 16 * old[-1] + 5 * old[-2]) / 12
        else:
            e_prime = (55 * e - 59 * old[-1] + 37 * old[-2] - 9 * old[-3]) / 24
        x = step(x, e_prime, index)
        old = (old + [e])[-3:]
    return x


@pytest.mark.parametrize("plms,eta", [(False, 0.0), (False, 1.0), (True, 0.0)])
def test_v_sampling_matches_reference(tiny_v2_v, plms, eta):
    model, steps, scale = tiny_v2_v, 8, 4.0
    assert model.parameterization == "v"
    cond, uncond = _conditioning(model, 2)
    g = torch.Generator().manual_seed(11)
    x_T = torch.randn(2, 4, 8, 8, generator=g)
    noises = [torch.randn(2, 4, 8, 8, generator=g) for _ in range(steps)]
    expected = reference_sample(model, x_T, cond, uncond, scale, steps, eta, noises, plms)

    denoiser = Denoiser(GuidedModel(model.apply_model, cond, uncond, scale), model.alphas_cumprod, model.parameterization)
    sigmas = get_sigmas("uniform", denoiser, steps)
    drawn = iter(noises)
    fn = sample_plms if plms else sample_ddim
    x = fn(denoiser, x_T * math.sqrt(float(sigmas[0]) ** 2 + 1), sigmas, eta=eta, noise=lambda like: next(drawn))
    ours = to_vp(x, float(sigmas[-1]))
    assert expected.abs().max() > 0.1
    assert _rel_err(ours.double(), expected) < 1e-5

    # the same model as eps would give another result: the test sees the parameterization
    wrong = Denoiser(GuidedModel(model.apply_model, cond, uncond, scale), model.alphas_cumprod, "eps")
    drawn = iter(noises)
    x_eps = to_vp(fn(wrong, x_T * math.sqrt(float(sigmas[0]) ** 2 + 1), sigmas, eta=eta, noise=lambda like: next(drawn)), float(sigmas[-1]))
    assert _rel_err(x_eps.double(), expected) > 1e-2

    if eta == 0.0:  # the CompVis-compatible classes (their eta > 0 noise comes from the global RNG)
        sampler = (PLMSSampler if plms else DDIMSampler)(model)
        samples, _ = sampler.sample(steps, 2, (4, 8, 8), cond, verbose=False, eta=0.0, x_T=x_T,
                                    unconditional_guidance_scale=scale, unconditional_conditioning=uncond)
        assert _rel_err(samples.double(), expected) < 1e-5


# --- eps / v detection -----------------------------------------------------------------------------------------


def _a(t: torch.Tensor) -> torch.Tensor:
    from ldm.modules.diffusionmodules.util import make_beta_schedule

    ac = torch.tensor(np.cumprod(1 - make_beta_schedule("linear", 1000, 0.00085, 0.012)))
    return ac[t.long()].reshape(-1, 1, 1, 1)


def gaussian_ideal(kind: str, std: float):
    """The exact E[eps | x_t] or E[v | x_t] for data x0 ~ N(0, std^2 I)."""

    def fn(x, t):
        a = _a(t)
        var = a * std**2 + 1 - a
        eps = (1 - a).sqrt() * x / var
        x0 = a.sqrt() * std**2 * x / var
        return (eps if kind == "eps" else a.sqrt() * eps - (1 - a).sqrt() * x0).to(x.dtype)

    return fn


def two_point_ideal(kind: str, m: float):
    """The exact E[eps | x_t] or E[v | x_t] for data x0 = +-m with equal probability (per element)."""

    def fn(x, t):
        a = _a(t)
        x0 = m * torch.tanh(a.sqrt() * m * x / (1 - a))
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return (eps if kind == "eps" else a.sqrt() * eps - (1 - a).sqrt() * x0).to(x.dtype)

    return fn


@pytest.mark.parametrize("data,param", [("gauss", 0.5), ("gauss", 1.0), ("gauss", 2.0), ("gauss", 5.0), ("two-point", 1.0), ("two-point", 0.3)])
def test_detector_statistic_on_ideal_models(data, param):
    make = gaussian_ideal if data == "gauss" else two_point_ideal
    x = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    eps_slope = output_input_slope(make("eps", param), x)
    v_slope = output_input_slope(make("v", param), x)
    assert eps_slope > 0.8 > EPS_SLOPE_THRESHOLD
    assert v_slope < 0.1
    if data == "gauss":  # the closed forms of the docstring
        a = float(_a(torch.tensor([999])))
        assert eps_slope == pytest.approx(math.sqrt(1 - a) / (a * param**2 + 1 - a), rel=1e-6)
        assert v_slope == pytest.approx(math.sqrt(a * (1 - a)) * (1 - param**2) / (a * param**2 + 1 - a), abs=1e-6)


def test_detect_parameterization_plumbing(tiny_v2, monkeypatch):
    """detect_parameterization evaluates apply_model once at t = 999 on N(0, I) latents with the text context."""
    seen = []

    def fake(kind):
        ideal = gaussian_ideal(kind, 1.0)

        def apply_model(x, t, cond):
            seen.append((tuple(x.shape), t.tolist(), tuple(cond.shape)))
            return ideal(x, t)

        return apply_model

    for kind in ("eps", "v"):
        monkeypatch.setattr(tiny_v2, "apply_model", fake(kind))
        choice, slope = detect_parameterization(tiny_v2)
        assert choice == kind
    assert seen == [((1, 4, 8, 8), [999], (1, 77, 32))] * 2


def test_detection_gives_inpainting_models_their_extra_channels(monkeypatch):
    model = build_tiny(REPO / "configs" / "tiny" / "tiny-v2-inpainting.yaml", seed=1)
    seen = []

    def apply_model(x, t, cond):
        seen.append(cond)
        return gaussian_ideal("eps", 1.0)(x, t)

    monkeypatch.setattr(model, "apply_model", apply_model)
    assert detect_parameterization(model)[0] == "eps"
    (cond,) = seen
    assert set(cond) == {"c_concat", "c_crossattn"} and cond["c_crossattn"][0].shape == (1, 77, 32)
    assert cond["c_concat"][0].shape == (1, 5, 8, 8) and not cond["c_concat"][0].any()


# --- config inference -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,expected", [("v2-inference.yaml", "v2-inference.yaml"), ("v2-inference-v.yaml", "v2-inference.yaml"),
                                           ("v2-inpainting-inference.yaml", "v2-inpainting-inference.yaml")])
def test_infer_config_full_size_from_meta_shapes(name, expected):
    sd = _meta_model(name).state_dict()
    config, reason = infer_config(sd, REPO / "x.ckpt")
    assert config == builtin_config(f"stable-diffusion/{expected}")
    assert "SD 2.x" in reason and "1024-wide context" in reason and expected in reason


def test_settle_parameterization_gives_768_for_inferred_v_models():
    model = _meta_model("v2-inference.yaml")
    base = builtin_config("stable-diffusion/v2-inference.yaml")
    config, reason = settle_parameterization(model, base, "shapes", inferred=True, requested="v", ckpt=None)
    assert config == builtin_config("stable-diffusion/v2-inference-v.yaml") and model.parameterization == "v"
    assert model.image_size * 8 == 768 and "native size 768" in reason
    model = _meta_model("v2-inference.yaml")
    config, reason = settle_parameterization(model, base, "given", inferred=False, requested="v", ckpt=None)
    assert config == base and model.parameterization == "v" and model.image_size == 64  # a given config keeps its size
    config, reason = settle_parameterization(model, base, "given", inferred=False, requested="auto", ckpt=None)
    assert config == base and reason == "given"


def test_infer_config_refuses_unknown_sd2_shapes(tiny_v2):
    from ldm.checkpoint import CheckpointError

    sd = dict(tiny_v2.state_dict())
    sd.pop("cond_stage_model.model.ln_final.weight")
    with pytest.raises(CheckpointError, match="no shipped config fits.*ln_final.weight missing"):
        infer_config(sd, REPO / "odd.safetensors")


def test_tiny_checkpoint_picks_config_and_parameterization_end_to_end(tiny_v2, tmp_path, caplog):
    from safetensors.torch import save_file

    from microbatch.cli import main_for

    ckpt = tmp_path / "tiny-sd2.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_v2.state_dict().items()}, str(ckpt))
    f32 = Dtypes(torch.float32, torch.float32, torch.float32)
    for requested, expected in (("v", TINY_V2_V), ("eps", TINY_V2)):
        loaded = load_model(ckpt, None, torch.device("cpu"), f32, parameterization=requested)
        assert loaded.config_path == expected and loaded.model.parameterization == requested
        assert "tiny/tiny-v2.yaml" in loaded.config_reason and "--parameterization" in loaded.config_reason
    auto = load_model(ckpt, None, torch.device("cpu"), f32)
    assert "slope" in auto.config_reason and auto.model.parameterization in ("eps", "v")
    with pytest.raises(ValueError, match="parameterization"):
        load_model(ckpt, None, torch.device("cpu"), f32, parameterization="x0")

    caplog.set_level(logging.INFO)
    out = tmp_path / "out"
    argv = ["--ckpt", str(ckpt), "--parameterization", "v", "--prompt", "a red circle", "--n_samples", "2", "--n_iter", "1",
            "--ddim_steps", "3", "--outdir", str(out), "--quiet", "--precision", "full"]
    assert main_for("txt2img", "test", argv) == 0
    assert "tiny-v2-v.yaml" in caplog.text and "given with --parameterization" in caplog.text
    from PIL import Image

    with Image.open(out / "samples" / "00001.png") as im:
        assert im.size == (64, 64)  # native size: image_size 8 x f 8
