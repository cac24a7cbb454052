"""Every script end to end on a tiny random checkpoint: exit codes, files written, numbering that continues."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.script_utils import REPO, load_script

FAST = ["--ddim_steps", "4", "--precision", "full", "--quiet", "--device", "cpu"]
TINY = ["--config", str(REPO / "configs" / "tiny" / "tiny-v1.yaml")]


def pngs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.png"))


def test_txt2img_plms_writes_samples_and_grid_and_numbering_continues(tmp_path, monkeypatch, tiny_ckpt, capsys):
    monkeypatch.chdir(tmp_path)
    txt2img = load_script("txt2img")
    args = ["--prompt", "a photograph of a cat", "--plms", "--n_samples", "3", "--n_iter", "1", "--H", "64", "--W", "64", "--ckpt", str(tiny_ckpt), *TINY, *FAST]
    assert txt2img.main(args) == 0
    out = tmp_path / "outputs" / "txt2img-samples"
    assert pngs(out / "samples") == ["00000.png", "00001.png", "00002.png"]
    assert pngs(out) == ["grid-0000.png"]
    printed = capsys.readouterr().out
    assert "Samples took" in printed and "Peak resident memory" in printed
    assert txt2img.main(args + ["--n_iter", "2"]) == 0
    assert pngs(out / "samples") == [f"{i:05}.png" for i in range(9)]
    assert pngs(out) == ["grid-0000.png", "grid-0001.png"]
    grid = Image.open(out / "grid-0001.png")
    assert grid.size == (2 + 3 * 66, 2 + 2 * 66)  # 3 per row, 2 rows, 2 px black padding
    image = Image.open(out / "samples" / "00004.png")
    assert image.size == (64, 64)
    assert "Seed: 43" in image.info["parameters"] and "a photograph of a cat" in image.info["parameters"]


def test_txt2img_skip_flags(tmp_path, monkeypatch, tiny_ckpt):
    monkeypatch.chdir(tmp_path)
    txt2img = load_script("txt2img")
    base = ["--n_samples", "2", "--n_iter", "1", "--H", "64", "--W", "64", "--ckpt", str(tiny_ckpt), *TINY, *FAST]
    assert txt2img.main(base + ["--skip_grid", "--outdir", "a"]) == 0
    assert pngs(tmp_path / "a" / "samples") == ["00000.png", "00001.png"] and pngs(tmp_path / "a") == []
    assert txt2img.main(base + ["--skip_save", "--outdir", "b"]) == 0
    assert pngs(tmp_path / "b" / "samples") == [] and pngs(tmp_path / "b") == ["grid-0000.png"]


def test_img2img_any_size_and_plms(tmp_path, monkeypatch, tiny_ckpt, capsys):
    monkeypatch.chdir(tmp_path)
    Image.fromarray((np.random.default_rng(0).random((70, 90, 3)) * 255).astype(np.uint8)).save("init.png")
    img2img = load_script("img2img")
    args = ["--prompt", "A cat with a hat", "--init-img", "init.png", "--strength", "0.8", "--ckpt", str(tiny_ckpt), *TINY, *FAST]
    assert img2img.main(args) == 0
    assert "resized to 80x64" in capsys.readouterr().out  # tiny model: sides are multiples of 16
    out = tmp_path / "outputs" / "img2img-samples"
    assert pngs(out / "samples") == ["00000.png", "00001.png"]  # img2img's default n_samples is 2
    assert Image.open(out / "samples" / "00000.png").size == (80, 64)
    assert img2img.main(args + ["--plms", "--strength", "1.0"]) == 0  # strength 1.0 crashes the original
    assert pngs(out / "samples") == [f"{i:05}.png" for i in range(4)]


def test_batch_gen_makes_exactly_n_samples(tmp_path, monkeypatch, tiny_ckpt):
    monkeypatch.chdir(tmp_path)
    batch_gen = load_script("batch_gen")
    args = ["--prompt", "a photograph of a cat", "--n_samples", "5", "--max_batch_size", "2", "--W", "64", "--H", "64", "--ckpt", str(tiny_ckpt), "--metrics_json", "m.json", *TINY, *FAST]
    assert batch_gen.main(args) == 0
    assert pngs(tmp_path / "outputs" / "batch_gen-samples" / "samples") == [f"{i:05}.png" for i in range(5)]
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["images"] == 5 and metrics["settings"]["max_batch_size"] == 2
    for key in ("sampling_s", "first_image_s", "median_image_s", "images_per_s", "model_load_s", "peak_memory_mb"):
        assert metrics[key] is not None and metrics[key] > 0


def test_script_runs_as_a_subprocess_with_the_yaml_beside_the_checkpoint(tmp_path, tiny_ckpt_with_yaml):
    """The users' command line, verbatim apart from size and steps: a real process, exit code 0."""
    cmd = [sys.executable, str(REPO / "scripts" / "txt2img.py"), "--prompt", "a photograph of a cat", "--plms", "--n_samples", "1",
           "--n_iter", "2", "--H", "64", "--W", "64", "--ckpt", str(tiny_ckpt_with_yaml), *FAST]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "the yaml beside the checkpoint" in result.stderr
    assert pngs(tmp_path / "outputs" / "txt2img-samples" / "samples") == ["00000.png", "00001.png"]


def test_memory_flags_end_to_end(tmp_path, monkeypatch, tiny_ckpt, capsys):
    """--max_batch_size auto measures and picks a size within the budget; --vae_tiling on decodes in tiles;
    --offload is accepted (a no-op on the CPU)."""
    monkeypatch.chdir(tmp_path)
    batch_gen = load_script("batch_gen")
    base = ["--prompt", "a cat", "--W", "64", "--H", "64", "--ckpt", str(tiny_ckpt), *TINY, *FAST]
    assert batch_gen.main(base + ["--n_samples", "3", "--max_batch_size", "auto", "--max_memory", "4", "--metrics_json", "m.json"]) == 0
    out = capsys.readouterr().out
    assert "--max_batch_size auto: 3 images per micro-batch" in out
    assert json.loads((tmp_path / "m.json").read_text())["settings"]["max_batch_size"] == 3
    import microbatch.vae_tiling as vt

    calls = []
    real = vt.decode_tiled
    monkeypatch.setattr("microbatch.engine.decode_tiled", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    assert batch_gen.main(base + ["--n_samples", "1", "--vae_tiling", "on", "--H", "256", "--W", "256", "--vae_tile", "16", "--vae_tile_overlap", "8", "--offload", "model", "--outdir", "t"]) == 0
    assert calls and (tmp_path / "t" / "samples" / "00000.png").is_file()
    assert batch_gen.main(base + ["--max_batch_size", "lots"]) == 2
    assert "--max_batch_size must be a positive integer or auto" in capsys.readouterr().err


def _cfg_scale(path: Path) -> str:
    with Image.open(path) as image:
        return next(f for f in image.info["parameters"].split(", ") if f.startswith("CFG scale"))


def test_scale_default_comes_from_the_config_sampling_defaults(tmp_path, monkeypatch, tiny_ckpt, capsys):
    monkeypatch.chdir(tmp_path)
    txt2img = load_script("txt2img")
    tiny = (REPO / "configs" / "tiny" / "tiny-v1.yaml").read_text()
    (tmp_path / "rec.yaml").write_text(tiny + "\nsampling_defaults:\n  scale: 2.5\n")
    base = ["--n_samples", "1", "--n_iter", "1", "--H", "64", "--W", "64", "--ckpt", str(tiny_ckpt), "--skip_grid", *FAST]
    runs = {"plain": [*TINY], "rec": ["--config", "rec.yaml"], "given": ["--config", "rec.yaml", "--scale", "6"]}
    for name, extra in runs.items():
        assert txt2img.main(base + extra + ["--outdir", name]) == 0
    assert _cfg_scale(tmp_path / "plain" / "samples" / "00000.png") == "CFG scale: 7.5"  # the original's default
    assert _cfg_scale(tmp_path / "rec" / "samples" / "00000.png") == "CFG scale: 2.5"
    assert _cfg_scale(tmp_path / "given" / "samples" / "00000.png") == "CFG scale: 6"
    capsys.readouterr()
    for bad in ("  scale: high\n", "  scale: 2\n  steps: 10\n"):
        (tmp_path / "bad.yaml").write_text(tiny + "\nsampling_defaults:\n" + bad)
        assert txt2img.main(base + ["--config", "bad.yaml", "--outdir", "bad"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: config bad.yaml: sampling_defaults") and "\n" not in err, err
    assert not list((tmp_path / "bad").rglob("*.png"))
