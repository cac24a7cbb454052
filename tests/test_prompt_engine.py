"""Issue 13 items 1-3 end to end: the prompt language, long prompts and clip skip through the scripts, the engine and
the Python API.

The conditioning the UNet receives at every denoiser call is recorded (LatentDiffusion.apply_model wrapped) and
compared with a reference built here from the text encoder's hidden states (tests/test_long_prompts.py's helpers:
token rows written out by hand, the transformer run on them, emphasis from its formula). The steps at which prompt
editing switches are written out by hand from the web UI's rule: prompt steps are denoiser calls, twice the steps
for a sampler with two model calls per step, and the text of an entry is used while call index <= its end step.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from microbatch.engine import Engine, ImageJob, SamplingSettings
from microbatch.request import GenerationRequest, UsageError
from samplers import Denoiser, GuidedModel, get_sampler, get_sigmas
from samplers.guidance import StepConditioning
from tests.script_utils import REPO, load_script
from tests.test_long_prompts import emphasis, hidden, ids, row, words

TINY = str(REPO / "configs" / "tiny" / "tiny-v1.yaml")
CPU = torch.device("cpu")


@pytest.fixture
def recorded(monkeypatch):
    """Every UNet call's context [N, L, C], in order."""
    from ldm.models.diffusion.ddpm import LatentDiffusion

    calls: list[torch.Tensor] = []
    real = LatentDiffusion.apply_model

    def recording(self, x, t, cond, return_ids=False):
        context = cond["c_crossattn"][0] if isinstance(cond, dict) else cond
        assert context.shape[0] == x.shape[0]
        calls.append(context.detach().clone())
        return real(self, x, t, cond)

    monkeypatch.setattr(LatentDiffusion, "apply_model", recording)
    return calls


def txt2img(tmp_path, ckpt, *flags: str) -> str:
    """Run scripts/txt2img.py on the tiny checkpoint (one 64x64 image, guidance scale 3); the PNG's parameters."""
    out = tmp_path / f"out{len(list(tmp_path.glob('out*')))}"
    argv = ["--ckpt", str(ckpt), "--config", TINY, "--precision", "full", "--device", "cpu", "--quiet", "--skip_grid",
            "--n_samples", "1", "--n_iter", "1", "--H", "64", "--W", "64", "--scale", "3", "--outdir", str(out), *flags]
    assert load_script("txt2img").main(argv) == 0
    with Image.open(out / "samples" / "00000.png") as im:
        return im.info["parameters"]


def plain(model, text: str, clip_skip: int = 1) -> torch.Tensor:
    """A plain prompt's context [77, C]: the original path, or the reference rows for clip skip."""
    if clip_skip == 1:
        with torch.no_grad():
            return model.get_learned_conditioning([text])[0]
    return hidden(model, [row(model, ids(model, text))], clip_skip)[0]


def rows_per_call(calls: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """UNet calls -> denoiser calls: each denoiser call with guidance gives [uncond, cond] rows for one image, in one
    UNet call when their lengths agree, else in two (uncond first)."""
    flat = [r for c in calls for r in c]
    assert len(flat) % 2 == 0
    return [flat[i : i + 2] for i in range(0, len(flat), 2)]


@pytest.mark.parametrize(
    "sampler,steps,prompt,texts",
    [
        # 4 prompt steps, [red:blue:0.5] ends at int(0.5 * 4) = 2: calls 0, 1, 2 use red
        ("ddim", 4, "a [red:blue:0.5] circle", ["a red circle"] * 3 + ["a blue circle"]),
        # heun: 3 steps make 5 calls (the last step to sigma 0 is one Euler call) and count 6 prompt steps
        ("heun", 3, "a [red:blue:0.5] circle", ["a red circle"] * 4 + ["a blue circle"]),
        # an integer is a step number: red while call <= 2
        ("ddim", 5, "a [red:blue:2] circle", ["a red circle"] * 3 + ["a blue circle"] * 2),
        ("euler", 4, "a [red:blue:1] circle", ["a red circle"] * 2 + ["a blue circle"] * 2),
        # alternation: entry k (ending at k) shows option (k - 1) mod 2; call i uses the first entry with i <= k
        ("ddim", 4, "a [red|blue] circle", ["a red circle", "a red circle", "a blue circle", "a red circle"]),
    ],
)
def test_prompt_editing_switches_at_the_scheduled_denoiser_calls(tiny_model, tiny_ckpt, tmp_path, recorded, sampler, steps, prompt, texts):
    txt2img(tmp_path, tiny_ckpt, "--prompt", prompt, "--sampler", sampler, "--ddim_steps", str(steps))
    per_call = rows_per_call(recorded)
    assert len(per_call) == len(texts)
    empty = plain(tiny_model, "")
    for (uncond, cond), text in zip(per_call, texts):
        assert torch.equal(uncond, empty)
        assert torch.equal(cond, plain(tiny_model, text)), text


def test_emphasis_long_prompt_and_break_reach_the_unet(tiny_model, tiny_ckpt, tmp_path, recorded):
    m = tiny_model
    # emphasis: the token states of "red" times 1.5, then the chunk rescaled to its original mean
    txt2img(tmp_path, tiny_ckpt, "--prompt", "a (red:1.5) circle", "--ddim_steps", "2")
    tokens = ids(m, "a ") + ids(m, "red") + ids(m, " circle")
    weights = torch.ones(1, 77)
    weights[0, 1 + len(ids(m, "a ")) : 1 + len(ids(m, "a ")) + len(ids(m, "red"))] = 1.5
    expected = emphasis(hidden(m, [row(m, tokens)]), weights)[0]
    for uncond, cond in rows_per_call(recorded):
        assert cond.shape == (77, 32) and torch.allclose(cond, expected, atol=1e-5)
    assert not torch.allclose(expected, plain(m, "a red circle"), atol=1e-3)

    # a long prompt: 100 single-token words in chunks of 75 and 25, encoded separately and concatenated; the
    # unconditional row (77) and the conditional one (154) go through the UNet as two calls, unpadded
    recorded.clear()
    text = " ".join(words(100))
    txt2img(tmp_path, tiny_ckpt, "--prompt", text, "--ddim_steps", "2")
    all_ids = ids(m, text)
    assert len(all_ids) == 100
    expected = torch.cat(list(hidden(m, [row(m, all_ids[:75]), row(m, all_ids[75:])])), dim=0)
    assert [tuple(c.shape) for c in recorded] == [(1, 77, 32), (1, 154, 32)] * 2
    for uncond, cond in rows_per_call(recorded):
        assert torch.equal(uncond, plain(m, ""))
        assert torch.allclose(cond, expected, atol=1e-5)

    # BREAK starts a new chunk
    recorded.clear()
    txt2img(tmp_path, tiny_ckpt, "--prompt", "red circle BREAK blue square", "--negative_prompt", "dark", "--ddim_steps", "2")
    expected = torch.cat(list(hidden(m, [row(m, ids(m, "red circle")), row(m, ids(m, "blue square"))])), dim=0)
    for uncond, cond in rows_per_call(recorded):
        assert torch.equal(uncond, plain(m, "dark"))
        assert cond.shape == (154, 32) and torch.allclose(cond, expected, atol=1e-5)


def test_clip_skip_from_the_flag_to_the_unet_and_the_png(tiny_model, tiny_ckpt, tmp_path, recorded, capsys):
    params = txt2img(tmp_path, tiny_ckpt, "--prompt", "a red circle", "--negative_prompt", "dark", "--clip_skip", "2", "--ddim_steps", "2")
    assert "Clip skip: 2" in params
    for uncond, cond in rows_per_call(recorded):
        assert torch.allclose(cond, plain(tiny_model, "a red circle", 2), atol=1e-5)
        assert torch.allclose(uncond, plain(tiny_model, "dark", 2), atol=1e-5)
        assert not torch.allclose(cond, plain(tiny_model, "a red circle"), atol=1e-3)
    assert "Clip skip" not in txt2img(tmp_path, tiny_ckpt, "--prompt", "a red circle", "--ddim_steps", "1")
    # --from_png reads it back: the same pixels
    first = sorted(tmp_path.glob("out*"))[0] / "samples" / "00000.png"
    out = tmp_path / "again"
    argv = ["--ckpt", str(tiny_ckpt), "--config", TINY, "--device", "cpu", "--quiet", "--skip_grid", "--from_png", str(first), "--outdir", str(out)]
    assert load_script("txt2img").main(argv) == 0
    assert Image.open(out / "samples" / "00000.png").tobytes() == Image.open(first).tobytes()
    # bad values: one line, exit 2
    capsys.readouterr()
    for bad in ("0", "3"):  # the tiny text encoder has 2 layers
        assert load_script("txt2img").main(["--ckpt", str(tiny_ckpt), "--config", TINY, "--device", "cpu", "--quiet", "--clip_skip", bad, "--outdir", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--clip_skip" in err and bad in err


def test_python_api_clip_skip_equals_the_script(tiny_ckpt, tmp_path):
    from microbatch import Pipeline

    pipe = Pipeline.from_checkpoint(tiny_ckpt, config=TINY, device="cpu", precision="full")
    images = pipe.txt2img("a (red:1.2) [circle:square:0.5]", n=1, steps=2, seed=5, width=64, height=64, scale=3, clip_skip=2)
    params = txt2img(tmp_path, tiny_ckpt, "--prompt", "a (red:1.2) [circle:square:0.5]", "--ddim_steps", "2", "--seed", "5", "--clip_skip", "2")
    assert images[0].info["parameters"] == params
    png = sorted(tmp_path.glob("out*"))[0] / "samples" / "00000.png"
    assert images[0].tobytes() == Image.open(png).tobytes()
    with pytest.raises(UsageError, match="--clip_skip must be a positive integer"):
        pipe.txt2img("x", clip_skip=0)


# -- the engine: batching, plain prompts, composable prompts ---------------------------------------------------------

MIXED = [
    ("a red circle", ""),
    (" ".join(words(90)), "dark"),  # 2 chunks against a 1-chunk negative
    ("a [red:blue:0.5] (circle:1.3)", " ".join(words(80, 3))),  # 1 chunk against a 2-chunk negative
    ("red circle BREAK blue square", ""),
    ("a red circle AND a blue square:0.6", "dark"),
    ("a [cat|dog]", ""),
]


@pytest.mark.parametrize("sampler", ["ddim", "heun", "euler_a"])
def test_mixed_prompts_are_batch_invariant(tiny_model, sampler):
    jobs = [ImageJob(i, p, 10 + i, n) for i, (p, n) in enumerate(MIXED)]

    def run(batch, **kw):
        out = []
        Engine(tiny_model, CPU).run(jobs, SamplingSettings(sampler=sampler, steps=3, height=64, width=64, guidance_scale=3.0, max_batch_size=batch, **kw), out.extend)
        return [d.latent for d in out]

    alone = run(1)
    for batch, kw in ((3, {}), (6, {}), (4, {"split_guidance": True})):
        assert all(torch.equal(a, b) for a, b in zip(run(batch, **kw), alone)), (batch, kw)
    assert len({tuple(x.flatten()[:4].tolist()) for x in alone}) == len(MIXED)


def test_plain_prompts_give_todays_images(tiny_model):
    """The engine's scheduled conditioning equals the static GuidedModel path it replaced, bit for bit."""
    prompts = ["a red circle", "a blue square on a green background"]
    jobs = [ImageJob(i, p, 3 + i, "dark" if i else "") for i, p in enumerate(prompts)]
    settings = SamplingSettings(sampler="dpmpp_2m", steps=3, height=64, width=64, guidance_scale=3.0, max_batch_size=2)
    engine = Engine(tiny_model, CPU)
    latents = engine.sample_batch(jobs, settings)
    with torch.no_grad():
        cond = torch.cat([tiny_model.get_learned_conditioning([p]) for p in prompts])
        uncond = torch.cat([tiny_model.get_learned_conditioning([j.negative_prompt]) for j in jobs])
        denoiser = Denoiser(GuidedModel(tiny_model.apply_model, cond, uncond, 3.0), tiny_model.alphas_cumprod)
        sigmas = get_sigmas("karras", denoiser, 3)
        gens = [torch.Generator().manual_seed(j.seed) for j in jobs]
        x = torch.stack([torch.randn(4, 8, 8, generator=g) for g in gens]) * (float(sigmas[0]) ** 2 + 1) ** 0.5
        x = get_sampler("dpmpp_2m").fn(denoiser, x, sigmas)
    assert torch.equal(latents, x / (float(sigmas[-1]) ** 2 + 1) ** 0.5)


def test_composable_prompt_guides_towards_each_part(tiny_model):
    """`a AND b:0.6` at one denoiser call: out_u + s (out_a - out_u) + 0.6 s (out_b - out_u), each row evaluated
    on its own."""
    engine = Engine(tiny_model, CPU)
    settings = SamplingSettings(sampler="euler", steps=2, guidance_scale=3.0)
    jobs = [ImageJob(0, "a red circle AND a blue square:0.6", 0, "dark"), ImageJob(1, "a cat", 1, "")]
    guided = GuidedModel(tiny_model.apply_model, engine.step_conditioning(jobs, settings), None, 3.0)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.full((2,), 500.0)
    with torch.no_grad():
        out = guided(x, t)

        def unet(i, text):
            return tiny_model.apply_model(x[i : i + 1], t[:1], tiny_model.get_learned_conditioning([text]))[0]

        u0, a, b = unet(0, "dark"), unet(0, "a red circle"), unet(0, "a blue square")
        u1, c = unet(1, ""), unet(1, "a cat")
    assert torch.allclose(out[0], u0 + 3.0 * (a - u0) + 0.6 * 3.0 * (b - u0), atol=1e-5)
    assert torch.allclose(out[1], u1 + 3.0 * (c - u1), atol=1e-5)


def test_guided_model_groups_rows_by_length_and_counts_steps():
    """A fake UNet that records its batches: rows of one length share a call, no call mixes lengths, and the
    schedule is asked for call 0, 1, 2..."""
    calls, asked = [], []

    def apply_model(x, t, context):
        calls.append(tuple(context.shape))
        return x * context.mean(dim=(1, 2))[:, None, None, None]

    short, long_ = torch.full((77, 4), 2.0), torch.full((154, 4), 3.0)
    u = torch.full((77, 4), 1.0)

    def schedule(step):
        asked.append(step)
        return StepConditioning([short, long_, short], [[(0, 1.0)], [(1, 1.0)], [(2, 0.5)]], [u, u, u])

    guided = GuidedModel(apply_model, schedule, None, 2.0)
    x = torch.ones(3, 1, 1, 1)
    for _ in range(3):
        out = guided(x, torch.zeros(3))
    assert asked == [0, 1, 2]
    assert calls[:2] == [(5, 77, 4), (1, 154, 4)]  # uncond x3 + short x2, then the long row
    # composable (image 2 has weight 0.5): u + w s (c - u) per image
    assert out.flatten().tolist() == [1 + 2 * (2 - 1), 1 + 2 * (3 - 1), 1 + 0.5 * 2 * (2 - 1)]
    with pytest.raises(ValueError, match="uncond must be None"):
        GuidedModel(apply_model, schedule, u, 2.0)


# -- --from_png of the web UI's PNGs -----------------------------------------------------------------------------------

WEBUI_NEW = (
    "masterpiece, (a cat:1.2), [day:night:0.5]\nNegative prompt: blurry, lowres\n"
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x768, Model hash: 6ce0161689, "
    'Model: v1-5-pruned-emaonly, Clip skip: 2, ENSD: 31337, Lora hashes: "style: 1a2b3c, other: 4d5e6f", Version: v1.9.4'
)


@pytest.mark.parametrize(
    "settings_line,sampler,schedule,eta",
    [
        ("Sampler: DPM++ 2M, Schedule type: Karras", "dpmpp_2m", "karras", 0.0),
        ("Sampler: DPM++ 2M, Schedule type: Automatic", "dpmpp_2m", "karras", 0.0),
        ("Sampler: DPM++ 2M Karras", "dpmpp_2m", "karras", 0.0),  # before 1.9: the schedule in the name
        ("Sampler: DPM++ 2M", "dpmpp_2m", "linspace", 0.0),  # before 1.9, no suffix: k-diffusion's grid
        ("Sampler: Euler a", "euler_a", "linspace", 1.0),
        ("Sampler: Euler a, Schedule type: Automatic, Eta: 0.5", "euler_a", "linspace", 0.5),
        ("Sampler: Euler, Schedule type: Uniform", "euler", "linspace", 0.0),
        ("Sampler: DPM++ SDE Karras", "dpmpp_sde", "karras", 1.0),
        ("Sampler: DPM++ 2M SDE, Schedule type: Exponential", "dpmpp_2m_sde", "exponential", 1.0),
        ("Sampler: DPM++ 2M SDE Karras", "dpmpp_2m_sde", "karras", 1.0),
        ("Sampler: DPM++ 2S a, Schedule type: Automatic", "dpmpp_2s_a", "karras", 1.0),
        ("Sampler: DPM++ 3M SDE", "dpmpp_3m_sde", "linspace", 1.0),
        ("Sampler: DDIM", "ddim", "uniform", 0.0),
        ("Sampler: DDIM, Schedule type: Automatic, Eta DDIM: 0.3", "ddim", "uniform", 0.3),
        ("Sampler: PLMS", "plms", "uniform", 0.0),
        ("Sampler: UniPC, Schedule type: Automatic", "unipc", "uniform", 0.0),
        ("Sampler: Heun", "heun", "linspace", 0.0),
        ("Sampler: LMS Karras", "lms", "karras", 0.0),
        ("Sampler: DPM2, Schedule type: Automatic", "dpm2", "karras", 0.0),
        ("Sampler: euler_a, Schedule: karras", "euler_a", "karras", 1.0),  # ours
    ],
)
def test_webui_sampler_names_map_to_ours(settings_line, sampler, schedule, eta):
    from microbatch.parameters import png_settings_from_text

    png = png_settings_from_text(f"a cat\nSteps: 20, {settings_line}, CFG scale: 7, Seed: 1, Size: 512x512")
    request = GenerationRequest(**{k: v for k, v in png.fields.items() if k != "precision"})
    assert (request.sampler, request.schedule, request.eta) == (sampler, schedule, eta)
    assert not png.notes


def test_webui_parameters_give_the_right_request_and_one_note():
    from microbatch.parameters import png_settings_from_text

    png = png_settings_from_text(WEBUI_NEW, "cat.png")
    request = GenerationRequest(**png.fields)
    expected = GenerationRequest(
        prompt="masterpiece, (a cat:1.2), [day:night:0.5]", negative_prompt="blurry, lowres", steps=20, sampler="dpmpp_2m",
        schedule="karras", scale=7.0, seed=1234, width=512, height=768, clip_skip=2,
    )
    assert request == expected
    assert png.model_hash == "6ce0161689"
    assert len(png.notes) == 1
    assert png.notes[0] == 'note: cat.png: settings not used here: ENSD: 31337'
    assert png.lora_hashes == {"style": "1a2b3c", "other": "4d5e6f"}  # read: checked against --lora_dir's files
    # a schedule type we do not have: the sampler's Automatic, with a note
    odd = png_settings_from_text("x\nSteps: 4, Sampler: DPM++ SDE, Schedule type: SGM Uniform, Seed: 1")
    assert odd.fields["schedule"] == "karras" and "SGM Uniform" in odd.notes[0]
    # a web UI sampler we do not have: the request says so, naming the nearest
    with pytest.raises(UsageError, match="unknown sampler 'DPM2 a'.*dpm2"):
        GenerationRequest(**png_settings_from_text("x\nSteps: 4, Sampler: DPM2 a, Seed: 1").fields)


def test_from_png_of_a_webui_png_on_the_command_line(tmp_path, monkeypatch, capsys):
    from microbatch.cli import build_parser, explicit_flags, from_args

    monkeypatch.chdir(tmp_path)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", WEBUI_NEW)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save("cat.png", pnginfo=info)
    argv = ["--from_png", "cat.png", "--ddim_steps", "5"]
    cmd = from_args(build_parser("txt2img").parse_args(argv), "txt2img", explicit_flags("txt2img", argv))
    r = cmd.request
    assert (r.sampler, r.schedule, r.clip_skip, r.steps, r.width, r.height, r.scale) == ("dpmpp_2m", "karras", 2, 5, 512, 768, 7.0)
    assert r.prompt.startswith("masterpiece") and r.negative_prompt == "blurry, lowres"
    assert any("settings not used here: ENSD: 31337" in n for n in cmd.notes)
    # --clip_skip given wins over the PNG's
    argv = ["--from_png", "cat.png", "--clip_skip", "1"]
    assert from_args(build_parser("txt2img").parse_args(argv), "txt2img", explicit_flags("txt2img", argv)).request.clip_skip == 1
