"""LoRAs end to end: `--lora` and `<lora:...>` prompt tags through the pipeline and the scripts, micro-batches
grouped by LoRA set, the model's weights restored after every run, and PNGs regenerated with their LoRAs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from microbatch import Pipeline
from microbatch.cli import parse_lora_flag
from microbatch.lora import _layer_index, applied_loras, lora_hash
from microbatch.lora_jobs import group_by_set, resolve_jobs
from microbatch.engine import ImageJob
from microbatch.request import GenerationRequest, UsageError
from tests.conftest import TINY_CONFIG, assert_weights_restored, weights_snapshot
from tests.script_utils import load_script

FAST = ["--n_samples", "1", "--n_iter", "1", "--ddim_steps", "3", "--precision", "full", "--quiet", "--device", "cpu", "--H", "32", "--W", "32", "--skip_grid"]


def _write_lora(model: torch.nn.Module, path, seed: int = 0, rank: int = 2, scale: float = 0.5) -> None:
    """A kohya LoRA over every linear layer (UNet and text encoder) of the tiny model, strong enough to change
    the image; layer names from the model's own index (one name per layer)."""
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    out, seen = {}, set()
    for key, target in _layer_index(model).items():
        weight = params[target.param]
        if target.rows is not None or weight.dim() != 2 or target.param in seen:
            continue
        seen.add(target.param)
        name = ("lora_unet_" if key.startswith("unet:") else "lora_te_") + key.split(":", 1)[1]
        out[name + ".lora_down.weight"] = scale * torch.randn(rank, weight.shape[1], generator=g)
        out[name + ".lora_up.weight"] = scale * torch.randn(weight.shape[0], rank, generator=g)
        out[name + ".alpha"] = torch.tensor(float(rank))
    save_file(out, str(path))


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, tiny_model):
    folder = tmp_path_factory.mktemp("Lora")
    _write_lora(tiny_model, folder / "style.safetensors", seed=1)
    _write_lora(tiny_model, folder / "detail.safetensors", seed=2)
    # an SD 2.x file: its cross-attention key projection reads 1024-wide text
    k = next(key for key in _layer_index(tiny_model) if key.startswith("unet:") and key.endswith("attn2_to_k"))
    save_file({
        f"lora_unet_{k[5:]}.lora_down.weight": torch.ones(2, 1024), f"lora_unet_{k[5:]}.lora_up.weight": torch.ones(32, 2),
    }, str(folder / "sd2.safetensors"))
    return folder


@pytest.fixture(scope="module")
def pipe(tiny_ckpt):
    return Pipeline.from_checkpoint(tiny_ckpt, config=TINY_CONFIG, device="cpu", precision="full")


def _pixels(pipe: Pipeline, **fields) -> list[np.ndarray]:
    request = GenerationRequest(steps=3, height=32, width=32, **fields)
    return [image.array for image in pipe.generate(request).images]


def test_parse_lora_flag():
    assert parse_lora_flag("a.safetensors") == ("a.safetensors", 1.0, None)
    assert parse_lora_flag("a.safetensors:0.8") == ("a.safetensors", 0.8, None)
    assert parse_lora_flag("a.safetensors:0.3:0.9") == ("a.safetensors", 0.9, 0.3)  # TE:UNET, as the tag
    assert parse_lora_flag(r"C:\loras\a.safetensors:0.5") == (r"C:\loras\a.safetensors", 0.5, None)
    with pytest.raises(UsageError):
        parse_lora_flag(":0.5")


def test_groups_sorted_sets_and_missing_names(lora_dir):
    jobs = [ImageJob(0, "a <lora:style:1> <lora:detail:0.5>", 1), ImageJob(1, "b", 2), ImageJob(2, "c <lora:detail:0.5><lora:style:1>", 3),
            ImageJob(3, "d <lora:nothere:1>", 4, "bad <lora:nothere:2>"), ImageJob(4, "e <lora:style:0>", 5)]
    resolved, missing = resolve_jobs(jobs, [], str(lora_dir))
    assert missing == ["nothere"]
    assert resolved[0].loras == resolved[2].loras and len(resolved[0].loras) == 2
    assert resolved[1].loras == resolved[3].loras == resolved[4].loras == ()
    assert resolved[3].job.prompt == "d " and resolved[3].job.negative_prompt == "bad "
    assert [positions for _, positions in group_by_set(resolved)] == [[1, 3, 4], [0, 2]]


def test_weight_zero_is_no_lora_and_weights_restored(pipe, lora_dir):
    before = weights_snapshot(pipe.model)
    plain = _pixels(pipe, prompt="a red circle", seed=5)
    zero = _pixels(pipe, prompt="a red circle <lora:style:0>", seed=5, lora_dir=str(lora_dir))
    flagged = _pixels(pipe, prompt="a red circle", seed=5, loras=((str(lora_dir / "style.safetensors"), 0.0),))
    assert np.array_equal(plain[0], zero[0]) and np.array_equal(plain[0], flagged[0])
    with_lora = _pixels(pipe, prompt="a red circle <lora:style:1>", seed=5, lora_dir=str(lora_dir))
    assert not np.array_equal(plain[0], with_lora[0])
    assert_weights_restored(pipe.model, before)


def test_mixed_batch_equals_each_image_alone(pipe, lora_dir):
    before = weights_snapshot(pipe.model)
    prompts = ["a cat <lora:style:1>", "a dog", "a cat <lora:style:0.5:1.5>", "a dog <lora:detail:1> <lora:style:1>", "a bird <lora:style:1>"]
    seen = []
    request = GenerationRequest(prompt_file=tuple((p, None) for p in prompts), n_samples=5, max_batch_size=5, seed=10, steps=3,
                                height=32, width=32, lora_dir=str(lora_dir))
    result = pipe.generate(request, on_image=lambda image: seen.append(image.job.index))
    assert seen == [0, 1, 2, 3, 4] and [i.job.index for i in result.images] == seen
    assert_weights_restored(pipe.model, before)
    for i, prompt in enumerate(prompts):
        alone = _pixels(pipe, prompt=prompt, seed=10 + i, lora_dir=str(lora_dir))[0]
        assert np.array_equal(result.images[i].array, alone), i
    assert result.images[0].parameters.startswith("a cat <lora:style:1>\n")
    hash_style = lora_hash(lora_dir / "style.safetensors")[:12]
    assert f'Lora hashes: "style: {hash_style}"' in result.images[0].parameters
    assert "Lora hashes" not in result.images[1].parameters
    assert f"detail: {lora_hash(lora_dir / 'detail.safetensors')[:12]}, style: {hash_style}" in result.images[3].parameters
    assert_weights_restored(pipe.model, before)


def test_weights_restored_after_an_error_and_a_cancel(pipe, lora_dir):
    before = weights_snapshot(pipe.model)

    def fail(event):
        if event.kind == "step":
            raise RuntimeError("boom")

    request = GenerationRequest(prompt="x <lora:style:1>", steps=3, height=32, width=32, lora_dir=str(lora_dir))
    with pytest.raises(RuntimeError, match="boom"):
        pipe.generate(request, callback=fail)
    assert_weights_restored(pipe.model, before)

    def cancel(event):
        if event.kind == "step":
            pipe.cancel()

    result = pipe.generate(request.with_changes(prompt_file=(("x <lora:style:1>", None), ("y", None)), n_samples=2, max_batch_size=1), callback=cancel)
    assert result.interrupted
    assert_weights_restored(pipe.model, before)


def test_networks_applied_before_the_run_stay(pipe, lora_dir):
    from microbatch.lora import apply_lora

    handle = apply_lora(pipe.model, lora_dir / "detail.safetensors", 0.7)
    try:
        applied = weights_snapshot(pipe.model)
        _pixels(pipe, prompt="x <lora:style:1>", lora_dir=str(lora_dir))
        assert applied_loras(pipe.model) == [handle]
        assert all(torch.equal(v, applied[k]) for k, v in pipe.model.state_dict().items())
    finally:
        handle.remove()


def test_python_api_loras_argument(pipe, lora_dir):
    a = pipe.txt2img("a cat", steps=3, width=32, height=32, loras=[(str(lora_dir / "style.safetensors"), 0.8)])
    b = pipe.txt2img("a cat <lora:style:0.8>", steps=3, width=32, height=32, lora_dir=str(lora_dir))
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert a[0].info["parameters"].startswith("a cat <lora:style:0.8>\n")
    with pytest.raises(UsageError, match="nothere"):
        GenerationRequest(loras=[("nothere", 1.0)], lora_dir=str(lora_dir))


def _run(script, args, tmp_path, name):
    out = tmp_path / name
    rc = script.main([*args, "--outdir", str(out)])
    files = sorted((out / "samples").glob("*.png")) if (out / "samples").exists() else []
    return rc, files


def test_scripts_flag_tag_missing_wrong_family_and_from_png(tmp_path, tiny_ckpt, lora_dir, capsys):
    txt2img = load_script("txt2img")
    base = ["--ckpt", str(tiny_ckpt), "--config", str(TINY_CONFIG), "--seed", "3", *FAST]
    rc, flag = _run(txt2img, ["--prompt", "a blue square", "--lora", f"{lora_dir / 'style.safetensors'}:0.8", *base], tmp_path, "flag")
    assert rc == 0
    rc, tag = _run(txt2img, ["--prompt", "a blue square <lora:style:0.8>", "--lora_dir", str(lora_dir), *base], tmp_path, "tag")
    assert rc == 0
    rc, plain = _run(txt2img, ["--prompt", "a blue square", *base], tmp_path, "plain")
    pixels = [np.asarray(Image.open(f[0])) for f in (flag, tag, plain)]
    assert np.array_equal(pixels[0], pixels[1]) and not np.array_equal(pixels[0], pixels[2])

    # from_png: the tag (and the --lora file, written as a tag) found in --lora_dir again
    for made in (flag, tag):
        rc, again = _run(txt2img, ["--from_png", str(made[0]), "--lora_dir", str(lora_dir), *base], tmp_path, f"again_{made[0].parent.parent.name}")
        assert rc == 0 and np.array_equal(np.asarray(Image.open(again[0])), pixels[0])
    capsys.readouterr()

    rc, missing = _run(txt2img, ["--prompt", "a cat <lora:nothere:1> <lora:nothere:0.5>", "--negative_prompt", "<lora:nothere:1>", "--lora_dir", str(lora_dir), *base], tmp_path, "missing")
    out = capsys.readouterr()
    assert rc == 0 and len(missing) == 1
    assert (out.out + out.err).count("nothere") == 1

    rc, wrong = _run(txt2img, ["--prompt", "a cat <lora:sd2:1>", "--n_samples", "2", "--lora_dir", str(lora_dir), *base], tmp_path, "wrong")
    out = capsys.readouterr()
    assert rc == 2 and wrong == []
    errors = [line for line in out.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "sd2.safetensors" in errors[0] and "SD 2.x" in errors[0]


def test_from_png_notes_a_lora_file_that_changed(tmp_path, lora_dir, tiny_model):
    from microbatch.parameters import lora_hash_notes, png_settings_from_text

    digest = lora_hash(lora_dir / "style.safetensors")[:12]
    text = f'a cat <lora:style:1>\nSteps: 3, Sampler: Euler a, Seed: 1, Lora hashes: "style: {digest}, gone: 0123456789ab"'
    png = png_settings_from_text(text)
    assert png.lora_hashes == {"style": digest, "gone": "0123456789ab"} and not any("Lora hashes" in n for n in png.notes)
    assert lora_hash_notes(png.lora_hashes, lora_dir) == []
    other = tmp_path / "Lora"
    other.mkdir()
    _write_lora(tiny_model, other / "style.safetensors", seed=7)
    notes = lora_hash_notes(png.lora_hashes, other)
    assert len(notes) == 1 and "style" in notes[0] and digest in notes[0] and "gone" not in notes[0]
