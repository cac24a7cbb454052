"""Bad input gives one line and a non-zero exit before the model loads; runs stop cleanly on signals; images carry
reproducible metadata; negative prompts and prompt files."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import microbatch.cli as cli
from tests.script_utils import REPO, load_script

TINY = str(REPO / "configs" / "tiny" / "tiny-v1.yaml")
FAST = ["--ddim_steps", "2", "--precision", "full", "--quiet", "--device", "cpu", "--config", TINY]


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(cli, "load_model", refuse)


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "not_an_image.png").write_text("hello")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "init.png")
    (tmp_path / "empty.txt").write_text("\n# only a comment\n\n")
    (tmp_path / "blocked").write_text("a file where the output folder should be")
    return tmp_path


BAD_INPUTS = [
    ("txt2img", ["--ckpt", "missing.ckpt"], "checkpoint not found: missing.ckpt"),
    ("txt2img", ["--sampler", "plsm"], "Did you mean 'plms'"),
    ("txt2img", ["--n_samples", "0"], "--n_samples must be a positive integer, got 0"),
    ("txt2img", ["--n_iter", "-1"], "--n_iter must be a positive integer, got -1"),
    ("txt2img", ["--ddim_steps", "0"], "--ddim_steps must be a positive integer, got 0"),
    ("txt2img", ["--max_batch_size", "0"], "--max_batch_size must be a positive integer or auto, got 0"),
    ("txt2img", ["--max_memory", "-1"], "--max_memory must be a positive number of GB, got -1.0"),
    ("txt2img", ["--vae_tile", "8", "--vae_tile_overlap", "8"], "VAE tile overlap must be in [0, tile=8), got 8"),
    ("txt2img", ["--H", "-8"], "--H must be positive, got -8"),
    ("txt2img", ["--plms", "--ddim_eta", "0.5"], "sampler plms is deterministic: --ddim_eta must be 0, got 0.5"),
    ("txt2img", ["--ddim_eta", "nan"], "--ddim_eta must be a finite number >= 0, got nan"),
    ("txt2img", ["--scale", "inf"], "--scale must be a finite number, got inf"),
    ("txt2img", ["--from-file", "nope.txt"], "prompt file not found: nope.txt"),
    ("txt2img", ["--from-file", "empty.txt"], "has no prompts"),
    ("txt2img", ["--outdir", "blocked"], "output folder blocked cannot be written"),
    ("txt2img", ["--attention_slicing", "lots"], "--attention_slicing must be auto, max or a positive integer"),
    ("txt2img", ["--config", "nope.yaml"], "config not found: nope.yaml"),
    ("img2img", [], "img2img needs --init-img PATH"),
    ("img2img", ["--init-img", "missing.png"], "init image not found: missing.png"),
    ("img2img", ["--init-img", "not_an_image.png"], "is not a readable image"),
    ("img2img", ["--init-img", "init.png", "--strength", "0"], "--strength must be in (0, 1], got 0.0"),
    ("img2img", ["--init-img", "init.png", "--strength", "1.5"], "--strength must be in (0, 1], got 1.5"),
]


@pytest.mark.parametrize("script,argv,message", BAD_INPUTS, ids=[f"{s}:{' '.join(a)}" for s, a, _ in BAD_INPUTS])
def test_bad_input_one_line_nonzero_before_loading(files, no_model_load, capsys, script, argv, message):
    code = load_script(script).main(argv + ["--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err


def test_argparse_errors_are_one_line(files, capsys):
    with pytest.raises(SystemExit) as e:
        load_script("txt2img").main(["--n_samples", "three"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "invalid int value: 'three'" in err


def test_load_time_errors_are_one_line(files, tiny_ckpt, capsys):
    data = Path(tiny_ckpt).read_bytes()
    (files / "cut.ckpt").write_bytes(data[: len(data) // 3])
    txt2img = load_script("txt2img")
    assert txt2img.main(["--ckpt", "cut.ckpt", *FAST]) == 2
    assert "truncated or corrupted" in capsys.readouterr().err
    from omegaconf import OmegaConf

    config = OmegaConf.load(TINY)
    config.model.params.first_stage_config.params.ddconfig.ch = 64
    OmegaConf.save(config, files / "other.yaml")
    assert txt2img.main(["--ckpt", str(tiny_ckpt), "--quiet", "--config", "other.yaml"]) == 2
    err = capsys.readouterr().err
    assert "does not fit the model config" in err and err.count("\n") == 1


def test_crafted_pickle_is_refused_by_the_script(files, capsys):
    marker = files / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": {}, "x": Evil()}, files / "evil.ckpt")
    assert load_script("txt2img").main(["--ckpt", "evil.ckpt", *FAST]) == 2
    assert "unpickling it would run code" in capsys.readouterr().err
    assert not marker.exists()


def test_sizes_are_rounded_with_a_note(files, tiny_ckpt, capsys):
    assert load_script("txt2img").main(["--ckpt", str(tiny_ckpt), "--H", "70", "--W", "33", "--n_samples", "1", "--n_iter", "1", *FAST]) == 0
    out = capsys.readouterr().out
    assert "--H 70 is not a multiple of 16; using 64" in out and "--W 33 is not a multiple of 16; using 32" in out
    assert Image.open(files / "outputs" / "txt2img-samples" / "samples" / "00000.png").size == (32, 64)


def test_from_png_regenerates_bit_identically(files, tiny_ckpt):
    txt2img = load_script("txt2img")
    args = ["--ckpt", str(tiny_ckpt), "--prompt", "a red circle", "--negative_prompt", "blurry", "--n_samples", "3", "--n_iter", "1",
            "--seed", "100", "--H", "64", "--W", "48", "--scale", "4", "--sampler", "ddim", "--ddim_eta", "0.5", "--skip_grid", *FAST]
    assert txt2img.main(args) == 0
    src = files / "outputs" / "txt2img-samples" / "samples" / "00002.png"
    params = Image.open(src).info["parameters"]
    assert params.startswith("a red circle\nNegative prompt: blurry\n")
    assert "Seed: 102" in params and "Size: 48x64" in params and "Model hash: " in params
    assert txt2img.main(["--ckpt", str(tiny_ckpt), "--from_png", str(src), "--outdir", "again", "--quiet", "--device", "cpu", "--config", TINY]) == 0
    again = files / "again" / "samples" / "00000.png"
    assert Image.open(again).tobytes() == Image.open(src).tobytes()
    assert Image.open(again).info["parameters"] == params


def test_negative_prompt_and_prompt_file(files, tiny_ckpt):
    (files / "prompts.txt").write_text("a red circle\n\n# comment\na blue square || red\na green triangle\nfour\nfive\n")
    txt2img = load_script("txt2img")
    base = ["--ckpt", str(tiny_ckpt), "--H", "32", "--W", "32", "--n_iter", "1", "--skip_grid", *FAST]
    assert txt2img.main(base + ["--from-file", "prompts.txt", "--n_samples", "2", "--outdir", "f"]) == 0
    names = sorted((files / "f" / "samples").glob("*.png"))
    assert len(names) == 5  # 5 prompts, n_samples 2: the original failed on the short last batch
    params = [Image.open(p).info["parameters"] for p in names]
    assert params[1].startswith("a blue square\nNegative prompt: red\n")
    assert params[4].startswith("five\n")
    assert txt2img.main(base + ["--prompt", "a red circle", "--n_samples", "1", "--outdir", "p"]) == 0
    assert txt2img.main(base + ["--prompt", "a red circle", "--n_samples", "1", "--outdir", "n", "--negative_prompt", "a blue square"]) == 0
    plain = Image.open(files / "p" / "samples" / "00000.png").tobytes()
    negated = Image.open(files / "n" / "samples" / "00000.png").tobytes()
    assert plain != negated


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_after_the_current_step_and_keeps_finished_images(tmp_path, tiny_ckpt, sig, code):
    cmd = [sys.executable, str(REPO / "scripts" / "batch_gen.py"), "--ckpt", str(tiny_ckpt), "--config", TINY, "--n_samples", "200",
           "--max_batch_size", "1", "--H", "64", "--W", "64", "--ddim_steps", "20", "--precision", "full", "--quiet", "--device", "cpu",
           "--metrics_json", "m.json"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    samples = tmp_path / "outputs" / "batch_gen-samples" / "samples"
    deadline = time.time() + 240
    while time.time() < deadline and len(list(samples.glob("0*.png"))) < 2:
        time.sleep(0.2)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == code, err
    finished = sorted(samples.glob("*.png"))
    assert 2 <= len(finished) < 200
    for path in finished:
        with Image.open(path) as im:
            im.load()  # every saved image is complete
    assert not list(samples.glob(".partial-*"))
    assert f"Stopped by {signal.Signals(sig).name}" in out and "Samples took" in out
    import json

    assert json.loads((tmp_path / "m.json").read_text())["interrupted"] is True


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    prompt=st.one_of(st.text(max_size=50), st.text(max_size=4000), st.sampled_from(["", "\x00\x07\x1b[31m", "🐱" * 300, "a\nb\r\tc"])),
    h=st.integers(-100, 300),
    w=st.integers(-100, 300),
    n=st.integers(-2, 3),
    steps=st.integers(-2, 3),
    strength=st.floats(allow_nan=True, allow_infinity=True),
    eta=st.floats(-1, 2),
    sampler=st.sampled_from(["ddim", "plms", "ddmi", "", "euler"]),
)
def test_fuzzed_arguments_give_a_plan_or_one_line(tmp_path, prompt, h, w, n, steps, strength, eta, sampler):
    """Argument checking and the tokenizer on arbitrary input: either a valid plan or a UsageError, never a crash."""
    init = tmp_path / "init.png"
    if not init.exists():
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(init)
    for mode in ("txt2img", "img2img"):
        argv = [f"--prompt={prompt}", f"--n_samples={n}", f"--ddim_steps={steps}", f"--ddim_eta={eta}", f"--sampler={sampler}",
                f"--outdir={tmp_path / 'o'}"]
        argv += [f"--H={h}", f"--W={w}"] if mode == "txt2img" else [f"--init-img={init}", f"--strength={strength}"]
        args = cli.build_parser(mode, "").parse_args(argv)
        try:
            cli.check_args(args, mode)
        except cli.UsageError as e:
            assert "\n" not in str(e) and str(e)
            continue
        plan = cli.make_plan(args, mode, 64, 64)
        assert len(plan.jobs) == n * args.n_iter
        from ldm.modules.encoders.tokenizer import CLIPTokenizer

        ids = CLIPTokenizer()([prompt]).input_ids
        assert ids.shape == (1, 77) and ids[0, 0] == 49406


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=st.text(max_size=300), h=st.integers(1, 80), w=st.integers(1, 80))
def test_fuzzed_full_runs(tmp_path, tiny_ckpt, prompt, h, w):
    code = load_script("txt2img").main(["--ckpt", str(tiny_ckpt), f"--prompt={prompt}", "--H", str(h), "--W", str(w), "--n_samples", "1",
                                        "--n_iter", "1", "--ddim_steps", "1", "--outdir", str(tmp_path / "o"), "--skip_grid",
                                        "--precision", "full", "--quiet", "--device", "cpu", "--config", TINY])
    assert code == 0
