"""The shipped demo model (microbatch/assets/demo-shapes.safetensors, trained by scripts/train_demo.py).

Its prompt adherence is judged by the independent, deterministic analyzer of microbatch.demo.analyze (plain image
statistics, tested against the renderer in test_demo_shapes.py); the same subset with random weights must fail the
threshold, so the adherence test measures the training and not the judge.
"""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.util import instantiate_from_config, load_config, load_model_from_config
from microbatch.devices import choose_dtypes
from microbatch.loading import LoadedModel, demo_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
# The 12 prompts of eval_demo.balanced_subset, seed 0, 20 steps, the demo model's default scale (2), float32.
# Measured on the shipped weights: DDIM and PLMS 12/12 in every attribute; random weights: all three 0/12. The
# thresholds leave a margin of two images for floating-point differences between CPUs.
SUBSET_MIN = {"all": 10 / 12, "color": 10 / 12, "shape": 10 / 12, "background": 10 / 12}


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def eval_demo():
    return _load_script("eval_demo")


@pytest.fixture(scope="module")
def ckpt() -> Path:
    path = demo_checkpoint()
    assert path is not None, "microbatch/assets/demo-shapes.safetensors is missing: run scripts/train_demo.py"
    return path


@pytest.fixture(scope="module")
def demo(eval_demo, ckpt):
    torch.set_num_threads(2)
    return eval_demo.load_demo(ckpt, precision="full", device="cpu")


def test_checkpoint_loads_strictly_in_the_original_layout(ckpt):
    from safetensors.torch import load_file

    state = load_file(str(ckpt))
    prefixes = {k.split(".")[0] for k in state}
    assert prefixes == {"model", "first_stage_model", "cond_stage_model", "scale_factor", *_schedule_names()}
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in state
    assert not any(k.startswith("model_ema.") for k in state)  # EMA weights are the UNet weights
    # The yaml beside the file is used by both loaders; a strict key check raises on any difference.
    model = load_model_from_config(ckpt.with_suffix(".yaml"), ckpt)
    assert model.image_size == 8 and model.first_stage_model.encoder.num_resolutions == 4  # 64x64 images, f = 8
    assert abs(model.scale_factor - float(state["scale_factor"])) < 1e-5
    assert model.scale_factor != 1.0  # measured by training, not the placeholder
    assert ckpt.stat().st_size < 20 * 2**20


def _schedule_names():
    from ldm.models.diffusion.ddpm import SCHEDULE_BUFFERS

    return set(SCHEDULE_BUFFERS)


@pytest.mark.parametrize("sampler", ["ddim", "plms"])
def test_adherence_subset(eval_demo, demo, sampler):
    labels = eval_demo.balanced_subset(12)
    settings = eval_demo.settings_for(sampler, steps=20, guidance_scale=eval_demo.default_scale(demo), batch=12)
    result, images = eval_demo.adherence(demo, labels, [0], settings)
    assert images[0].shape == (64, 64, 3)
    for key, minimum in SUBSET_MIN.items():
        assert result[key] >= minimum - 1e-9, (key, result)


def test_adherence_threshold_fails_with_random_weights(eval_demo, ckpt):
    torch.manual_seed(0)
    config = ckpt.with_suffix(".yaml")
    model = instantiate_from_config(load_config(config).model).eval()
    random = LoadedModel(model, None, config, "random weights", choose_dtypes("full", CPU), 0.0)
    settings = eval_demo.settings_for("ddim", steps=20, guidance_scale=2.0, batch=12)
    result, _ = eval_demo.adherence(random, eval_demo.balanced_subset(12), [0], settings)
    assert result["all"] < SUBSET_MIN["all"], result


def test_img2img_turns_a_red_circle_blue(eval_demo, demo):
    from microbatch.demo.analyze import analyze
    from microbatch.demo.shapes import render

    assert analyze(render("red", "circle", "white")).color == "red"
    colors = eval_demo.img2img_blue(demo, seeds=[0, 1], steps=20)
    assert colors == ["blue", "blue"]


def test_txt2img_without_ckpt_uses_the_demo_model(ckpt, tmp_path, monkeypatch, capsys):
    txt2img = _load_script("txt2img")
    monkeypatch.chdir(tmp_path)  # so the default SD checkpoint path (relative) does not exist
    outdir = tmp_path / "out"
    code = txt2img.main(
        ["--prompt", "a green square on a black background", "--n_samples", "1", "--n_iter", "1", "--ddim_steps", "10",
         "--precision", "full", "--device", "cpu", "--outdir", str(outdir), "--quiet", "--skip_grid"]
    )
    assert code == 0
    out = capsys.readouterr().out
    notices = [line for line in out.splitlines() if "demo model" in line]
    assert len(notices) == 1 and "--ckpt" in notices[0], out
    samples = sorted((outdir / "samples").glob("*.png"))
    assert len(samples) == 1
    with Image.open(samples[0]) as im:
        assert im.size == (64, 64)
        assert "CFG scale: 2," in im.info["parameters"]  # the demo yaml's sampling_defaults.scale
        image = np.asarray(im.convert("RGB"))
    assert image.std() > 5  # not a blank image


def test_eval_script_defaults_to_the_models_scale_and_writes_its_table(eval_demo, ckpt, tmp_path, capsys):
    argv = ["--seeds", "1", "--samplers", "ddim", "--steps", "3", "--img2img_seeds", "1", "--outdir", str(tmp_path)]
    assert eval_demo.main(argv) == 0
    table = (tmp_path / "table.md").read_text()
    assert "| ddim 3 steps, scale 2 |" in table, table
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["img2img_blue"]["ddim"]["scale"] == 2.0 and len(summary["img2img_blue"]["ddim"]["colors"]) == 1
    assert (tmp_path / "grid-ddim-2.png").is_file()
    assert eval_demo.main(argv + ["--steps", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
