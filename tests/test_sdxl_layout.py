"""SDXL layouts and configs: the published yamls build (on the meta device) the published key names and shapes,
diffusers' converters and model-type detection accept them, the schedule and parameterization come from the
denoiser config, and config inference recognises base and refiner files.

Independent references: parameter counts and key names of the published checkpoints (UNet 2,567,463,684; CLIP ViT-L
text 123,060,480; OpenCLIP bigG text with projection 694,659,840; VAE 83,653,863), diffusers' SDXL models built from
diffusers' own config conversion of the yaml, and diffusers' DDPM scheduler for the scaled-linear schedule.
"""
from __future__ import annotations

import logging

import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import CheckpointError
from ldm.modules.attention_backends import AttentionBackend
from ldm.util import instantiate_from_config, load_config, load_model_from_config
from microbatch.devices import Dtypes
from microbatch.loading import builtin_config, infer_config, load_model
from microbatch.sdxl import infer_sdxl_config, sdxl_kind
from sgm.models.diffusion import DiffusionEngine, schedule_from_denoiser_config
from tests.conftest import REPO, TINY_CONFIG, build_tiny

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

SDXL = REPO / "configs" / "sdxl"
TINY = {"base": REPO / "configs" / "tiny" / "tiny-sdxl-base.yaml", "refiner": REPO / "configs" / "tiny" / "tiny-sdxl-refiner.yaml"}
F32 = Dtypes(torch.float32, torch.float32, torch.float32)


def meta_model(path) -> DiffusionEngine:
    with torch.device("meta"):
        return instantiate_from_config(load_config(path).model)


def shapes(state_dict: dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def numel(state_dict: dict, prefix: str) -> int:
    return sum(v.numel() for k, v in state_dict.items() if k.startswith(prefix))


@pytest.fixture(scope="module")
def full():
    """State dicts (meta tensors) of the four published yamls."""
    names = ("sd_xl_base", "sd_xl_refiner", "sd_xl_base_2023-07", "sd_xl_refiner_2023-07")
    return {name: meta_model(SDXL / f"{name}.yaml").state_dict() for name in names}


# --- the published layouts ---------------------------------------------------------------------------------------


# (tensors in our state dict, UNet parameters, text-encoder tensors' elements per embedder, VAE parameters)
LAYOUTS = {
    "sd_xl_base": (2514, 2_567_463_684, {0: 123_060_480, 1: 694_659_840 + 1}, 83_653_863),
    "sd_xl_refiner": (1858, 2_259_526_660, {0: 694_659_840 + 1}, 83_653_863),
}
# Published key names and shapes (the +1 above is OpenCLIP's scalar logit_scale, stored in the files).
PUBLISHED_KEYS = {
    "sd_xl_base": {
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.label_emb.0.2.weight": (1280, 1280),
        "model.diffusion_model.input_blocks.4.1.proj_in.weight": (640, 640),
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight": (640, 2048),
        "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_v.weight": (1280, 2048),
        "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.0.proj.weight": (10240, 1280),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.1.transformer_blocks.1.norm3.weight": (640,),
        "model.diffusion_model.output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc1.weight": (3072, 768),
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
        "conditioner.embedders.1.model.logit_scale": (),
        "conditioner.embedders.1.model.positional_embedding": (77, 1280),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
    },
    "sd_xl_refiner": {
        "model.diffusion_model.label_emb.0.0.weight": (1536, 2560),
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.3.attn2.to_k.weight": (768, 1280),
        "model.diffusion_model.middle_block.1.transformer_blocks.3.attn1.to_q.weight": (1536, 1536),
        "model.diffusion_model.input_blocks.10.0.in_layers.2.weight": (1536, 1536, 3, 3),
        "model.diffusion_model.output_blocks.0.0.skip_connection.weight": (1536, 3072, 1, 1),
        "conditioner.embedders.0.model.text_projection": (1280, 1280),
        "conditioner.embedders.0.model.transformer.resblocks.31.mlp.c_fc.weight": (5120, 1280),
        "first_stage_model.post_quant_conv.weight": (4, 4, 1, 1),
    },
}


@pytest.mark.parametrize("name", ["sd_xl_base", "sd_xl_refiner"])
def test_published_layout_counts_and_keys(full, name):
    sd = full[name]
    assert all(v.is_meta for v in sd.values())
    tensors, unet, text, vae = LAYOUTS[name]
    assert len(sd) == tensors
    assert numel(sd, "model.diffusion_model.") == unet
    for n, count in text.items():
        assert numel(sd, f"conditioner.embedders.{n}.") == count
    assert numel(sd, "first_stage_model.") == vae
    assert numel(sd, "") == unet + sum(text.values()) + vae  # nothing outside the three components
    assert {k: tuple(sd[k].shape) for k in PUBLISHED_KEYS[name] if k in sd} == PUBLISHED_KEYS[name]
    if name == "sd_xl_refiner":  # no attention at the lowest resolution (attention_resolutions [4, 2])
        assert not any(k.startswith(("model.diffusion_model.input_blocks.10.1.", "model.diffusion_model.output_blocks.0.1.")) for k in sd)


@pytest.mark.parametrize("name", ["sd_xl_base", "sd_xl_refiner"])
def test_july_2023_yamls_build_the_same_layout(full, name):
    assert shapes(full[f"{name}_2023-07"]) == shapes(full[name])
    model = meta_model(SDXL / f"{name}_2023-07.yaml")
    assert type(model.first_stage_model).__name__ == "AutoencoderKLInferenceWrapper"


@pytest.mark.parametrize("name", ["sd_xl_base", "sd_xl_refiner"])
def test_published_layout_converts_to_diffusers(full, name):
    """diffusers recognises the layout (xl_base / xl_refiner) and its converters map every tensor onto diffusers'
    SDXL models (configs from diffusers' own conversion of the yaml), shape for shape."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    sd = full[name]
    base = name == "sd_xl_base"
    assert sfu.infer_diffusers_model_type(sd) == ("xl_base" if base else "xl_refiner")
    config = OmegaConf.to_container(load_config(SDXL / f"{name}.yaml"), resolve=True)
    unet_cfg = sfu.create_unet_diffusers_config_from_ldm(config, sd)
    assert unet_cfg["addition_embed_type"] == "text_time" and unet_cfg["projection_class_embeddings_input_dim"] == (2816 if base else 2560)
    vae_cfg = sfu.create_vae_diffusers_config_from_ldm(config, sd)
    assert vae_cfg["scaling_factor"] == 0.13025
    bigg = CLIPTextConfig(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                          max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
        text_2 = CLIPTextModelWithProjection(bigg)
        text_1 = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu"))
    converted_unet = sfu.convert_ldm_unet_checkpoint(sd, unet_cfg)
    assert shapes(converted_unet) == shapes(unet.state_dict())
    assert len(converted_unet) == sum(k.startswith("model.diffusion_model.") for k in sd)
    assert shapes(sfu.convert_ldm_vae_checkpoint(sd, vae_cfg)) == shapes(vae.state_dict())
    prefix = "conditioner.embedders.1.model." if base else "conditioner.embedders.0.model."
    assert shapes(sfu.convert_open_clip_checkpoint(text_2, sd, prefix=prefix)) == shapes(text_2.state_dict())
    if base:
        clip = {k.removeprefix("text_model.") if not hasattr(text_1, "text_model") else k: v for k, v in sfu.convert_ldm_clip_checkpoint(sd).items()}
        theirs = {k: v for k, v in shapes(text_1.state_dict()).items() if not k.endswith("position_ids")}
        assert shapes(clip) == theirs


# --- schedule, parameterization and config sections ---------------------------------------------------------------


def test_schedule_is_sds_scaled_linear():
    from diffusers import DDPMScheduler

    model = meta_model(TINY["base"])
    reference = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    cumprod, parameterization = schedule_from_denoiser_config(load_config(SDXL / "sd_xl_base.yaml").model.params.denoiser_config)
    assert parameterization == "eps" and cumprod.shape == (1000,)
    assert torch.allclose(torch.tensor(cumprod, dtype=torch.float32), reference, rtol=2e-6, atol=0)
    v1 = build_tiny(TINY_CONFIG)
    assert torch.equal(torch.tensor(cumprod, dtype=torch.float32), v1.alphas_cumprod)  # the same schedule as SD 1.x
    assert model.alphas_cumprod.is_meta and "alphas_cumprod" not in model.state_dict()
    assert model.parameterization == "eps" and model.scale_factor == 0.13025 and model.num_timesteps == 1000


def test_denoiser_config_variants():
    cfg = OmegaConf.to_container(load_config(SDXL / "sd_xl_base.yaml").model.params.denoiser_config)
    v = {**cfg, "params": {**cfg["params"], "scaling_config": {"target": "sgm.modules.diffusionmodules.denoiser_scaling.VScaling"}}}
    assert schedule_from_denoiser_config(v)[1] == "v"
    edm = {**cfg, "params": {**cfg["params"], "scaling_config": {"target": "sgm.modules.diffusionmodules.denoiser_scaling.EDMScaling"}}}
    with pytest.raises(ValueError, match="EDMScaling"):
        schedule_from_denoiser_config(edm)
    zsnr = {**cfg, "params": {**cfg["params"], "discretization_config": {"target": "sgm.modules.diffusionmodules.discretizer.ZeroSNRDDPMDiscretization"}}}
    with pytest.raises(ValueError, match="ZeroSNRDDPMDiscretization"):
        schedule_from_denoiser_config(zsnr)
    with pytest.raises(ValueError, match="only DiscreteDenoiser"):
        schedule_from_denoiser_config({**cfg, "target": "sgm.modules.diffusionmodules.denoiser.Denoiser"})
    shifted = {**cfg, "params": {**cfg["params"], "num_idx": 500}}
    with pytest.raises(ValueError, match="num_idx 500"):
        schedule_from_denoiser_config(shifted)


def test_engine_surface_for_the_runtime():
    model = meta_model(SDXL / "sd_xl_base.yaml")
    assert model.cond_stage_model is model.conditioner and model.channels == 4
    assert model.image_size * model.vae_scale == 1024  # SDXL's native size
    unet = model.model.diffusion_model
    assert unet.num_classes == "sequential" and unet.adm_in_channels == 2816 and unet.context_dim == 2048
    assert [len(st.transformer_blocks) for st in unet.modules() if type(st).__name__ == "SpatialTransformer"] == [2, 2, 10, 10, 10, 10, 10, 10, 2, 2, 2]
    # UNet (70 transformer blocks x 2) and VAE (2 mid-block) attention modules take one strategy in one call
    assert model.set_attention(AttentionBackend("math")) == 2 * 70 + 2
    with pytest.raises(ValueError, match="context_dim lists"):
        instantiate_from_config({"target": "sgm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
            "in_channels": 4, "model_channels": 32, "out_channels": 4, "num_res_blocks": 1, "attention_resolutions": [1],
            "channel_mult": [1], "num_head_channels": 16, "context_dim": [32, 48]}})
    with pytest.raises(ValueError, match="adm_in_channels"):
        instantiate_from_config({"target": "sgm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
            "in_channels": 4, "model_channels": 32, "out_channels": 4, "num_res_blocks": 1, "attention_resolutions": [1],
            "channel_mult": [1], "num_head_channels": 16, "context_dim": 32, "num_classes": "sequential"}})


# --- config inference and loading -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """Tiny base and refiner safetensors files (no yaml beside them) and their state dicts."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("sdxl")
    out = {}
    for seed, kind in enumerate(("base", "refiner"), start=21):
        sd = {k: v.contiguous() for k, v in build_tiny(TINY[kind], seed=seed).state_dict().items()}
        path = folder / f"tiny-sdxl-{kind}.safetensors"
        save_file(sd, str(path))
        out[kind] = (path, sd)
    return out


@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_infer_config_recognises_sdxl(tiny_files, full, kind, caplog):
    path, sd = tiny_files[kind]
    assert sdxl_kind(sd) == kind
    with caplog.at_level(logging.INFO, logger="microbatch.sdxl"):
        config, reason = infer_config(sd, path)
    assert config == builtin_config(f"tiny/tiny-sdxl-{kind}.yaml")
    assert f"SDXL {kind}" in reason and "tensor shapes match" in reason and f"SDXL {kind}" in caplog.text
    # the full-size layout picks the published yaml (shapes only: meta tensors suffice)
    published, reason = infer_sdxl_config(full[f"sd_xl_{kind}"], "sd_xl_1.0.safetensors")
    assert published == builtin_config(f"sdxl/sd_xl_{kind}.yaml")
    assert ("2048-wide context, adm vector of 2816" if kind == "base" else "1280-wide context, adm vector of 2560") in reason


def test_infer_config_leaves_other_families_alone(tiny_model):
    assert infer_sdxl_config(tiny_model.state_dict()) is None
    config, reason = infer_config(tiny_model.state_dict(), REPO / "x.ckpt")  # handled by the SD 1 / 2 path
    assert config == builtin_config("tiny/tiny-v1.yaml") and "SD v1.x" in reason


def test_infer_config_explains_a_broken_sdxl_file(tiny_files):
    _, sd = tiny_files["base"]
    broken = dict(sd)
    broken["model.diffusion_model.label_emb.0.0.weight"] = torch.zeros(128, 99)
    with pytest.raises(CheckpointError, match=r"SDXL base layout .*label_emb\.0\.0\.weight: file \(128, 99\)"):
        infer_sdxl_config(broken, "broken.safetensors")
    missing = {k: v for k, v in sd.items() if "output_blocks.1" not in k}
    with pytest.raises(CheckpointError, match="missing"):
        infer_config(missing, REPO / "broken.safetensors")


@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_load_model_infers_builds_and_loads_strictly(tiny_files, kind):
    path, sd = tiny_files[kind]
    loaded = load_model(path, None, torch.device("cpu"), F32, parameterization="eps")
    assert loaded.config_path == builtin_config(f"tiny/tiny-sdxl-{kind}.yaml") and isinstance(loaded.model, DiffusionEngine)
    assert loaded.size_multiple == 8 * (4 if kind == "base" else 8)
    ours = loaded.model.state_dict()
    assert set(ours) == set(sd) and all(torch.equal(ours[k], sd[k]) for k in sd)
    # without --parameterization the inferred config's eps / v is measured: one UNet call on dict conditioning
    auto = load_model(path, None, torch.device("cpu"), F32)
    assert auto.model.parameterization in ("eps", "v") and "prediction: UNet output/input slope" in auto.config_reason


def test_load_model_from_config_is_strict(tiny_files, tmp_path):
    from safetensors.torch import save_file

    path, sd = tiny_files["base"]
    model = load_model_from_config(TINY["base"], path, "cpu")
    assert all(torch.equal(model.state_dict()[k], sd[k]) for k in sd)
    # the published base file also stores CLIP's position_ids (a buffer computed here): accepted
    with_ids = {**sd, "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]}
    save_file(with_ids, str(tmp_path / "ids.safetensors"))
    load_model_from_config(TINY["base"], tmp_path / "ids.safetensors", "cpu")
    stray = {**sd, "conditioner.embedders.2.stray": torch.zeros(1)}
    save_file(stray, str(tmp_path / "stray.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected"):
        load_model_from_config(TINY["base"], tmp_path / "stray.safetensors", "cpu")
    with pytest.raises(CheckpointError, match="missing"):
        load_model_from_config(TINY["refiner"], path, "cpu")
