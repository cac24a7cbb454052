"""What the demo model does not know: the shape cross (its renders, the analyzer, the LoRA) and the colour word
demo-scarlet (the textual-inversion embedding); their trainer (scripts/train_demo_lora.py) and the shipped files
(microbatch/assets/lora/demo-cross.safetensors, microbatch/assets/embeddings/demo-scarlet.pt)."""
import hashlib
import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from microbatch.demo.analyze import analyze, score
from microbatch.demo.concept import (
    CONCEPT_SHAPE, EMBEDDING_COLOR, EMBEDDING_NAME, LORA_NAME, SHIPPED_DIR, concept_prompt, embedding_labels, embedding_path,
    embedding_prompt, lora_path,
)
from microbatch.demo.shapes import (
    ALL_SHAPES, BACKGROUNDS, COLORS, SHAPES, all_combinations, caption, make_dataset, render, shape_alpha, shape_combinations,
)
from microbatch.loading import demo_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- data and analyzer ----------------------------------------------------------------------------------------------


def test_cross_is_drawn_but_not_in_the_base_data():
    assert CONCEPT_SHAPE == "cross" and "cross" in ALL_SHAPES and "cross" not in SHAPES
    assert all(shape != "cross" for _, shape, _ in all_combinations())
    _, captions, _ = make_dataset(64, seed=0)
    assert not any("cross" in c for c in captions)
    assert len(shape_combinations("cross")) == 18
    assert caption("red", "cross", "white") == "a red cross on a white background"
    assert concept_prompt("red", "white") == "a red cross on a white background"
    assert lora_path(SHIPPED_DIR).name == f"{LORA_NAME}.safetensors" == "demo-cross.safetensors"


def test_the_new_colour_word_and_its_data():
    assert EMBEDDING_NAME == "demo-scarlet" and EMBEDDING_COLOR == "red" and EMBEDDING_NAME not in COLORS
    assert embedding_prompt("circle", "white") == "a demo-scarlet circle on a white background"
    assert embedding_labels() == [("red", shape, bg) for shape in SHAPES for bg in BACKGROUNDS]
    images, captions, labels = make_dataset(40, seed=7, colors=("red",))
    assert {label[0] for label in labels} == {"red"} and {label[1] for label in labels} == set(SHAPES)
    assert all(analyze(image).color == "red" for image in images)
    # the base model's data is what it always was (hash of the images and captions before `colors` existed)
    images, captions, _ = make_dataset(16, seed=0)
    digest = hashlib.sha256(images.tobytes() + "|".join(captions).encode()).hexdigest()
    assert digest == "d87198d78befa01f350a6b3134f0d914cb083a3c6bc1190bf83a858edc88e823"
    with pytest.raises(ValueError, match="colors"):
        make_dataset(2, seed=0, colors=("scarlet",))


def test_cross_geometry_matches_analytic():
    # two bars of 2h x 2h/3 overlapping in a 2h/3 square: area 20 h^2 / 9, centred on the given centre
    size, h, center = 64, 18.0, (30.5, 33.25)
    alpha = shape_alpha("cross", size, center, h, supersample=8).astype(np.float64)
    assert alpha.sum() == pytest.approx(20 * h * h / 9, rel=2e-3)
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    assert (alpha * xs).sum() / alpha.sum() == pytest.approx(center[0], abs=0.02)
    assert (alpha * ys).sum() / alpha.sum() == pytest.approx(center[1], abs=0.02)
    # the corners of its box are empty, the middle full
    assert alpha[int(center[1] - h) + 1, int(center[0] - h) + 1] == 0 and alpha[int(center[1]), int(center[0])] == 1


def test_analyzer_recognises_crosses_clean_and_degraded():
    rng = np.random.default_rng(3)
    for size in (64, 32):
        images, _, labels = make_dataset(60, seed=11, size=size, shapes=("cross",))
        for image, label in zip(images, labels):
            assert score(image, label)["all"], (size, label, analyze(image))
            blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(1)), dtype=np.float64)
            noisy = np.clip(np.rint(blurred + rng.normal(0.0, 8.0, blurred.shape)), 0, 255).astype(np.uint8)
            assert analyze(noisy).shape == "cross", (size, label, analyze(noisy))


def test_analyzer_never_calls_the_old_shapes_a_cross():
    images, _, labels = make_dataset(300, seed=5)
    shapes = [analyze(image).shape for image in images]
    assert "cross" not in shapes
    assert shapes == [label[1] for label in labels]
    # a square with one corner cut is no cross either
    image = render("red", "square", "white")
    image[10:25, 10:25] = 255
    assert analyze(image).shape != "cross"


# --- the trainer --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo():
    eval_demo = _load_script("eval_demo")
    assert demo_checkpoint() is not None
    return eval_demo, eval_demo.load_demo()


def _unmatched_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "match no layer" in r.getMessage()]


def test_training_script_writes_loadable_files(tmp_path, demo, caplog):
    from microbatch.embeddings import load_embeddings, read_embedding, text_encoder
    from microbatch.lora import apply_lora

    train = _load_script("train_demo_lora")
    out = tmp_path / "concept"
    argv = ["--out", str(out), "--threads", "1", "--n_concept", "8", "--n_replay", "8", "--lora_steps", "2", "--lora_batch", "4",
            "--ti_steps", "2", "--ti_batch", "4", "--log_every", "1"]
    assert train.main(argv) == 0
    summary = json.loads((out / "demo-concept-summary.json").read_text())
    assert summary["lora"]["parameters"] > 0 and summary["embedding"]["vectors"] == 1

    _, loaded = demo
    model = loaded.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="microbatch.lora"):
        handle = apply_lora(model, lora_path(out))
    assert not _unmatched_warnings(caplog)
    # 2 steps from a zero up factor: small but nonzero changes to every layer the file names
    from safetensors.torch import load_file

    keys = load_file(str(lora_path(out)))
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
    assert handle.layers == len(keys) // 3
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) == handle.layers
    handle.remove()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    record = read_embedding(embedding_path(out))
    assert record.name == EMBEDDING_NAME and record.width == 64 and record.count == 1 and record.step == 2
    assert load_embeddings(model, embedding_path(out)) == [EMBEDDING_NAME]
    text_encoder(model).embeddings().remove(EMBEDDING_NAME)


def test_training_script_trains_the_embedding_alone(tmp_path):
    from microbatch.embeddings import read_embedding

    train = _load_script("train_demo_lora")
    out = tmp_path / "only-embedding"
    argv = ["--which", "embedding", "--out", str(out), "--threads", "1", "--n_embedding", "8", "--ti_steps", "3", "--ti_batch", "4", "--ti_vectors", "2"]
    assert train.main(argv) == 0
    assert not lora_path(out).exists() and not (out / "lora").exists()
    summary = json.loads((out / "demo-concept-summary.json").read_text())
    assert "lora" not in summary and summary["embedding"]["vectors"] == 2
    record = read_embedding(embedding_path(out))
    assert record.name == EMBEDDING_NAME and record.count == 2 and record.step == 3
    # trained: no longer the start vectors (the token embedding of --ti_init "*", repeated)
    assert not torch.equal(record.vectors[0], record.vectors[1])


def test_training_script_rejects_bad_input(tmp_path, capsys):
    train = _load_script("train_demo_lora")
    assert train.main(["--out", str(SHIPPED_DIR)]) == 2
    assert train.main(["--out", str(tmp_path), "--lora_rank", "0"]) == 2
    assert train.main(["--ckpt", str(tmp_path / "missing.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 3 and "Traceback" not in err


# --- the shipped files ----------------------------------------------------------------------------------------------


def test_shipped_files_are_small_and_in_the_web_ui_formats():
    from safetensors import safe_open

    lora, embedding = lora_path(SHIPPED_DIR), embedding_path(SHIPPED_DIR)
    assert lora.is_file() and embedding.is_file(), "run scripts/train_demo_lora.py --out microbatch/assets --replace_shipped"
    assert lora.stat().st_size < 1 << 20 and embedding.stat().st_size < 16 << 10
    with safe_open(str(lora), "pt") as f:
        assert f.metadata()["ss_network_module"] == "networks.lora"
        assert all(k.startswith("lora_unet_") for k in f.keys())
    data = torch.load(embedding, map_location="cpu", weights_only=True)
    assert set(data["string_to_param"]) == {"*"} and tuple(data["string_to_param"]["*"].shape) == (1, 64)
    assert data["name"] == EMBEDDING_NAME and data["sd_checkpoint_name"] == "demo-shapes"
    # the cross embedding it replaced (which could not teach a shape) is no longer shipped
    assert sorted(p.name for p in embedding.parent.iterdir()) == ["demo-scarlet.pt"]


def _cross_adherence(eval_demo, loaded):
    labels = shape_combinations("cross")[::3]  # 6 prompts: every colour, every background twice
    settings = eval_demo.settings_for("ddim", 20, 2.0)
    result, images = eval_demo.adherence(loaded, labels, [0], settings)
    return result, images


def _word_adherence(eval_demo, loaded, prompt_for=lambda label: embedding_prompt(label[1], label[2])):
    """The 9 red shapes x backgrounds, prompted with the new word (default) or another wording; judged as red."""
    return eval_demo.adherence(loaded, embedding_labels(), [0], eval_demo.settings_for("ddim", 20, 2.0), prompt_for)


def test_shipped_lora_teaches_the_cross_and_comes_off(demo, caplog):
    from microbatch.lora import apply_lora

    eval_demo, loaded = demo
    without, images_without = _cross_adherence(eval_demo, loaded)
    with caplog.at_level(logging.WARNING, logger="microbatch.lora"):
        handle = apply_lora(loaded.model, lora_path(SHIPPED_DIR))
    assert not _unmatched_warnings(caplog)
    try:
        with_lora, images_with = _cross_adherence(eval_demo, loaded)
    finally:
        handle.remove()
    again, images_again = _cross_adherence(eval_demo, loaded)
    # Measured: 0/6 crosses without, 6/6 with; a margin of one image for floating-point differences between CPUs.
    assert without["shape"] == 0.0
    assert with_lora["shape"] >= 5 / 6 and with_lora["color"] >= 5 / 6 and with_lora["background"] >= 5 / 6
    assert all(np.array_equal(a, b) for a, b in zip(images_without, images_again))


def test_shipped_embedding_teaches_the_colour_word(demo):
    from microbatch.embeddings import load_embeddings, text_encoder

    eval_demo, loaded = demo
    model = loaded.model
    encoder = text_encoder(model)

    def encode(text):  # the prompt path of the engine (embeddings are matched there)
        return encoder.encode_weighted([[[text, 1.0]]])

    prompt, other_prompt = embedding_prompt("circle", "white"), caption("blue", "square", "gray")
    plain, other_plain = encode(prompt), encode(other_prompt)
    without, images_without = _word_adherence(eval_demo, loaded)
    assert load_embeddings(model, embedding_path(SHIPPED_DIR)) == [EMBEDDING_NAME]
    try:
        with_embedding, other = encode(prompt), encode(other_prompt)
        learnt, images = _word_adherence(eval_demo, loaded)
    finally:
        encoder.embeddings().remove(EMBEDDING_NAME)
    assert not torch.equal(plain, with_embedding)
    assert torch.equal(other, other_plain)  # a prompt without the word is untouched
    # Measured (DDIM 20 steps, 1 seed): 9/9 red and right in all three with the embedding; without it 0/9 red.
    # A margin of one image for floating-point differences between CPUs.
    assert learnt["color"] >= 8 / 9 and learnt["all"] >= 8 / 9
    assert without["color"] <= 1 / 9 and without["all"] <= 1 / 9
    assert sum(analyze(image).color == "red" for image in images) >= 8
    assert not any(np.array_equal(a, b) for a, b in zip(images, images_without))


def test_eval_script_concept_rows(demo, tmp_path):
    eval_demo, _ = demo
    argv = ["--concept_only", "--seeds", "1", "--samplers", "ddim", "--steps", "2", "--outdir", str(tmp_path)]
    assert eval_demo.main(argv) == 0
    summary = json.loads((tmp_path / "results.json").read_text())
    rows = summary["concept"]["adherence"]
    assert len(rows) == 6 and summary["adherence"] == {} and "img2img_blue" not in summary
    assert any(name.startswith("concept: old prompts, LoRA (54 images)") for name in rows)
    table = (tmp_path / "table.md").read_text()
    assert "| concept: cross, LoRA (18 images), ddim 2 steps, scale 2 |" in table
    assert "| concept: demo-scarlet, embedding (9 images), ddim 2 steps, scale 2 |" in table
    assert "| concept: red, the known word (9 images), ddim 2 steps, scale 2 |" in table
    assert summary["concept"]["embedding"].endswith("demo-scarlet.pt")
    assert eval_demo.main(argv + ["--concept_lora", str(tmp_path / "missing.safetensors")]) == 2
