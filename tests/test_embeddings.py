"""Textual-inversion embeddings: file formats, conditioning against diffusers' load_textual_inversion and against the
token rows they are made of, chunk boundaries, wrong widths and broken files, TI hashes, the scripts and the server."""
from __future__ import annotations

import copy
import hashlib
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ldm.modules.encoders.modules import CHUNK_LENGTH
from microbatch.embeddings import (
    EmbeddingFileError, embedding_hash, embeddings_used, load_embeddings, loaded_embeddings, read_embedding, sync_embeddings_dir,
    ti_hashes,
)
from microbatch.prompts import get_learned_conditioning
from tests.conftest import REPO, TINY_CONFIG, build_tiny
from tests.script_utils import load_script
from tests.test_lora import _transformers_text_encoder
from tests.test_tokenizer import hf_tok  # noqa: F401 - the fixture: transformers' CLIPTokenizer built offline

TINY_V2 = REPO / "configs" / "tiny" / "tiny-v2.yaml"


def _cond(model, prompt: str) -> torch.Tensor:
    return get_learned_conditioning(model, [prompt], 10)[0][0].cond


def _rows(model, text: str) -> torch.Tensor:
    """The token-embedding rows of `text`'s BPE ids [n, C]."""
    encoder = model.cond_stage_model
    return encoder.token_embedding_module().weight[encoder.tokenizer.encode(text)].detach().clone()


@pytest.fixture()
def model_v1(tiny_model):
    return copy.deepcopy(tiny_model)


@pytest.fixture(scope="module")
def model_v2():
    return build_tiny(TINY_V2, seed=3)


# ----------------------------------------------------------------------------------------------------------------
# files


def test_every_format_reads_to_the_same_vectors(tmp_path):
    vectors = torch.randn(3, 8)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "x", "step": 7,
                "sd_checkpoint": "abcd", "sd_checkpoint_name": "model"}, tmp_path / "webui.pt")
    # the original textual-inversion code (and old web UIs) saved an nn.ParameterDict
    torch.save({"string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(vectors.clone())})}, tmp_path / "old.pt")
    torch.save({"<token>": vectors.clone()}, tmp_path / "learned_embeds.bin")
    save_file({"emb_params": vectors.clone()}, str(tmp_path / "civitai.safetensors"))
    torch.save(vectors.clone(), tmp_path / "bare.pt")
    for name in ("webui.pt", "old.pt", "learned_embeds.bin", "civitai.safetensors", "bare.pt"):
        record = read_embedding(tmp_path / name)
        assert torch.equal(record.vectors, vectors) and record.width == 8 and record.count == 3, name
        assert record.name == name.split(".")[0]
    webui = read_embedding(tmp_path / "webui.pt").api()
    assert webui == {"step": 7, "sd_checkpoint": "abcd", "sd_checkpoint_name": "model", "shape": 8, "vectors": 3}
    torch.save({"<t>": torch.randn(8)}, tmp_path / "one.bin")  # diffusers' single vector [C]
    assert read_embedding(tmp_path / "one.bin").vectors.shape == (1, 8)
    sdxl = tmp_path / "xl.safetensors"
    save_file({"clip_g": torch.randn(2, 1280), "clip_l": torch.randn(2, 768)}, str(sdxl))
    assert read_embedding(sdxl).vectors is None and read_embedding(sdxl).width == 2048


@pytest.mark.parametrize("content, match", [
    ({"string_to_param": {"*": torch.randn(2, 8), "+": torch.randn(2, 8)}}, "2 terms"),
    ({"a": torch.randn(2, 8), "b": torch.randn(2, 8)}, "holds 2 tensors"),
    ({"step": 3}, "no string_to_param"),
    ({"e": torch.randn(2, 3, 8)}, r"\(2, 3, 8\)"),
    ({"e": torch.zeros(2, 8, dtype=torch.long)}, "int64"),
    ({"e": torch.randn(76, 8)}, "76 vectors"),
    ({"e": torch.tensor([[float("nan")] * 8])}, "not finite"),
])
def test_malformed_files_are_one_line_errors(tmp_path, content, match):
    path = tmp_path / "bad.pt"
    torch.save(content, path)
    with pytest.raises(EmbeddingFileError, match=match) as e:
        read_embedding(path)
    assert "\n" not in str(e.value) and "bad.pt" in str(e.value)


def test_pickled_code_and_non_files_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"string_to_param": {"*": torch.randn(1, 8)}, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(EmbeddingFileError, match="run code"):
        read_embedding(tmp_path / "evil.pt")
    Image.new("RGB", (4, 4)).save(tmp_path / "picture.pt", format="PNG")
    with pytest.raises(EmbeddingFileError, match="PNG"):
        read_embedding(tmp_path / "picture.pt")
    (tmp_path / "cut.pt").write_bytes(b"\x80\x02garbage")
    with pytest.raises(EmbeddingFileError, match="corrupted"):
        read_embedding(tmp_path / "cut.pt")


# ----------------------------------------------------------------------------------------------------------------
# conditioning


def test_matches_diffusers_load_textual_inversion(model_v1, tmp_path, hf_tok):  # noqa: F811
    """The web UI's .pt (3 vectors), diffusers' learned_embeds.bin (1 vector) and a .safetensors emb_params file
    (2 vectors), loaded by diffusers into transformers' CLIP text model (converted from the same checkpoint) and by
    us: the prompt's conditioning agrees."""
    diffusers_loaders = pytest.importorskip("diffusers.loaders")
    width = model_v1.cond_stage_model.token_embedding_module().embedding_dim
    g = torch.Generator().manual_seed(0)
    torch.save({"string_to_param": {"*": torch.randn(3, width, generator=g) * 0.3}, "name": "ignored", "step": 100}, tmp_path / "wispystyle.pt")
    torch.save({"<whatever>": torch.randn(width, generator=g) * 0.3}, tmp_path / "qqtoy.bin")
    save_file({"emb_params": torch.randn(2, width, generator=g) * 0.3}, str(tmp_path / "zorbish.safetensors"))

    class Loader(diffusers_loaders.TextualInversionLoaderMixin):
        hf_device_map = None
        components: dict = {}

    te = _transformers_text_encoder(model_v1)
    tokenizer = copy.deepcopy(hf_tok)
    loader = Loader()
    for name in ("wispystyle.pt", "qqtoy.bin", "zorbish.safetensors"):
        loader.load_textual_inversion(str(tmp_path / name), token=name.split(".")[0], tokenizer=tokenizer, text_encoder=te)

    assert load_embeddings(model_v1, tmp_path) == ["qqtoy", "wispystyle", "zorbish"]
    for prompt in ("a wispystyle painting of a qqtoy", "zorbish, a red square and a qqtoy on zorbish", "wispystyle"):
        converted = loader.maybe_convert_prompt(prompt, tokenizer)
        ids = tokenizer(converted, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            reference = te(ids)[0][0]
        ours = _cond(model_v1, prompt)
        assert ours.shape == reference.shape
        assert torch.allclose(ours, reference, atol=1e-6, rtol=0), (prompt, (ours - reference).abs().max())


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_an_embedding_of_token_rows_equals_those_tokens(family, model_v1, model_v2, tmp_path):
    """Bit-identical conditioning, emphasis included, for the CLIP (SD 1.x) and OpenCLIP (SD 2.x) encoders."""
    model = model_v1 if family == "v1" else copy.deepcopy(model_v2)
    torch.save({"string_to_param": {"*": _rows(model, "red square")}}, tmp_path / "mything.pt")
    save_file({"emb_params": _rows(model, "blue")}, str(tmp_path / "tint.safetensors"))
    plain = [_cond(model, p) for p in ("a red square on blue", "a (red square:1.3) on [blue]", "a cat")]
    assert load_embeddings(model, tmp_path) == ["mything", "tint"]
    used = [_cond(model, p) for p in ("a mything on tint", "a (mything:1.3) on [tint]", "a cat")]
    for a, b in zip(plain, used):
        assert torch.equal(a, b)
    assert embeddings_used(model, ["a [mything:tint:0.5]", "tint AND a cat"], 10) == ["mything", "tint"]


def test_a_missing_embedding_is_plain_text(model_v1, tmp_path):
    before = _cond(model_v1, "a nothere cat")
    torch.save({"e": _rows(model_v1, "red")}, tmp_path / "other.pt")
    load_embeddings(model_v1, tmp_path)
    assert torch.equal(_cond(model_v1, "a nothere cat"), before)
    assert embeddings_used(model_v1, ["a nothere cat"], 10) == []


def test_vectors_never_straddle_a_chunk_boundary(model_v1, tmp_path):
    """An embedding that would cross the 75-token end pads the chunk and starts the next one; the conditioning
    equals the two chunks built by hand, the embedding's vectors being token rows."""
    encoder = model_v1.cond_stage_model
    words = "red blue green"
    torch.save({"string_to_param": {"*": _rows(model_v1, words)}}, tmp_path / "trio.pt")
    load_embeddings(model_v1, tmp_path)
    filler = " ".join(["cat"] * 73)  # 73 tokens: the 3 vectors would end at position 76
    chunks = encoder.tokenize_weighted([[f"{filler} trio dog", 1.0]])
    table = encoder.embedding_table
    placeholders = table.entries["trio"].ids
    assert len(chunks.tokens) == 2
    first, second = chunks.tokens
    assert first[74:] == (encoder.tokenizer.eos_token_id,) * 3  # padded after the 73 cats
    assert second[1:5] == (*placeholders, encoder.tokenizer.encode("dog")[0])

    tok = encoder.tokenizer
    cat, dog, eos = tok.encode("cat")[0], tok.encode("dog")[0], tok.eos_token_id
    row1 = [tok.bos_token_id, *[cat] * 73, eos, eos, eos]
    row2 = [tok.bos_token_id, *tok.encode(words), dog, eos, *[eos] * (CHUNK_LENGTH - 4)]
    with torch.no_grad():
        reference = encoder.encode_chunk_tokens(torch.tensor([row1, row2]))
    assert torch.equal(_cond(model_v1, f"{filler} trio dog"), torch.cat([reference[0], reference[1]]))

    # 72 tokens: the embedding fits at the end of the first chunk
    fits = encoder.tokenize_weighted([[" ".join(["cat"] * 72) + " trio", 1.0]])
    assert len(fits.tokens) == 1 and fits.tokens[0][73:76] == placeholders


def test_comma_backtracking_moves_an_embedding_whole(model_v1, tmp_path):
    """The web UI moves the words after a late comma to the next chunk; an embedding among them moves with its
    vectors (the web UI's PromptChunkFix stays behind there, so its vectors land in the wrong chunk)."""
    encoder = model_v1.cond_stage_model
    torch.save({"e": _rows(model_v1, "red blue")}, tmp_path / "duo.pt")
    load_embeddings(model_v1, tmp_path)
    text = " ".join(["cat"] * 70) + ", duo dog dog dog"  # comma at 70, duo at 71-72, dogs to 75, overflow at 76
    chunks = encoder.tokenize_weighted([[text, 1.0]])
    duo = encoder.embedding_table.entries["duo"].ids
    assert len(chunks.tokens) == 2
    assert chunks.tokens[0][71] == encoder.comma_id and chunks.tokens[0][72] == encoder.tokenizer.eos_token_id  # closed after the comma
    assert chunks.tokens[1][1:3] == duo


def test_loading_leaves_plain_prompts_bit_identical_and_reloads_invalidate_the_engine_cache(model_v1, tmp_path):
    from microbatch.engine import Engine

    engine = Engine(model_v1, torch.device("cpu"))
    plain = engine.prompt_schedule("a red square, BREAK (blue:1.2)", 10)[0].cond
    torch.save({"e": _rows(model_v1, "red")}, tmp_path / "hue.pt")
    assert sync_embeddings_dir(model_v1, tmp_path) == []
    assert torch.equal(engine.prompt_schedule("a red square, BREAK (blue:1.2)", 10)[0].cond, plain)
    first = engine.prompt_schedule("a hue square", 10)[0].cond
    assert torch.equal(first, engine.prompt_schedule("a red square", 10)[0].cond)
    torch.save({"e": _rows(model_v1, "green")}, tmp_path / "hue.pt")
    sync_embeddings_dir(model_v1, tmp_path)
    assert torch.equal(engine.prompt_schedule("a hue square", 10)[0].cond, engine.prompt_schedule("a green square", 10)[0].cond)
    (tmp_path / "hue.pt").unlink()
    sync_embeddings_dir(model_v1, tmp_path)
    assert loaded_embeddings(model_v1) == ({}, {})


# ----------------------------------------------------------------------------------------------------------------
# wrong widths, broken files


def test_wrong_width_is_skipped_with_a_warning_naming_the_file(model_v1, tmp_path, caplog):
    width = model_v1.cond_stage_model.token_embedding_module().embedding_dim
    torch.save({"string_to_param": {"*": torch.randn(2, 768)}, "step": 5}, tmp_path / "sd1style.pt")
    save_file({"clip_g": torch.randn(2, 1280), "clip_l": torch.randn(2, 768)}, str(tmp_path / "xlstyle.safetensors"))
    torch.save({"e": torch.randn(1, width)}, tmp_path / "good.pt")
    with caplog.at_level(logging.WARNING):
        assert load_embeddings(model_v1, tmp_path) == ["good"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert any("sd1style.pt" in w and "width 768" in w for w in warnings)
    assert any("xlstyle.safetensors" in w and "SDXL" in w for w in warnings)
    loaded, skipped = loaded_embeddings(model_v1)
    assert list(loaded) == ["good"] and sorted(skipped) == ["sd1style", "xlstyle"]
    assert skipped["sd1style"].api() == {"step": 5, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 768, "vectors": 2}
    before = _cond(model_v1, "a sd1style cat")
    assert torch.equal(before, _cond(copy.deepcopy(build_tiny(TINY_CONFIG)), "a sd1style cat"))  # plain text


def test_a_broken_file_alone_raises_in_a_folder_warns(model_v1, tmp_path, caplog):
    (tmp_path / "junk.pt").write_bytes(b"not an embedding at all")
    with pytest.raises(EmbeddingFileError, match="junk.pt"):
        load_embeddings(model_v1, tmp_path / "junk.pt")
    with caplog.at_level(logging.WARNING):
        assert load_embeddings(model_v1, tmp_path) == []
    assert any("junk.pt" in r.getMessage() for r in caplog.records)
    with pytest.raises(EmbeddingFileError, match="no embedding file"):
        load_embeddings(model_v1, tmp_path / "nothing")


# ----------------------------------------------------------------------------------------------------------------
# TI hashes, the scripts, the server


def test_ti_hashes_as_the_web_ui_writes_them(model_v1, tmp_path):
    from microbatch.parameters import png_settings_from_text, ti_hash_notes

    torch.save({"e": _rows(model_v1, "red")}, tmp_path / "one.pt")
    save_file({"emb_params": _rows(model_v1, "blue")}, str(tmp_path / "two.safetensors"))
    load_embeddings(model_v1, tmp_path)
    full = hashlib.sha256((tmp_path / "two.safetensors").read_bytes()).hexdigest()
    assert embedding_hash(tmp_path / "two.safetensors") == full  # the whole file, header included
    used = embeddings_used(model_v1, ["a two cat", "one, (two:0.5)"], 10)
    assert used == ["two", "one"]
    text = ti_hashes(model_v1, used)
    assert text == f"two: {full[:12]}, one: {embedding_hash(tmp_path / 'one.pt')[:12]}"
    png = png_settings_from_text(f'a two cat\nNegative prompt: one\nSteps: 3, Sampler: Euler a, Seed: 1, TI hashes: "{text}"')
    assert png.ti_hashes == {"two": full[:12], "one": embedding_hash(tmp_path / "one.pt")[:12]}
    assert not any("TI hashes" in n for n in png.notes)
    assert ti_hash_notes(png.ti_hashes, tmp_path) == []
    notes = ti_hash_notes({"two": "0123456789ab", "gone": "ffffffffffff"}, tmp_path)
    assert len(notes) == 2 and "gone" in notes[0] and "two" in notes[1] and "0123456789ab" in notes[1]


FAST = ["--n_samples", "1", "--n_iter", "1", "--ddim_steps", "3", "--precision", "full", "--quiet", "--device", "cpu", "--H", "32", "--W", "32", "--skip_grid"]


def _run(script, args, tmp_path, name):
    out = tmp_path / name
    rc = script.main([*args, "--outdir", str(out)])
    files = sorted((out / "samples").glob("*.png")) if (out / "samples").exists() else []
    return rc, files


def test_scripts_use_embeddings_write_ti_hashes_and_regenerate(tmp_path, tiny_ckpt, tiny_model, capsys):
    txt2img = load_script("txt2img")
    folder = tmp_path / "emb"
    (folder / "sub").mkdir(parents=True)
    torch.save({"string_to_param": {"*": _rows(tiny_model, "red square")}}, folder / "sub" / "shapey.pt")
    torch.save({"e": torch.randn(1, 768)}, folder / "wide.pt")
    base = ["--ckpt", str(tiny_ckpt), "--config", str(TINY_CONFIG), "--seed", "3", *FAST]
    rc, used = _run(txt2img, ["--prompt", "a shapey on blue", "--negative_prompt", "wide", "--embeddings_dir", str(folder), *base], tmp_path, "used")
    out = capsys.readouterr()
    assert rc == 0 and len(used) == 1
    assert (out.out + out.err).count("wide.pt") == 1  # one warning naming the file
    rc, words = _run(txt2img, ["--prompt", "a red square on blue", "--negative_prompt", "wide", *base], tmp_path, "words")
    assert rc == 0
    assert np.array_equal(np.asarray(Image.open(used[0])), np.asarray(Image.open(words[0])))
    parameters = Image.open(used[0]).info["parameters"]
    digest = embedding_hash(folder / "sub" / "shapey.pt")[:12]
    assert parameters.splitlines()[-1].endswith(f'TI hashes: "shapey: {digest}"')
    assert "TI hashes" not in Image.open(words[0]).info["parameters"]
    capsys.readouterr()

    rc, again = _run(txt2img, ["--from_png", str(used[0]), "--embeddings_dir", str(folder), *base], tmp_path, "again")
    out = capsys.readouterr()
    assert rc == 0 and np.array_equal(np.asarray(Image.open(again[0])), np.asarray(Image.open(used[0])))
    assert "TI hashes" not in out.out + out.err  # read, not listed as unused

    # a broken file: a warning while unused, a one-line error (exit 2) when a prompt names it
    (folder / "broken.pt").write_bytes(b"\x80\x02broken")
    rc, _ = _run(txt2img, ["--prompt", "a cat", "--embeddings_dir", str(folder), *base], tmp_path, "unused")
    out = capsys.readouterr()
    assert rc == 0 and "broken.pt" in out.out + out.err
    rc, files = _run(txt2img, ["--prompt", "a broken cat", "--embeddings_dir", str(folder), *base], tmp_path, "named")
    out = capsys.readouterr()
    errors = [line for line in out.err.splitlines() if line.startswith("error:")]
    assert rc == 2 and files == [] and len(errors) == 1 and "broken" in errors[0] and "Traceback" not in out.err
    rc, _ = _run(txt2img, ["--prompt", "a cat", "--embeddings_dir", str(tmp_path / "nowhere"), *base], tmp_path, "nowhere")
    out = capsys.readouterr()
    assert rc == 2 and "nowhere" in out.err


def test_server_lists_loaded_and_skipped_embeddings(tmp_path, tiny_ckpt, tiny_model):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from microbatch import Pipeline
    from microbatch.server.app import create_app

    torch.save({"string_to_param": {"*": _rows(tiny_model, "red")}, "step": 40, "sd_checkpoint": "0123abcd",
                "sd_checkpoint_name": "tiny"}, tmp_path / "hue.pt")
    torch.save({"e": torch.randn(3, 1024)}, tmp_path / "sd2thing.pt")
    pipe = Pipeline.from_checkpoint(tiny_ckpt, config=TINY_CONFIG, device="cpu", precision="full")
    width = pipe.model.cond_stage_model.token_embedding_module().embedding_dim
    with TestClient(create_app(pipe, embeddings_dir=str(tmp_path))) as client:
        listing = client.get("/sdapi/v1/embeddings").json()
    assert listing == {
        "loaded": {"hue": {"step": 40, "sd_checkpoint": "0123abcd", "sd_checkpoint_name": "tiny", "shape": width, "vectors": 1}},
        "skipped": {"sd2thing": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 1024, "vectors": 3}},
    }
