"""SDXL speaks the web UI's prompt language: each text encoder (CLIP ViT-L, OpenCLIP bigG; the refiner's bigG alone)
chunks, weights and BREAKs the prompt by the SD 1.x rules, crossattn is both encoders' hidden states side by side per
token, and the pooled vector comes from the first chunk.

The reference is built here from the encoders' hidden states: the 77-token rows written out by hand from the
tokenizer's ids, CLIP's hidden state read from transformers' output, bigG's computed block by block from its weights,
and the web UI's emphasis (multiply, then rescale each encoder's chunk batch to its mean before weighting) written
from its description. Tiny random SDXL base and refiner models in the published layout.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch

from microbatch.engine import Engine, ImageJob, SamplingSettings
from microbatch.prompts import (
    ScheduledPromptConditioning,
    get_learned_conditioning,
    get_learned_conditioning_prompt_schedules,
    pad_cond_uncond,
    pad_cond_uncond_v0,
    reconstruct_cond_batch,
    stack_conds,
)
from samplers import GuidedModel
from tests.conftest import REPO, build_tiny
from tests.script_utils import load_script

BASE = REPO / "configs" / "tiny" / "tiny-sdxl-base.yaml"
REFINER = REPO / "configs" / "tiny" / "tiny-sdxl-refiner.yaml"
BOS, EOS = 49406, 49407
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    return build_tiny(BASE, seed=31).eval()


@pytest.fixture(scope="module")
def refiner() -> torch.nn.Module:
    return build_tiny(REFINER, seed=32).eval()


# -- the reference ------------------------------------------------------------------------------------------------


def text_embedders(model) -> list:
    return [e for e in model.conditioner.embedders if getattr(e, "input_key", None) == "txt"]


def ids(model, text: str) -> list[int]:
    return text_embedders(model)[-1].tokenizer.encode(text)


def row(tokens: list[int], pad: int) -> list[int]:
    assert len(tokens) <= 75
    return [BOS, *tokens, EOS] + [pad] * (75 - len(tokens))


def clip_hidden(embedder, rows: list[list[int]]) -> torch.Tensor:
    """CLIP ViT-L as SDXL reads it: transformers' hidden_states[layer_idx] (eos padding)."""
    out = embedder.transformer(input_ids=torch.tensor(rows), output_hidden_states=True)
    return out.hidden_states[embedder.layer_idx]


def bigg_hidden(embedder, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenCLIP bigG as SDXL reads it, from its weights: (the penultimate block's output, no ln_final; pooled =
    ln_final(last block's output) at the eos, times text_projection). Zero padding."""
    tower = embedder.model
    tokens = torch.tensor(rows)
    x = tower.token_embedding(tokens) + tower.positional_embedding
    for block in tower.transformer.resblocks[:-1]:
        x = block(x)
    final = tower.ln_final(tower.transformer.resblocks[-1](x))
    eos = torch.tensor([r.index(EOS) for r in rows])
    return x, final[torch.arange(len(rows)), eos] @ tower.text_projection


def emphasis(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The web UI's "Original" emphasis on one chunk position of a batch: z [N, 77, C] times the weights [N, 77],
    rescaled so that the mean of the whole batch is what it was."""
    weighted = z * weights[..., None]
    return weighted * (z.mean() / weighted.mean())


def reference(model, prompts_chunks: list[list[list[tuple[int, float]]]], micro_vector: torch.Tensor) -> list[dict]:
    """Prompts encoded together (one web UI call), each as chunks of (token id, weight) written by hand ->
    per prompt {"crossattn": [77 k, C], "vector": [pooled + micro_vector]}; a prompt with fewer chunks is padded with
    the empty chunk."""
    embedders = text_embedders(model)
    count = max(len(c) for c in prompts_chunks)
    per_encoder, pooled = [], None
    for embedder in embedders:
        bigg = hasattr(embedder, "model")
        pad = 0 if bigg else EOS
        positions = []
        for i in range(count):
            chunks = [c[i] if i < len(c) else [] for c in prompts_chunks]
            rows = [row([t for t, _ in chunk], pad) for chunk in chunks]
            weights = torch.tensor([[1.0, *[w for _, w in chunk], 1.0] + [1.0] * (75 - len(chunk)) for chunk in chunks])
            if bigg:
                z, p = bigg_hidden(embedder, rows)
                pooled = p if i == 0 else pooled
            else:
                z = clip_hidden(embedder, rows)
            positions.append(emphasis(z, weights))
        per_encoder.append(torch.cat(positions, dim=1))
    crossattn = torch.cat(per_encoder, dim=-1)
    return [{"crossattn": crossattn[n], "vector": torch.cat([pooled[n], micro_vector])} for n in range(len(prompts_chunks))]


def micro_vector(model) -> torch.Tensor:
    """The size (and aesthetic) part of the vector at the native micro-conditioning: it does not depend on text."""
    with torch.no_grad():
        vector = model.get_learned_conditioning(model.conditioning_batch(["x"]))["vector"][0]
    width = text_embedders(model)[-1].model.text_projection.shape[1]
    return vector[width:]


def weighted(model, *fragments: tuple[str, float]) -> list[tuple[int, float]]:
    return [(t, w) for text, w in fragments for t in ids(model, text)]


def ours(model, prompt: str, steps: int = 10) -> list[ScheduledPromptConditioning]:
    with torch.no_grad():
        return get_learned_conditioning(model, [prompt], steps)[0]


def assert_close(got: dict, want: dict) -> None:
    for key in ("crossattn", "vector"):
        assert got[key].shape == want[key].shape, (key, got[key].shape, want[key].shape)
        assert torch.allclose(got[key], want[key], rtol=1e-5, atol=1e-5), (key, float((got[key] - want[key]).abs().max()))


# -- conditioning against the reference -------------------------------------------------------------------------------


def test_plain_prompts_are_bit_identical_to_the_published_conditioner(base, refiner):
    for model in (base, refiner):
        for prompt in ("a red circle", "an astronaut riding a horse, 4k", "", "a \\(red\\) circle", ", ".join(["tree"] * 37)):
            literal = prompt.replace("\\(", "(").replace("\\)", ")")
            with torch.no_grad():
                want = model.get_learned_conditioning(model.conditioning_batch([literal]))
            (got,) = ours(model, prompt)
            assert got.end_at_step == 10
            assert torch.equal(got.cond["crossattn"], want["crossattn"][0]) and torch.equal(got.cond["vector"], want["vector"][0])


def test_emphasis_weights_each_encoder_and_leaves_the_pooled_vector(base):
    prompt = "a (red:1.5) circle and a [blue] square"
    want = reference(base, [[weighted(base, ("a ", 1), ("red", 1.5), (" circle and a ", 1), ("blue", 1 / 1.1), (" square", 1))]], micro_vector(base))
    (got,) = ours(base, prompt)
    assert_close(got.cond, want[0])
    plain = ours(base, "a red circle and a blue square")[0].cond
    assert torch.equal(got.cond["vector"], plain["vector"])  # the pooled output is taken before emphasis
    assert not torch.allclose(got.cond["crossattn"], plain["crossattn"], atol=1e-3)


def test_a_long_prompt_is_two_chunks_and_pools_the_first(base):
    words = ["red", "blue", "green", "circle", "square", "small", "large", "dark"]
    prompt = " ".join(words[i % len(words)] + ("s" if i % 3 == 0 else "") for i in range(100))
    tokens = ids(base, prompt)
    assert 75 < len(tokens) <= 150 and ids(base, ",")[0] not in tokens
    want = reference(base, [[[(t, 1.0) for t in tokens[:75]], [(t, 1.0) for t in tokens[75:]]]], micro_vector(base))
    (got,) = ours(base, prompt)
    assert got.cond["crossattn"].shape == (154, 80)
    assert_close(got.cond, want[0])


def test_a_comma_near_the_end_of_a_full_chunk_moves_the_rest_to_the_next(base):
    head, tail = " ".join(["red circle"] * 30), " ".join(["blue square"] * 15)
    prompt = f"{head}, {tail}"
    tokens = ids(base, prompt)
    comma = tokens.index(ids(base, ",")[0])
    assert comma == 60 and len(tokens) > 75  # the chunk fills at 75 tokens, 15 after the comma: back-track
    want = reference(base, [[[(t, 1.0) for t in tokens[: comma + 1]], [(t, 1.0) for t in tokens[comma + 1 :]]]], micro_vector(base))
    assert_close(ours(base, prompt)[0].cond, want[0])


def test_break_starts_a_chunk_in_both_encoders(base, refiner):
    for model in (base, refiner):
        prompt = "a red circle BREAK a (blue:1.2) square"
        chunks = [weighted(model, ("a red circle", 1)), weighted(model, ("a ", 1), ("blue", 1.2), (" square", 1))]
        want = reference(model, [chunks], micro_vector(model))
        (got,) = ours(model, prompt)
        assert got.cond["crossattn"].shape[0] == 154
        assert_close(got.cond, want[0])


def test_prompt_editing_encodes_its_texts_together_as_the_web_ui(base):
    """[from:to:when]: both texts go through the encoders in one batch, so the shorter is padded with the empty chunk
    and emphasis keeps the mean of the whole batch at each chunk position."""
    long = " ".join(["green tree"] * 40)
    prompt = f"[(red:1.4) circle:{long}:0.5]"
    want = reference(base, [[weighted(base, ("red", 1.4), (" circle", 1))],
                            [[(t, 1.0) for t in ids(base, long)[:75]], [(t, 1.0) for t in ids(base, long)[75:]]]], micro_vector(base))
    got = ours(base, prompt)
    assert [e.end_at_step for e in got] == [5, 10]
    assert_close(got[0].cond, want[0])
    assert_close(got[1].cond, want[1])
    # the hires fix's second pass counts `[a:b:N]` from the end of the first pass's steps, as for SD
    with torch.no_grad():
        hires = get_learned_conditioning(base, ["[red:blue:15] circle"], 10, hires_steps=10)[0]
    assert [e.end_at_step for e in hires] == [e for e, _ in get_learned_conditioning_prompt_schedules(["[red:blue:15] circle"], 10, 10)[0]]
    assert len(hires) == 2 and not torch.equal(hires[0].cond["crossattn"], hires[1].cond["crossattn"])


def test_emphasis_on_the_refiner_matches_the_reference(refiner):
    prompt = "a ((red)) circle"
    want = reference(refiner, [[weighted(refiner, ("a ", 1), ("red", 1.21), (" circle", 1))]], micro_vector(refiner))
    (got,) = ours(refiner, prompt)
    assert got.cond["crossattn"].shape == (77, 48)
    assert_close(got.cond, want[0])


def test_an_empty_negative_prompt_is_zeroed_and_a_long_one_is_not(base):
    engine = Engine(base, CPU)
    micro = SamplingSettings(height=64, width=64).micro_conditioning(negative=True)
    (zero,) = engine.prompt_schedule("", 10, micro=micro, negative=True)
    with torch.no_grad():
        batch = base.conditioning_batch([""], micro.original_size, micro.crop_coords, micro.target_size, micro.aesthetic_score)
        want = base.get_learned_conditioning(batch, ["txt"])
    assert torch.equal(zero.cond["crossattn"], want["crossattn"][0]) and torch.equal(zero.cond["vector"], want["vector"][0])
    assert not zero.cond["crossattn"].any()
    (long,) = engine.prompt_schedule(" ".join(["blurry"] * 80), 10, micro=micro, negative=True)
    assert long.cond["crossattn"].shape == (154, 80) and long.cond["crossattn"].abs().sum() > 0


def test_clip_skip_is_ignored_for_sdxl_with_one_warning(base, caplog):
    engine = Engine(base, CPU)
    with caplog.at_level(logging.WARNING, logger="microbatch.engine"):
        skipped = engine.prompt_schedule("a (red:1.2) circle", 10, clip_skip=2)
        engine.prompt_schedule("a blue circle", 10, clip_skip=2)
    plain = engine.prompt_schedule("a (red:1.2) circle", 10, clip_skip=1)
    assert torch.equal(skipped[0].cond["crossattn"], plain[0].cond["crossattn"])
    assert sum("clip skip 2 has no effect on SDXL" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(ValueError, match="clip_skip must be an int from 1"):
        engine.prompt_schedule("a circle", 10, clip_skip=4)  # beyond the tiny encoders' 3 layers


# -- batching: stacking, padding, and cond / uncond of different lengths ------------------------------------------------


def test_stack_and_pad_helpers_take_sdxl_dicts(base):
    short, long = ours(base, "a red circle")[0].cond, ours(base, " ".join(["red circle"] * 50))[0].cond
    stacked = stack_conds([short, long])
    assert stacked["crossattn"].shape == (2, 154, 80) and stacked["vector"].shape == (2, 72)
    assert torch.equal(stacked["crossattn"][0, 77:], short["crossattn"][-1:].expand(77, -1))  # the last vector repeated
    assert torch.equal(stacked["vector"], torch.stack([short["vector"], long["vector"]]))
    batch = reconstruct_cond_batch([[ScheduledPromptConditioning(10, short)], [ScheduledPromptConditioning(10, long)]], 0)
    assert torch.equal(batch["crossattn"], stacked["crossattn"])

    empty = ours(base, "")[0].cond["crossattn"]
    cond = {k: v[None] for k, v in long.items()}
    uncond = {k: v[None] for k, v in short.items()}
    c, u = pad_cond_uncond(cond, uncond, empty)
    assert torch.equal(u["crossattn"][0], torch.cat([short["crossattn"], empty])) and torch.equal(u["vector"], uncond["vector"])
    assert c["crossattn"] is cond["crossattn"]
    c0, u0 = pad_cond_uncond_v0(cond, uncond)
    assert torch.equal(u0["crossattn"][0], torch.cat([short["crossattn"], short["crossattn"][-1:].expand(77, -1)]))


def test_cond_and_uncond_of_different_chunk_counts_run_as_separate_unet_calls(base):
    """A 2-chunk prompt with a 1-chunk negative prompt: guidance out_u + s (out_c - out_u) with each half through
    the UNet at its own length (the web UI's default, no padding), for a micro-batch mixing lengths."""
    engine = Engine(base, CPU)
    settings = SamplingSettings(sampler="euler", steps=4, height=64, width=64, guidance_scale=6.0, max_batch_size=2)
    long = "a red circle BREAK a blue square"
    jobs = [ImageJob(0, long, 1, "blurry"), ImageJob(1, "a green tree", 2, "")]
    step = engine.step_conditioning(jobs, settings)(0)
    calls = []

    def apply_model(x, t, cond):
        calls.append(tuple(cond["crossattn"].shape))
        return base.apply_model(x, t, cond)

    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.full((2,), 500.0)
    with torch.no_grad():
        out = GuidedModel(apply_model, lambda k: step, None, 6.0)(x, t)
        want = []
        for i, job in enumerate(jobs):
            c = engine.prompt_parts(job.prompt, settings.prompt_steps, micro=settings.micro_conditioning())[0][0][0].cond
            u = engine.prompt_schedule(job.negative_prompt, settings.prompt_steps, micro=settings.micro_conditioning(negative=True), negative=True)[0].cond
            out_c = base.apply_model(x[i : i + 1], t[i : i + 1], {k: v[None] for k, v in c.items()})
            out_u = base.apply_model(x[i : i + 1], t[i : i + 1], {k: v[None] for k, v in u.items()})
            want.append(out_u + 6.0 * (out_c - out_u))
    assert sorted(calls) == [(1, 154, 80), (3, 77, 80)]  # the long cond alone; the other three rows together
    assert torch.equal(out, torch.cat(want)), float((out - torch.cat(want)).abs().max())


def test_an_image_with_a_long_prompt_is_the_same_whichever_images_share_its_micro_batch(base):
    engine = Engine(base, CPU)
    settings = SamplingSettings(sampler="euler", steps=3, height=64, width=64, guidance_scale=5.0, max_batch_size=2)
    jobs = [ImageJob(0, " ".join(["red circle"] * 45), 4, "blurry"), ImageJob(1, "a (green:1.3) tree", 5, "")]
    together = engine.sample_batch(jobs, settings)
    alone = torch.cat([engine.sample_batch([job], settings) for job in jobs])
    split = engine.sample_batch(jobs, dataclasses.replace(settings, split_guidance=True))
    assert torch.equal(together, alone) and torch.equal(split, alone)  # one-row UNet calls included


# -- end to end ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_file(tmp_path_factory, base) -> Path:
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("sdxl_prompts") / "tiny-sdxl-base.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(path))
    return path


RUN = ["--precision", "full", "--quiet", "--device", "cpu", "--ddim_steps", "3", "--sampler", "euler", "--seed", "5",
       "--W", "64", "--H", "64", "--scale", "4", "--n_samples", "1", "--n_iter", "1"]


def test_txt2img_script_with_emphasis_break_and_a_long_prompt(base_file, tmp_path, monkeypatch):
    from PIL import Image

    from microbatch import Pipeline
    from sgm.models.diffusion import DiffusionEngine

    lengths: list[int] = []
    original = DiffusionEngine.apply_model

    def recording(self, x, t, cond, **kw):
        lengths.append(int(cond["crossattn"].shape[1]))
        return original(self, x, t, cond, **kw)

    monkeypatch.setattr(DiffusionEngine, "apply_model", recording)
    prompt = "a (red:1.3) circle, " + ", ".join(["a small square"] * 20) + " BREAK [blue|green] background"
    txt2img = load_script("txt2img")
    assert txt2img.main(["--ckpt", str(base_file), "--prompt", prompt, "--outdir", str(tmp_path / "a"), *RUN]) == 0
    assert sorted(set(lengths)) == [77, 231]  # cond: 2 chunks + the BREAK chunk; the empty negative prompt: 1
    (png,) = sorted((tmp_path / "a" / "samples").glob("*.png"))
    image = Image.open(png)
    assert image.info["parameters"].startswith(prompt + "\n")
    assert txt2img.main(["--ckpt", str(base_file), "--prompt", prompt.replace("(red:1.3)", "red"), "--outdir", str(tmp_path / "b"), *RUN]) == 0
    (plain,) = sorted((tmp_path / "b" / "samples").glob("*.png"))
    assert Image.open(plain).tobytes() != image.tobytes()  # the weight reaches the image
    monkeypatch.setattr(DiffusionEngine, "apply_model", original)
    pipe = Pipeline.from_checkpoint(base_file, device="cpu", precision="full")
    (api,) = pipe.txt2img(prompt, n=1, steps=3, sampler="euler", seed=5, width=64, height=64, scale=4.0)
    assert api.tobytes() == image.tobytes()
    # clip skip: no effect on SDXL, written all the same (as the web UI writes its setting)
    (skipped,) = pipe.txt2img(prompt, n=1, steps=3, sampler="euler", seed=5, width=64, height=64, scale=4.0, clip_skip=2)
    assert skipped.tobytes() == image.tobytes() and "Clip skip: 2" in skipped.info["parameters"]


def test_plain_prompt_images_are_bit_identical_to_the_literal_conditioner(base, monkeypatch):
    """The images a plain prompt (<= 75 tokens, no emphasis) gave before the prompt language reached SDXL: the
    engine's conditioning replaced by the published conditioner on the literal text, as the engine did."""
    settings = SamplingSettings(sampler="euler", steps=3, height=64, width=64, guidance_scale=5.0, max_batch_size=2)
    jobs = [ImageJob(0, "an astronaut riding a horse", 3, ""), ImageJob(1, "a bowl of fruit, 4k", 9, "blurry, low quality")]
    now = Engine(base, CPU).sample_batch(jobs, settings)

    def literal(self, text, steps, clip_skip, micro, negative, hires_steps=None):
        batch = self.model.conditioning_batch([text], micro.original_size, micro.crop_coords, micro.target_size, micro.aesthetic_score)
        with torch.no_grad():
            cond = self.model.get_learned_conditioning(batch, ["txt"] if negative and text == "" else None)
        return [ScheduledPromptConditioning(steps, {k: v[0] for k, v in cond.items()})]

    monkeypatch.setattr(Engine, "_sdxl_schedule", literal)
    before = Engine(base, CPU).sample_batch(jobs, settings)
    assert now.abs().max() > 0.1 and torch.equal(now, before)
