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


# -- token merging (--tome) and DeepCache (--deepcache) --

from ldm.modules.token_merging import bipartite_soft_matching, destination_offsets, split_indices  # noqa: E402
from microbatch.step_savings import step_savings, transformer_blocks_by_downsample, unet_of  # noqa: E402


def _groups_reference(metric: torch.Tensor, src: list[int], dst: list[int], r: int) -> list[list[int]]:
    """Brute force, one row: each source's most similar destination (cosine), the r best-matched sources join
    their destination's group; groups as lists of token indices, one per destination (plus singletons)."""
    unit = metric / metric.norm(dim=-1, keepdim=True)
    best = []
    for i in src:
        sims = [float(unit[i] @ unit[j]) for j in dst]
        k = max(range(len(dst)), key=lambda q: sims[q])
        best.append((sims[k], i, dst[k]))
    best.sort(key=lambda e: -e[0])
    groups = {j: [j] for j in dst}
    singles = []
    for n, (_, i, j) in enumerate(best):
        (groups[j].append(i) if n < r else singles.append([i]))
    return list(groups.values()) + singles


def test_merge_then_unmerge_gives_each_token_its_group_mean():
    torch.manual_seed(0)
    h, w, r = 6, 5, 9  # w not a multiple of the stride: the last column only holds sources
    x = torch.randn(2, h * w, 8)
    offsets = destination_offsets(h, w, 2, 2, torch.Generator().manual_seed(3))
    src, dst = split_indices(h, w, 2, 2, offsets)
    assert dst.numel() == (h // 2) * (w // 2) and sorted(src.tolist() + dst.tolist()) == list(range(h * w))
    for cy in range(h // 2):  # one destination per 2x2 cell
        for cx in range(w // 2):
            cell = {(2 * cy + a) * w + 2 * cx + b for a in range(2) for b in range(2)}
            assert len(cell & set(dst.tolist())) == 1
    merge, unmerge = bipartite_soft_matching(x, src, dst, r)
    merged = merge(x)
    assert merged.shape == (2, h * w - r, 8)
    out = unmerge(merged)
    for row in range(2):
        expected = torch.empty(h * w, 8)
        for group in _groups_reference(x[row], src.tolist(), dst.tolist(), r):
            expected[group] = x[row, group].mean(dim=0)
        assert torch.allclose(out[row], expected, atol=1e-6)
    ident_m, ident_u = bipartite_soft_matching(x, src, dst, 0)
    assert ident_m(x) is x and ident_u(x) is x


def test_tome_applies_to_the_highest_resolution_blocks_only(tiny_model):
    unet = unet_of(tiny_model)
    found = transformer_blocks_by_downsample(unet)
    # tiny-v1: attention at ds 1 and 2; input 1 (ds 1), input 3 (ds 2), middle (ds 2), outputs 0-2 (ds 2), 3-4 (ds 1)
    assert [ds for _, ds in found] == [1, 2, 2, 2, 2, 1, 1]
    with step_savings(unet, lambda: 0, tome=0.5):
        assert [b.token_merge is not None for b, _ in found] == [ds == 1 for _, ds in found]
    assert all(b.token_merge is None for b, _ in found)


def test_deepcache_shallow_call_matches_a_reference_built_from_the_blocks(tiny_model):
    unet = unet_of(tiny_model)
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.full((2,), 500.0)
    context = torch.randn(2, 77, 32, generator=g)
    step = [0]
    with torch.no_grad():
        exact0 = unet(x0, t, context)
        with step_savings(unet, lambda: step[0], deepcache=3) as cache:
            full = unet(x0, t, context)
            step[0] = 1
            shallow = unet(x1, t, context)
            step[0] = 3  # every 3rd call runs the whole UNet again
            again = unet(x1, t, context)
        assert (cache.full_calls, cache.shallow_calls) == (2, 1)
        assert torch.equal(full, exact0) and torch.equal(again, unet(x1, t, context))
        # reference: the feature entering the last output block at step 0 (its input is the list [h, skip]),
        # joined with step 1's first input block
        feats = []
        hook = unet.output_blocks[-1].register_forward_pre_hook(lambda m, args: feats.append(args[0][0]))
        unet(x0, t, context)
        hook.remove()
        deep = feats[0]
        emb = unet.time_embed(__import__("ldm.modules.diffusionmodules.util", fromlist=["x"]).timestep_embedding(t, unet.model_channels))
        h0 = unet.input_blocks[0](x1, emb, context)
        reference = unet.out(unet.output_blocks[-1](torch.cat([deep, h0], dim=1), emb, context))
    assert torch.allclose(shallow, reference, atol=1e-5) and not torch.allclose(shallow, exact0)


def test_tome_0_and_deepcache_1_equal_the_exact_run_and_the_others_are_deterministic(pipe):
    exact = _pixels(pipe)
    assert np.array_equal(_pixels(pipe, tome=0.0), exact)
    assert np.array_equal(_pixels(pipe, deepcache=1), exact)
    for kw in (dict(tome=0.5), dict(deepcache=3), dict(tome=0.3, deepcache=2)):
        first = _pixels(pipe, **kw)
        assert not np.array_equal(first, exact), kw
        assert np.array_equal(_pixels(pipe, **kw), first), kw
        # an image does not depend on its micro-batch
        assert np.array_equal(_pixels(pipe, max_batch_size=1, **kw), first), kw


def test_savings_compose_with_prompt_editing_guidance_interval_and_second_order_samplers(pipe):
    kw = dict(prompt="a [cat:dog:0.5] AND a hat:0.5", tome=0.5, deepcache=2, guidance_interval=(0.5, 5.0))
    for sampler in ("heun", "dpmpp_2m"):
        first = _pixels(pipe, sampler=sampler, **kw)
        assert np.array_equal(_pixels(pipe, sampler=sampler, max_batch_size=1, **kw), first)
        assert not np.array_equal(_pixels(pipe, sampler=sampler, prompt=kw["prompt"]), first)
    assert _pixels(pipe, split_guidance=True, **kw).shape == first.shape


def test_the_model_is_bit_identical_after_a_run_and_after_an_error(pipe):
    unet = unet_of(pipe.loaded.model)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    x, t, c = torch.randn(1, 4, 4, 4), torch.full((1,), 300.0), torch.randn(1, 77, 32)
    with torch.no_grad():
        out_before = unet(x, t, c)
    _pixels(pipe, tome=0.5, deepcache=3)
    with pytest.raises(RuntimeError, match="boom"):
        with step_savings(unet, lambda: 1, tome=0.5, deepcache=2):
            raise RuntimeError("boom")
    after = unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert unet.deep_cache is None and all(b.token_merge is None for b, _ in transformer_blocks_by_downsample(unet))
    with torch.no_grad():
        assert torch.equal(unet(x, t, c), out_before)


def test_tome_and_deepcache_flags_parameters_round_trip_and_errors(tiny_ckpt, tmp_path, capsys):
    for bad in (dict(tome=0.8), dict(tome=-0.1), dict(deepcache=0), dict(deepcache=2.5)):
        with pytest.raises(UsageError):
            GenerationRequest(prompt="x", **bad)
    txt2img = load_script("txt2img")
    run = ["--ckpt", str(tiny_ckpt), "--config", TINY, "--precision", "full", "--device", "cpu", "--quiet", "--prompt", "a cat",
           "--n_samples", "1", "--n_iter", "1", "--ddim_steps", "4", "--W", "32", "--H", "32"]
    assert txt2img.main([*run, "--tome", "0.5", "--deepcache", "3", "--outdir", str(tmp_path / "a")]) == 0
    png = sorted((tmp_path / "a" / "samples").glob("*.png"))[0]
    from PIL import Image

    with Image.open(png) as im:
        text = im.info["parameters"]
        first = im.tobytes()
    assert "Token merging ratio: 0.5" in text and "DeepCache: 3" in text
    assert txt2img.main(["--from_png", str(png), *run[:8], "--outdir", str(tmp_path / "b")]) == 0
    with Image.open(sorted((tmp_path / "b" / "samples").glob("*.png"))[0]) as im:
        assert im.tobytes() == first and "Token merging ratio: 0.5" in im.info["parameters"]
    assert "not used" not in capsys.readouterr().out  # the keys are read, not listed as unknown
    for flags in (["--tome", "0.9"], ["--deepcache", "0"]):
        assert txt2img.main([*run, *flags, "--outdir", str(tmp_path / "c")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --" + flags[0][2:]) and err.count("\n") == 0


def test_eval_demo_setting_flag(tmp_path, capsys):
    eval_demo = load_script("eval_demo")
    assert eval_demo.parse_settings(["tome=0.5", "guidance_interval=(0.28, 5.42)"]) == {"tome": 0.5, "guidance_interval": (0.28, 5.42)}
    for bad in (["nonsense=1"], ["tome"], ["tome=abc"]):
        assert eval_demo.main(["--setting", *bad, "--outdir", str(tmp_path)]) == 2
        assert capsys.readouterr().err.startswith("error: --setting")


@pytest.mark.slow
def test_eval_demo_runs_with_the_savings(tmp_path):
    """About 40 s on 2 cores: every one of the 54 combinations, 3 steps."""
    eval_demo = load_script("eval_demo")
    args = ["--seeds", "1", "--samplers", "ddim", "--steps", "3", "--img2img_seeds", "0", "--outdir", str(tmp_path)]
    assert eval_demo.main([*args, "--setting", "tome=0.5", "--setting", "deepcache=2"]) == 0
    import json

    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["settings"] == {"tome": 0.5, "deepcache": 2} and len(summary["adherence"]) == 1
