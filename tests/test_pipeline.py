"""The Python API and the one request path: Pipeline.txt2img / img2img / inpaint give the scripts' pixels, requests
from flags, from --from_png and from the API are equal, callbacks, progress from another thread, cancellation."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from microbatch import GenerationRequest, Pipeline, UsageError
from microbatch.cli import build_parser, explicit_flags, from_args
from tests.script_utils import REPO, load_script

TINY = str(REPO / "configs" / "tiny" / "tiny-v1.yaml")
RUN = ["--precision", "full", "--quiet", "--device", "cpu", "--config", TINY]


@pytest.fixture(scope="module")
def pipe(tiny_ckpt) -> Pipeline:
    return Pipeline.from_checkpoint(tiny_ckpt, config=TINY, device="cpu", precision="full")


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((70, 90, 3)) * 255).astype(np.uint8)).save(tmp_path / "init.png")
    mask = np.zeros((70, 90), np.uint8)
    mask[20:50, 30:70] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    return tmp_path / "init.png", tmp_path / "mask.png"


def _pngs(folder: Path) -> list[Image.Image]:
    return [Image.open(p) for p in sorted((folder / "samples").glob("*.png"))]


def _same(api: list[Image.Image], files: list[Image.Image]) -> None:
    assert len(api) == len(files)
    for a, f in zip(api, files):
        assert a.tobytes() == f.tobytes() and a.size == f.size
        assert a.info["parameters"] == f.info["parameters"]


def test_txt2img_api_gives_the_scripts_pixels_and_parameters(pipe, tiny_ckpt, tmp_path):
    api = pipe.txt2img("a red circle", negative_prompt="blurry", n=3, steps=3, sampler="euler_a", seed=5, width=48, height=32, scale=3.0)
    argv = ["--ckpt", str(tiny_ckpt), "--prompt", "a red circle", "--negative_prompt", "blurry", "--n_samples", "3", "--n_iter", "1",
            "--ddim_steps", "3", "--sampler", "euler_a", "--seed", "5", "--W", "48", "--H", "32", "--scale", "3", "--outdir", str(tmp_path / "o"), *RUN]
    assert load_script("txt2img").main(argv) == 0
    files = _pngs(tmp_path / "o")
    _same(api, files)
    assert "Seed: 7" in api[2].info["parameters"] and api[0].size == (48, 32)


def test_img2img_and_inpaint_api_give_the_scripts_pixels(pipe, tiny_ckpt, tmp_path, images):
    init, mask = images
    common = ["--ckpt", str(tiny_ckpt), "--prompt", "a cat", "--n_samples", "2", "--ddim_steps", "4", "--seed", "3", *RUN]
    assert load_script("img2img").main(common + ["--init-img", str(init), "--strength", "0.5", "--outdir", str(tmp_path / "i")]) == 0
    _same(pipe.img2img("a cat", str(init), strength=0.5, n=2, steps=4, seed=3), _pngs(tmp_path / "i"))
    # A PIL image works as well as a path.
    _same(pipe.img2img("a cat", Image.open(init), strength=0.5, n=2, steps=4, seed=3), _pngs(tmp_path / "i"))
    assert load_script("inpaint").main(common + ["--init-img", str(init), "--mask", str(mask), "--outdir", str(tmp_path / "p")]) == 0
    painted = pipe.inpaint("a cat", init, mask, n=2, steps=4, seed=3)
    _same(painted, _pngs(tmp_path / "p"))
    assert painted[0].size == (90, 70)


def test_requests_from_flags_png_and_api_are_equal(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flags = ["--prompt", "a red circle", "--negative_prompt", "dark", "--n_samples", "1", "--n_iter", "1", "--ddim_steps", "3",
             "--sampler", "dpmpp_2m", "--seed", "9", "--W", "32", "--H", "48", "--scale", "4"]
    args = build_parser("txt2img").parse_args(flags)
    cmd = from_args(args, "txt2img", explicit_flags("txt2img", flags))
    api = GenerationRequest(prompt="a red circle", negative_prompt="dark", steps=3, sampler="dpmpp_2m", seed=9, width=32, height=48, scale=4.0)
    assert cmd.request == api
    assert load_script("txt2img").main(["--ckpt", str(tiny_ckpt), *flags, "--outdir", "o", *RUN]) == 0
    png = ["--from_png", "o/samples/00000.png"]
    from_png = from_args(build_parser("txt2img").parse_args(png), "txt2img", explicit_flags("txt2img", png))
    assert from_png.request == api
    assert from_png.options.precision == "full"  # the PNG's precision


def test_request_is_frozen_and_validated_once():
    r = GenerationRequest(prompt="x", sampler="euler_a")
    assert r.eta == 1.0  # the sampler's own default
    with pytest.raises(Exception):
        r.steps = 3  # type: ignore[misc]
    with pytest.raises(UsageError, match="--n_samples must be a positive integer, got 0"):
        GenerationRequest(n_samples=0)
    with pytest.raises(UsageError, match="img2img needs --init-img"):
        GenerationRequest(mode="img2img")
    with pytest.raises(UsageError, match="takes no --H / --W"):
        GenerationRequest(mode="img2img", init_image=str(REPO / "docs" / "demo-grid.png"), width=64)
    assert r.with_changes(sampler="ddim").eta == 0.0


def test_callbacks_progress_and_cancel_from_another_thread(pipe):
    events, snapshots = [], []
    started = threading.Event()

    def callback(event):
        events.append(event)
        started.set()

    def watch():
        started.wait(30)
        snapshots.append(pipe.progress())
        pipe.cancel()

    watcher = threading.Thread(target=watch)
    watcher.start()
    out = pipe.txt2img("a cat", n=6, steps=20, max_batch_size=2, width=32, height=32, callback=callback)
    watcher.join()
    assert pipe.last_result.interrupted and len(out) < 6
    assert snapshots and snapshots[0].state == "running" and snapshots[0].images_total == 6
    assert pipe.progress().state == "cancelled"
    steps = [e for e in events if e.kind == "step"]
    assert steps and steps[0].steps_total == 20 and steps[0].step == 1  # 1000 // 20 divides: 20 CompVis steps
    # A full run after a cancelled one: every step and image reported, in order.
    events.clear()
    done = pipe.txt2img("a cat", n=3, steps=2, max_batch_size=2, width=32, height=32, callback=events.append)
    assert len(done) == 3 and pipe.progress().state == "done" and pipe.progress().fraction == 1.0
    kinds = [(e.kind, e.step) for e in events]
    assert kinds == [("step", 1), ("step", 2), ("image", 2), ("image", 2), ("step", 1), ("step", 2), ("image", 2)]
    assert [e.image.job.seed for e in events if e.kind == "image"] == [42, 43, 44]


def test_metrics_settings_are_plain_values(tiny_ckpt, tmp_path):
    argv = ["--ckpt", str(tiny_ckpt), "--n_samples", "1", "--n_iter", "1", "--ddim_steps", "1", "--W", "32", "--H", "32",
            "--attention_slicing", "2", "--outdir", str(tmp_path / "o"), "--metrics_json", str(tmp_path / "m.json"), *RUN]
    assert load_script("txt2img").main(argv) == 0
    settings = json.loads((tmp_path / "m.json").read_text())["settings"]
    assert settings["attention"] == "sliced:2"
    assert all(v is None or isinstance(v, (str, int, float, bool)) for v in settings.values()), settings


def test_save_image_keeps_the_parameters(pipe, tmp_path):
    from microbatch.images import save_image

    image = pipe.txt2img("a cat", steps=1, width=32, height=32)[0]
    path = save_image(image, tmp_path / "x.png")
    with Image.open(path) as again:
        assert again.info["parameters"] == image.info["parameters"] and again.tobytes() == image.tobytes()


def test_vae_flag_and_vae_beside_the_checkpoint_give_the_same_pixels(tiny_ckpt, tiny_model, tmp_path, capsys):
    """The checkpoint's own VAE saved alone: given with --vae, and found beside a copy of the checkpoint, the PNGs
    have the same pixels as without it, and their parameters name the VAE file by hash and name."""
    import shutil

    import torch

    vae = {k: v for k, v in tiny_model.state_dict().items() if k.startswith("first_stage_model.")}
    torch.save(vae, tmp_path / "own.vae.pt")
    beside = tmp_path / "beside"
    beside.mkdir()
    shutil.copy(tiny_ckpt, beside / "model.ckpt")
    shutil.copy(tmp_path / "own.vae.pt", beside / "model.vae.pt")
    base = ["--n_samples", "2", "--n_iter", "1", "--ddim_steps", "2", "--W", "32", "--H", "32", "--skip_grid", *RUN]
    txt2img = load_script("txt2img")
    assert txt2img.main(["--ckpt", str(tiny_ckpt), *base, "--outdir", str(tmp_path / "plain")]) == 0
    assert txt2img.main(["--ckpt", str(tiny_ckpt), "--vae", str(tmp_path / "own.vae.pt"), *base, "--outdir", str(tmp_path / "flag")]) == 0
    assert txt2img.main(["--ckpt", str(beside / "model.ckpt"), *base, "--outdir", str(tmp_path / "auto")]) == 0
    assert "found beside the checkpoint" in capsys.readouterr().out
    plain, flag, auto = (_pngs(tmp_path / d) for d in ("plain", "flag", "auto"))
    for a, b, c in zip(plain, flag, auto):
        assert a.tobytes() == b.tobytes() == c.tobytes()
        assert "VAE hash" not in a.info["parameters"]
        assert "VAE: own.vae.pt" in b.info["parameters"] and "VAE: model.vae.pt" in c.info["parameters"]
        assert b.info["parameters"].split("VAE hash: ")[1][:10] == c.info["parameters"].split("VAE hash: ")[1][:10]
    assert txt2img.main(["--ckpt", str(tiny_ckpt), "--vae", str(tmp_path / "nope.pt"), *base]) == 2
    assert "VAE file not found" in capsys.readouterr().err


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable peak RSS")
def test_sampling_peak_excludes_what_came_before(pipe, tiny_ckpt, tmp_path):
    """The metrics' sampling peak starts after loading: a 400 MB spike before sampling (standing in for a load's
    peak) shows in the process's peak but not in peak_memory_sampling_mb; the JSON has both phases."""
    import resource

    import torch

    spike = torch.ones(100 * 2**20)  # 400 MB, every page touched
    del spike
    process_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = pipe.generate(GenerationRequest(prompt="a cat", n_samples=1, n_iter=1, steps=1, height=32, width=32))
    m = result.metrics
    assert m.sampling_peak_reset and m.peak_memory_sampling_mb == m.peak_memory_mb
    assert m.peak_memory_sampling_mb < process_peak - 300, (m.peak_memory_sampling_mb, process_peak)
    assert m.peak_memory_load_mb is not None and m.peak_memory_load_mb > 0
    argv = ["--ckpt", str(tiny_ckpt), "--n_samples", "1", "--n_iter", "1", "--ddim_steps", "1", "--W", "32", "--H", "32",
            "--outdir", str(tmp_path / "o"), "--metrics_json", str(tmp_path / "m.json"), *RUN]
    assert load_script("txt2img").main(argv) == 0
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["peak_memory_load_mb"] > 0 and saved["peak_memory_sampling_mb"] > 0
