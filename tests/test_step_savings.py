"""Opt-in step savings: guidance on a limited interval of noise levels (--guidance_interval)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from microbatch import GenerationRequest, Pipeline, UsageError
from samplers.guidance import GuidedModel
from tests.script_utils import REPO, load_script

TINY = str(REPO / "configs" / "tiny" / "tiny-v1.yaml")


@pytest.fixture(scope="module")
def pipe(tiny_ckpt) -> Pipeline:
    return Pipeline.from_checkpoint(tiny_ckpt, config=TINY, device="cpu", precision="full")


def _pixels(pipe: Pipeline, **kw) -> np.ndarray:
    fields = dict(prompt="a cat", n_samples=2, n_iter=1, steps=6, height=32, width=32, sampler="euler", scale=5.0)
    request = GenerationRequest(**{**fields, **kw})
    return np.stack([g.array for g in pipe.generate(request).images])


def test_interval_covering_every_level_is_exact_and_an_empty_one_is_scale_1(pipe):
    exact = _pixels(pipe)
    assert np.array_equal(_pixels(pipe, guidance_interval=(0.0, math.inf)), exact)
    off = _pixels(pipe, guidance_interval=(1e6, 2e6))
    assert np.array_equal(off, _pixels(pipe, scale=1.0)) and not np.array_equal(off, exact)
    part = _pixels(pipe, guidance_interval=(0.5, 5.0))
    assert not np.array_equal(part, exact) and not np.array_equal(part, off)


def test_outside_the_interval_the_unconditional_rows_are_not_computed():
    calls = []

    def apply_model(x, t, c):
        calls.append(x.shape[0])
        return x * 0 + c.mean(dim=(1, 2)).view(-1, 1, 1, 1)

    cond, uncond = torch.ones(2, 3, 4), torch.zeros(2, 3, 4)
    model = GuidedModel(apply_model, cond, uncond, guidance_scale=3.0)
    model.t_interval = (100.0, 500.0)
    x = torch.randn(2, 4, 8, 8)
    inside = model(x, torch.full((2,), 300.0))
    outside = model(x, torch.full((2,), 900.0))
    assert calls == [4, 2] and model.unguided_calls == 1
    assert torch.allclose(inside, torch.full_like(x, 3.0)) and torch.allclose(outside, torch.ones_like(x))


def test_flag_validation_and_parameters_round_trip(tiny_ckpt, tmp_path, capsys):
    with pytest.raises(UsageError, match="guidance_interval"):
        GenerationRequest(prompt="x", guidance_interval=(2.0, 1.0))
    txt2img = load_script("txt2img")
    run = ["--ckpt", str(tiny_ckpt), "--config", TINY, "--precision", "full", "--device", "cpu", "--quiet", "--prompt", "a cat",
           "--n_samples", "1", "--n_iter", "1", "--ddim_steps", "3", "--W", "32", "--H", "32"]
    assert txt2img.main([*run, "--guidance_interval", "0.3", "inf", "--outdir", str(tmp_path / "a")]) == 0
    png = sorted((tmp_path / "a" / "samples").glob("*.png"))[0]
    from PIL import Image

    with Image.open(png) as im:
        text = im.info["parameters"]
        first = im.tobytes()
    assert "Guidance interval: 0.3 inf" in text
    assert txt2img.main(["--from_png", str(png), *run[:8], "--outdir", str(tmp_path / "b")]) == 0
    with Image.open(sorted((tmp_path / "b" / "samples").glob("*.png"))[0]) as im:
        assert im.tobytes() == first and "Guidance interval: 0.3 inf" in im.info["parameters"]
    capsys.readouterr()
    assert txt2img.main([*run, "--guidance_interval", "5", "1", "--outdir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --guidance_interval") and err.count("\n") == 0
