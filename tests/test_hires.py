"""The hires fix: sizes and step counts as the AUTOMATIC1111 web UI computes them, the first pass equal to a plain
txt2img run, the second pass equal to an img2img of the upscaled first-pass latent written here from the samplers'
pieces, micro-batching, the parameters text both ways, and bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from microbatch import GenerationRequest, Pipeline, UsageError
from microbatch.engine import INIT_SEED_OFFSET, Engine
from microbatch.hires import hires_size, hires_steps, upscale_image, upscaler_name
from microbatch.parameters import png_settings_from_text
from samplers import Denoiser, GuidedModel, get_sampler, get_sigmas, to_vp
from tests.script_utils import REPO, load_script

TINY = str(REPO / "configs" / "tiny" / "tiny-v1.yaml")
RUN = ["--precision", "full", "--quiet", "--device", "cpu", "--config", TINY]


@pytest.fixture(scope="module")
def pipe(tiny_ckpt) -> Pipeline:
    return Pipeline.from_checkpoint(tiny_ckpt, config=TINY, device="cpu", precision="full")


# -- sizes and steps (the web UI's calculate_target_resolution and setup_img2img_steps) ------------------------------


@pytest.mark.parametrize("first, scale, resize, multiple, expected, crop", [
    ((512, 512), 2.0, (0, 0), 64, (1024, 1024), (0, 0, 0, 0)),
    ((512, 768), 1.5, (0, 0), 64, (768, 1152), (0, 0, 0, 0)),
    # int(512 * 1.3) = 665: the web UI's latent is 665 // 8 = 83, i.e. 664 pixels; our SD UNet needs 64s
    ((512, 512), 1.3, (0, 0), 8, (664, 664), (0, 0, 0, 0)),
    ((512, 512), 1.3, (0, 0), 64, (640, 640), (0, 0, 0, 0)),
    # one side given: the other keeps the aspect ratio, x * H // W
    ((512, 768), None, (1024, 0), 64, (1024, 1536), (0, 0, 0, 0)),
    ((512, 768), None, (0, 1000), 8, (664, 1000), (0, 0, 0, 0)),
    # both: cover 1024x1024 (1024 x 1536), then the latent is cropped by (1536 - 1024) // 8 = 64 rows, 32 each side
    ((512, 768), None, (1024, 1024), 64, (1024, 1024), (32, 32, 0, 0)),
    # wider than the target: cover by height, 1024 * 768 // 512 = 1536 wide, 64 columns cropped
    ((768, 512), None, (1024, 1024), 64, (1024, 1024), (0, 0, 32, 32)),
    # an odd crop puts the extra row at the bottom (the web UI's truncate // 2, (truncate + 1) // 2)
    ((512, 768), None, (1024, 1528), 8, (1024, 1528), (0, 1, 0, 0)),
])
def test_hires_size_as_the_web_ui(first, scale, resize, multiple, expected, crop):
    size = hires_size(first[0], first[1], scale, resize[0], resize[1], multiple, 8)
    assert (size.width, size.height) == expected
    assert size.crop == crop
    w, h = size.upscale_to
    top, bottom, left, right = size.crop
    assert (w // 8 - left - right, h // 8 - top - bottom) == (expected[0] // 8, expected[1] // 8)
    rounded = (scale == 1.3) or resize == (0, 1000)  # 665 and 1000 * 512 // 768 = 666 are no multiples of 8
    assert bool(size.notes) == rounded


@pytest.mark.parametrize("steps, hr_steps, strength, expected", [
    (20, None, 0.7, (28, 20)),  # int(20 / 0.7) = 28, the last 20 run
    (20, 10, 0.5, (20, 10)),
    (30, None, 0.75, (40, 30)),
    (20, None, 1.0, (20, 20)),  # int(20 / 0.999) = 20: all of it, from pure noise
    (10, 3, 0.3, (10, 3)),  # int(3 / 0.3) = 10
    (10, 4, 0.3, (13, 4)),  # int(13.33)
])
def test_hires_steps_as_the_web_ui(steps, hr_steps, strength, expected):
    assert hires_steps(steps, hr_steps, strength) == expected


def test_upscalers_by_our_and_the_web_uis_names():
    assert upscaler_name("Latent") == "latent" and upscaler_name("Latent (nearest)") == "latent-nearest"
    assert upscaler_name("Lanczos") == "lanczos" and upscaler_name("latent") == "latent"
    with pytest.raises(ValueError, match="unknown hires upscaler 'R-ESRGAN 4x\\+'"):
        upscaler_name("R-ESRGAN 4x+")


def test_lanczos_upscale_follows_the_web_uis_resize_chain():
    rng = np.random.default_rng(0)
    im = Image.fromarray((rng.random((60, 60, 3)) * 255).astype(np.uint8))
    # an exact enlargement to a multiple of 8 is one Lanczos resize
    assert upscale_image(im, 120, 120, "lanczos").tobytes() == im.resize((120, 120), Image.Resampling.LANCZOS).tobytes()
    # 60 -> 100: the upscaler makes int(60 * 5/3) = 100, resized to the multiple of 8 below (96), then to 100
    chain = im.resize((100, 100), Image.Resampling.LANCZOS).resize((96, 96), Image.Resampling.LANCZOS).resize((100, 100), Image.Resampling.LANCZOS)
    out = upscale_image(im, 100, 100, "lanczos")
    assert out.size == (100, 100) and out.tobytes() == chain.tobytes()


# -- the passes against references built here ------------------------------------------------------------------------


def _first_and_final(pipe: Pipeline, request: GenerationRequest, monkeypatch) -> tuple[list[torch.Tensor], list]:
    """Run `request`, capturing the first-pass latents each micro-batch hands to the second pass."""
    seen: list[torch.Tensor] = []
    original = Engine.hires_pass

    def spy(self, jobs, settings, latents, batch_index=0):
        seen.extend(latents.detach().float().cpu())
        return original(self, jobs, settings, latents, batch_index)

    monkeypatch.setattr(Engine, "hires_pass", spy)
    return seen, pipe.generate(request).images


def _reference_second_pass(pipe, prompt, seed, init, sampler, scale, n, run, eta) -> torch.Tensor:
    """img2img over `init` [1, C, h, w] written from the samplers' pieces: the last `run` levels of an n-step
    schedule, start noise = the first draw of a fresh generator of `seed`, the sampler's noise its next draws."""
    model = pipe.model
    g = torch.Generator().manual_seed(seed)
    start = torch.randn(tuple(init.shape[1:]), generator=g)[None]
    with torch.no_grad():
        cond, uncond = model.get_learned_conditioning([prompt]), model.get_learned_conditioning([""])
    denoiser = Denoiser(GuidedModel(model.apply_model, cond, uncond, scale), model.alphas_cumprod, model.parameterization)
    info = get_sampler(sampler)
    sigmas = get_sigmas(info.default_schedule, denoiser, n)
    sigmas = sigmas[len(sigmas) - 1 - run :]
    x = init + float(sigmas[0]) * start
    with torch.no_grad():
        x = info.fn(denoiser, x, sigmas, eta=eta, noise=lambda like: torch.randn(tuple(like.shape[1:]), generator=g)[None])
    return to_vp(x, float(sigmas[-1]))


@pytest.mark.parametrize("sampler, upscaler", [("ddim", "latent"), ("euler_a", "lanczos"), ("dpmpp_2m", "latent-nearest")])
def test_first_pass_is_txt2img_and_second_pass_is_img2img_of_the_upscaled_latent(pipe, monkeypatch, sampler, upscaler):
    common = dict(prompt="a red circle", n_samples=2, steps=4, sampler=sampler, seed=11, width=32, height=32, scale=3.0)
    hires = GenerationRequest(**common, hr_scale=2, hr_upscaler=upscaler, hr_steps=3, hr_denoising_strength=0.5)
    first, images = _first_and_final(pipe, hires, monkeypatch)
    plain = pipe.generate(GenerationRequest(**common)).images
    assert [im.array.shape for im in images] == [(64, 64, 3)] * 2
    assert [im.latent.shape for im in images] == [(4, 8, 8)] * 2
    for latent, ref in zip(first, plain):  # the first pass is exactly the plain txt2img run
        assert torch.equal(latent, ref.latent)
    model = pipe.model
    for image, ref in zip(images, plain):
        z = ref.latent[None]
        if upscaler == "latent":
            init = torch.nn.functional.interpolate(z, size=(8, 8), mode="bilinear", antialias=False)
        elif upscaler == "latent-nearest":
            init = torch.nn.functional.interpolate(z, size=(8, 8), mode="nearest")
        else:  # decode, 8-bit, Lanczos x2, encode; the posterior sample from the INIT_SEED_OFFSET stream
            with torch.no_grad():
                pixels = torch.clamp((model.decode_first_stage(z) + 1) / 2, 0, 1)[0]
            small = Image.fromarray((255.0 * pixels.permute(1, 2, 0).numpy()).astype(np.uint8))
            big = torch.from_numpy(np.asarray(small.resize((64, 64), Image.Resampling.LANCZOS), np.float32) / 255).permute(2, 0, 1)
            with torch.no_grad():
                posterior = model.encode_first_stage(2 * big[None] - 1)
            g = torch.Generator().manual_seed((image.job.seed + INIT_SEED_OFFSET) % 2**64)
            init = model.scale_factor * (posterior.mean + posterior.std * torch.randn(tuple(posterior.mean.shape[1:]), generator=g)[None])
        eta = get_sampler(sampler).default_eta
        expected = _reference_second_pass(pipe, "a red circle", image.job.seed, init, sampler, 3.0, n=6, run=3, eta=eta)
        torch.testing.assert_close(image.latent[None], expected, atol=1e-5, rtol=1e-5)


def test_micro_batching_does_not_change_hires_images(pipe):
    for upscaler in ("latent", "lanczos"):
        req = GenerationRequest(prompt="a blue square", n_samples=3, steps=3, sampler="euler_a", seed=3, width=32, height=32, hr_scale=2,
                                hr_upscaler=upscaler, max_batch_size=1)
        one = pipe.generate(req).images
        three = pipe.generate(req.with_changes(max_batch_size=3)).images
        assert all(np.array_equal(a.array, b.array) for a, b in zip(one, three))


def test_resize_sizes_progress_and_notes(pipe):
    notes: list[str] = []
    pipe.on_note = notes.append
    events = []
    images = pipe.txt2img("a cat", n=1, steps=4, width=32, height=48, hr_resize_x=64, hr_steps=2, callback=events.append)
    assert images[0].size == (64, 96)
    steps = [e.step for e in events if e.kind == "step"]
    assert steps == [1, 2, 3, 4, 5, 6] and {e.steps_total for e in events} == {6}  # 4 first-pass steps, 2 hires
    # both sides: cover 64x64 (64 x 96), then crop to 64x64
    assert pipe.txt2img("a cat", steps=2, width=32, height=48, hr_resize_x=64, hr_resize_y=64)[0].size == (64, 64)
    # sizes our UNet cannot take are rounded down to its multiple (16 for the tiny model), with a note
    notes.clear()
    assert pipe.txt2img("a cat", steps=2, width=32, height=32, hr_scale=1.3)[0].size == (32, 32)
    assert any("hires width 41 is not a multiple of 16; using 32" in n for n in notes)
    assert any(n.startswith("hires fix: 32x32 -> 32x32 (Latent upscaler), then 2 steps of a 2-step schedule") for n in notes)


def test_prompt_editing_counts_on_from_the_first_pass(pipe):
    engine = Engine(pipe.model, pipe.device)
    # [red:blue:15] with 10 first-pass steps: the web UI switches at hires step 5 of 10
    schedule = engine.prompt_schedule("[red:blue:15]", 10, hires_steps=10)
    assert [s.end_at_step for s in schedule] == [5, 10]
    with torch.no_grad():
        red, blue = pipe.model.get_learned_conditioning(["red"])[0], pipe.model.get_learned_conditioning(["blue"])[0]
    assert torch.equal(schedule[0].cond, red) and torch.equal(schedule[1].cond, blue)
    assert [s.end_at_step for s in engine.prompt_schedule("[red:blue:15]", 10)] == [10]


# -- parameters and the command line ---------------------------------------------------------------------------------


def test_parameters_round_trip_through_from_png(tiny_ckpt, tmp_path):
    argv = ["--ckpt", str(tiny_ckpt), "--prompt", "a red circle", "--ddim_steps", "3", "--seed", "4", "--W", "32", "--H", "32",
            "--n_samples", "2", "--n_iter", "1", "--hr_scale", "2", "--hr_upscaler", "Latent (nearest)", "--hr_steps", "2",
            "--hr_denoising_strength", "0.6", "--skip_grid", *RUN]
    assert load_script("txt2img").main(argv + ["--outdir", str(tmp_path / "a")]) == 0
    made = Image.open(tmp_path / "a" / "samples" / "00001.png")
    text = made.info["parameters"]
    assert made.size == (64, 64)
    assert text.endswith("Size: 32x32, Model hash: " + text.split("Model hash: ")[1].split(",")[0] +
                         ", Eta: 0, Precision: full, Denoising strength: 0.6, Hires upscale: 2, Hires steps: 2, Hires upscaler: Latent (nearest)")
    again = ["--from_png", str(tmp_path / "a" / "samples" / "00001.png"), "--ckpt", str(tiny_ckpt), "--skip_grid", *RUN]
    assert load_script("txt2img").main(again + ["--outdir", str(tmp_path / "b")]) == 0
    remade = Image.open(tmp_path / "b" / "samples" / "00000.png")
    assert remade.tobytes() == made.tobytes() and remade.info["parameters"] == text


def test_web_ui_hires_parameters_are_read():
    base = "a cat\nSteps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 5, Size: 512x768, "
    png = png_settings_from_text(base + "Denoising strength: 0.55, Hires upscale: 1.5, Hires steps: 12, Hires upscaler: Latent (nearest)")
    assert png.hires and png.made_by == "txt2img" and "strength" not in png.fields
    assert {k: v for k, v in png.fields.items() if k.startswith("hr_")} == {
        "hr_scale": 1.5, "hr_steps": 12, "hr_upscaler": "latent-nearest", "hr_denoising_strength": 0.55}
    assert png.notes == []
    png = png_settings_from_text(base + "Denoising strength: 0.7, Hires resize: 1024x0, Hires upscaler: R-ESRGAN 4x+, Hires sampler: DPM++ 2M")
    assert png.fields["hr_resize_x"] == 1024 and png.fields["hr_resize_y"] == 0 and "hr_scale" not in png.fields
    assert png.fields["hr_upscaler"] == "lanczos"
    assert any("'R-ESRGAN 4x+' is not available here: using Lanczos" in n for n in png.notes)
    assert any("settings not used here: Hires sampler: DPM++ 2M" in n for n in png.notes)
    # requests built from them are valid (resize 0 is the web UI's unset)
    req = GenerationRequest(prompt="a cat", **{k: v for k, v in png.fields.items() if k.startswith("hr_")})
    assert req.hires and req.hr_resize_y is None
    # without a hires key, a Denoising strength is img2img's
    assert png_settings_from_text(base + "Denoising strength: 0.5").made_by == "img2img"


@pytest.mark.parametrize("fields, message", [
    (dict(hr_scale=0), "--hr_scale must be a number > 0, got 0"),
    (dict(hr_scale=-1.5), "--hr_scale must be a number > 0, got -1.5"),
    (dict(hr_scale=float("nan")), "--hr_scale must be a number > 0, got nan"),
    (dict(hr_scale=2, hr_resize_x=512), "give --hr_scale or --hr_resize_x / --hr_resize_y, not both"),
    (dict(hr_resize_x=-8), "--hr_resize_x must be a positive integer or 0 (unset), got -8"),
    (dict(hr_scale=2, hr_steps=-1), "--hr_steps must be a positive integer or 0 (the first pass's steps), got -1"),
    (dict(hr_scale=2, hr_denoising_strength=0), "--hr_denoising_strength must be in (0, 1], got 0"),
    (dict(hr_scale=2, hr_denoising_strength=1.5), "--hr_denoising_strength must be in (0, 1], got 1.5"),
    (dict(hr_scale=2, hr_upscaler="ESRGAN"), "unknown hires upscaler 'ESRGAN'"),
    (dict(hr_steps=5), "--hr_steps: the hires fix needs --hr_scale S or --hr_resize_x / --hr_resize_y"),
])
def test_bad_hires_input_is_one_line(fields, message):
    with pytest.raises(UsageError) as e:
        GenerationRequest(prompt="x", **fields)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_hires_is_txt2img_only_on_the_command_line(tiny_ckpt, tmp_path, capsys):
    init = tmp_path / "init.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(init)
    argv = ["--ckpt", str(tiny_ckpt), "--init-img", str(init), "--hr_scale", "2", "--outdir", str(tmp_path / "o"), *RUN]
    assert load_script("img2img").main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: the hires fix (--hr_scale, --hr_resize_x, --hr_resize_y) applies to txt2img only, not img2img"]
    assert load_script("txt2img").main(["--ckpt", str(tiny_ckpt), "--hr_scale", "0", "--outdir", str(tmp_path / "o"), *RUN]) == 2
    assert capsys.readouterr().err.strip() == "error: --hr_scale must be a number > 0, got 0.0"


def test_large_hires_passes_go_through_the_vae_in_tiles(pipe, monkeypatch):
    import microbatch.engine as engine_module
    from microbatch.vae_tiling import TileSettings

    calls = []
    for name in ("decode_tiled", "encode_tiled"):
        original = getattr(engine_module, name)
        monkeypatch.setattr(engine_module, name, lambda *a, _f=original, _n=name, **k: calls.append((_n, tuple(a[1].shape[-2:]))) or _f(*a, **k))
    tiles = TileSettings("on", 16, 8)
    images = pipe.txt2img("a cat", steps=2, width=64, height=64, hr_scale=3, hr_upscaler="lanczos", vae_tiling=tiles)
    assert images[0].size == (192, 192)
    # the 64x64 first pass (8x8 latents) fits one tile; the 192x192 image is encoded and decoded in tiles
    assert calls == [("encode_tiled", (192, 192)), ("decode_tiled", (24, 24))]


def test_sdxl_hires_pass_is_conditioned_on_its_size(tmp_path):
    from tests.conftest import save_tiny

    path = save_tiny(REPO / "configs" / "tiny" / "tiny-sdxl-base.yaml", tmp_path / "tiny-sdxl-base.safetensors", seed=21)
    sdxl = Pipeline.from_checkpoint(path, device="cpu", precision="full")
    images = sdxl.txt2img("a red circle", steps=2, width=32, height=32, hr_scale=2, sampler="euler")
    assert images[0].size == (64, 64)
    second = sdxl.last_result.plan.settings.hires.settings
    # the web UI conditions its hires pass on the hires size (SdConditioning(width=hr_upscale_to_x, ...))
    assert second.micro_conditioning().original_size == (64, 64) and second.micro_conditioning().target_size == (64, 64)
