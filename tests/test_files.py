"""Files we write honour the umask: images and grids (tempfile.mkstemp creates 0600) and converted checkpoints
(safetensors creates 0600) get 0666 & ~umask, like the metrics JSON written with open()."""
from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import torch

from microbatch.files import current_umask, default_file_mode
from microbatch.images import save_grid, save_png_atomic
from tests.script_utils import load_script


@pytest.fixture(params=[0o022, 0o027, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_umask_is_read_back(umask):
    assert current_umask() == umask and default_file_mode() == 0o666 & ~umask
    assert current_umask() == umask  # reading it does not change it


def test_pngs_and_grids_get_the_umask_mode(tmp_path, umask):
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    png = save_png_atomic(image, tmp_path / "samples", 0, text={"parameters": "a cat"})
    grid = save_grid([image, image], tmp_path, 2)
    reference = tmp_path / "plain.txt"
    reference.write_text("metrics")
    assert mode(png) == mode(grid) == mode(reference) == 0o666 & ~umask
    assert not [p for p in (tmp_path / "samples").iterdir() if p.name.startswith(".partial")]


def test_converted_checkpoint_gets_the_umask_mode(tmp_path, tiny_ckpt, umask):
    convert = load_script("convert_checkpoint")
    dst = tmp_path / "out.safetensors"
    assert convert.main([str(tiny_ckpt), str(dst)]) == 0
    assert mode(dst) == 0o666 & ~umask
    from safetensors.torch import load_file

    assert set(load_file(str(dst))) == set(torch.load(tiny_ckpt, weights_only=True)["state_dict"])
