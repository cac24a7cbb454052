"""scripts/benchmark.py end to end on the tiny config (quick mode), and its planning and weight-building helpers."""
from __future__ import annotations

import csv
import json

import pytest
import torch
from PIL import Image

from tests.script_utils import REPO, registered_script

TINY = str(REPO / "configs" / "tiny" / "tiny-v1.yaml")


@pytest.fixture(scope="module")
def bench():
    with registered_script("benchmark", "script_benchmark") as module:
        yield module


def test_quick_benchmark_on_the_tiny_config_writes_tables_and_plots(bench, tmp_path):
    pytest.importorskip("diffusers")
    out = tmp_path / "bench"
    argv = ["--config", TINY, "--random", "--cases", "quick", "--out", str(out), "--device", "cpu",
            "--repeats", "1", "--warmup", "0", "--threads", "1"]
    assert bench.main(argv) == 0
    rows = json.loads((out / "results.json").read_text())
    with open(out / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == bench.COLUMNS
        table = list(reader)
    assert len(table) == len(rows) == 10  # unet (2 impls), generate x 2 max_batch_size (2 impls), vae whole + tiled (2 impls)
    assert all(set(bench.COLUMNS) <= set(r) for r in rows)  # JSON rows also list every timed run (times_s)
    assert all(r["status"] == "ok" and r["device"] == "cpu" for r in rows)
    by = {(r["kind"], r["impl"], r["max_batch_size"], r["vae_mode"]): r for r in rows}
    ours, theirs = by[("unet", "ours", 1, "")], by[("unet", "diffusers", 1, "")]
    assert ours["resolution"] == 64 and ours["rows"] == 2 and ours["time_ratio_vs_diffusers"] > 0
    assert ours["max_abs_diff"] < 1e-4  # same weights, same inputs
    assert ours["peak_mb"] >= ours["weights_mb"] > 0 and ours["attn_peak_mb"] > 0
    assert theirs["weights_mb"] == pytest.approx(ours["weights_mb"], rel=0.01)
    for mbs in (1, 2):
        g = by[("generate", "ours", mbs, "")]
        assert g["n_samples"] == 2 and 0 < g["first_image_s"] <= g["time_s"] and g["time_per_image_s"] > 0
        assert by[("generate", "diffusers", mbs, "")]["peak_mb"] > 0
    whole, tiled = by[("vae", "ours", 1, "whole")], by[("vae", "ours", 1, "tiled")]
    assert tiled["tile"] == 8 and tiled["resolution"] == 128 and tiled["max_abs_diff"] is not None
    assert tiled["transient_mb"] < whole["transient_mb"]  # tiles of 64 px instead of the whole 128 px
    for name in ("unet", "generate", "vae"):
        for what in ("peak_memory", "time_per_image"):
            path = out / f"{name}_{what}.png"
            assert path.is_file() and Image.open(path).size[0] > 100


def test_plan_is_ready_for_gpus(bench):
    args = bench.build_parser().parse_args(["--cases", "full"])
    cases = bench.plan_cases(args, "cuda", peer=True)
    kinds = {c.kind for c in cases}
    assert kinds == {"unet", "generate", "vae"}
    assert {c.precision for c in cases} == {"fp32", "fp16"}
    assert {c.offload for c in cases if c.kind == "generate"} == {"none", "model", "sequential"}
    assert all(c.impl == "ours" for c in cases if c.offload != "none")
    assert {c.attention for c in cases if c.kind == "unet"} == {"sdpa", "math", "sliced"}
    assert all(c.max_batch_size <= c.n_samples for c in cases if c.kind == "generate")
    cpu = bench.plan_cases(bench.build_parser().parse_args(["--cases", "full"]), "cpu", peer=False)
    assert {c.precision for c in cpu} == {"fp32", "bf16"} and {c.offload for c in cpu if c.kind == "generate"} == {"none"}
    assert all(c.impl == "ours" for c in cpu)


def test_random_weights_are_deterministic_and_materialised(bench):
    ctx = bench.Context(None, TINY, "cpu", 0, 0, None, seed=3)
    a, b = bench.build_model(ctx, "unet"), bench.build_model(ctx, "unet")
    assert all(p.device.type == "cpu" for p in a.parameters())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    other = bench.build_model(bench.Context(None, TINY, "cpu", 0, 0, None, seed=4), "unet")
    assert not torch.equal(next(a.parameters()), next(other.parameters()))
    full = bench.build_model(ctx, "all")  # buffers (the schedule) stay real
    assert full.alphas_cumprod.device.type == "cpu" and 0 < float(full.alphas_cumprod[-1]) < 1


def test_pil_plot(bench, tmp_path):
    path = tmp_path / "p.png"
    bench.plot_pil(path, "t", "x", "y", {"a": [(1, 2.0), (2, 3.5), (4, 1.0)], "b": [(1, 0.5)]})
    image = Image.open(path).convert("RGB")
    colours = {image.getpixel((x, y)) for x in range(0, image.width, 3) for y in range(0, image.height, 3)}
    assert tuple(bench.PALETTE[0]) in colours and tuple(bench.PALETTE[1]) in colours


def test_bad_arguments(bench, tmp_path, capsys):
    assert bench.main(["--ckpt", str(tmp_path / "missing.ckpt")]) == 2
    assert bench.main(["--config", str(tmp_path / "missing.yaml")]) == 2
    with pytest.raises(SystemExit):
        bench.main(["--attention", "flash9"])
    assert "not found" in capsys.readouterr().err


def test_gpu_preset_plans_without_a_gpu(bench, capsys):
    """`--cases gpu --device cuda --dry_run` plans the GPU table on a machine without one; running it needs CUDA."""
    assert bench.main(["--cases", "gpu", "--device", "cuda", "--dry_run"]) == 0
    printed = capsys.readouterr()
    cases = bench.plan_cases(bench.build_parser().parse_args(["--cases", "gpu"]), "cuda", peer=True)
    assert f"{len(cases)} cases on cuda" in printed.out
    kinds = [c.kind for c in cases]
    assert kinds[0] == "roofline" and {"profile", "unet", "generate", "vae"} <= set(kinds)
    assert {c.precision for c in cases if c.kind == "roofline"} == {"fp32", "fp16", "bf16"}
    gen = [c for c in cases if c.kind == "generate"]
    assert all(c.precision == "fp16" and c.resolution == 512 and c.steps == 50 and c.n_samples == 4 for c in gen)
    assert {(c.attention, c.compile) for c in gen} == {("sdpa", False), ("sdpa", True), ("sliced", False)}
    assert {c.attention for c in cases if c.kind == "unet"} == {"sdpa", "sliced", "math"}
    assert any(c.kind == "unet" and c.compile for c in cases)
    if not torch.cuda.is_available():
        assert bench.main(["--cases", "gpu", "--device", "cuda"]) == 2
        assert bench.main(["--cases", "gpu", "--device", "cpu", "--dry_run"]) == 2


def test_roofline_flags_plan_their_cases(bench):
    args = bench.build_parser().parse_args(["--roofline", "--compile", "--kinds", "unet,generate", "--config", TINY])
    cases = bench.plan_cases(args, "cpu", peer=True)
    assert cases[0].kind == "roofline" and cases[0].precision == "fp32"
    assert all(c.compile for c in cases if c.kind == "unet")
    assert {c.compile for c in cases if c.kind == "generate"} == {False, True}


def test_roofline_and_profile_cases_on_the_tiny_config(bench, tmp_path):
    """In-process: the attainable rate of the tiny UNet's kernels, and a profiled call's time by category."""
    pytest.importorskip("diffusers")
    ctx = bench.Context(None, TINY, "cpu", 0, 0, 1)
    rows = bench.run_case_here(bench.Case("roofline", "machine", 64, precision="fp32"), ctx)
    best = rows[-1]
    big = max(r["gflop"] for r in rows[:-1])
    assert best["op"] == "best" and best["attainable_gflops_per_s"] == max(r["gflops_per_s"] for r in rows[:-1] if r["gflop"] >= 0.05 * big) > 0
    assert {r["layout"] for r in rows if r["op"] == "conv3x3"} == {"contiguous", "channels_last"}
    prof = bench.run_case_here(bench.Case("profile", "both", 64, precision="fp32"), ctx)
    assert [r["impl"] for r in prof] == ["ours", "diffusers"]
    for r in prof:
        assert r["breakdown_s"]["convolution"] > 0 and r["breakdown_s"]["GEMM"] > 0
        assert sum(r["breakdown_s"].values()) <= r["time_s"] * 1.05
    for r in rows + prof:
        r["status"] = "ok"
    text = bench.write_summary(rows + prof, tmp_path)
    assert "attainable GFLOP/s" in text and "| convolution |" in text and (tmp_path / "summary.md").read_text().strip() == text.strip()


@pytest.mark.parametrize("config", [TINY, str(REPO / "configs" / "tiny" / "tiny-sdxl-base.yaml")], ids=["v1", "sdxl"])
def test_lora_cases_merge_kohyas_default_targets_and_restore_the_bits(bench, config, tmp_path):
    """The lora kind: a kohya LoRA touches every transformer linear / 1x1 projection and every text-encoder
    attention and MLP weight; a LoCon also every ResBlock, Downsample and Upsample layer; both come off bit-exactly."""
    from safetensors.torch import save_file

    from ldm.modules.attention import BasicTransformerBlock, SpatialTransformer
    from ldm.modules.diffusionmodules.openaimodel import Downsample, ResBlock, Upsample
    from microbatch.lora import apply_lora

    ctx = bench.Context(None, config, "cpu", 1, 0, 1)
    model = bench.build_model(ctx, "all")
    unet = model.model.diffusion_model

    def weights(kinds):
        return sum(1 for m in unet.modules() if isinstance(m, kinds) for p in m.parameters() if p.dim() >= 2)

    # a block's own matrices: SpatialTransformer's proj_in / proj_out are counted without its blocks' ones
    projections = sum(sum(1 for n, p in m.named_parameters() if p.dim() >= 2 and n.startswith("proj_")) for m in unet.modules() if isinstance(m, SpatialTransformer))
    blocks = weights(BasicTransformerBlock)
    assert blocks == 10 * sum(1 for m in unet.modules() if isinstance(m, BasicTransformerBlock))  # q k v out twice, ff in and out
    text = {
        name: sum(1 for n, p in enc.named_parameters() if p.dim() == 2 and any(k in n for k in ("_proj.weight", "fc1.weight", "fc2.weight", "c_fc.weight", "c_proj.weight", "in_proj_weight")))
        for name, enc in ((n, m) for n, m in model.named_modules() if type(m).__name__.startswith("Frozen"))
    }
    expected_lora = projections + blocks + sum(text.values())
    expected_locon = expected_lora + weights((ResBlock, Downsample, Upsample))
    before = {n: p.clone() for n, p in model.named_parameters()}
    rows = {}
    for network in ("lora", "locon"):
        (row,) = bench.run_case_here(bench.Case("lora", "ours", precision="fp32", network=network), ctx)
        assert row["status"] == "ok" and row["restored"] is True and len(row["times_s"]) == 2 and row["time_s"] > 0
        rows[network] = row
        # the file really changes those weights
        path = tmp_path / f"{network}.safetensors"
        save_file(bench.kohya_network(model, network), str(path))
        handle = apply_lora(model, path)
        changed = sum(1 for n, p in model.named_parameters() if not torch.equal(p, before[n]))
        handle.remove()
        assert changed == row["layers"]
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert rows["lora"]["layers"] == expected_lora
    assert rows["locon"]["layers"] == expected_locon > expected_lora


def test_load_benchmark_times_ours_and_diffusers_whole_pipeline_on_the_same_file(bench, tmp_path, capsys):
    pytest.importorskip("diffusers")
    from tests.conftest import TINY_CONFIG, save_tiny

    ckpt = save_tiny(TINY_CONFIG, tmp_path / "tiny.safetensors")
    out = tmp_path / "load"
    assert bench.main(["--load", "--ckpt", str(ckpt), "--config", TINY, "--repeats", "2", "--out", str(out)]) == 0
    rows = json.loads((out / "load.json").read_text())
    assert [r["impl"] for r in rows] == ["ours", "diffusers", "diffusers", "ours"]  # alternating rounds
    ours = [r for r in rows if r["impl"] == "ours"]
    theirs = [r for r in rows if r["impl"] == "diffusers"]
    # diffusers loads its whole pipeline offline (text encoder included): the same weights as ours (ours also holds
    # the sampling schedule's buffers, computed from the config).
    assert all(r["what"] == "full pipeline (UNet, VAE, text encoder)" for r in theirs)
    assert ours[0]["weights_mb"] == pytest.approx(theirs[0]["weights_mb"], abs=0.06) and ours[0]["weights_mb"] > 1
    assert all(r["load_s"] > 0 and r["peak_rss_mb"] >= r["rss_before_mb"] > 0 for r in rows)
    assert "median load time: ours" in capsys.readouterr().out
