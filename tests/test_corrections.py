"""Issue 18's corrections on the command line, each found by trying the scripts as a new user would."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from microbatch.cli import build_parser, make_plan
from tests.script_utils import REPO, load_script

TINY = str(REPO / "configs" / "tiny" / "tiny-v1.yaml")
FAST = ["--precision", "full", "--quiet", "--device", "cpu", "--config", TINY, "--ddim_steps", "2"]


@pytest.fixture
def work(tmp_path, monkeypatch, tiny_ckpt):
    monkeypatch.chdir(tmp_path)
    Image.fromarray((np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8)).save("init.png")
    return ["--ckpt", str(tiny_ckpt), *FAST]


def _params(path) -> str:
    with Image.open(path) as im:
        return im.info["parameters"]


def test_from_png_of_an_empty_prompt(work):
    txt2img = load_script("txt2img")
    assert txt2img.main(work + ["--prompt", "", "--n_samples", "1", "--n_iter", "1", "--W", "32", "--H", "32", "--outdir", "a"]) == 0
    src = "a/samples/00000.png"
    assert _params(src).startswith("\nSteps: ")
    assert txt2img.main(work + ["--from_png", src, "--outdir", "b"]) == 0
    assert Image.open("b/samples/00000.png").tobytes() == Image.open(src).tobytes()
    # The web UIs strip the text: an empty prompt leaves the settings line alone.
    im = Image.open(src)
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", _params(src).strip())
    im.save("webui.png", pnginfo=info)
    assert txt2img.main(work + ["--from_png", "webui.png", "--outdir", "c"]) == 0
    assert Image.open("c/samples/00000.png").tobytes() == Image.open(src).tobytes()


def test_txt2img_refuses_an_img2img_png_and_img2img_regenerates_it(work, capsys):
    img2img = load_script("img2img")
    assert img2img.main(work + ["--init-img", "init.png", "--strength", "0.6", "--n_samples", "1", "--seed", "7", "--outdir", "i"]) == 0
    src = "i/samples/00000.png"
    capsys.readouterr()
    assert load_script("txt2img").main(work + ["--from_png", src, "--outdir", "t"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "made by img2img (Denoising strength 0.6)" in err and "img2img.py --from_png" in err
    assert not list((REPO / "t").glob("**/*.png"))
    assert img2img.main(work + ["--from_png", src, "--init-img", "init.png", "--outdir", "j"]) == 0
    assert Image.open("j/samples/00000.png").tobytes() == Image.open(src).tobytes()
    assert _params("j/samples/00000.png") == _params(src)


def test_flags_given_with_from_png_win_with_a_note(work, capsys):
    txt2img = load_script("txt2img")
    assert txt2img.main(work + ["--n_samples", "1", "--n_iter", "1", "--W", "32", "--H", "32", "--outdir", "a", "--ddim_steps", "3"]) == 0
    capsys.readouterr()
    assert txt2img.main(work + ["--from_png", "a/samples/00000.png", "--ddim_steps", "2", "--sampler", "euler", "--outdir", "b"]) == 0
    out = capsys.readouterr().out
    assert "flags given override" in out and "--ddim_steps 2 (PNG: 3)" in out and "--sampler euler (PNG: ddim)" in out
    params = _params("b/samples/00000.png")
    assert "Steps: 2" in params and "Sampler: euler" in params and "Schedule: karras" in params  # euler's own schedule
    assert "Seed: 42" in params and "Size: 32x32" in params  # the rest from the PNG


def test_metrics_json_is_checked_before_the_run(work, capsys):
    txt2img = load_script("txt2img")
    import os
    import pathlib

    open("afile", "w").close()

    os.mkdir("folder")
    for bad, message in (("afile/m.json", "its folder cannot be made"), ("folder", "is a folder")):
        assert txt2img.main(work + ["--metrics_json", bad, "--outdir", "o"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert not list(pathlib.Path("o").rglob("*.png")) and not list(pathlib.Path(".").glob("*.partial"))
    assert os.listdir("folder") == []


def test_prompt_file_with_a_byte_order_mark(work):
    with open("prompts.txt", "w", encoding="utf-8-sig") as f:
        f.write("a red circle\na blue square || dark\n")
    args = build_parser("txt2img").parse_args(["--from-file", "prompts.txt", "--n_samples", "2", "--n_iter", "1"])
    jobs = make_plan(args, "txt2img", 64, 64).jobs
    assert [j.prompt for j in jobs] == ["a red circle", "a blue square"] and jobs[1].negative_prompt == "dark"


def test_inpaint_without_init_img_names_inpainting(work, capsys):
    assert load_script("inpaint").main(work + ["--mask", "init.png"]) == 2
    assert "inpaint needs --init-img PATH" in capsys.readouterr().err


def test_default_micro_batch_is_bounded():
    args = build_parser("txt2img").parse_args(["--n_samples", "100000", "--n_iter", "1"])
    plan = make_plan(args, "txt2img", 64, 64)
    assert len(plan.jobs) == 100000 and plan.settings.max_batch_size == 8
    args = build_parser("txt2img").parse_args(["--n_samples", "3"])
    assert make_plan(args, "txt2img", 64, 64).settings.max_batch_size == 3


def test_messages_for_skip_flags_and_small_strength(work, capsys):
    assert load_script("txt2img").main(work + ["--n_samples", "1", "--n_iter", "1", "--W", "32", "--H", "32", "--skip_save", "--skip_grid"]) == 0
    out = capsys.readouterr().out
    assert "nothing saved" in out and "ready and waiting" not in out
    img2img = load_script("img2img")
    assert img2img.main(work + ["--init-img", "init.png", "--strength", "0.01", "--ddim_steps", "10", "--n_samples", "1", "--outdir", "s"]) == 0
    out = capsys.readouterr().out
    assert "re-runs 0 steps" in out
    assert img2img.main(work + ["--init-img", "init.png", "--strength", "0.5", "--ddim_steps", "10", "--n_samples", "1", "--outdir", "s"]) == 0
    assert "img2img: --strength 0.5 re-runs 5 of 10 steps" in capsys.readouterr().out


def test_n_rows_sets_rows(work):
    txt2img = load_script("txt2img")
    base = work + ["--n_samples", "3", "--n_iter", "2", "--W", "32", "--H", "32", "--skip_save"]
    assert txt2img.main(base + ["--outdir", "a"]) == 0
    assert Image.open("a/grid-0000.png").size == (2 + 3 * 34, 2 + 2 * 34)  # default: one row per batch
    assert txt2img.main(base + ["--outdir", "b", "--n_rows", "3"]) == 0
    assert Image.open("b/grid-0000.png").size == (2 + 2 * 34, 2 + 3 * 34)  # 3 rows of 2


def test_help_is_grouped_and_prints_each_default_once(capsys):
    with pytest.raises(SystemExit):
        build_parser("txt2img").parse_args(["--help"])
    text = capsys.readouterr().out
    for group in ("prompt:", "sampling:", "size and count:", "model:", "memory and speed:", "output:"):
        assert group in text
    assert "(default: None)" not in text
    flags = text.split("samplers (--sampler NAME)")[0]
    for block in re.split(r"\n  -", flags):
        # argparse's "(default: X)" only where the help text does not say its default itself
        assert block.count("(default: ") <= 1 and not ("(default: " in block and block.count("default") > 1), block


def test_errors_after_progress_bars_start_on_their_own_line(work, capsys, monkeypatch):
    from microbatch import engine

    def boom(self, *a, **k):
        raise RuntimeError("kaput")

    monkeypatch.setattr(engine.Engine, "decode", boom)
    argv = [a for a in work if a != "--quiet"] + ["--n_samples", "1", "--n_iter", "1", "--W", "32", "--H", "32"]
    assert load_script("txt2img").main(argv) == 1
    err = capsys.readouterr().err
    last = err.rstrip("\n").split("\n")[-1]
    assert last.startswith("error: RuntimeError: kaput"), repr(err[-300:])
