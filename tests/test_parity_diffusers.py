"""Our UNet, VAE and text encoder against diffusers' independent implementation, on the same random weights.

A tiny random checkpoint in the original key layout is converted with diffusers' single-file helpers and loaded
strictly into diffusers' models; outputs must agree to float round-off.
"""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import TINY_CONFIG, REPO

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL as DAutoencoderKL  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.loaders import single_file_utils as sfu  # noqa: E402


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.fixture(scope="module")
def converted(tiny_model):
    config = OmegaConf.to_container(OmegaConf.load(TINY_CONFIG), resolve=True)
    sd = tiny_model.state_dict()
    unet_cfg = sfu.create_unet_diffusers_config_from_ldm(config, sd)
    unet = UNet2DConditionModel(**unet_cfg)
    unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(sd, unet_cfg), strict=True)
    vae_cfg = sfu.create_vae_diffusers_config_from_ldm(config, sd)
    vae = DAutoencoderKL(**vae_cfg)
    vae.load_state_dict(sfu.convert_ldm_vae_checkpoint(sd, vae_cfg), strict=True)
    return unet.eval(), vae.eval()


@torch.no_grad()
def test_unet_matches_diffusers(tiny_model, converted):
    unet, _ = converted
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, 32, generator=g)
    for t in (1, 500, 999):
        ts = torch.tensor([t, t])
        ours = tiny_model.apply_model(x, ts, ctx)
        theirs = unet(x, ts, encoder_hidden_states=ctx).sample
        assert ours.abs().max() > 1e-2  # not a trivially zero network
        assert _rel_err(ours, theirs) < 1e-4


@torch.no_grad()
def test_unet_attention_backends_agree(tiny_model):
    from ldm.modules.attention_backends import AttentionBackend

    g = torch.Generator().manual_seed(2)
    x, ctx, ts = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g), torch.tensor([10, 700])
    outs = {}
    for backend in (AttentionBackend("math"), AttentionBackend("sdpa"), AttentionBackend("sliced", 1, 4096), AttentionBackend("sliced", None, 1 << 12)):
        tiny_model.set_attention(backend)
        outs[repr(backend)] = tiny_model.apply_model(x, ts, ctx)
    tiny_model.set_attention(AttentionBackend("sdpa"))
    ref = next(iter(outs.values()))
    for out in outs.values():
        assert _rel_err(out, ref) < 1e-5


@torch.no_grad()
def test_vae_matches_diffusers(tiny_model, converted):
    _, vae = converted
    g = torch.Generator().manual_seed(3)
    img = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    post = tiny_model.encode_first_stage(img)
    theirs = vae.encode(img).latent_dist
    assert _rel_err(post.mean, theirs.mean) < 1e-4
    assert _rel_err(post.std, theirs.std) < 1e-4
    z = torch.randn(1, 4, 8, 8, generator=g)
    ours = tiny_model.decode_first_stage(z)
    theirs_img = vae.decode(z / tiny_model.scale_factor).sample
    assert _rel_err(ours, theirs_img) < 1e-4


@torch.no_grad()
def test_text_encoder_matches_transformers_loaded_through_diffusers(tiny_model):
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.modules.encoders.modules import VIT_L14_TEXT_CONFIG

    text_cfg = dict(OmegaConf.to_container(OmegaConf.load(TINY_CONFIG).model.params.cond_stage_config.params.text_config))
    ref = CLIPTextModel(CLIPTextConfig(**{**VIT_L14_TEXT_CONFIG, **text_cfg}))
    sd = sfu.convert_ldm_clip_checkpoint(tiny_model.state_dict())
    if not any(k.startswith("text_model.") for k in ref.state_dict()):  # transformers 5 dropped the nesting
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    assert sd and all(k.startswith(("embeddings.", "encoder.", "final_layer_norm.", "text_model.")) for k in sd)
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    prompts = ["a photograph of a cat", "", "a red circle on a white background, highly detailed"]
    ours = tiny_model.get_learned_conditioning(prompts)
    ids = tiny_model.cond_stage_model.tokenize(prompts)
    theirs = ref(input_ids=ids).last_hidden_state
    assert ours.shape == (3, 77, 32)
    assert _rel_err(ours, theirs) < 1e-4


def test_full_size_v1_layout_is_accepted_by_diffusers_converters():
    """The published v1 config builds (on the meta device: nothing allocated) a state dict whose keys and shapes
    diffusers' converters map onto its UNet and VAE with strict loading."""
    from ldm.util import instantiate_from_config

    config = OmegaConf.load(REPO / "configs" / "stable-diffusion" / "v1-inference.yaml")
    with torch.device("meta"):
        model = instantiate_from_config(config.model)
    sd = model.state_dict()
    n_params = sum(p.numel() for p in model.model.parameters())
    assert 859_000_000 < n_params < 860_000_000  # "DiffusionWrapper has 859.52 M params"
    container = OmegaConf.to_container(config, resolve=True)
    unet_cfg = sfu.create_unet_diffusers_config_from_ldm(container, sd)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_cfg)
    converted = sfu.convert_ldm_unet_checkpoint(sd, unet_cfg)
    theirs = unet.state_dict()
    assert set(converted) == set(theirs)
    assert all(tuple(converted[k].shape) == tuple(theirs[k].shape) for k in theirs)
    vae_cfg = sfu.create_vae_diffusers_config_from_ldm(container, sd)
    with torch.device("meta"):
        vae = DAutoencoderKL(**vae_cfg)
    converted_vae = sfu.convert_ldm_vae_checkpoint(sd, vae_cfg)
    theirs_vae = vae.state_dict()
    assert set(converted_vae) == set(theirs_vae)
    assert all(tuple(converted_vae[k].shape) == tuple(theirs_vae[k].shape) for k in theirs_vae)
    text = {k for k in sd if k.startswith("cond_stage_model.transformer.text_model.")}
    assert len(text) == 196 and "cond_stage_model.transformer.text_model.final_layer_norm.weight" in text
