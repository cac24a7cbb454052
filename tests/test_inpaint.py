"""Inpainting: LatentInpaintDiffusion's concat conditioning, the 9-channel path through the engine, the latent
blending fallback for 4-channel models, and scripts/inpaint.py end to end (tiny random SD 2 models).

The SD 2 recipe checked against: mask = L / 255 binarised at 0.5 (1 = repaint), masked image = image * (mask < 0.5),
c_concat = cat([nearest-resized mask, scale * VAE(masked image)]) shared by the conditional and unconditional
halves of guidance; UNet input cat([x, c_concat]) = 9 channels.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from microbatch.cli import Session
from microbatch.devices import Dtypes
from microbatch.engine import ImageJob, SamplingSettings
from microbatch.inpaint import CroppingEngine, load_image_and_mask, setup_inpainting
from microbatch.loading import LoadedModel
from tests.conftest import REPO, build_tiny
from tests.script_utils import load_script

TINY_V2 = REPO / "configs" / "tiny" / "tiny-v2.yaml"
TINY_INPAINT = REPO / "configs" / "tiny" / "tiny-v2-inpainting.yaml"
F32 = Dtypes(torch.float32, torch.float32, torch.float32)


@pytest.fixture(scope="module")
def inpaint_model():
    return build_tiny(TINY_INPAINT, seed=7)


@pytest.fixture(scope="module")
def plain_model():
    return build_tiny(TINY_V2, seed=8)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A 90x70 RGB image (not a multiple of 16) and a mask with a white 30x30 square."""
    folder = tmp_path_factory.mktemp("inpaint")
    rng = np.random.default_rng(0)
    image = (rng.random((70, 90, 3)) * 255).astype(np.uint8)
    mask = np.zeros((70, 90), np.uint8)
    mask[20:50, 30:60] = 255
    mask[0, 0] = 100  # below 50%: keep
    Image.fromarray(image).save(folder / "image.png")
    Image.fromarray(mask).save(folder / "mask.png")
    return folder / "image.png", folder / "mask.png", image, mask


def _session(model) -> Session:
    return Session(None, "inpaint", torch.device("cpu"), LoadedModel(model, None, None, "", F32, 0.0), None)


def test_load_image_and_mask_pads_with_edges_and_binarises(files):
    image_path, mask_path, image, mask = files
    x, m, (w, h), notes = load_image_and_mask(image_path, mask_path, 16)
    assert (w, h) == (90, 70) and x.shape == (1, 3, 80, 96) and m.shape == (1, 1, 80, 96)
    assert torch.allclose(x[0, :, :70, :90], torch.from_numpy(image).permute(2, 0, 1) / 127.5 - 1)
    assert torch.equal(x[0, :, 75, 95], x[0, :, 69, 89]) and torch.equal(x[0, :, 79, 10], x[0, :, 69, 10])  # edge padding
    assert set(m.unique().tolist()) == {0.0, 1.0} and m[0, 0, 0, 0] == 0
    assert m[0, 0, 20:50, 30:60].eq(1).all() and m.sum() == 900
    assert any("padded" in n and "cropped back to 90x70" in n for n in notes)


def test_concat_conditioning_follows_the_sd2_recipe(inpaint_model, files):
    x, m, _, _ = load_image_and_mask(files[0], files[1], 16)
    with torch.no_grad():
        c = inpaint_model.get_concat_conditioning(x, m)
        masked = x * (m < 0.5)
        latent = 0.18215 * inpaint_model.first_stage_model.encode(masked).mean
    assert c.shape == (1, 5, 10, 12)
    assert torch.equal(c[:, :1], F.interpolate(m, size=(10, 12), mode="nearest"))
    assert torch.allclose(c[:, 1:], latent, atol=1e-6)
    assert masked[0, :, 25, 40].eq(0).all() and torch.equal(masked[0, :, 5, 5], x[0, :, 5, 5])


def test_inpaint_model_requires_concat(inpaint_model):
    x = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match="c_concat"):
        inpaint_model.apply_model(x, torch.tensor([10]), torch.zeros(1, 77, 32))


def test_nine_channel_unet_sees_mask_and_masked_latent_in_both_guidance_halves(inpaint_model, files):
    x, m, (w, h), _ = load_image_and_mask(files[0], files[1], 16)
    engine = CroppingEngine(inpaint_model, torch.device("cpu"))
    assert setup_inpainting(_session(inpaint_model), engine, x, m) == "concat"
    seen = []
    hook = inpaint_model.model.diffusion_model.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    try:
        settings = SamplingSettings(steps=4, guidance_scale=3.0, height=80, width=96, max_batch_size=2, strength=1.0)
        latents = engine.sample_batch([ImageJob(0, "a red circle", 1), ImageJob(1, "a blue square", 2)], settings)
    finally:
        hook.remove()
    assert latents.shape == (2, 4, 10, 12) and torch.isfinite(latents).all()
    assert len(seen) == 4  # DDIM: one batched [uncond, cond] call per step
    for inp in seen:
        assert inp.shape == (4, 9, 10, 12)  # [uncond x 2, cond x 2], 4 + 1 + 4 channels
        for row in inp:
            assert torch.equal(row[4:], engine.concat_latents[0])
    engine.crop = (h, w)
    assert engine.decode(latents).shape == (2, 3, 70, 90)


def test_blending_fallback_keeps_the_known_latent(plain_model, files):
    x, m, _, _ = load_image_and_mask(files[0], files[1], 16)
    engine = CroppingEngine(plain_model, torch.device("cpu"))
    assert setup_inpainting(_session(plain_model), engine, x, m) == "blend"
    keep = engine.keep_mask
    assert torch.equal(keep, 1 - F.interpolate(m, size=(10, 12), mode="nearest"))
    assert keep.sum() == 120 - 16  # the 30x30 hole covers latent rows 3..6, columns 4..7 (nearest)
    settings = SamplingSettings(steps=4, guidance_scale=3.0, height=80, width=96, max_batch_size=2, strength=1.0)
    latents = engine.sample_batch([ImageJob(0, "a red circle", 5)], settings)
    # the init latent drawn independently: the posterior sample is the first draw of the image's second generator
    from microbatch.engine import INIT_SEED_OFFSET

    post = plain_model.encode_first_stage(x)
    z = torch.randn(post.mean.shape[1:], generator=torch.Generator().manual_seed((5 + INIT_SEED_OFFSET) % 2**64))[None]
    init = plain_model.scale_factor * (post.mean + post.std * z)
    known = keep.bool().expand_as(latents)
    assert torch.allclose(latents[known], init.detach()[known], atol=1e-6)
    assert (latents[~known] - init.detach()[~known]).abs().mean() > 0.1


def test_micro_batching_does_not_change_inpainting(inpaint_model, files):
    x, m, _, _ = load_image_and_mask(files[0], files[1], 16)
    engine = CroppingEngine(inpaint_model, torch.device("cpu"))
    setup_inpainting(_session(inpaint_model), engine, x, m)
    jobs = [ImageJob(i, "a red circle", 40 + i) for i in range(3)]
    outs = {}
    for size in (1, 3):
        done = []
        settings = SamplingSettings(steps=3, guidance_scale=2.0, height=80, width=96, max_batch_size=size, strength=0.6)
        engine.run(jobs, settings, lambda batch: done.extend(batch))
        outs[size] = torch.stack([d.latent for d in done])
    assert torch.allclose(outs[1], outs[3], atol=1e-5)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, inpaint_model, plain_model):
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("ckpts")
    paths = {}
    for name, model in (("inpaint", inpaint_model), ("plain", plain_model)):
        paths[name] = folder / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(paths[name]))
    return paths


@pytest.mark.parametrize("kind", ["inpaint", "plain"])
def test_inpaint_script_end_to_end(kind, checkpoints, files, tmp_path, capsys):
    script = load_script("inpaint")
    out = tmp_path / "out"
    argv = ["--ckpt", str(checkpoints[kind]), "--init-img", str(files[0]), "--mask", str(files[1]), "--prompt", "a red circle",
            "--n_samples", "2", "--ddim_steps", "3", "--outdir", str(out), "--quiet", "--precision", "full", "--parameterization", "eps",
            "--sampler", "plms" if kind == "plain" else "ddim"]
    assert script.main(argv) == 0
    printed = capsys.readouterr().out
    assert ("not an inpainting model" in printed) == (kind == "plain")
    assert printed.count("not an inpainting model") <= 1
    samples = sorted((out / "samples").glob("*.png"))
    assert len(samples) == 2
    for path in samples:
        with Image.open(path) as im:
            assert im.size == (90, 70)  # cropped back to the input size
            assert "Denoising strength: 1" in im.text["parameters"]
    assert len(list(out.glob("grid-*.png"))) == 1


def test_inpaint_script_rejects_bad_input(checkpoints, files, tmp_path, capsys):
    script = load_script("inpaint")
    base = ["--ckpt", str(checkpoints["inpaint"]), "--init-img", str(files[0]), "--outdir", str(tmp_path), "--quiet"]
    assert script.main(base) == 2
    assert "--mask" in capsys.readouterr().err
    assert script.main(base + ["--mask", str(tmp_path / "nope.png")]) == 2
    assert "mask not found" in capsys.readouterr().err
    assert script.main(base + ["--mask", str(files[1]), "--strength", "1.5"]) == 2
    assert "strength" in capsys.readouterr().err


def test_repaint_weight_is_one_near_the_mask_and_zero_beyond_dilate_plus_feather():
    from scipy.ndimage import distance_transform_edt

    from microbatch.inpaint import repaint_weight

    mask = torch.zeros(1, 1, 64, 80)
    mask[..., 20:35, 30:41] = 1
    mask[..., 50, 10] = 1  # a single pixel
    w = repaint_weight(mask, dilate=2, feather=6)
    d = torch.from_numpy(distance_transform_edt(mask[0, 0].numpy() == 0)).float()
    assert torch.equal(w[0, 0][d <= 2], torch.ones(int((d <= 2).sum())))
    assert (w[0, 0][d > 8 * 1.12] == 0).all()  # octagonal distance: at most 12% beyond Euclidean
    assert ((w > 0) & (w < 1)).any() and w.min() == 0 and w.max() == 1
    row = w[0, 0, 27, 40:52].tolist()  # to the right of the block: 1, 1, 1, then 6/7 .. 1/7, then 0
    assert row == pytest.approx([1, 1, 1, 6 / 7, 5 / 7, 4 / 7, 3 / 7, 2 / 7, 1 / 7, 0, 0, 0])
    with pytest.raises(ValueError, match="dilate and feather"):
        repaint_weight(mask, dilate=-1)


@pytest.mark.parametrize("kind", ["plain", "inpaint"])
def test_pixels_away_from_the_mask_keep_the_init_image_exactly(kind, plain_model, inpaint_model, files):
    """Latent blending changed pixels far from the mask (the VAE round trip, and decoding mixing repainted latents
    into their neighbours); the outputs are composited over the init image outside the dilated, feathered mask."""
    from scipy.ndimage import distance_transform_edt

    from microbatch.images import to_uint8

    model = plain_model if kind == "plain" else inpaint_model
    x, m, (w, h), _ = load_image_and_mask(files[0], files[1], 16)
    engine = CroppingEngine(model, torch.device("cpu"))
    engine.crop = (h, w)
    setup_inpainting(_session(model), engine, x, m)
    done = []
    settings = SamplingSettings(steps=3, guidance_scale=3.0, height=80, width=96, max_batch_size=2, strength=1.0)
    engine.run([ImageJob(0, "a red circle", 5), ImageJob(1, "a red circle", 6)], settings, done.extend)
    image, mask = files[2], files[3] >= 128
    dist = distance_transform_edt(~mask)
    far = dist > 9  # 8 octagonal pixels reach at most 8.94 Euclidean ones
    for d in done:
        pixels = to_uint8(d.image)
        assert pixels.shape == image.shape
        assert np.array_equal(pixels[far], image[far])  # byte for byte
        assert np.abs(pixels[mask].astype(int) - image[mask]).mean() > 10  # the hole is repainted
