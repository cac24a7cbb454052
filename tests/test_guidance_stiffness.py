"""scripts/guidance_stiffness.py: its eigenvalue estimate against exact Gaussian models, its stability boundaries
against the textbook values, and the script end to end on a tiny random model."""
from __future__ import annotations

import pytest
import torch

from samplers import Denoiser, GuidedModel
from samplers.gaussian import GaussianModel, sd_alphas_cumprod
from tests.script_utils import load_script

ACP = sd_alphas_cumprod()


@pytest.fixture(scope="module")
def gs():
    return load_script("guidance_stiffness")


def test_adams_bashforth_stability_boundaries(gs):
    # Real-axis stability intervals of AB1..AB4: -2, -1, -6/11, -3/10 (Hairer & Wanner, Solving ODEs II, III.3).
    for k, expected in {1: -2.0, 2: -1.0, 3: -6 / 11, 4: -0.3}.items():
        assert gs.ab_stability_boundary(k) == pytest.approx(expected, abs=2e-4)
    with pytest.raises(ValueError):
        gs.ab_stability_boundary(5)


def _pair(s_uncond: torch.Tensor, s_cond: torch.Tensor, scale: float) -> Denoiser:
    """Guided denoiser of two exact Gaussian models (data N(0, s^2) per coordinate): D' is diagonal with entries
    r_u + scale (r_c - r_u), r = s^2 / (s^2 + sigma^2)."""
    models = {"u": GaussianModel(s_uncond, ACP), "c": GaussianModel(s_cond, ACP)}
    guided = GuidedModel(lambda x, t, cond: models[cond].apply_model(x, t, 0.0), "c", "u", scale, split=True)
    return Denoiser(guided, ACP)


def test_dominant_eigenvalue_matches_the_exact_guided_jacobian(gs):
    g = torch.Generator().manual_seed(0)
    s_u = torch.rand(2, 4, 4, 4, generator=g, dtype=torch.float64) * 0.4 + 0.1
    s_c = s_u * torch.rand(2, 4, 4, 4, generator=g, dtype=torch.float64)
    # One coordinate per image that the prompt pins down (s_c << s_u): the dominant direction, with a clear gap.
    s_u[:, 0, 0, 0], s_c[:, 0, 0, 0] = torch.tensor([2.0, 1.5]), 0.05
    x = torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64)
    for sigma, scale in [(0.5, 2.0), (1.5, 7.5), (5.0, 3.0)]:
        den = _pair(s_u, s_c, scale)
        r_u, r_c = s_u**2 / (s_u**2 + sigma**2), s_c**2 / (s_c**2 + sigma**2)
        eig = (r_u + scale * (r_c - r_u)).flatten(1)
        expected = eig.gather(1, eig.abs().argmax(dim=1, keepdim=True)).squeeze(1)
        got = gs.dominant_eigenvalue(lambda y: den(y, sigma), x, iters=60)
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6), (sigma, scale, got, expected)


def test_script_prints_a_row_per_step_and_rejects_bad_input(gs, tiny_ckpt, capsys):
    from tests.conftest import TINY_CONFIG

    argv = ["--ckpt", str(tiny_ckpt), "--config", str(TINY_CONFIG), "--prompt", "a cat", "--steps", "4", "--iters", "2"]
    assert gs.main(argv) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.strip() and line.split()[0].isdigit()]
    assert len(rows) == 4 and "4-step -0.300" in out, out
    assert gs.main(argv + ["--steps", "0"]) == 2
    assert gs.main(["--ckpt", "missing.ckpt"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err), err
