"""Textual-inversion embeddings on SDXL: the web UI's clip_l / clip_g files, each part in its own text encoder."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from microbatch.embeddings import load_embeddings, loaded_embeddings, read_embedding, text_encoders
from microbatch.engine import Engine
from tests.conftest import REPO, build_tiny

BASE = REPO / "configs" / "tiny" / "tiny-sdxl-base.yaml"
REFINER = REPO / "configs" / "tiny" / "tiny-sdxl-refiner.yaml"


@pytest.fixture(scope="module", params=["base", "refiner"])
def model(request) -> torch.nn.Module:
    return build_tiny(BASE if request.param == "base" else REFINER, seed=41).eval()


def _rows_of(encoder, text: str) -> torch.Tensor:
    ids = encoder.tokenizer.encode(text)
    return encoder.token_embedding_module().weight[ids].detach().clone()


def _file(model, path, text: str) -> None:
    parts = {part: _rows_of(encoder, text) for encoder, part in text_encoders(model)}
    parts.setdefault("clip_l", torch.zeros(len(next(iter(parts.values()))), 768))  # a refiner file still has both
    parts.setdefault("clip_g", torch.zeros(len(next(iter(parts.values()))), 1280))
    save_file({k: v.contiguous() for k, v in parts.items()}, str(path))


def _cond(model, prompt: str) -> dict:
    engine = Engine(model, torch.device("cpu"))
    return engine.prompt_schedule(prompt, 1)[0].cond


def test_an_embedding_of_token_rows_conditions_as_those_tokens(model, tmp_path):
    path = tmp_path / "redthing.safetensors"
    _file(model, path, "red circle")
    assert read_embedding(path).parts is not None
    assert load_embeddings(model, path) == ["redthing"]
    want, got = _cond(model, "a (red circle:1.2) on white"), _cond(model, "a (redthing:1.2) on white")
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)
    other = _cond(model, "a (blue square:1.2) on white")
    assert not torch.equal(other["crossattn"], got["crossattn"])
    loaded, _ = loaded_embeddings(model)
    assert loaded["redthing"].count == 2


def test_an_sd1_embedding_is_skipped_on_sdxl_with_a_warning(model, tmp_path, caplog):
    path = tmp_path / "oldstyle.pt"
    torch.save({"string_to_param": {"*": torch.randn(2, 768)}, "name": "oldstyle"}, path)
    assert load_embeddings(model, path) == []
    assert "oldstyle" in caplog.text and "SD 1.x / 2.x embedding" in caplog.text
    _, skipped = loaded_embeddings(model)
    assert "oldstyle" in skipped
    plain = _cond(model, "a oldstyle")
    for encoder, _ in text_encoders(model):
        assert "oldstyle" not in encoder.embeddings().entries
    assert plain["crossattn"].shape[0] == 77
