"""Long prompts, emphasis, BREAK and clip skip through the text encoders, and the per-step conditioning helpers.

The reference is built here from the text encoder's own hidden states: token rows written out by hand from the
documented chunking rules (75 tokens, bos/eos, padding, comma back-tracking, BREAK), the transformer run on them,
the final LayerNorm applied by hand for clip skip, and emphasis computed from its formula (scale by the weights,
then restore the mean).
"""
from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from ldm.modules.encoders.modules import CHUNK_LENGTH, FrozenOpenCLIPEmbedder
from microbatch.prompts import (
    ScheduledPromptConditioning,
    get_learned_conditioning,
    get_multicond_learned_conditioning,
    pad_cond_uncond,
    pad_cond_uncond_v0,
    reconstruct_cond_batch,
    reconstruct_multicond_batch,
    stack_conds,
)
from tests.conftest import REPO, build_tiny

BOS, EOS, COMMA = 49406, 49407, 267
TINY_V2 = REPO / "configs" / "tiny" / "tiny-v2.yaml"
# single-token words, so that token positions are word positions
WORDS = ["dragon", "castle", "mountain", "sunset", "river", "forest", "cat", "dog", "red", "blue"]


@pytest.fixture(scope="module")
def v1():
    return build_tiny()


@pytest.fixture(scope="module")
def v2():
    return build_tiny(TINY_V2)


@pytest.fixture(scope="module")
def demo():
    from ldm.util import load_model_from_config
    from microbatch.loading import demo_checkpoint

    ckpt = demo_checkpoint()
    assert ckpt is not None, "the demo model is missing"
    return load_model_from_config(ckpt.with_suffix(".yaml"), ckpt)


def words(n: int, offset: int = 0) -> list[str]:
    return [WORDS[(i + offset) % len(WORDS)] for i in range(n)]


def ids(model, text: str) -> list[int]:
    out = model.cond_stage_model.tokenizer.encode(text)
    return out


def row(model, tokens: list[int]) -> list[int]:
    """bos, tokens, eos, padding to 77: eos for SD 1.x, 0 for OpenCLIP."""
    pad = 0 if isinstance(model.cond_stage_model, FrozenOpenCLIPEmbedder) else EOS
    assert len(tokens) <= CHUNK_LENGTH
    return [BOS, *tokens, EOS] + [pad] * (CHUNK_LENGTH - len(tokens))


def hidden(model, rows: list[list[int]], clip_skip: int = 1) -> torch.Tensor:
    """Reference hidden states [N, 77, C] straight from the text transformer."""
    enc = model.cond_stage_model
    tokens = torch.tensor(rows)
    with torch.no_grad():
        if isinstance(enc, FrozenOpenCLIPEmbedder):
            return enc.model.encode_tokens(tokens, stop_before=enc.layer_idx)
        out = enc.transformer(input_ids=tokens, output_hidden_states=True)
        ln = enc.transformer.text_model.final_layer_norm
        h = out.hidden_states[-clip_skip]
        return F.layer_norm(h, h.shape[-1:], ln.weight, ln.bias, ln.eps)


def emphasis(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The web UI's default emphasis: z [N, 77, C] times weights [N, 77], rescaled to the original mean."""
    scaled = z * weights[..., None]
    return scaled * (z.mean() / scaled.mean())


def cond(model, prompt: str, steps: int = 10, clip_skip: int = 1) -> torch.Tensor:
    schedule = get_learned_conditioning(model, [prompt], steps, clip_skip)[0]
    assert len(schedule) == 1
    return schedule[0].cond


PLAIN = ["", "a photo of a cat", "a red circle on a blue background, high quality", " ".join(words(75)), "cat, " * 37 + "dog"]


@pytest.mark.parametrize("name", ["v1", "v2", "demo"])
def test_plain_prompts_are_bit_identical_to_the_original_path(name, request):
    model = request.getfixturevalue(name)
    with torch.no_grad():
        batch = model.get_learned_conditioning(PLAIN)
    for prompt, expected in zip(PLAIN, batch):
        assert len(ids(model, prompt)) <= 75
        got = cond(model, prompt)
        assert got.shape == expected.shape and torch.equal(got, expected), prompt
    together = get_learned_conditioning(model, PLAIN, 20)
    assert all(torch.equal(s[0].cond, e) for s, e in zip(together, batch))


@pytest.mark.parametrize("name", ["v1", "v2"])
def test_long_prompt_is_chunked_and_concatenated(name, request):
    model = request.getfixturevalue(name)
    prompt = " ".join(words(160))
    toks = ids(model, prompt)
    assert len(toks) == 160
    rows = [row(model, toks[:75]), row(model, toks[75:150]), row(model, toks[150:])]
    expected = hidden(model, rows).reshape(3 * 77, -1)
    got = cond(model, prompt)
    assert got.shape == (3 * 77, expected.shape[-1])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert [list(r) for r in model.cond_stage_model.tokenize_weighted([[prompt, 1.0]]).tokens] == rows


def test_comma_back_tracking(v1):
    enc = v1.cond_stage_model
    # a comma 5 tokens before the end of a full chunk: the words after it move to the next chunk
    text = " ".join(words(70)) + ", " + " ".join(words(10, 3))
    t = ids(v1, text)
    assert t[70] == COMMA
    chunks = enc.tokenize_weighted([[text, 1.0]])
    assert [list(r) for r in chunks.tokens] == [row(v1, t[:71]), row(v1, t[71:])]
    torch.testing.assert_close(cond(v1, text), hidden(v1, [row(v1, t[:71]), row(v1, t[71:])]).reshape(154, -1), rtol=0, atol=1e-6)
    # a comma 35 tokens before the end is too far (the limit is 20): a plain cut at 75
    text = " ".join(words(40)) + ", " + " ".join(words(50, 1))
    t = ids(v1, text)
    assert [list(r) for r in enc.tokenize_weighted([[text, 1.0]]).tokens] == [row(v1, t[:75]), row(v1, t[75:])]
    # a comma arriving when the chunk is full starts the next chunk
    text = " ".join(words(75)) + ", cat"
    t = ids(v1, text)
    assert [list(r) for r in enc.tokenize_weighted([[text, 1.0]]).tokens] == [row(v1, t[:75]), row(v1, t[75:])]


@pytest.mark.parametrize("name", ["v1", "v2"])
def test_break_starts_a_new_chunk(name, request):
    model = request.getfixturevalue(name)
    a, b = ids(model, "a red cat"), ids(model, "a blue dog")
    got = cond(model, "a red cat BREAK a blue dog")
    torch.testing.assert_close(got, hidden(model, [row(model, a), row(model, b)]).reshape(154, -1), rtol=0, atol=1e-6)
    # BREAK first gives an empty chunk first; BREAK last adds nothing
    torch.testing.assert_close(cond(model, "BREAK a red cat"), hidden(model, [row(model, []), row(model, a)]).reshape(154, -1), rtol=0, atol=1e-6)
    assert torch.equal(cond(model, "a red cat BREAK"), cond(model, "a red cat"))


@pytest.mark.parametrize("name", ["v1", "v2"])
def test_emphasis_scales_token_states_and_keeps_the_mean(name, request):
    model = request.getfixturevalue(name)
    prompt = "a (red:1.5) cat on [a mat]"
    toks = ids(model, "a red cat on a mat")
    z = hidden(model, [row(model, toks)])
    w = torch.ones(1, 77)
    w[0, 2] = 1.5  # bos a red ...
    w[0, 5:7] = 1 / 1.1  # "a mat"
    expected = emphasis(z, w)[0]
    got = cond(model, prompt)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.mean(), z.mean())
    assert not torch.allclose(got, z[0], atol=1e-3)


def test_emphasis_mean_is_taken_over_a_prompts_scheduled_texts(v1):
    # The web UI encodes a prompt's scheduled texts as one batch, and emphasis restores the mean of that batch.
    schedule = get_learned_conditioning(v1, ["[(red:1.5):dog:3]"], 10)[0]
    assert [e.end_at_step for e in schedule] == [3, 10]
    z = hidden(v1, [row(v1, ids(v1, "red")), row(v1, ids(v1, "dog"))])
    w = torch.ones(2, 77)
    w[0, 1] = 1.5
    expected = emphasis(z, w)
    torch.testing.assert_close(torch.stack([e.cond for e in schedule]), expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(schedule[1].cond, cond(v1, "dog"), atol=1e-4)  # "dog" alone is not rescaled


def test_scheduled_texts_of_a_prompt_share_its_chunk_count(v1):
    long = " ".join(words(100))
    schedule = get_learned_conditioning(v1, [f"[cat:{long}:3]"], 10)[0]
    short, full = schedule[0].cond, schedule[1].cond
    assert short.shape == full.shape == (154, 32)
    expected = hidden(v1, [row(v1, ids(v1, "cat")), row(v1, [])]).reshape(154, -1)  # padded with the empty chunk
    torch.testing.assert_close(short, expected, rtol=0, atol=1e-6)
    assert cond(v1, "cat").shape == (77, 32)  # alone: one chunk


def test_each_distinct_chunk_is_encoded_once(v1, monkeypatch):
    enc = v1.cond_stage_model
    seen = []
    original = type(enc).encode_chunk_tokens

    def counting(self, tokens, clip_skip=1):
        seen.extend(tuple(r) for r in tokens.tolist())
        return original(self, tokens, clip_skip)

    monkeypatch.setattr(type(enc), "encode_chunk_tokens", counting)
    out = get_learned_conditioning(v1, ["a cat", "[a cat|a dog]", "a cat", "[a dog:a cat:4]"], 10)
    assert len(seen) == len(set(seen)) == 2
    assert [len(s) for s in out] == [1, 10, 1, 2]
    assert torch.equal(out[1][0].cond, out[0][0].cond) and torch.equal(out[1][1].cond, out[3][0].cond)


@pytest.mark.parametrize("name", ["v1", "demo"])
def test_clip_skip_is_the_final_layer_norm_of_an_earlier_hidden_state(name, request):
    model = request.getfixturevalue(name)
    prompt = "a red circle, " + " ".join(words(90))
    t = ids(model, prompt)
    rows = [row(model, t[:75]), row(model, t[75:])]
    layers = len(model.cond_stage_model.transformer.text_model.encoder.layers)
    for skip in range(1, layers + 1):
        expected = hidden(model, rows, clip_skip=skip).reshape(154, -1)
        torch.testing.assert_close(cond(model, prompt, clip_skip=skip), expected, rtol=0, atol=2e-6)
    assert not torch.allclose(cond(model, prompt, clip_skip=2), cond(model, prompt), atol=1e-3)
    for bad in (0, layers + 1, 1.5, True):
        with pytest.raises(ValueError, match="clip_skip must be an int from 1"):
            get_learned_conditioning(model, ["a cat"], 10, clip_skip=bad)


def test_clip_skip_has_no_effect_on_openclip(v2, caplog):
    caplog.set_level(logging.WARNING, logger="ldm.modules.encoders.modules")
    v2.cond_stage_model._clip_skip_noted = False
    assert torch.equal(cond(v2, "a red cat", clip_skip=2), cond(v2, "a red cat"))
    cond(v2, "a blue cat", clip_skip=2)
    notes = [r.getMessage() for r in caplog.records if "no effect" in r.getMessage()]
    assert notes == ["clip skip 2 has no effect on the SD 2.x OpenCLIP text encoder (as in the web UI); ignored"]


def test_a_thousand_word_prompt_is_encoded_whole_without_a_giant_warning(v1, caplog):
    prompt = " ".join(words(1000))
    caplog.set_level(logging.WARNING)
    c = cond(v1, prompt)
    assert c.shape == (math.ceil(1000 / 75) * 77, 32)
    assert not caplog.records
    with torch.no_grad():
        v1.get_learned_conditioning([prompt])  # the original path still cuts at 77, with a short warning
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "dropped 925 tokens" in lines[0] and len(lines[0]) < 400


def test_model_without_a_clip_encoder_is_a_clear_error():
    with pytest.raises(ValueError, match="does not support the prompt language"):
        get_learned_conditioning(torch.nn.Linear(2, 2), ["a"], 10)


# ----------------------------------------------------------------------------------------------------------------
# Per-step helpers


def _t(value: float, chunks: int = 1) -> torch.Tensor:
    return torch.full((77 * chunks, 4), value)


def test_reconstruct_cond_batch_follows_the_web_uis_step_rule():
    a, b, c = _t(1), _t(2), _t(3)
    schedules = [[ScheduledPromptConditioning(3, a), ScheduledPromptConditioning(10, b)], [ScheduledPromptConditioning(10, c)]]
    for step, first in [(0, a), (3, a), (4, b), (10, b), (11, a)]:  # past the last end: the first entry
        batch = reconstruct_cond_batch(schedules, step)
        assert batch.shape == (2, 77, 4) and torch.equal(batch[0], first) and torch.equal(batch[1], c)


def test_rows_of_different_lengths_repeat_their_last_vector():
    short = torch.arange(77 * 4, dtype=torch.float32).reshape(77, 4)
    long = _t(5, 2)
    batch = stack_conds([short, long])
    assert batch.shape == (2, 154, 4)
    assert torch.equal(batch[0, :77], short) and (batch[0, 77:] == short[-1]).all() and torch.equal(batch[1], long)


def test_pad_cond_uncond_with_the_empty_chunk_and_v0():
    cond, uncond, empty = _t(1, 3)[None].repeat(2, 1, 1), _t(2)[None].repeat(2, 1, 1), torch.arange(77 * 4.0).reshape(77, 4)
    c2, u2 = pad_cond_uncond(cond, uncond, empty)
    assert c2 is cond and u2.shape == (2, 231, 4) and torch.equal(u2[1, 77:154], empty) and torch.equal(u2[1, 154:], empty)
    u3, c3 = pad_cond_uncond(uncond, cond, empty)  # the other way round
    assert c3 is cond and torch.equal(u3, u2)
    c4, u4 = pad_cond_uncond_v0(cond, uncond)
    assert u4.shape == (2, 231, 4) and (u4 == 2).all()
    c5, u5 = pad_cond_uncond_v0(uncond, cond)  # a longer uncond is cut
    assert u5.shape == (2, 77, 4)


def test_multicond_conditioning(v1):
    c = get_multicond_learned_conditioning(v1, ["a cat AND a dog:0.5", "a cat"], 10)
    conds_list, tensor = reconstruct_multicond_batch(c, 0)
    assert conds_list == [[(0, 1.0), (1, 0.5)], [(2, 1.0)]]
    assert tensor.shape == (3, 77, 32)
    assert torch.equal(tensor[0], cond(v1, "a cat")) and torch.equal(tensor[1], cond(v1, " a dog")) and torch.equal(tensor[2], tensor[0])


def test_emphasis_modes(v1):
    prompt = "a (red:1.5) cat BREAK dog"
    toks = ids(v1, "a red cat")
    z = hidden(v1, [row(v1, toks), row(v1, ids(v1, "dog"))])
    w = torch.ones(1, 77)
    w[0, 2] = 1.5
    weighted = z[:1] * w[..., None]
    by_mode = {m: get_learned_conditioning(v1, [prompt], 10, emphasis=m)[0][0].cond for m in ("Original", "No norm", "Ignore", "None")}
    torch.testing.assert_close(by_mode["Original"][:77], emphasis(z[:1], w)[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(by_mode["No norm"][:77], weighted[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(by_mode["Ignore"], z.reshape(154, -1), rtol=0, atol=1e-6)
    # "None": brackets and BREAK are plain text
    literal = ids(v1, prompt)
    torch.testing.assert_close(by_mode["None"], hidden(v1, [row(v1, literal)])[0], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="emphasis must be one of"):
        get_learned_conditioning(v1, [prompt], 10, emphasis="original")


@pytest.mark.parametrize("name", ["v1", "v2"])
def test_encode_weighted_is_one_web_ui_batch(name, request):
    model = request.getfixturevalue(name)
    enc = model.cond_stage_model
    long = " ".join(words(100))
    with torch.no_grad():
        out = enc.encode_weighted([[["a cat", 1.0]], [[long, 1.0]]])
    t = ids(model, long)
    expected = hidden(model, [row(model, ids(model, "a cat")), row(model, []), row(model, t[:75]), row(model, t[75:])])
    assert out.shape == (2, 154, expected.shape[-1])
    torch.testing.assert_close(out, expected.reshape(2, 154, -1), rtol=0, atol=1e-6)
