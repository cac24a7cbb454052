"""Separate VAE files: given with `vae=` or found beside the checkpoint as `<stem>.vae.{pt,ckpt,safetensors}`."""
from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from ldm.checkpoint import CheckpointError
from ldm.checkpoint_layouts import load_vae_file
from ldm.util import load_model_from_config
from microbatch.devices import Dtypes
from microbatch.loading import LoadedModel, check_vae_path, find_vae_beside, load_model
from tests.conftest import TINY_CONFIG, build_tiny

F32 = Dtypes(torch.float32, torch.float32, torch.float32)
CPU = torch.device("cpu")
VAE = "first_stage_model."


def _save(sd: dict[str, torch.Tensor], path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save({"state_dict": sd} if path.suffix == ".ckpt" else sd, path)
    return path


def _vae_part(model: torch.nn.Module, prefixed: bool) -> dict[str, torch.Tensor]:
    return {(k if prefixed else k[len(VAE):]): v for k, v in model.state_dict().items() if k.startswith(VAE)}


def _images(loaded: LoadedModel) -> torch.Tensor:
    """Decoded 8-bit images [2, 3, 64, 64] of fixed latents, as the scripts save them."""
    z = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        x = loaded.model.decode_first_stage(z)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _sha10(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:10]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_model) -> Path:
    return _save(tiny_model.state_dict(), tmp_path_factory.mktemp("vae") / "model.safetensors")


@pytest.fixture(scope="module")
def reference(ckpt) -> torch.Tensor:
    return _images(load_model(ckpt, TINY_CONFIG, CPU, F32))


def test_own_vae_alone_gives_identical_images(tmp_path, tiny_model, ckpt, reference, caplog):
    sd = dict(tiny_model.state_dict())
    files = {
        "bare.pt": _vae_part(tiny_model, prefixed=False),
        "prefixed.safetensors": _vae_part(tiny_model, prefixed=True),
        # a VAE file with its training bookkeeping, as vae-ft-mse-840000-ema-pruned.ckpt
        "bookkeeping.ckpt": {**_vae_part(tiny_model, prefixed=False), "loss.logvar": torch.zeros(()),
                             "loss.discriminator.main.0.weight": torch.zeros(8, 3, 4, 4), "model_ema.decay": torch.tensor(0.999),
                             "model_ema.num_updates": torch.tensor(5)},
        "full.ckpt": {**sd, "first_stage_model.loss.logvar": torch.zeros(())},  # a full checkpoint as the VAE source
    }
    caplog.set_level(logging.INFO)
    for name, content in files.items():
        path = _save(content, tmp_path / name)
        loaded = load_model(ckpt, TINY_CONFIG, CPU, F32, vae=path)
        assert torch.equal(_images(loaded), reference), name
        assert loaded.vae_path == path and loaded.vae_name == name and loaded.vae_hash == _sha10(path)
    assert "VAE weights from" in caplog.text
    plain = load_model(ckpt, TINY_CONFIG, CPU, F32)
    assert plain.vae_path is None and plain.vae_hash is None and plain.vae_name is None
    assert plain.model_hash == _sha10(ckpt)


def test_a_different_vae_changes_the_decode_to_its_own(tmp_path, ckpt, reference):
    other = build_tiny(seed=5)
    path = _save(_vae_part(other, prefixed=False), tmp_path / "other.safetensors")
    loaded = load_model(ckpt, TINY_CONFIG, CPU, F32, vae=path)
    images = _images(loaded)
    assert (images.int() - reference.int()).abs().max() > 20
    # the decode is the other model's, bit for bit; the rest of the model is the checkpoint's
    assert torch.equal(images, _images(LoadedModel(other, None, None, "", F32, 0.0)))
    assert torch.equal(loaded.model.model.diffusion_model.out[2].weight, load_model(ckpt, TINY_CONFIG, CPU, F32).unet.out[2].weight)


@pytest.mark.parametrize("suffix", [".vae.pt", ".vae.ckpt", ".vae.safetensors"])
def test_vae_beside_the_checkpoint_is_picked_up(tmp_path, tiny_model, ckpt, reference, caplog, suffix):
    folder = tmp_path / "models"
    folder.mkdir()
    model_file = shutil.copy(ckpt, folder / "model.safetensors")
    beside = _save(_vae_part(tiny_model, prefixed=suffix == ".vae.ckpt"), folder / f"model{suffix}")
    assert find_vae_beside(Path(model_file)) == beside
    caplog.set_level(logging.INFO)
    loaded = load_model(Path(model_file), TINY_CONFIG, CPU, F32)
    assert loaded.vae_path == beside and loaded.vae_hash == _sha10(beside)
    assert f"using the VAE beside the checkpoint: {beside}" in caplog.text
    assert torch.equal(_images(loaded), reference)
    # ... and it is really used: a different VAE beside the checkpoint changes the images.
    _save(_vae_part(build_tiny(seed=5), prefixed=False), beside)
    assert not torch.equal(_images(load_model(Path(model_file), TINY_CONFIG, CPU, F32)), reference)
    off = load_model(Path(model_file), TINY_CONFIG, CPU, F32, vae_beside=False)
    assert off.vae_path is None and torch.equal(_images(off), reference)


def test_beside_order_follows_the_web_ui(tmp_path):
    ckpt = tmp_path / "m.ckpt"
    assert find_vae_beside(ckpt) is None
    for suffix in (".vae.safetensors", ".vae.ckpt", ".vae.pt"):
        (tmp_path / f"m{suffix}").write_bytes(b"x")
        assert find_vae_beside(ckpt) == tmp_path / f"m{suffix}"
    (tmp_path / "m.pt").write_bytes(b"x")  # not a .vae. name: never taken
    assert find_vae_beside(tmp_path / "other.ckpt") is None


def test_vae_with_wrong_shapes_is_one_line(tmp_path, ckpt):
    config = OmegaConf.load(TINY_CONFIG)
    config.model.params.first_stage_config.params.ddconfig.ch = 64
    wide = load_model_from_config(config, None)
    path = _save(_vae_part(wide, prefixed=False), tmp_path / "wide.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_model(ckpt, TINY_CONFIG, CPU, F32, vae=path)
    message = str(e.value)
    assert message.startswith(f"VAE {path} does not fit the model's VAE: ") and "wrong shape" in message and "\n" not in message
    assert "encoder.conv_in.weight: file (64, 3, 3, 3) vs model (32, 3, 3, 3)" in message


def test_files_without_a_vae_are_refused_as_vae(tmp_path, tiny_model, ckpt):
    unet = {k: v for k, v in tiny_model.state_dict().items() if k.startswith("model.diffusion_model.")}
    cases = {
        "unet.safetensors": (unet, "holds no VAE weights (it is a UNet-only file"),
        "diffusers.safetensors": ({"encoder.down_blocks.0.resnets.0.conv1.weight": torch.zeros(1), "decoder.up_blocks.0.resnets.0.conv1.weight": torch.zeros(1)},
                                  "holds no VAE weights (it is a VAE in the diffusers layout"),
        "partial.pt": ({k: v for k, v in _vae_part(tiny_model, False).items() if not k.startswith("decoder.")}, "weights missing, e.g. decoder."),
    }
    for name, (content, expected) in cases.items():
        path = _save(content, tmp_path / name)
        with pytest.raises(CheckpointError) as e:
            load_model(ckpt, TINY_CONFIG, CPU, F32, vae=path)
        assert expected in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_check_vae_path(tmp_path):
    with pytest.raises(CheckpointError, match="VAE file not found: .*nope.pt"):
        check_vae_path(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="expected a .pt, .ckpt or .safetensors file"):
        check_vae_path(tmp_path / "vae.png")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="VAE file is empty"):
        check_vae_path(tmp_path / "empty.safetensors")
    (tmp_path / "folder.pt").mkdir()
    with pytest.raises(CheckpointError, match="VAE path is not a file"):
        check_vae_path(tmp_path / "folder.pt")
    (tmp_path / "ok.pt").write_bytes(b"x")
    assert check_vae_path(tmp_path / "ok.pt") == tmp_path / "ok.pt"


def test_checkpoint_without_vae_needs_one(tmp_path, tiny_model, reference):
    no_vae = _save({k: v for k, v in tiny_model.state_dict().items() if not k.startswith(VAE)}, tmp_path / "novae.safetensors")
    with pytest.raises(CheckpointError, match="holds no VAE: pass one with --vae"):
        load_model(no_vae, TINY_CONFIG, CPU, F32)
    vae = _save(_vae_part(tiny_model, prefixed=False), tmp_path / "the.vae.pt")
    assert torch.equal(_images(load_model(no_vae, TINY_CONFIG, CPU, F32, vae=vae)), reference)


def test_compvis_entry_point_and_loaded_model_swap(tmp_path, tiny_model, ckpt, reference):
    other = build_tiny(seed=5)
    path = _save(_vae_part(other, prefixed=True), tmp_path / "other.ckpt")
    model = load_model_from_config(TINY_CONFIG, ckpt, vae=path)
    swapped = load_model_from_config(TINY_CONFIG, ckpt)
    assert load_vae_file(swapped, path) == len(_vae_part(other, False))
    for m in (model, swapped):
        assert torch.equal(_images(LoadedModel(m, None, None, "", F32, 0.0)), _images(LoadedModel(other, None, None, "", F32, 0.0)))


def test_loaded_model_facade(ckpt):
    loaded = load_model(ckpt, TINY_CONFIG, CPU, F32)
    assert loaded.vae_factor == 8 and loaded.size_multiple == 16
    assert loaded.unet is loaded.model.model.diffusion_model
