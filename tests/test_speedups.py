"""--compile and --channels_last (microbatch.speedups), the sync-free time embedding, and the FLOP / roofline helpers
(microbatch.roofline)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from microbatch import Pipeline, UsageError
from microbatch.request import ModelOptions
from microbatch import speedups
from microbatch.roofline import OpShape, categorize, count_flops, unet_shapes
from tests.script_utils import REPO, load_script

TINY = ["--config", str(REPO / "configs" / "tiny" / "tiny-v1.yaml")]
FAST = ["--ddim_steps", "3", "--precision", "full", "--quiet", "--device", "cpu", "--n_samples", "2", "--n_iter", "1", "--H", "64", "--W", "64"]


def _run(tmp_path, monkeypatch, ckpt, name: str, *flags: str) -> tuple[list[np.ndarray], dict]:
    folder = tmp_path / name
    monkeypatch.chdir(tmp_path)
    txt2img = load_script("txt2img")
    args = ["--prompt", "a red circle", "--ckpt", str(ckpt), "--outdir", str(folder), "--metrics_json", str(folder / "m.json"), *TINY, *FAST, *flags]
    assert txt2img.main(args) == 0
    pngs = sorted((folder / "samples").glob("*.png"))
    assert len(pngs) == 2
    return [np.asarray(Image.open(p), dtype=np.int16) for p in pngs], json.loads((folder / "m.json").read_text())


def test_compile_flag_reaches_the_model_and_the_metrics(tmp_path, monkeypatch, tiny_ckpt, capsys):
    """The plumbing, with torch.compile's "eager" backend (dynamo traces the UNet and the VAE decoder, no code is
    generated): the flag compiles both parts in place, the run's compilation time is in the metrics and the closing
    lines, and the images are those of the eager run (the eager backend runs the same kernels)."""
    monkeypatch.setattr(speedups, "BACKEND", "eager")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    eager, m0 = _run(tmp_path, monkeypatch, tiny_ckpt, "eager")
    compiled, m1 = _run(tmp_path, monkeypatch, tiny_ckpt, "compiled", "--compile")
    assert m0["compile_s"] is None and m0["settings"]["compile"] is False
    assert m1["settings"]["compile"] is True and m1["compile_s"] > 0
    assert m1["first_image_without_compile_s"] == pytest.approx(max(0.0, m1["first_image_s"] - m1["compile_s"]))
    assert "Compilation (torch.compile, in the sampling time) took" in capsys.readouterr().out
    for a, b in zip(eager, compiled):
        assert np.abs(a - b).max() <= 1


def test_pipeline_compiles_unet_and_vae_decoder_in_place(tiny_ckpt, monkeypatch):
    monkeypatch.setattr(speedups, "BACKEND", "eager")
    pipe = Pipeline.from_checkpoint(tiny_ckpt, config=TINY[1], device="cpu", precision="full", compile=True)
    keys = set(pipe.model.state_dict())
    assert speedups.is_compiled(pipe.model.model.diffusion_model) and speedups.is_compiled(pipe.model.first_stage_model.decoder)
    assert not speedups.is_compiled(pipe.model.first_stage_model.encoder)
    assert all("_orig_mod" not in k for k in keys)  # the checkpoint's key layout is kept (LoRAs, offload)
    plain = Pipeline.from_checkpoint(tiny_ckpt, config=TINY[1], device="cpu", precision="full")
    assert not speedups.is_compiled(plain.model.model.diffusion_model)


def test_compile_with_sequential_offload_is_a_usage_error(tmp_path, monkeypatch, tiny_ckpt, capsys):
    with pytest.raises(UsageError, match="--offload sequential"):
        ModelOptions(compile=True, offload="sequential")
    monkeypatch.chdir(tmp_path)
    txt2img = load_script("txt2img")
    code = txt2img.main(["--prompt", "x", "--ckpt", str(tiny_ckpt), *TINY, *FAST, "--compile", "--offload", "sequential"])
    assert code == 2 and "--offload sequential" in capsys.readouterr().err


def test_compile_cache_defaults_under_home_and_respects_the_variable(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setattr(speedups, "DEFAULT_CACHE_DIR", tmp_path / "default")
    assert speedups.configure_cache() == tmp_path / "default"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert speedups.configure_cache() == tmp_path / "mine" and (tmp_path / "mine").is_dir()
    import torch._inductor.config as inductor_config

    assert inductor_config.fx_graph_cache is True


def test_channels_last_gives_the_same_images_up_to_rounding(tmp_path, monkeypatch, tiny_ckpt):
    plain, _ = _run(tmp_path, monkeypatch, tiny_ckpt, "plain")
    nhwc, m = _run(tmp_path, monkeypatch, tiny_ckpt, "nhwc", "--channels_last")
    assert m["settings"]["channels_last"] is True
    for a, b in zip(plain, nhwc):
        assert np.abs(a - b).max() <= 2 and np.abs(a - b).mean() < 0.05


@pytest.mark.slow
def test_inductor_compile_gives_the_eager_images_within_float_tolerance(tmp_path, monkeypatch, tiny_ckpt):
    """The real thing (Inductor's C++ code generation): about 3 minutes cold on a 2-core CPU, ~20 s with a warm
    cache (~/.cache/microbatch/inductor, or TORCHINDUCTOR_CACHE_DIR)."""
    eager, _ = _run(tmp_path, monkeypatch, tiny_ckpt, "eager")
    compiled, m = _run(tmp_path, monkeypatch, tiny_ckpt, "compiled", "--compile")
    assert m["compile_s"] > 0
    for a, b in zip(eager, compiled):
        assert np.abs(a - b).max() <= 2 and np.abs(a - b).mean() < 0.05


def test_time_embedding_without_host_sync_is_bit_identical(tiny_model, monkeypatch):
    """The per-row time embedding (used on GPUs and under torch.compile, where torch.unique would synchronise or
    break the graph) gives the bits of the torch.unique path for a batch sharing its timestep."""
    import ldm.modules.diffusionmodules.openaimodel as om

    unet = tiny_model.model.diffusion_model
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 77, unet.context_dim, generator=g)
    t = torch.full((3,), 421.5)
    with torch.no_grad():
        ref = unet(x, t, context=context)
        monkeypatch.setattr(om, "_distinct_on_host", lambda t: False)
        per_row = unet(x, t, context=context)
        mixed = unet(x, torch.tensor([1.0, 500.0, 999.0]), context=context)
    assert torch.equal(ref, per_row)
    monkeypatch.undo()
    with torch.no_grad():
        assert torch.allclose(mixed, unet(x, torch.tensor([1.0, 500.0, 999.0]), context=context), atol=1e-5)


def test_flop_counter_and_roofline_shapes():
    lin = torch.nn.Linear(32, 16)
    assert count_flops(lambda: lin(torch.randn(10, 32))) == {"addmm": 2 * 10 * 32 * 16}
    conv = OpShape("conv3x3", "", 2, 320, 320, 64)
    assert conv.flops == 2 * 2 * 64 * 64 * 320 * 320 * 9
    shapes = unet_shapes(320, [1, 2, 4, 4], 64, 2)
    convs = [(s.k, s.side) for s in shapes if s.kind == "conv3x3"]
    assert convs == [(320, 64), (640, 32), (1280, 16), (1280, 8), (1280, 8)]
    assert any(s.kind == "gemm" and s.m == 2 * 4096 and s.n == 8 * 320 for s in shapes)  # GEGLU at 4096 tokens
    assert [categorize(n) for n in ("aten::mkldnn_convolution", "aten::addmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
                                    "aten::native_group_norm", "aten::silu", "aten::copy_", "aten::foo")] == [
        "convolution", "GEMM", "attention", "norms", "element-wise", "copies", "other"]


def test_full_size_unet_flops_counted_on_meta():
    """One guided 512x512 call of the SD v1 UNet, counted on the meta device: 1.607 TFLOP (diffusers' UNet counts the same)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("script_benchmark_flops", REPO / "scripts" / "benchmark.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses look the module up there
    try:
        spec.loader.exec_module(bench)
    finally:
        sys.modules.pop(spec.name, None)
    ctx = bench.Context(None, str(bench.V1_CONFIG), "cpu", 0, 0, 1)
    ours = bench.unet_gflop(ctx, 2, 64)
    assert ours == pytest.approx(1606.5, rel=1e-3)


def test_identical_prompts_are_encoded_once_per_run(tiny_ckpt, monkeypatch):
    """6 images of one prompt in micro-batches of 1: the text encoder runs once for the prompt and once for the
    (empty) negative prompt, not once per image or micro-batch."""
    pipe = Pipeline.from_checkpoint(tiny_ckpt, config=TINY[1], device="cpu", precision="full")
    import microbatch.engine as engine

    texts: list[str] = []
    real, real_long = pipe.model.get_learned_conditioning, engine.get_learned_conditioning

    def counting(c):
        texts.extend(c)
        return real(c)

    def counting_long(model, prompts, *args, **kwargs):
        texts.extend(prompts)
        return real_long(model, prompts, *args, **kwargs)

    monkeypatch.setattr(pipe.model, "get_learned_conditioning", counting)
    monkeypatch.setattr(engine, "get_learned_conditioning", counting_long)
    pipe.txt2img("a red circle", n=6, steps=2, width=64, height=64, max_batch_size=1)
    assert sorted(texts) == ["", "a red circle"]
