"""SDXL LoRAs end to end: `--lora FILE:TE:UNET` and `<lora:NAME:W>` tags through the scripts and the Pipeline API
on a tiny SDXL base checkpoint (and base + refiner: LoRAs go to the base only), the `Lora hashes` parameter,
`--from_png`, the conditioning cache refreshed between LoRA sets, the weights restored after each run."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from microbatch import GenerationRequest, Pipeline
from microbatch.lora import _layer_index, lora_hash
from tests.conftest import TINY_CONFIG, assert_weights_restored, build_tiny, save_tiny, weights_snapshot
from tests.script_utils import load_script
from tests.test_sdxl import TINY

RUN = ["--precision", "full", "--quiet", "--device", "cpu", "--skip_grid"]
SMALL = ["--n_samples", "1", "--n_iter", "1", "--ddim_steps", "3", "--sampler", "euler", "--W", "64", "--H", "64", "--seed", "7"]
PREFIX = {"unet": "lora_unet_", "te1": "lora_te1_", "te2": "lora_te2_"}


def write_sdxl_lora(model: torch.nn.Module, path: Path, seed: int, parts=("unet", "te1", "te2"), rank: int = 2, scale: float = 0.5) -> None:
    """A kohya SDXL LoRA over every linear layer of the model's UNet (sgm names, as kohya's SDXL trainer writes
    them) and text encoders (`lora_te1_` / `lora_te2_`, bigG's q / k / v included), strong enough to change the
    image."""
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    out, seen = {}, set()
    for key, target in _layer_index(model).items():
        kind, name = key.split(":", 1)
        weight = params[target.param]
        if kind not in parts or weight.dim() != 2 or (target.param, target.rows) in seen or (kind == "unet" and not name.startswith(("input_blocks", "middle_block", "output_blocks", "label_emb", "time_embed"))):
            continue
        seen.add((target.param, target.rows))
        rows = weight.shape[0] if target.rows is None else target.rows[1] - target.rows[0]
        out[PREFIX[kind] + name + ".lora_down.weight"] = scale * torch.randn(rank, weight.shape[1], generator=g)
        out[PREFIX[kind] + name + ".lora_up.weight"] = scale * torch.randn(rows, rank, generator=g)
        out[PREFIX[kind] + name + ".alpha"] = torch.tensor(float(rank))
    save_file(out, str(path), metadata={"ss_base_model_version": "sdxl_base_v1-0"})


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("sdxl_lora")
    out = {}
    for seed, kind in ((21, "base"), (22, "refiner")):
        out[kind] = save_tiny(TINY[kind], folder / f"tiny-sdxl-{kind}.safetensors", seed)
    loras = folder / "Lora"
    loras.mkdir()
    base = build_tiny(TINY["base"], seed=21)
    write_sdxl_lora(base, loras / "xlstyle.safetensors", seed=1)
    write_sdxl_lora(base, loras / "xltext.safetensors", seed=2, parts=("te1", "te2"))
    sd1 = build_tiny(TINY_CONFIG)
    sd_key = next(k for k in _layer_index(sd1) if k.startswith("te:"))[3:]
    save_file({f"lora_te_{sd_key}.lora_down.weight": torch.ones(2, 32), f"lora_te_{sd_key}.lora_up.weight": torch.ones(32, 2)}, str(loras / "sd1.safetensors"))
    out["loras"] = loras
    return out


@pytest.fixture(scope="module")
def pipe(files) -> Pipeline:
    return Pipeline.from_checkpoint(files["base"], device="cpu", precision="full")


def _pngs(folder: Path) -> list[Image.Image]:
    return [Image.open(p) for p in sorted((folder / "samples").glob("*.png"))]


def test_scripts_flag_tag_api_hashes_and_from_png(files, pipe, tmp_path):
    loras = files["loras"]
    txt2img = load_script("txt2img")
    base = ["--ckpt", str(files["base"]), *SMALL, *RUN]
    runs = {
        "plain": ["--prompt", "a red circle"],
        "flag": ["--prompt", "a red circle", "--lora", f"{loras / 'xlstyle.safetensors'}:0.6:0.8"],
        "tag": ["--prompt", "a red circle <lora:xlstyle:0.6:0.8>", "--lora_dir", str(loras)],
    }
    pngs = {}
    for name, args in runs.items():
        assert txt2img.main([*args, *base, "--outdir", str(tmp_path / name)]) == 0
        pngs[name] = _pngs(tmp_path / name)[0]
    pixels = {k: np.asarray(v) for k, v in pngs.items()}
    assert np.array_equal(pixels["flag"], pixels["tag"]) and not np.array_equal(pixels["flag"], pixels["plain"])
    digest = lora_hash(loras / "xlstyle.safetensors")[:12]
    for name in ("flag", "tag"):
        text = pngs[name].info["parameters"]
        assert text.startswith("a red circle <lora:xlstyle:0.6:0.8>\n") and f'Lora hashes: "xlstyle: {digest}"' in text
    assert "Lora" not in pngs["plain"].info["parameters"]
    # the API: the same pixels and text
    before = weights_snapshot(pipe.model)
    api = pipe.txt2img("a red circle <lora:xlstyle:0.6:0.8>", n=1, steps=3, sampler="euler", width=64, height=64, seed=7, lora_dir=str(loras))
    assert api[0].tobytes() == pngs["tag"].tobytes() and api[0].info["parameters"] == pngs["tag"].info["parameters"]
    flagged = pipe.txt2img("a red circle", n=1, steps=3, sampler="euler", width=64, height=64, seed=7, loras=[(str(loras / "xlstyle.safetensors"), 0.8, 0.6)])
    assert flagged[0].tobytes() == pngs["flag"].tobytes()
    assert_weights_restored(pipe.model, before)
    # --from_png applies the tag again from --lora_dir
    for name in ("flag", "tag"):
        again = tmp_path / f"again_{name}"
        png = tmp_path / name / "samples" / "00000.png"
        assert txt2img.main(["--ckpt", str(files["base"]), "--from_png", str(png), "--lora_dir", str(loras), *RUN, "--outdir", str(again)]) == 0
        assert _pngs(again)[0].tobytes() == pngs[name].tobytes()


def test_text_encoder_lora_sets_refresh_the_cached_conditioning(pipe, files):
    """One run, one prompt with and without a text-only LoRA (both encoders): the conditioning cached for the
    prompt under one set must not serve the other; each image equals itself made alone."""
    loras = files["loras"]
    before = weights_snapshot(pipe.model)
    prompts = ["a red circle", "a red circle <lora:xltext:1>", "a red circle"]
    request = GenerationRequest(prompt_file=tuple((p, None) for p in prompts), n_samples=3, max_batch_size=3, seed=4, steps=2,
                                sampler="euler", height=64, width=64, lora_dir=str(loras))
    result = pipe.generate(request)
    arrays = [image.array for image in result.images]
    assert not np.array_equal(arrays[0], arrays[1])
    for i, prompt in enumerate(prompts):
        alone = pipe.generate(GenerationRequest(prompt=prompt, seed=4 + i, steps=2, sampler="euler", height=64, width=64, lora_dir=str(loras)))
        assert np.array_equal(alone.images[0].array, arrays[i]), i
    assert_weights_restored(pipe.model, before)


def test_weight_zero_equals_no_lora(pipe, files):
    kw = dict(n=1, steps=2, sampler="euler", width=64, height=64, seed=9, lora_dir=str(files["loras"]))
    plain = pipe.txt2img("a blue square", **kw)
    zero = pipe.txt2img("a blue square <lora:xlstyle:0>", **kw)
    assert plain[0].tobytes() == zero[0].tobytes()


def test_sd1_lora_on_sdxl_is_a_one_line_error(files, tmp_path, capsys):
    txt2img = load_script("txt2img")
    rc = txt2img.main(["--ckpt", str(files["base"]), "--prompt", "a cat <lora:sd1:1>", "--lora_dir", str(files["loras"]), *SMALL, *RUN, "--outdir", str(tmp_path / "x")])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and "sd1.safetensors" in errors[0] and "SD 1.x" in errors[0] and "SDXL" in errors[0]
    assert "Traceback" not in err and not list((tmp_path / "x").rglob("*.png"))


def test_base_and_refiner_loras_go_to_the_base_only(files):
    pipe = Pipeline.from_checkpoint(files["base"], device="cpu", precision="full", refiner=files["refiner"])
    refiner_before, base_before = weights_snapshot(pipe.refiner.model), weights_snapshot(pipe.model)
    seen = []
    original = pipe.refiner.model.apply_model

    def recording(x, t, cond, **kw):  # the refiner runs on its own, untouched weights
        seen.append(all(torch.equal(v, refiner_before[k]) for k, v in pipe.refiner.model.state_dict().items()))
        return original(x, t, cond, **kw)

    pipe.refiner.model.apply_model = recording
    kw = dict(n=1, steps=4, sampler="euler", width=128, height=128, seed=3, refiner_switch=0.5, lora_dir=str(files["loras"]))
    with_lora = pipe.txt2img("a red circle <lora:xlstyle:1>", **kw)
    plain = pipe.txt2img("a red circle", **kw)
    assert seen and all(seen)
    assert with_lora[0].tobytes() != plain[0].tobytes()
    text = with_lora[0].info["parameters"]
    assert "Refiner: tiny-sdxl-refiner" in text and "Lora hashes" in text
    assert_weights_restored(pipe.model, base_before)
    assert_weights_restored(pipe.refiner.model, refiner_before)
