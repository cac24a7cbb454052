"""scripts/benchmark.py's SDXL UNet case on the tiny SDXL base config: ours against diffusers' UNet2DConditionModel
(SDXL "text_time" added conditioning) on the same weights, and the SDXL plans (CPU, gpu-sdxl)."""
from __future__ import annotations

import json

import pytest
import torch

from tests.script_utils import REPO, registered_script

TINY_SDXL = str(REPO / "configs" / "tiny" / "tiny-sdxl-base.yaml")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def bench():
    with registered_script("benchmark", "script_benchmark_sdxl") as module:
        yield module


def test_sdxl_case_end_to_end_on_the_tiny_config(bench, tmp_path):
    """The whole command (planning, a case subprocess, the tables): both implementations on the same weights give
    the same output, with times, their ratio and peaks."""
    pytest.importorskip("diffusers")
    out = tmp_path / "bench"
    argv = ["--config", TINY_SDXL, "--random", "--cases", "sdxl", "--precision", "fp32", "--out", str(out),
            "--device", "cpu", "--repeats", "2", "--warmup", "0", "--threads", "1", "--resolutions", "32"]
    assert bench.main(argv) == 0
    rows = {r["impl"]: r for r in json.loads((out / "results.json").read_text())}
    ours, theirs = rows["ours"], rows["diffusers"]
    for r in (ours, theirs):
        assert r["status"] == "ok" and r["kind"] == "sdxl_unet" and r["resolution"] == 32 and r["rows"] == 2
        assert r["peak_mb"] >= r["weights_mb"] > 0 and r["transient_mb"] > 0 and len(r["times_s"]) == 2
    assert ours["weights_mb"] == theirs["weights_mb"]  # the same tensors
    assert ours["max_abs_diff"] < 1e-4  # same weights, same inputs (y against text_embeds + time_ids)
    assert all(r["cpu_s"] > 0 and len(r["cpu_times_s"]) == 2 for r in (ours, theirs))
    assert ours["time_ratio_vs_diffusers"] > 0 and len(ours["ratios"]) == 2 and ours["attn_peak_mb"] is not None


def test_sdxl_inputs_agree_and_the_checkpoint_path(bench, tmp_path):
    """In-process from a tiny SDXL checkpoint (the loader's path): the two outputs agree, and the label embedding
    does see the time ids (a y built from other sizes changes the output, so the comparison can fail)."""
    pytest.importorskip("diffusers")
    from safetensors.torch import save_file

    from ldm.util import instantiate_from_config, load_config

    with bench.params_on_meta():
        model = instantiate_from_config(load_config(TINY_SDXL).model)
    bench.fill_random_(model, seed=5)
    ckpt = tmp_path / "tiny-sdxl.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, ckpt)
    ctx = bench.Context(str(ckpt), TINY_SDXL, "cpu", repeats=0, warmup=0, threads=None, seed=3)
    rows = {r["impl"]: r for r in bench.run_case_here(bench.Case("sdxl_unet", "both", 32, precision="fp32"), ctx)}
    assert rows["ours"]["weights_mb"] == pytest.approx(sum(v.numel() * 4 for k, v in model.state_dict().items()
                                                           if k.startswith("model.diffusion_model.")) / 2**20, abs=0.01)
    assert rows["ours"]["max_abs_diff"] < 1e-4 and rows["ours"]["timing"].startswith("the measured run")

    # the label embedding sees the time ids: a y built from other sizes changes the output
    unet = bench.build_sdxl_unet(ctx, torch.float32)
    ids, outdim = bench.sdxl_time_ids(ctx, 64)
    assert ids == [64.0, 64.0, 0.0, 0.0, 64.0, 64.0] and outdim == 8
    from ldm.modules.diffusionmodules.util import timestep_embedding

    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, unet.context_dim)
    pooled = torch.randn(1, unet.adm_in_channels - 48)
    y = lambda ids: torch.cat([pooled, timestep_embedding(torch.tensor(ids), outdim).reshape(1, -1)], 1)  # noqa: E731
    with torch.no_grad():
        assert (unet(x, t, context=c, y=y(ids)) - unet(x, t, context=c, y=y([128.0] * 6))).abs().max() > 1e-3


def test_sdxl_plans(bench, capsys):
    parse = bench.build_parser().parse_args
    cpu = bench.plan_sdxl_cases(parse(["--cases", "sdxl", "--config", str(bench.SDXL_CONFIG)]), "cpu", peer=True)
    assert len(cpu) == 1 and cpu[0].kind == "sdxl_unet" and cpu[0].resolution == 1024 and cpu[0].batch == 1
    assert cpu[0].precision in ("bf16", "fp32") and cpu[0].attention == "sdpa" and cpu[0].impl == "both"
    gpu = bench.plan_sdxl_cases(parse(["--cases", "gpu-sdxl", "--dry_run"]), "cpu", peer=True)
    assert [(c.precision, c.attention, c.batch, c.resolution) for c in gpu] == [("fp16", "sdpa", 1, 1024)]
    assert bench.plan_sdxl_cases(parse(["--cases", "gpu-sdxl"]), "cuda", peer=True) == gpu
    tiny = bench.plan_sdxl_cases(parse(["--config", TINY_SDXL, "--precision", "fp32,bf16", "--batch", "1,2"]), "cpu", peer=False)
    assert {(c.resolution, c.precision, c.batch, c.impl) for c in tiny} == {(64, p, b, "ours") for p in ("fp32", "bf16") for b in (1, 2)}
    assert bench.is_sdxl_config(TINY_SDXL) and not bench.is_sdxl_config(str(bench.V1_CONFIG))

    # the preset picks the SDXL config; the dry run shows the CUDA plan on a CPU machine
    assert bench.main(["--cases", "gpu-sdxl", "--dry_run", "--device", "cpu"]) == 0
    shown = capsys.readouterr().out
    assert "sd_xl_base.yaml" in shown and "'precision': 'fp16'" in shown and "'kind': 'sdxl_unet'" in shown
    # one-line errors, exit 2: the CUDA plan without CUDA, kinds the SDXL cases do not have
    assert bench.main(["--cases", "gpu-sdxl", "--device", "cpu"]) == 2
    assert "use --device cuda" in capsys.readouterr().err
    assert bench.main(["--config", TINY_SDXL, "--kinds", "unet,vae", "--dry_run", "--device", "cpu"]) == 2
    assert "--kinds unet" in capsys.readouterr().err


@pytest.mark.parametrize("threads", [1, 2])
def test_groupnorm32_upcast_in_blocks_is_exact_and_smaller(threads):
    """GroupNorm32 upcasts a half input a block of groups at a time on the CPU: the same bits as the whole
    upcast (NCHW and channels-last, bf16 and fp16), and a lower peak than two float32 copies of the input."""
    from ldm.modules.diffusionmodules.util import GroupNorm32
    from microbatch.memory import PeakMemory

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        for dtype in (torch.bfloat16, torch.float16):
            norm = GroupNorm32(32, 192).to(dtype)
            with torch.no_grad():
                norm.weight.copy_(torch.randn(192, generator=g) * 0.5 + 1)
                norm.bias.copy_(torch.randn(192, generator=g) * 0.1)
            for channels_last in (False, True):
                x = (torch.randn(2, 192, 24, 24, generator=g) * 3 + 1).to(dtype)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.no_grad():
                    norm.upcast_bytes = 2**40
                    whole = norm(x)
                    norm.upcast_bytes = 20_000  # 4 groups (2 x 6 x 576 x 4 bytes = 27.6 kB each): 8 blocks
                    blocks = norm(x)
                assert torch.equal(whole, blocks) and blocks.dtype == dtype
                assert blocks.is_contiguous(memory_format=torch.channels_last) == channels_last
                reference = torch.nn.functional.group_norm(x.double(), 32, norm.weight.double(), norm.bias.double(), norm.eps)
                assert (blocks.double() - reference).abs().max() < 0.05
        x = torch.randn(2, 192, 64, 64, generator=g).to(torch.bfloat16)
        peaks = {}
        for budget in (2**40, 2**20):
            norm.upcast_bytes = budget
            with torch.no_grad(), PeakMemory(torch.device("cpu")) as meter:
                norm.to(torch.bfloat16)(x)
            peaks[budget] = meter.transient_bytes
        size = x.numel() * 2
        assert peaks[2**40] >= 3.9 * size  # two float32 copies (the upcast input and the output)
        assert peaks[2**20] <= size + 3 * 2**20  # bf16 output + one block's float32 copies
    finally:
        torch.set_num_threads(previous)
