"""SDXL base and refiner on tiny random checkpoints in the published layout, against diffusers' SDXL conversion.

Independent reference: diffusers' single-file converters (`convert_ldm_clip_checkpoint`,
`convert_open_clip_checkpoint`, `convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`) map our state dict into
transformers' CLIPTextModel / CLIPTextModelWithProjection and diffusers' UNet2DConditionModel (SDXL's "text_time"
added conditioning) and AutoencoderKL, built from explicit configs (no hub access). Every comparison runs the same
prompts, sizes and latents through both and asserts a relative error under 1e-4 (largest max-abs difference over the
largest reference value).
"""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from ldm.util import load_config
from tests.conftest import REPO, build_tiny

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

TINY = {"base": REPO / "configs" / "tiny" / "tiny-sdxl-base.yaml", "refiner": REPO / "configs" / "tiny" / "tiny-sdxl-refiner.yaml"}
PROMPTS = ["a professional photograph of an astronaut riding a triceratops", "", "a red circle, " * 40]
TOL = 1e-4
# per-prompt micro-conditioning: (original h, w), (crop top, left), (target h, w), aesthetic score
MICRO = [((1024, 768), (0, 0), (1024, 1024), 6.0), ((512, 512), (32, 64), (896, 1152), 2.5), ((2048, 1536), (8, 0), (768, 1344), 7.25)]


def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours.double() - theirs.double()).abs().max() / theirs.double().abs().max().clamp_min(1e-12))


def batch_for(kind: str) -> dict:
    """The conditioner batch (original keys) for PROMPTS with the MICRO sizes."""
    batch = {
        "txt": PROMPTS,
        "original_size_as_tuple": torch.tensor([m[0] for m in MICRO], dtype=torch.float32),
        "crop_coords_top_left": torch.tensor([m[1] for m in MICRO], dtype=torch.float32),
    }
    if kind == "base":
        batch["target_size_as_tuple"] = torch.tensor([m[2] for m in MICRO], dtype=torch.float32)
    else:
        batch["aesthetic_score"] = torch.tensor([[m[3]] for m in MICRO], dtype=torch.float32)
    return batch


def time_ids_for(kind: str) -> torch.Tensor:
    """diffusers' add_time_ids: original size + crop + target size (base) or + aesthetic score (refiner)."""
    rows = [[*m[0], *m[1], *m[2]] if kind == "base" else [*m[0], *m[1], m[3]] for m in MICRO]
    return torch.tensor(rows, dtype=torch.float32)


class Reference:
    """diffusers / transformers components holding the tiny model's weights through diffusers' converters."""

    def __init__(self, kind: str, model: torch.nn.Module):
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from diffusers.loaders import single_file_utils as sfu
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        sd = model.state_dict()
        config = OmegaConf.to_container(load_config(TINY[kind]), resolve=True)
        unet_cfg = sfu.create_unet_diffusers_config_from_ldm(config, sd)
        # diffusers recognises SDXL's added conditioning by the full-size context widths (2048 / 1280) only
        unet_cfg.update(class_embed_type=None, addition_embed_type="text_time", addition_time_embed_dim=8)
        self.unet = UNet2DConditionModel(**unet_cfg)
        self.unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(sd, unet_cfg), strict=True)
        vae_cfg = sfu.create_vae_diffusers_config_from_ldm(config, sd)
        self.vae = AutoencoderKL(**vae_cfg)
        self.vae.load_state_dict(sfu.convert_ldm_vae_checkpoint(sd, vae_cfg), strict=True)
        common = dict(vocab_size=49408, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2, max_position_embeddings=77)
        self.text_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=48, hidden_act="gelu", projection_dim=24, **common))
        prefix = "conditioner.embedders.1.model." if kind == "base" else "conditioner.embedders.0.model."
        self.text_2.load_state_dict(sfu.convert_open_clip_checkpoint(self.text_2, sd, prefix=prefix), strict=True)
        self.text_1 = None
        if kind == "base":
            self.text_1 = CLIPTextModel(CLIPTextConfig(**{**common, "intermediate_size": 64}, hidden_size=32, hidden_act="quick_gelu", projection_dim=16))
            converted = sfu.convert_ldm_clip_checkpoint(sd)
            if not hasattr(self.text_1, "text_model"):  # transformers 5 puts the transformer at the top
                converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
            self.text_1.load_state_dict(converted, strict=False)
            assert set(converted) >= {k for k in self.text_1.state_dict() if not k.endswith("position_ids")}
        for part in (self.unet, self.vae, self.text_2, self.text_1):
            if part is not None:
                part.eval()

    @torch.no_grad()
    def encode_prompts(self, model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """diffusers' SDXL prompt encoding: (prompt_embeds [B, 77, ctx], pooled text_embeds [B, proj])."""
        embedders = model.conditioner.embedders
        bigg = embedders[1] if self.text_1 is not None else embedders[0]
        out_2 = self.text_2(input_ids=bigg.tokenize(PROMPTS), output_hidden_states=True)
        hidden = [out_2.hidden_states[-2]]
        if self.text_1 is not None:
            out_1 = self.text_1(input_ids=embedders[0].tokenize(PROMPTS), output_hidden_states=True)
            hidden.insert(0, out_1.hidden_states[-2])
        return torch.cat(hidden, dim=-1), out_2.text_embeds


@pytest.fixture(scope="module", params=["base", "refiner"])
def pair(request):
    kind = request.param
    model = build_tiny(TINY[kind], seed=11 if kind == "base" else 12)
    return kind, model, Reference(kind, model)


# --- text encoders and the added conditioning -----------------------------------------------------------------


@torch.no_grad()
def test_clip_l_hidden_state_matches_transformers(pair):
    kind, model, ref = pair
    if kind != "base":
        pytest.skip("the refiner has no CLIP ViT-L")
    clip = model.conditioner.embedders[0]
    ours = clip(PROMPTS)
    theirs = ref.text_1(input_ids=clip.tokenize(PROMPTS), output_hidden_states=True).hidden_states[-2]
    assert ours.shape == (3, 77, 32) and ours.abs().max() > 0.5
    assert rel_err(ours, theirs) < TOL


@torch.no_grad()
def test_openclip_bigg_hidden_state_and_pooled_match_transformers(pair):
    kind, model, ref = pair
    bigg = model.conditioner.embedders[1 if kind == "base" else 0]
    z, pooled = bigg(PROMPTS)
    out = ref.text_2(input_ids=bigg.tokenize(PROMPTS), output_hidden_states=True)
    assert z.shape == (3, 77, 48) and pooled.shape == (3, 24)
    assert rel_err(z, out.hidden_states[-2]) < TOL  # penultimate layer, no final LayerNorm
    assert rel_err(pooled, out.text_embeds) < TOL  # final LayerNorm at eos, then the projection
    # the pooled output reads the eos position: padding after it changes nothing, the prompt does
    assert not torch.allclose(pooled[0], pooled[1])


@torch.no_grad()
def test_conditioner_and_added_embedding_match_diffusers(pair):
    kind, model, ref = pair
    cond = model.conditioner(batch_for(kind))
    prompt_embeds, text_embeds = ref.encode_prompts(model)
    assert rel_err(cond["crossattn"], prompt_embeds) < TOL
    time_ids = time_ids_for(kind)
    time_embeds = ref.unet.add_time_proj(time_ids.flatten()).reshape(len(PROMPTS), -1)
    vector = torch.cat([text_embeds, time_embeds], dim=-1)
    assert cond["vector"].shape == vector.shape == (3, 72 if kind == "base" else 64)
    assert rel_err(cond["vector"], vector) < TOL
    ours = model.model.diffusion_model.label_emb(cond["vector"])
    theirs = ref.unet.add_embedding(vector)
    assert rel_err(ours, theirs) < TOL


@torch.no_grad()
def test_force_zero_embeddings_zero_the_text_parts_only(pair):
    kind, model, _ = pair
    batch = batch_for(kind)
    cond = model.conditioner(batch)
    zero = model.conditioner(batch, force_zero_embeddings=["txt"])
    assert torch.equal(zero["crossattn"], torch.zeros_like(cond["crossattn"]))
    assert torch.equal(zero["vector"][:, :24], torch.zeros(3, 24))  # pooled text embedding
    assert torch.equal(zero["vector"][:, 24:], cond["vector"][:, 24:]) and cond["vector"][:, 24:].abs().max() > 0.5
    c, uc = model.conditioner.get_unconditional_conditioning(batch, force_uc_zero_embeddings=["txt"])
    assert torch.equal(c["vector"], cond["vector"]) and torch.equal(uc["crossattn"], zero["crossattn"])


def test_conditioner_batch_errors(pair):
    kind, model, _ = pair
    batch = batch_for(kind)
    del batch["crop_coords_top_left"]
    with pytest.raises(ValueError, match="crop_coords_top_left"):
        model.conditioner(batch)
    with pytest.raises(ValueError, match="original_size_as_tuple"):
        model.conditioning_batch(["a"], original_size=(1024,))


@torch.no_grad()
def test_conditioning_batch_defaults_to_the_native_size(pair):
    kind, model, _ = pair
    batch = model.conditioning_batch(["a cat"], aesthetic_score=2.5)
    assert batch["txt"] == ["a cat"]
    assert batch["original_size_as_tuple"].tolist() == [[64.0, 64.0]]  # tiny: 8 latents x 8 pixels
    assert batch["crop_coords_top_left"].tolist() == [[0.0, 0.0]]
    extra = "target_size_as_tuple" if kind == "base" else "aesthetic_score"
    assert batch[extra].tolist() == ([[64.0, 64.0]] if kind == "base" else [[2.5]])
    assert set(batch) == set(model.conditioner.input_keys)
    direct = model.get_learned_conditioning(["a cat"])
    assert torch.equal(direct["vector"], model.conditioner(model.conditioning_batch(["a cat"]))["vector"])


# --- UNet, VAE, a short sampling run ------------------------------------------------------------------------------


@torch.no_grad()
def test_unet_matches_diffusers(pair):
    kind, model, ref = pair
    cond = model.conditioner(batch_for(kind))
    prompt_embeds, text_embeds = ref.encode_prompts(model)
    x = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([999, 500, 1])
    ours = model.apply_model(x, t, cond)
    also = model.model.diffusion_model(x, timesteps=t, context=cond["crossattn"], y=cond["vector"])  # the original interface
    theirs = ref.unet(x, t, encoder_hidden_states=prompt_embeds, added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids_for(kind)}).sample
    assert torch.equal(ours, also)
    assert ours.shape == (3, 4, 16, 16) and ours.abs().max() > 0.5
    assert rel_err(ours, theirs) < TOL


@torch.no_grad()
def test_unet_label_embedding_is_per_image(pair):
    """Each image's output depends on its own vector only: the one-row result equals its row in the batch."""
    kind, model, _ = pair
    cond = model.conditioner(batch_for(kind))
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2)).expand(3, -1, -1, -1)
    t = torch.full((3,), 400)
    batch = model.apply_model(x, t, cond)
    single = model.apply_model(x[1:2], t[1:2], {k: v[1:2] for k, v in cond.items()})
    assert rel_err(batch[1:2], single) < 1e-5  # batch-size round-off of the convolutions only
    assert rel_err(batch[0], batch[1]) > 1e-2


def test_unet_requires_the_vector(pair):
    _, model, _ = pair
    unet = model.model.diffusion_model
    x, t = torch.zeros(1, 4, 16, 16), torch.tensor([10])
    ctx = torch.zeros(1, 77, unet.context_dim)
    with pytest.raises(ValueError, match="conditioning vector y"):
        unet(x, t, context=ctx)
    with pytest.raises(ValueError, match=r"y must be \[B=1"):
        unet(x, t, context=ctx, y=torch.zeros(1, 5))
    with pytest.raises(ValueError, match="crossattn"):
        model.apply_model(x, t, ctx)


@torch.no_grad()
def test_vae_matches_diffusers(pair):
    kind, model, ref = pair
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 4, 8, 8, generator=g)
    ours = model.decode_first_stage(z)
    theirs = ref.vae.decode(z / model.scale_factor).sample
    assert ours.shape == (2, 3, 64, 64) and rel_err(ours, theirs) < TOL
    image = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    posterior = model.encode_first_stage(image)
    reference = ref.vae.encode(image).latent_dist
    assert rel_err(posterior.mean, reference.mean) < TOL and rel_err(posterior.std, reference.std) < TOL
    assert torch.equal(model.get_first_stage_encoding(posterior.mean), model.scale_factor * posterior.mean)


@torch.no_grad()
def test_short_guided_euler_run_matches_diffusers(pair):
    """6 Euler steps with classifier-free guidance (uncond: the published force-zero text): our sampler on our
    model against diffusers' EulerDiscreteScheduler loop on diffusers' UNet."""
    from diffusers import EulerDiscreteScheduler

    from samplers import Denoiser, GuidedModel
    from samplers.registry import SAMPLERS

    kind, model, ref = pair
    batch = batch_for(kind)
    cond, uncond = model.conditioner.get_unconditional_conditioning(batch, force_uc_zero_embeddings=["txt"])
    scale = 5.0
    denoiser = Denoiser(GuidedModel(model.apply_model, cond, uncond, scale), model.alphas_cumprod, model.parameterization)
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    scheduler.set_timesteps(6)
    sigmas = torch.unique_consecutive(scheduler.sigmas.to(torch.float64))
    noise = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    ours = SAMPLERS["euler"].fn(denoiser, noise * float(sigmas[0]), sigmas)

    prompt_embeds, text_embeds = ref.encode_prompts(model)
    time_ids = time_ids_for(kind)
    added = {"text_embeds": torch.cat([torch.zeros_like(text_embeds), text_embeds]), "time_ids": torch.cat([time_ids, time_ids])}
    context = torch.cat([torch.zeros_like(prompt_embeds), prompt_embeds])
    sample = noise * float(sigmas[0])  # the same start as ours: x = sigma_max * noise
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([sample, sample]), t)
        out_uncond, out_cond = ref.unet(model_input, t, encoder_hidden_states=context, added_cond_kwargs=added).sample.chunk(2)
        sample = scheduler.step(out_uncond + scale * (out_cond - out_uncond), t, sample).prev_sample
    assert model.parameterization == "eps" and ours.abs().max() > 0.1
    assert rel_err(ours, sample) < TOL
