"""The micro-batched engine: batch-independent per-image seeds, out-of-memory back-off, the half-precision VAE
fallback, attention backends and sliced attention memory."""
from __future__ import annotations

import logging

import pytest
import torch
from PIL import Image

from ldm.modules.attention_backends import AttentionBackend, attention_math, resolve_backend
from microbatch.engine import Engine, ImageJob, SamplingSettings
from tests.script_utils import REPO, load_script

CPU = torch.device("cpu")


def run_engine(model, seed, n, batch, **settings):
    engine = Engine(model, CPU)
    jobs = [ImageJob(i, "a red circle", seed + i) for i in range(n)]
    out = []
    kw = dict(steps=4, height=64, width=64, max_batch_size=batch)
    kw.update(settings)
    engine.run(jobs, SamplingSettings(**kw), out.extend)
    return out


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 1.0), ("plms", 0.0)])
def test_image_depends_on_its_seed_not_on_batching(tiny_model, sampler, eta):
    a = run_engine(tiny_model, 42, 6, 2, sampler=sampler, eta=eta)
    b = run_engine(tiny_model, 42, 6, 6, sampler=sampler, eta=eta)
    c = run_engine(tiny_model, 45, 1, 1, sampler=sampler, eta=eta)
    assert [d.job.seed for d in a] == list(range(42, 48))
    assert torch.equal(a[3].latent, b[3].latent) and torch.equal(a[3].latent, c[0].latent)
    assert torch.equal(a[3].image, c[0].image)
    assert not torch.equal(a[2].latent, a[3].latent)


@pytest.fixture(scope="module")
def demo_model():
    from microbatch.devices import Dtypes
    from microbatch.loading import demo_checkpoint, load_model

    full = Dtypes(torch.float32, torch.float32, torch.float32)
    return load_model(demo_checkpoint(), None, CPU, full, is_demo=True).model


def test_every_micro_batch_size_gives_the_same_demo_images(demo_model):
    """The demo model in float32 on the CPU: micro-batches of 8 (16 UNet rows, where oneDNN switched convolution
    kernels and 3 of 8 images moved by one pixel level) and of odd sizes equal micro-batch 1 bit for bit."""
    prompts = ["a red circle on a blue background", "a green square on a white background"]

    def run(batch, **kw):
        jobs = [ImageJob(i, prompts[i % 2], 100 + i) for i in range(8)]
        out = []
        settings = SamplingSettings(steps=6, height=64, width=64, guidance_scale=2.0, max_batch_size=batch, **kw)
        Engine(demo_model, CPU).run(jobs, settings, out.extend)
        return out

    reference = run(1)
    for batch in (8, 3, 5):
        out = run(batch)
        assert [d.job.index for d in out] == list(range(8))
        assert all(torch.equal(a.latent, r.latent) for a, r in zip(out, reference)), f"micro-batch {batch}"
        assert all(torch.equal(a.image, r.image) for a, r in zip(out, reference)), f"micro-batch {batch}"
    split = run(8, split_guidance=True)
    assert all(torch.equal(a.latent, r.latent) for a, r in zip(split, reference))


def test_rowwise_conv_matches_a_plain_conv_row_by_row():
    from ldm.modules.diffusionmodules.util import RowwiseConv2d, conv_nd

    conv = conv_nd(2, 64, 128, 3, padding=1)
    assert isinstance(conv, RowwiseConv2d) and set(conv.state_dict()) == {"weight", "bias"}
    x = torch.randn(16, 64, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        rows = torch.cat([conv(x[i : i + 1]) for i in range(16)])
        assert torch.equal(conv(x), rows)
        assert torch.allclose(conv(x), torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=1), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rowwise_conv_as_a_product_matches_the_convolution_and_is_batch_invariant(dtype):
    """Large kernels at small sizes (the deep levels' 1280-channel 3x3 convolutions, >= 8 M weights) and pointwise
    kernels run as matrix products: the convolution's values within rounding, every row the same bits in any batch,
    in both layouts (a channels-last pointwise input gives a channels-last result)."""
    from ldm.modules.diffusionmodules.util import RowwiseConv2d

    g = torch.Generator().manual_seed(0)
    cases = [  # (conv, input side, product expected)
        (RowwiseConv2d(1024, 1024, 3, padding=1), 8, True),
        (RowwiseConv2d(1024, 1024, 3, stride=2, padding=1), 16, True),  # a downsampler: 8x8 out
        (RowwiseConv2d(1024, 1024, 3, padding=1, bias=False), 12, True),
        (RowwiseConv2d(1024, 1024, 3, padding=1), 32, False),  # 32x32: oneDNN's convolution is faster
        (RowwiseConv2d(256, 256, 3, padding=1), 8, False),  # small weights: the convolution
        (RowwiseConv2d(96, 48, 1), 16, True),
        (RowwiseConv2d(96, 48, 1, bias=False), 16, True),
    ]
    for conv, side, product in cases:
        conv = conv.to(dtype).requires_grad_(False)
        with torch.no_grad():
            for p in conv.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / (p[0].numel() ** 0.5))
        x = torch.randn(3, conv.in_channels, side, side, generator=g).to(dtype)
        assert conv._as_gemm(x[:1]) == product, (conv, side)
        for layout in (torch.contiguous_format, torch.channels_last):
            xl = x.contiguous(memory_format=layout)
            with torch.no_grad():
                out = conv(xl)
                reference = torch.nn.functional.conv2d(x.float(), conv.weight.float(), None if conv.bias is None else conv.bias.float(), conv.stride, conv.padding)
                for i in range(3):
                    assert torch.equal(conv(xl[i : i + 1]), out[i : i + 1])
                assert torch.equal(conv(xl[1:]), out[1:])
            tolerance = 1e-4 if dtype == torch.float32 else 5e-2
            assert torch.allclose(out.float(), reference, atol=tolerance), (conv, side, (out.float() - reference).abs().max())
            pointwise_channels_last = product and conv.kernel_size == (1, 1) and layout == torch.channels_last
            assert out.is_contiguous(memory_format=torch.channels_last) == pointwise_channels_last or out.is_contiguous()


def test_rowwise_linear_matches_plain_products_image_by_image():
    """At the full-size v1 UNet's feed-forward shape (K = 5120 -> 1280, 256 tokens per image) the BLAS gave one
    image 2.2e-8 apart between batches of 2 and 4 rows; one product per image makes them equal."""
    from ldm.modules.diffusionmodules.util import RowwiseLinear, linear

    layer = linear(5120, 1280)
    assert isinstance(layer, RowwiseLinear) and set(layer.state_dict()) == {"weight", "bias"}
    x = torch.randn(4, 256, 5120, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        alone = [layer(x[i : i + 1]) for i in range(4)]
        for batch in (2, 3, 4):
            assert torch.equal(layer(x[:batch]), torch.cat(alone[:batch])), f"batch {batch}"
        assert torch.allclose(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias), atol=1e-5)
        vectors = torch.randn(5, 5120, generator=torch.Generator().manual_seed(1))  # [U, C]: one product per row
        assert torch.equal(layer(vectors), torch.cat([layer(vectors[i : i + 1]) for i in range(5)]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_geglu_halves_match_the_whole_projection_and_hold_half_the_memory(dtype):
    """Without gradients GEGLU multiplies by its weight's two halves and works in place: the products are the same
    bits as the whole projection's halves, the result the same values (the contiguous gate's GELU may differ in
    the last bit in float32), images stay batch-invariant, and the layer allocates two [.., dim_out] tensors, not
    four. With gradients, or with a hook on `proj`, it calls `proj` as before."""
    from ldm.modules.attention import GEGLU
    from microbatch.memory import PeakMemory

    torch.manual_seed(0)
    layer = GEGLU(64, 256).to(dtype)
    x = torch.randn(3, 512, 64, dtype=dtype)

    def whole(inp):
        a, gate = torch.nn.functional.linear(inp, layer.proj.weight, layer.proj.bias).chunk(2, dim=-1)
        return a * torch.nn.functional.gelu(gate.contiguous())

    with torch.no_grad():
        out = layer(x)
        expected = torch.cat([whole(x[i : i + 1]) for i in range(3)])
        assert torch.equal(out, expected)  # same products per image, same contiguous GELU
        halves = [layer.proj(x[i : i + 1]).chunk(2, -1) for i in range(3)]  # the old layer: GELU of the strided half
        strided = torch.cat([a * torch.nn.functional.gelu(gate) for a, gate in halves])
        assert torch.allclose(out.float(), strided.float(), rtol=0, atol=1e-6 if dtype == torch.float32 else 0)
        for batch in (1, 2):
            assert torch.equal(layer(x[:batch]), out[:batch])
        result_bytes = out.numel() * out.element_size()
        with PeakMemory(CPU) as peak:
            layer(x)
        assert peak.transient_bytes <= 2 * result_bytes + 2**16, (peak.transient_bytes, result_bytes)

        handle = layer.proj.register_forward_hook(lambda m, inp, o: o * 0)
        try:
            assert torch.equal(layer(x), torch.zeros_like(out))
        finally:
            handle.remove()
    x.requires_grad_(True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.proj.weight.grad is not None


def test_every_unet_linear_and_conv_is_batch_invariant():
    from omegaconf import OmegaConf

    from ldm.modules.diffusionmodules.util import RowwiseConv2d, RowwiseLinear
    from ldm.util import instantiate_from_config

    for config in ("configs/stable-diffusion/v1-inference.yaml", "configs/sdxl/sd_xl_base.yaml"):
        cfg = OmegaConf.load(REPO / config)
        unet_cfg = cfg.model.params.get("unet_config") or cfg.model.params.network_config
        with torch.device("meta"):
            unet = instantiate_from_config(unet_cfg)
        kinds = {type(m).__name__ for m in unet.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
        assert kinds == {RowwiseLinear.__name__, RowwiseConv2d.__name__}, (config, kinds)


def test_script_level_batch_invariance_bit_identical_pngs(tmp_path, monkeypatch, tiny_ckpt):
    monkeypatch.chdir(tmp_path)
    txt2img = load_script("txt2img")
    common = ["--prompt", "a cat", "--n_iter", "1", "--H", "64", "--W", "64", "--ckpt", str(tiny_ckpt), "--ddim_steps", "3",
              "--precision", "full", "--quiet", "--device", "cpu", "--skip_grid", "--config", str(REPO / "configs" / "tiny" / "tiny-v1.yaml")]
    assert txt2img.main(common + ["--seed", "42", "--n_samples", "6", "--max_batch_size", "2", "--outdir", "a"]) == 0
    assert txt2img.main(common + ["--seed", "42", "--n_samples", "6", "--max_batch_size", "6", "--outdir", "b"]) == 0
    assert txt2img.main(common + ["--seed", "45", "--n_samples", "1", "--outdir", "c"]) == 0
    pixels = [Image.open(tmp_path / d / "samples" / name).tobytes() for d, name in (("a", "00003.png"), ("b", "00003.png"), ("c", "00000.png"))]
    assert pixels[0] == pixels[1] == pixels[2]
    assert "Seed: 45" in Image.open(tmp_path / "a" / "samples" / "00003.png").info["parameters"]


def test_fixed_code_reuses_noise_across_iterations(tiny_model):
    from microbatch.cli import build_parser, make_plan

    args = build_parser("txt2img", "").parse_args(["--n_samples", "2", "--n_iter", "3", "--fixed_code", "--seed", "7"])
    args.sampler, args.prompts = "ddim", None
    plan = make_plan(args, "txt2img", 64, 64)
    assert [j.seed for j in plan.jobs] == [7, 8, 7, 8, 7, 8]
    args.fixed_code = False
    assert [j.seed for j in make_plan(args, "txt2img", 64, 64).jobs] == [7, 8, 9, 10, 11, 12]


def test_out_of_memory_halves_the_micro_batch_and_loses_nothing(tiny_model, monkeypatch, caplog):
    reference = run_engine(tiny_model, 0, 5, 1)
    real = tiny_model.apply_model
    calls = []

    def flaky(x, t, cond):
        calls.append(x.shape[0])
        if x.shape[0] > 2:  # more than one image (2 rows with guidance) "does not fit"
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB")
        return real(x, t, cond)

    monkeypatch.setattr(tiny_model, "apply_model", flaky)
    engine = Engine(tiny_model, CPU)
    jobs = [ImageJob(i, "a red circle", i) for i in range(5)]
    done, changes = [], []
    caplog.set_level(logging.WARNING)
    final = engine.run(jobs, SamplingSettings(steps=4, height=64, width=64, max_batch_size=4), done.extend, lambda a, b: changes.append((a, b)))
    assert final == 1 and changes == [(4, 2), (2, 1)]
    assert [d.job.index for d in done] == [0, 1, 2, 3, 4]
    assert all(torch.equal(d.latent, r.latent) for d, r in zip(done, reference))
    assert "out of memory" in caplog.text


CPU_ALLOCATOR_FAILURE = (
    "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to allocate "
    "26843545600 bytes. Error code 12 (Cannot allocate memory)"
)


@pytest.mark.parametrize("make_error", [lambda: RuntimeError(CPU_ALLOCATOR_FAILURE), lambda: MemoryError()], ids=["cpu_allocator", "MemoryError"])
def test_cpu_out_of_memory_also_halves_the_micro_batch(tiny_model, monkeypatch, make_error):
    reference = run_engine(tiny_model, 0, 3, 1)
    real = tiny_model.apply_model

    def flaky(x, t, cond):
        if x.shape[0] > 2:
            raise make_error()
        return real(x, t, cond)

    monkeypatch.setattr(tiny_model, "apply_model", flaky)
    done, changes = [], []
    jobs = [ImageJob(i, "a red circle", i) for i in range(3)]
    final = Engine(tiny_model, CPU).run(jobs, SamplingSettings(steps=4, height=64, width=64, max_batch_size=3), done.extend, lambda a, b: changes.append((a, b)))
    assert final == 1 and changes == [(3, 1)]
    assert all(torch.equal(d.latent, r.latent) for d, r in zip(done, reference))


def test_is_out_of_memory_recognises_allocation_failures_only():
    from microbatch.devices import is_out_of_memory

    for error in (
        RuntimeError(CPU_ALLOCATOR_FAILURE),
        RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB, other allocations: 1.00 GB)"),
        RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB"),
        MemoryError(),
    ):
        assert is_out_of_memory(error), error
    for error in (
        RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"),
        RuntimeError("Storage size calculation overflowed with sizes=[4611686018427387904]"),
        ValueError("can't allocate memory"),  # not an allocation failure of torch's
        KeyboardInterrupt(),
    ):
        assert not is_out_of_memory(error), error


def test_half_precision_vae_nan_falls_back_to_float32_once(tiny_model, caplog):
    import copy

    model = copy.deepcopy(tiny_model)
    model.first_stage_model.to(torch.bfloat16)
    real_decode = model.first_stage_model.decoder.forward

    def overflowing(z):
        out = real_decode(z)
        return out * float("nan") if out.dtype != torch.float32 else out

    model.first_stage_model.decoder.forward = overflowing
    engine = Engine(model, CPU)
    caplog.set_level(logging.WARNING)
    images = engine.decode(torch.randn(2, 4, 8, 8))
    assert torch.isfinite(images).all() and images.dtype == torch.float32
    assert model.first_stage_model.post_quant_conv.weight.dtype == torch.float32
    assert caplog.text.count("decoding in float32") == 1


@pytest.mark.parametrize("shape", [(2, 8, 300, 40), (1, 1, 4096 // 16, 64), (3, 5, 77, 16)])
def test_attention_backends_agree_with_math(shape):
    g = torch.Generator().manual_seed(0)
    b, h, n, d = shape
    q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
    k_ctx = torch.randn(b, h, 77, d, generator=g)
    ref = attention_math(q, k, v)
    ref_x = attention_math(q, k_ctx, k_ctx)
    for backend in (resolve_backend("sdpa"), resolve_backend("sliced"), resolve_backend("auto", "max"), resolve_backend("auto", "3"), AttentionBackend("sliced", 2, 4096)):
        assert torch.allclose(backend(q, k, v), ref, atol=1e-5, rtol=1e-4)
        assert torch.allclose(backend(q, k_ctx, k_ctx), ref_x, atol=1e-5, rtol=1e-4)


def test_sliced_attention_never_holds_the_whole_score_matrix(monkeypatch):
    """At 512x512 SD v1 self-attention is 4096 x 4096 per head; the sliced backend keeps each score block under
    its budget (default 16 MB), so the attention score memory of a UNet call stays under 64 MB."""
    import ldm.modules.attention_backends as ab

    largest = []
    real = ab.attention_math

    def spy(q, k, v):
        largest.append(q.shape[0] * q.shape[1] * k.shape[1] * 4 if q.dim() == 3 else q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * 4)
        return real(q, k, v)

    monkeypatch.setattr(ab, "attention_math", spy)
    q = torch.randn(2, 8, 4096, 8)  # 2 rows (uncond, cond) x 8 heads at 64x64 latents; small head dim for speed
    resolve_backend("auto", "auto")(q, q, q)
    assert largest and max(largest) <= 16 * 2**20
    assert 2 * 8 * 4096 * 4096 * 4 > 64 * 2**20  # the unsliced matrix would be 1 GiB


def test_invalid_slicing_values_are_rejected():
    for bad in ("0", "-3", "lots"):
        with pytest.raises(ValueError, match="attention_slicing"):
            resolve_backend("auto", bad)
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("flash3")


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("euler_a", 1.0), ("dpmpp_2m_sde", 1.0)])
def test_img2img_at_strength_one_equals_txt2img_from_the_same_seed(tiny_model, sampler, eta):
    """The README's promise: strength 1.0 starts from pure noise, so the init image must not change the result,
    for deterministic and stochastic samplers alike (the posterior sample has a generator of its own)."""
    init = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        posterior = tiny_model.encode_first_stage(init)
    jobs = [ImageJob(i, "a red circle", 7 + i) for i in range(3)]

    def run(init_posterior, strength):
        out = []
        settings = SamplingSettings(sampler=sampler, eta=eta, steps=5, height=64, width=64, max_batch_size=2, strength=strength)
        Engine(tiny_model, CPU, init_posterior=init_posterior).run(jobs, settings, out.extend)
        return out

    txt = run(None, None)
    img = run(posterior, 1.0)
    assert all(torch.equal(a.latent, b.latent) and torch.equal(a.image, b.image) for a, b in zip(img, txt))
    # Below strength 1 the init image matters, and each image is still a function of its seed alone.
    partial = run(posterior, 0.6)
    assert not torch.equal(partial[0].latent, txt[0].latent)
    single = []
    settings = SamplingSettings(sampler=sampler, eta=eta, steps=5, height=64, width=64, max_batch_size=1, strength=0.6)
    Engine(tiny_model, CPU, init_posterior=posterior).run(jobs[2:], settings, single.extend)
    assert torch.equal(single[0].latent, partial[2].latent)
