"""Shared fixtures: tiny random-weight models in the original checkpoint layout, built by the tests."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny" / "tiny-v1.yaml"


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Give every parameter (zero-initialised output convs included) small random values, so that no layer is a
    no-op and parity tests exercise the whole network."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.dim() == 1:  # norm scales around 1
                p.copy_(1 + std * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model


def build_tiny(config: Path = TINY_CONFIG, seed: int = 0) -> torch.nn.Module:
    from ldm.util import load_model_from_config

    torch.manual_seed(seed)
    return randomize_(load_model_from_config(config, None), seed)


def save_tiny(config: Path, path: Path, seed: int = 0) -> Path:
    """build_tiny(config, seed) written to `path` as .safetensors, with no yaml beside it."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in build_tiny(config, seed=seed).state_dict().items()}, str(path))
    return path


def weights_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_weights_restored(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    """Every weight equals the snapshot `before`, bit for bit, and no LoRA is applied."""
    from microbatch.lora import applied_loras

    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert not changed, changed[:5]
    assert applied_loras(model) == []


@pytest.fixture(scope="session")
def tiny_model() -> torch.nn.Module:
    return build_tiny()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tiny_model) -> Path:
    """A tiny .ckpt in the Lightning layout ({"state_dict": ..., "global_step": N}) with no yaml beside it."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    torch.save({"state_dict": tiny_model.state_dict(), "global_step": 1234}, path)
    return path


@pytest.fixture(scope="session")
def tiny_ckpt_with_yaml(tmp_path_factory, tiny_model) -> Path:
    """The same weights as safetensors with the yaml beside them (the loader's second config source)."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("ckpt_yaml")
    path = folder / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_model.state_dict().items()}, str(path))
    shutil.copy(TINY_CONFIG, folder / "tiny.yaml")
    return path


@pytest.fixture(autouse=True)
def _single_thread(monkeypatch):
    # Tests are small; one thread avoids oversubscription on shared 2-core machines.
    torch.set_num_threads(int(os.environ.get("TEST_TORCH_THREADS", "1")))
    yield


# scripts/serve.py with the demo model on 127.0.0.1, started once per session for the test files that use it.
from tests.server_process import demo_server  # noqa: E402,F401 - a fixture
