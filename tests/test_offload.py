"""Model and sequential offload, exercised on the CPU with `force=True`: the copies are real CPU-to-CPU copies, so
the bookkeeping (what is where, in which order) is observable, and outputs must be bit-identical."""
from __future__ import annotations

import copy
import logging

import pytest
import torch

from microbatch.engine import Engine, ImageJob, SamplingSettings
from microbatch.offload import apply_offload, components, offload_state, remove_offload, unet_blocks

CPU = torch.device("cpu")


@pytest.fixture()
def model(tiny_model):
    return copy.deepcopy(tiny_model)


def run(model, n=2, batch=1):
    engine = Engine(model, CPU)
    out = []
    engine.run([ImageJob(i, "a red circle", 10 + i) for i in range(n)], SamplingSettings(steps=2, height=64, width=64, max_batch_size=batch), out.extend)
    return out


def _is_staged(state, name):
    """True when every tensor of `name` is bound to its staging copy (nothing of it on the compute device)."""
    staged = state.staged[name]
    return all(staged._get(entry).data_ptr() == t.data_ptr() for entry, t in staged.tensors.items())


def test_cpu_only_is_a_no_op_without_force(model, caplog):
    caplog.set_level(logging.DEBUG, logger="microbatch.offload")
    for mode in ("model", "sequential"):
        assert apply_offload(model, mode, "cpu") is None
    assert apply_offload(model, "none", "cpu", force=True) is None
    assert offload_state(model) is None and "nothing to do" in caplog.text
    assert not any(m._forward_pre_hooks for m in model.modules())
    with pytest.raises(ValueError, match="offload mode"):
        apply_offload(model, "layers", "cpu")


def test_model_offload_keeps_one_component_resident_and_is_bit_identical(model, tiny_model):
    reference = run(tiny_model)
    state = apply_offload(model, "model", "cpu", force=True)
    assert state is not None and state.resident == []
    assert all(_is_staged(state, name) for name in ("text_encoder", "unet", "vae"))
    residency = []

    # Watch residency at every UNet and VAE call: exactly the component in use is loaded.
    def watch(name):
        def hook(*_):
            residency.append((name, list(state.resident), [n for n in state.staged if not _is_staged(state, n)]))
        return hook

    watchers = [components(model)["unet"].register_forward_hook(watch("unet")),
                components(model)["vae"].decoder.register_forward_hook(watch("vae"))]
    out = run(model)
    for w in watchers:
        w.remove()
    assert all(torch.equal(a.latent, b.latent) and torch.equal(a.image, b.image) for a, b in zip(out, reference))
    assert residency and all(resident == [name] and loaded == [name] for name, resident, loaded in residency)
    events = list(state.events)
    # text once (both prompts cached), then per micro-batch: UNet in (text out), VAE in (UNet out)
    assert events == [
        ("load", "text_encoder"),
        ("unload", "text_encoder"), ("load", "unet"), ("unload", "unet"), ("load", "vae"),
        ("unload", "vae"), ("load", "unet"), ("unload", "unet"), ("load", "vae"),
    ]
    assert state.peak_resident_bytes == max(s.nbytes for s in state.staged.values())
    remove_offload(model)
    assert offload_state(model) is None and not any(m._forward_pre_hooks for m in model.modules())
    again = run(model, n=1)
    assert torch.equal(again[0].latent, reference[0].latent)


def test_sequential_offload_streams_unet_blocks_in_call_order(model, tiny_model):
    reference = run(tiny_model, n=1)
    state = apply_offload(model, "sequential", "cpu", force=True)
    blocks = list(unet_blocks(model))
    assert blocks[0] == "unet.time_embed" and blocks[-1] == "unet.out" and "unet.middle_block" in blocks
    out = run(model, n=1)
    assert torch.equal(out[0].latent, reference[0].latent) and torch.equal(out[0].image, reference[0].image)
    events = list(state.events)
    unet_events = [e for e in events if e[1].startswith("unet.")]
    one_call = [(action, name) for name in blocks for action in ("load", "unload")]
    calls = len(unet_events) // len(one_call)
    assert calls == 2  # two DDIM steps, one guided call each
    assert unet_events == one_call * calls
    # the text encoder leaves before the first block comes in; the VAE comes in after the last block left
    first_block = events.index(("load", "unet.time_embed"))
    assert events[:first_block] == [("load", "text_encoder"), ("unload", "text_encoder")]
    assert events[-1] == ("load", "vae")
    # never more than one block's weights at once (and no component while a block runs)
    biggest_block = max(state.staged[name].nbytes for name in blocks)
    biggest_part = max(state.staged[name].nbytes for name in ("text_encoder", "vae"))
    assert state.peak_resident_bytes <= max(biggest_block, biggest_part)
    unet_total = sum(state.staged[name].nbytes for name in blocks)
    assert biggest_block < unet_total / 3
    remove_offload(model)


def test_restaged_after_dtype_change(model):
    """The engine's float32 VAE fallback calls `.float()` on the VAE: the offload must adopt the new weights."""
    model.first_stage_model.to(torch.bfloat16)
    state = apply_offload(model, "model", "cpu", force=True)
    model.first_stage_model.float()  # while staged
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        x = model.decode_first_stage(z)
    assert x.dtype == torch.float32
    assert all(t.dtype == torch.float32 for t in state.staged["vae"].tensors.values())
    remove_offload(model)
    assert model.first_stage_model.post_quant_conv.weight.dtype == torch.float32


def test_offload_twice_is_refused(model):
    apply_offload(model, "model", "cpu", force=True)
    with pytest.raises(ValueError, match="already installed"):
        apply_offload(model, "sequential", "cpu", force=True)
    remove_offload(model)
