"""Loading checkpoint files: formats, EMA, strict key checks with explained errors, refusal of code in pickles."""
from __future__ import annotations

import logging
import os
import pickle
import sys
import types
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import CheckpointError, ema_key, read_checkpoint
from ldm.util import load_model_from_config
from microbatch.loading import infer_config
from tests.conftest import REPO, TINY_CONFIG


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sb = b.state_dict()
    return all(torch.equal(v.float(), sb[k].float()) for k, v in a.state_dict().items())


def test_lightning_ckpt_bare_state_dict_safetensors_and_fp16(tmp_path, tiny_model, tiny_ckpt, caplog):
    caplog.set_level(logging.INFO)
    m = load_model_from_config(TINY_CONFIG, tiny_ckpt)
    assert _same_weights(m, tiny_model) and not m.training
    assert "Global Step: 1234" in caplog.text
    bare = tmp_path / "bare.pt"
    torch.save(tiny_model.state_dict(), bare)
    assert _same_weights(load_model_from_config(str(TINY_CONFIG), bare), tiny_model)
    from safetensors.torch import save_file

    half = tmp_path / "half.safetensors"
    save_file({k: v.half().contiguous() if v.is_floating_point() else v for k, v in tiny_model.state_dict().items()}, str(half))
    m16 = load_model_from_config(OmegaConf.load(TINY_CONFIG), half)
    p = m16.model.diffusion_model.out[2].weight
    assert p.dtype == torch.float32
    assert torch.equal(p, tiny_model.model.diffusion_model.out[2].weight.half().float())


def test_benign_extra_keys_are_ignored_and_missing_schedule_is_recomputed(tmp_path, tiny_model):
    sd = dict(tiny_model.state_dict())
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd["first_stage_model.loss.logvar"] = torch.zeros(())
    sd["model_ema.decay"] = torch.tensor(0.9999)
    del sd["betas"], sd["alphas_cumprod"]
    path = tmp_path / "extra.ckpt"
    torch.save({"state_dict": sd}, path)
    m = load_model_from_config(TINY_CONFIG, path)
    assert torch.equal(m.alphas_cumprod, tiny_model.alphas_cumprod)


def test_use_ema_loads_ema_weights_into_the_unet(tmp_path, tiny_model):
    sd = dict(tiny_model.state_dict())
    unet_keys = [k for k in sd if k.startswith("model.diffusion_model.")]
    for k in unet_keys:
        sd[ema_key(k)] = sd[k] + 1.0
    sd["model_ema.num_updates"] = torch.tensor(10)
    path = tmp_path / "full-ema.ckpt"
    torch.save({"state_dict": sd}, path)
    plain = load_model_from_config(TINY_CONFIG, path)  # config says use_ema: False -> training weights
    assert _same_weights(plain, tiny_model)
    ema = load_model_from_config(TINY_CONFIG, path, use_ema=True)
    w = "model.diffusion_model.input_blocks.0.0.weight"
    assert torch.equal(ema.state_dict()[w], tiny_model.state_dict()[w] + 1.0)
    assert ema_key(w) == "model_ema.diffusion_modelinput_blocks00weight"


def test_missing_weights_are_counted_and_listed(tmp_path, tiny_model):
    sd = {k: v for k, v in tiny_model.state_dict().items() if not k.startswith("first_stage_model.decoder.")}
    path = tmp_path / "novae.ckpt"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as e:
        load_model_from_config(TINY_CONFIG, path)
    n = sum(1 for k in tiny_model.state_dict() if k.startswith("first_stage_model.decoder."))
    assert f"{n} weights missing ({n} VAE)" in str(e.value)
    assert "first_stage_model.decoder.conv_in" in str(e.value)


def test_wrong_shapes_name_the_family(tmp_path, tiny_model):
    sd = dict(tiny_model.state_dict())
    for k in list(sd):
        if "attn2.to_k" in k or "attn2.to_v" in k:
            sd[k] = torch.zeros(sd[k].shape[0], 1024)
    path = tmp_path / "sd2ish.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    with pytest.raises(CheckpointError, match=r"wrong shape.*Stable Diffusion 2\.x"):
        load_model_from_config(TINY_CONFIG, path)


def test_missing_empty_and_truncated_files(tmp_path, tiny_ckpt, tiny_ckpt_with_yaml):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        read_checkpoint(tmp_path / "nope.ckpt")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        read_checkpoint(tmp_path / "empty.ckpt")
    for src, name in ((tiny_ckpt, "cut.ckpt"), (tiny_ckpt_with_yaml, "cut.safetensors")):
        data = Path(src).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match="truncated or corrupted"):
            read_checkpoint(tmp_path / name)
    (tmp_path / "garbage.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        read_checkpoint(tmp_path / "garbage.safetensors")


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_a_command_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Evil(str(marker))}, path)
    with pytest.raises(CheckpointError, match="unpickling it would run code"):
        read_checkpoint(path)
    assert not marker.exists()
    # A legacy (non-zip) pickle file gets the same treatment.
    legacy = tmp_path / "evil_legacy.ckpt"
    with open(legacy, "wb") as f:
        pickle.dump({"payload": _Evil(str(marker))}, f)
    with pytest.raises(CheckpointError):
        read_checkpoint(legacy)
    assert not marker.exists()


def test_lightning_training_objects_become_inert_placeholders(tmp_path, tiny_model):
    """A real Lightning checkpoint pickles callback objects; their classes are not importable here."""
    mod = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __init__(self):
            self.best_model_path = "/somewhere"

    ModelCheckpoint.__module__ = mod.__name__
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    mod.ModelCheckpoint = ModelCheckpoint
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", mod.__name__]
    fakes = {n: types.ModuleType(n) for n in names[:2]}
    fakes[mod.__name__] = mod
    fakes["pytorch_lightning"].callbacks = fakes["pytorch_lightning.callbacks"]
    fakes["pytorch_lightning.callbacks"].model_checkpoint = mod
    assert not any(n in sys.modules for n in names)  # not installed: the loader must cope without it
    sys.modules.update(fakes)
    path = tmp_path / "lightning.ckpt"
    try:
        torch.save({"state_dict": tiny_model.state_dict(), "global_step": 470000, "callbacks": {"cb": ModelCheckpoint()}}, path)
    finally:
        for n in names:
            del sys.modules[n]
    sd, meta = read_checkpoint(path)
    assert meta["global_step"] == 470000 and len(sd) == len(tiny_model.state_dict())


def test_config_inferred_from_full_size_v1_shapes():
    from ldm.util import instantiate_from_config

    config = OmegaConf.load(REPO / "configs" / "stable-diffusion" / "v1-inference.yaml")
    with torch.device("meta"):
        sd = instantiate_from_config(config.model).state_dict()
    path, reason = infer_config(sd, Path("sd-v1-4.ckpt"))
    assert path.name == "v1-inference.yaml" and path.is_file() and "SD v1" in reason


def test_config_that_does_not_fit_is_explained(tmp_path, tiny_ckpt):
    config = OmegaConf.load(TINY_CONFIG)
    config.model.params.unet_config.params.model_channels = 64
    with pytest.raises(CheckpointError, match=r"does not fit the model config: \d+ weights have the wrong shape"):
        load_model_from_config(config, tiny_ckpt)


def test_convert_checkpoint_script(tmp_path, tiny_ckpt, tiny_model):
    from tests.script_utils import load_script

    convert = load_script("convert_checkpoint")
    out = tmp_path / "tiny.safetensors"
    assert convert.main([str(tiny_ckpt), str(out), "--half"]) == 0
    sd, _ = read_checkpoint(out)
    assert sd["model.diffusion_model.out.2.weight"].dtype == torch.float16
    assert convert.main([str(tiny_ckpt), str(out)]) == 2  # never overwrites
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Evil(str(tmp_path / "pwned"))}, evil)
    assert convert.main([str(evil), str(tmp_path / "evil.safetensors")]) == 2
    assert not (tmp_path / "pwned").exists()


def _reference_load(path: Path, fmt: str) -> dict[str, torch.Tensor]:
    """Yesterday's loader: the whole file read into memory, then load_state_dict."""
    from safetensors.torch import load_file

    raw = load_file(str(path)) if fmt == "safetensors" else torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    model = load_model_from_config(TINY_CONFIG, None)
    own = model.state_dict()
    model.load_state_dict({k: v for k, v in raw.items() if k in own}, strict=False)
    return model.state_dict()


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_streaming_load_gives_bit_identical_weights(tmp_path, tiny_model, fmt, dtype):
    """Memory-mapped reading and tensor-by-tensor copies give exactly the weights of a whole-file read."""
    from safetensors.torch import save_file

    sd = {k: (v.to(dtype) if v.is_floating_point() and k.startswith(("model.", "first_stage", "cond_stage")) else v).contiguous()
          for k, v in tiny_model.state_dict().items()}
    path = tmp_path / f"m.{fmt}"
    save_file(sd, str(path)) if fmt == "safetensors" else torch.save({"state_dict": sd}, path)
    mapped, _ = read_checkpoint(path)
    assert set(mapped) == set(sd) and all(torch.equal(mapped[k], sd[k]) for k in sd)
    got = load_model_from_config(TINY_CONFIG, path).state_dict()
    want = _reference_load(path, fmt)
    assert set(got) == set(want)
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)


def test_safetensors_offsets_outside_the_file_are_corruption(tmp_path):
    import json as _json

    from safetensors.torch import save_file

    save_file({"a": torch.ones(4, 4), "b": torch.zeros(8)}, str(tmp_path / "good.safetensors"))
    raw = (tmp_path / "good.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = _json.loads(raw[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"][1] += 4  # one tensor claims more bytes than its shape holds
    text = _json.dumps(header).encode()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        read_checkpoint(bad)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_copied_tensors_leave_the_resident_set(tmp_path):
    """PageReleaser drops a mapped tensor's file pages from RSS once it was copied; tensors in ordinary memory are
    left alone (their contents survive)."""
    from safetensors.torch import save_file

    from ldm.checkpoint import PageReleaser

    def rss_file_mb() -> float:
        for line in open("/proc/self/status"):
            if line.startswith("RssFile:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no RssFile")

    path = tmp_path / "big.safetensors"
    save_file({f"w{i}": torch.full((1024, 1024), float(i)) for i in range(16)}, str(path))  # 64 MB
    tensors, _ = read_checkpoint(path)
    before = rss_file_mb()
    assert sum(float(t.sum()) for t in tensors.values()) > 0  # every page touched
    touched = rss_file_mb()
    assert touched - before > 48
    release = PageReleaser([path])
    heap = torch.full((1024, 1024), 3.0)
    release(heap)
    assert torch.equal(heap, torch.full((1024, 1024), 3.0))
    for t in tensors.values():
        release(t)
    assert rss_file_mb() < touched - 48
    assert torch.equal(tensors["w5"], torch.full((1024, 1024), 5.0))  # read again from the page cache
