"""SDXL base and refiner in one run (microbatch.refiner) on tiny random checkpoints in the published layouts: the
switch step against the web UI's and diffusers' rules, the result against a reference composed here from the
models' own pieces, switch 1 = the base alone, micro-batching, offload, the refiner's own conditioning, errors and
the PNG parameters both ways.

Images are 128 x 128, except where micro-batching is checked at 64 x 64 too: there the tiny refiner's middle block
is 1 x 1, so its transformer's products have one token per image, where the BLAS takes another path at one row than
at two and micro-batches differed by 1.6e-4 before the linear layers made one product per image (RowwiseLinear)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from microbatch import GenerationRequest, Pipeline, UsageError
from microbatch.parameters import png_settings_from_text
from microbatch.refiner import refiner_steps, refiner_switch_step
from tests.conftest import REPO, save_tiny
from tests.script_utils import load_script

TINY = {kind: REPO / "configs" / "tiny" / f"tiny-sdxl-{kind}.yaml" for kind in ("base", "refiner")}
RUN = ["--precision", "full", "--quiet", "--device", "cpu", "--parameterization", "eps"]
SIZE = dict(width=128, height=128)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Tiny base and refiner .safetensors side by side (no yaml: configs inferred from the keys)."""
    folder = tmp_path_factory.mktemp("refiner")
    out = {}
    for seed, kind in ((21, "base"), (22, "refiner")):
        out[kind] = save_tiny(TINY[kind], folder / f"tiny-sdxl-{kind}.safetensors", seed)
    return out


@pytest.fixture(scope="module")
def pipe(files) -> Pipeline:
    return Pipeline.from_checkpoint(files["base"], device="cpu", precision="full", parameterization="eps", refiner=files["refiner"])


@pytest.fixture(scope="module")
def base_pipe(files) -> Pipeline:
    return Pipeline.from_checkpoint(files["base"], device="cpu", precision="full", parameterization="eps")


def _table(model) -> torch.Tensor:
    ac = model.alphas_cumprod.double()
    return ((1 - ac) / ac).sqrt()


def _webui_switch_step(sigmas: torch.Tensor, table: torch.Tensor, switch: float) -> int:
    """The web UI's check before each denoiser call (its apply_refiner since 1.8), written out: the timestep whose
    sigma is nearest, completed ratio (999 - t) / 1000, switch once it reaches `switch`."""
    for i, sigma in enumerate(sigmas[:-1].tolist()):
        t = min(range(1000), key=lambda j: abs(float(table[j]) - sigma))
        if (999 - t) / 1000 >= switch:
            return i
    return len(sigmas) - 1


def test_switch_step_is_diffusers_denoising_end_and_the_webuis_rule(pipe):
    """uniform = diffusers' SDXL default grid (EulerDiscreteScheduler, leading, steps_offset 1): the base runs
    exactly the timesteps diffusers' `denoising_end` keeps (t >= round(1000 (1 - switch))); on karras, the web UI's
    rule, and it differs from the step rule int(switch * steps)."""
    from diffusers import EulerDiscreteScheduler

    from samplers import Denoiser, get_sigmas
    from samplers.schedules import uniform_timesteps

    table = _table(pipe.model)
    denoiser = Denoiser(None, pipe.model.alphas_cumprod)
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    for steps in (10, 20, 25, 40, 50):  # where the CompVis grid has exactly `steps` entries
        scheduler.set_timesteps(steps)
        assert scheduler.timesteps.tolist() == uniform_timesteps(steps).tolist()
        sigmas = get_sigmas("uniform", denoiser, steps)
        for switch in (0.5, 0.7, 0.8, 0.85, 0.9, 0.95):
            cutoff = int(round(1000 - switch * 1000))
            base_steps = len([t for t in scheduler.timesteps.tolist() if t >= cutoff])
            assert refiner_switch_step(sigmas, table, switch) == base_steps, (steps, switch)
    assert refiner_switch_step(get_sigmas("uniform", denoiser, 50), table, 0.8) == 40
    karras = get_sigmas("karras", denoiser, 30)
    k = refiner_switch_step(karras, table, 0.8)
    assert k == _webui_switch_step(karras, table, 0.8) and k != int(0.8 * 30)
    assert denoiser.sigma_to_t(float(karras[k])) <= 199.5 < denoiser.sigma_to_t(float(karras[k - 1]))
    for switch in (0.3, 0.6, 0.9, 0.999):
        assert refiner_switch_step(karras, table, switch) == _webui_switch_step(karras, table, switch)
    assert refiner_switch_step(karras, table, 1.0) == 30  # never: the refiner takes no step


def test_plan_splits_img2img_by_the_same_rule(pipe):
    """img2img's truncated schedule (strength 0.5 of 50 uniform steps: t = 481 ... 1) switches at t <= 199: the
    base takes 15 steps (481 ... 201), the refiner the last 10."""
    plan = pipe.plan(GenerationRequest(prompt="x", steps=50), image_size=(128, 128))
    assert plan.settings.refiner_switch == 0.8 and any("takes steps 41-50 of 50" in n for n in plan.notes)
    request = GenerationRequest(prompt="x", steps=50, refiner_switch=0.8).with_changes(mode="img2img", strength=0.5, init_image=str(REPO / "docs" / "demo-grid.png"))
    plan = pipe.plan(request, image_size=(128, 128))
    assert plan.steps_run == 25 and any("takes steps 16-25 of 25" in n for n in plan.notes)


def test_switch_one_equals_the_base_alone(pipe, base_pipe):
    kwargs = dict(n=2, steps=6, sampler="euler_a", seed=3, scale=5.0, **SIZE)
    alone = base_pipe.txt2img("a red circle", **kwargs)
    for switch in (1.0, 0.9999):  # 0.9999: a fraction the schedule never reaches (at most 0.999)
        images = pipe.txt2img("a red circle", refiner_switch=switch, **kwargs)
        assert [a.tobytes() for a in images] == [b.tobytes() for b in alone]
        assert [a.info["parameters"] for a in images] == [b.info["parameters"] for b in alone]
        assert "Refiner" not in images[0].info["parameters"]
    refined = pipe.txt2img("a red circle", **kwargs)
    assert refined[0].tobytes() != alone[0].tobytes()


def _noise(seeds: list[int]):
    generators = [torch.Generator().manual_seed(s) for s in seeds]

    def draw(like: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.randn(tuple(like.shape[1:]), generator=g) for g in generators])

    return draw


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m"])
@torch.no_grad()
def test_result_equals_a_reference_composed_from_the_models(pipe, sampler):
    """Base over sigmas[:k + 1] with its conditioning (empty negative prompt zeroed), then the refiner over
    sigmas[k:] with its own (OpenCLIP, aesthetic scores 7 / 2.5, empty negative prompt encoded), the same
    per-image noise streams continuing; decoded by the base's VAE."""
    from samplers import Denoiser, GuidedModel, get_sigmas, to_vp
    from samplers.registry import SAMPLERS

    base, refiner = pipe.model, pipe.refiner.model
    prompts, seeds, scale, steps = ["an astronaut riding a horse", "a bowl of fruit"], [5, 6], 5.0, 8
    request = GenerationRequest(prompt_file=tuple((p, None) for p in prompts), n_samples=2, steps=steps, sampler=sampler, seed=5,
                                scale=scale, aesthetic_score=7.0, max_batch_size=2, refiner_switch=0.8, **SIZE)
    result = pipe.generate(request)
    ours = torch.stack([image.latent for image in result.images])
    assert "Aesthetic score: 7" in result.images[0].parameters and "Refiner: tiny-sdxl-refiner [" in result.images[0].parameters

    size = (128, 128)
    cond = base.get_learned_conditioning(base.conditioning_batch(prompts, size, (0, 0), size))
    uncond = base.get_learned_conditioning(base.conditioning_batch([""] * 2, size, (0, 0), size), ["txt"])
    r_cond = refiner.get_learned_conditioning(refiner.conditioning_batch(prompts, size, (0, 0), size, 7.0))
    r_uncond = refiner.get_learned_conditioning(refiner.conditioning_batch([""] * 2, size, (0, 0), size, 2.5))
    assert r_uncond["crossattn"].abs().sum() > 0  # the refiner encodes the empty negative prompt
    d_base = Denoiser(GuidedModel(base.apply_model, cond, uncond, scale), base.alphas_cumprod, "eps")
    d_refiner = Denoiser(GuidedModel(refiner.apply_model, r_cond, r_uncond, scale), refiner.alphas_cumprod, "eps")
    sigmas = get_sigmas("karras", d_base, steps)
    k = _webui_switch_step(sigmas, _table(base), 0.8)
    assert 0 < k < steps
    noise = _noise(seeds)
    x = noise(torch.empty(2, 4, 16, 16)) * float((sigmas[0] ** 2 + 1) ** 0.5)
    fn = SAMPLERS[sampler].fn
    eta = 1.0 if sampler == "euler_a" else 0.0
    x = fn(d_base, x, sigmas[: k + 1], eta=eta, noise=noise)
    x = fn(d_refiner, x, sigmas[k:], eta=eta, noise=noise)
    reference = to_vp(x, float(sigmas[-1]))
    assert ours.abs().max() > 0.1
    # Within 1e-5 of the latents' scale (about 50 here): the reference encodes both prompts in one batch, the engine
    # each alone, and the conditioning vectors' products differ in the last bits between the two (their BLAS
    # kernel depends on the row count); measured 1.9e-4 (3.9e-6 of the scale) on one 2-core machine.
    assert torch.allclose(ours, reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max())), float((ours - reference).abs().max())
    pixels = np.asarray(result.images[0].array).astype(int)
    decoded = torch.clamp((base.decode_first_stage(reference[:1]) + 1) / 2, 0, 1)[0]
    assert np.abs(pixels - (255 * decoded.permute(1, 2, 0).numpy()).astype(int)).max() <= 1
    # without the refiner's part the latents differ: it took the last steps
    fresh = _noise(seeds)
    alone = fn(d_base, fresh(torch.empty(2, 4, 16, 16)) * float((sigmas[0] ** 2 + 1) ** 0.5), sigmas, eta=eta, noise=fresh)
    assert not torch.allclose(ours, to_vp(alone, float(sigmas[-1])), atol=1e-3)


@pytest.mark.parametrize("side", [128, 64])
def test_micro_batching_does_not_change_images(pipe, side):
    prompts = ["a red circle", "a blue square AND a green triangle:0.5", "[a cat:a dog:0.5]"]
    runs = []
    for size in (1, 3):
        request = GenerationRequest(prompt_file=tuple((p, None) for p in prompts), n_samples=3, steps=6, sampler="euler_a",
                                    scale=6.0, max_batch_size=size, width=side, height=side)
        runs.append([(image.array, image.latent) for image in pipe.generate(request).images])
    assert len(runs[0]) == 3 and all(np.array_equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(*runs))


def test_prompt_editing_counts_denoiser_calls_across_the_switch(pipe, monkeypatch):
    """[a:b:0.8] over 10 Euler steps (karras) uses b from call 9 (0-based; the web UI uses a up to step 8), which the
    refiner makes: it takes steps 7-10 (calls 6-9), so its calls must count on from the base's."""
    refiner = pipe.refiner.model
    seen: list[torch.Tensor] = []
    original = refiner.apply_model

    def recording(x, t, cond, **kw):
        seen.append(cond["crossattn"][-1].clone())  # [uncond, cond]: the prompt's row
        return original(x, t, cond, **kw)

    monkeypatch.setattr(refiner, "apply_model", recording)
    pipe.txt2img("[a red circle:a blue square:0.8]", n=1, steps=10, sampler="euler", scale=5.0, **SIZE)
    with torch.no_grad():
        a, b = (refiner.get_learned_conditioning(refiner.conditioning_batch([p], (128, 128), (0, 0), (128, 128)))["crossattn"][0]
                for p in ("a red circle", "a blue square"))
    k, n = refiner_steps(pipe.model, GenerationRequest(steps=10, sampler="euler").settings(128, 128, 5.0, 1), 0.8)
    assert (k, n) == (6, 10) and len(seen) == n - k
    assert all(torch.equal(c, a) for c in seen[:-1]) and torch.equal(seen[-1], b)


def test_offload_keeps_only_the_model_in_use(pipe):
    """With model offload on both (forced on the CPU: real copies, the same bookkeeping as on a GPU), whenever a
    component of one model is loaded the other model has nothing on the device; images are unchanged."""
    from microbatch.offload import apply_offload, remove_offload

    kwargs = dict(n=2, steps=4, sampler="euler", seed=7, max_batch_size=1, **SIZE)
    plain = pipe.txt2img("a red circle", **kwargs)
    states = {name: apply_offload(model, "model", "cpu", force=True) for name, model in (("base", pipe.model), ("refiner", pipe.refiner.model))}
    log: list[tuple[str, str, list[str]]] = []
    for name, state in states.items():
        other = states["refiner" if name == "base" else "base"]

        def load(component, _state=state, _other=other, _name=name, _load=state.load):
            log.append((_name, component, list(_other.resident)))
            _load(component)

        state.load = load
    try:
        offloaded = pipe.txt2img("a red circle", **kwargs)
    finally:
        remove_offload(pipe.model, "cpu")
        remove_offload(pipe.refiner.model, "cpu")
    assert [a.tobytes() for a in offloaded] == [b.tobytes() for b in plain]
    assert ("refiner", "unet", []) in log and ("base", "unet", []) in log and ("base", "vae", []) in log
    assert all(not other for _, _, other in log), log
    assert [(m, c) for m, c, _ in log][:5] == [("base", "text_encoder"), ("base", "unet"), ("refiner", "text_encoder"), ("refiner", "unet"), ("base", "vae")]


def test_refiner_alone_img2img_encodes_the_empty_negative_prompt(files, tmp_path):
    """img2img with the refiner as the model, as published: its empty negative prompt is encoded (the published
    sampling runs the refiner with no zeroed embeddings; diffusers' refiner: force_zeros_for_empty_prompt false)."""
    from PIL import Image

    refiner = Pipeline.from_checkpoint(files["refiner"], device="cpu", precision="full", parameterization="eps")
    rng = np.random.default_rng(3)
    Image.fromarray((rng.random((128, 128, 3)) * 255).astype(np.uint8)).save(tmp_path / "init.png")
    seen = []
    original = refiner.model.apply_model
    refiner.model.apply_model = lambda x, t, cond, **kw: (seen.append({k: v.clone() for k, v in cond.items()}), original(x, t, cond, **kw))[1]
    refiner.img2img("a cat", str(tmp_path / "init.png"), strength=0.3, n=1, steps=10, aesthetic_score=6.5)
    with torch.no_grad():
        empty = refiner.model.get_learned_conditioning(refiner.model.conditioning_batch([""], (128, 128), (0, 0), None, 2.5))
    assert len(seen) == 3 and torch.equal(seen[0]["crossattn"][0], empty["crossattn"][0]) and seen[0]["crossattn"][0].abs().sum() > 0


def test_bad_refiners_are_one_line_errors(files, base_pipe, tiny_ckpt, tmp_path, capsys):
    txt2img = load_script("txt2img")
    common = ["--ckpt", str(files["base"]), "--prompt", "x", "--outdir", str(tmp_path / "o"), "--W", "128", "--H", "128", *RUN]
    demo = REPO / "microbatch" / "assets" / "demo-shapes.safetensors"
    cases = [
        (["--refiner", str(demo)], "is a model with 64-wide text context, not an SDXL model"),  # caught from the header, before loading
        (["--refiner", str(tiny_ckpt)], "not an SDXL model"),  # an SD 1.x .ckpt, caught once loaded
        (["--refiner", str(tmp_path / "missing.safetensors")], "refiner not found"),
        (["--refiner_switch", "0.7"], "--refiner_switch 0.7 needs a refiner: --refiner FILE"),
        (["--refiner", str(files["refiner"]), "--refiner_switch", "0"], "--refiner_switch must be a fraction in (0, 1]"),
        (["--refiner", str(files["refiner"]), "--refiner_switch", "nan"], "--refiner_switch must be a fraction in (0, 1]"),
    ]
    for extra, message in cases:
        assert txt2img.main([*common, *extra]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, (extra, err)
    # an SD 1.x base with an SDXL refiner
    assert txt2img.main(["--prompt", "x", "--outdir", str(tmp_path / "o"), "--refiner", str(files["refiner"]), *RUN]) == 2
    assert "--refiner needs an SDXL base model" in capsys.readouterr().err
    with pytest.raises(UsageError, match="needs a refiner"):
        base_pipe.txt2img("x", steps=1, refiner_switch=0.5, **SIZE)


def test_parameters_round_trip(files, pipe, tmp_path, capsys):
    from PIL import Image

    txt2img = load_script("txt2img")
    argv = ["--ckpt", str(files["base"]), "--refiner", str(files["refiner"]), "--refiner_switch", "0.7", "--prompt", "a cat",
            "--n_samples", "2", "--n_iter", "1", "--ddim_steps", "6", "--sampler", "dpmpp_2m", "--seed", "9", "--W", "128", "--H", "128",
            "--outdir", str(tmp_path / "t"), *RUN]
    assert txt2img.main(argv) == 0
    first = Image.open(tmp_path / "t" / "samples" / "00001.png")
    text = first.info["parameters"]
    assert f"Refiner: tiny-sdxl-refiner [{pipe.refiner.model_hash}], Refiner switch at: 0.7" in text
    api = pipe.txt2img("a cat", n=2, steps=6, sampler="dpmpp_2m", seed=9, refiner_switch=0.7, **SIZE)
    assert api[1].tobytes() == first.tobytes() and api[1].info["parameters"] == text
    # --from_png: the refiner is found by name beside the checkpoint, the switch read back
    assert txt2img.main(["--ckpt", str(files["base"]), "--from_png", str(tmp_path / "t" / "samples" / "00001.png"), "--outdir", str(tmp_path / "again"), *RUN]) == 0
    again = Image.open(tmp_path / "again" / "samples" / "00000.png")
    assert again.tobytes() == first.tobytes() and again.info["parameters"] == text
    # no refiner beside the checkpoint: a note, and the base alone
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(files["base"], lone / files["base"].name)
    capsys.readouterr()
    assert txt2img.main(["--ckpt", str(lone / files["base"].name), "--from_png", str(tmp_path / "t" / "samples" / "00001.png"), "--outdir", str(tmp_path / "lone_out"), *RUN]) == 0
    assert "the PNG used the refiner tiny-sdxl-refiner [" in capsys.readouterr().out
    assert "Refiner" not in Image.open(tmp_path / "lone_out" / "samples" / "00000.png").info["parameters"]
    # the web UI's text: both keys read, nothing left over
    webui = png_settings_from_text("a cat\nSteps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 1024x1024, "
                                   "Model hash: 31e35c80fc, Model: sd_xl_base_1.0, Refiner: sd_xl_refiner_1.0 [7440042bbd], Refiner switch at: 0.8, Version: v1.9.4")
    assert (webui.refiner, webui.refiner_switch, webui.notes) == ("sd_xl_refiner_1.0 [7440042bbd]", 0.8, [])


def test_img2img_and_inpainting_with_the_refiner(pipe, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    Image.fromarray((rng.random((128, 128, 3)) * 255).astype(np.uint8)).save(tmp_path / "init.png")
    mask = np.zeros((128, 128), np.uint8)
    mask[32:96, 32:96] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    runs = [pipe.img2img("a cat", str(tmp_path / "init.png"), strength=0.5, n=2, steps=20, sampler="dpmpp_sde", max_batch_size=size)
            for size in (1, 2)]
    assert [a.tobytes() for a in runs[0]] == [b.tobytes() for b in runs[1]]
    assert "Denoising strength: 0.5" in runs[0][0].info["parameters"] and "Refiner switch at: 0.8" in runs[0][0].info["parameters"]
    assert runs[0][0].tobytes() != pipe.img2img("a cat", str(tmp_path / "init.png"), strength=0.5, n=1, steps=20, sampler="dpmpp_sde", refiner_switch=1.0)[0].tobytes()
    painted = np.asarray(pipe.inpaint("a cat", str(tmp_path / "init.png"), str(tmp_path / "mask.png"), n=1, steps=8, seed=2)[0]).astype(int)
    init = np.asarray(Image.open(tmp_path / "init.png")).astype(int)
    assert np.abs(painted - init)[mask > 0].mean() > 4 * np.abs(painted - init)[mask == 0].mean()


def test_a_job_records_its_refiner(files, tmp_path, capsys):
    """batch_gen's job settings hold the refiner's hash: --resume with another refiner (or none) is refused."""
    from safetensors.torch import load_file, save_file

    batch_gen = load_script("batch_gen")
    common = ["--ckpt", str(files["base"]), "--prompt", "x", "--n_samples", "1", "--ddim_steps", "2", "--W", "128", "--H", "128",
              "--outdir", str(tmp_path / "job"), "--skip_grid", *RUN]
    assert batch_gen.main([*common, "--refiner", str(files["refiner"])]) == 0
    other = tmp_path / "other-refiner.safetensors"
    weights = load_file(str(files["refiner"]))
    save_file({k: (v + 1 if k.endswith("out.2.bias") else v) for k, v in weights.items()}, str(other))
    capsys.readouterr()
    for extra in (["--refiner", str(other)], []):
        assert batch_gen.main([*common, "--resume", *extra]) == 2
        assert "holds another job (refiner_hash:" in capsys.readouterr().err
