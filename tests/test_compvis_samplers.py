"""DDIM and PLMS against a reference written here from the published equations (CompVis behaviour): uniform
timesteps range(0, 1000, 1000 // S) + 1, first previous alpha = alphas_cumprod[0], eta sigmas, one guided batch
[uncond, cond], PLMS's second evaluation on the first step and Adams-Bashforth after, img2img through
stochastic_encode / decode."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from samplers import DDIMSampler, PLMSSampler
from ldm.modules.diffusionmodules.util import make_ddim_timesteps


def reference(model, x_T, cond, uncond, S, scale, eta=0.0, plms=False, noises=None, timesteps=None):
    """CompVis DDIM/PLMS in float64, VP variables, written from the equations."""
    ac = model.alphas_cumprod.double()
    ts = np.arange(0, 1000, 1000 // S) + 1 if timesteps is None else timesteps
    a = ac[ts]
    a_prev = torch.cat([ac[:1], ac[ts[:-1]]])
    sig = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
    B = x_T.shape[0]

    def e_of(x, t):
        out = model.apply_model(torch.cat([x, x]).float(), torch.full((2 * B,), int(t)), torch.cat([uncond, cond])).double()
        e_u, e_c = out.chunk(2)
        return e_u + scale * (e_c - e_u)

    def step(x, e, idx, noise=None):
        pred_x0 = (x - (1 - a[idx]).sqrt() * e) / a[idx].sqrt()
        dir_xt = (1 - a_prev[idx] - sig[idx] ** 2).sqrt() * e
        x_prev = a_prev[idx].sqrt() * pred_x0 + dir_xt
        if noise is not None:
            x_prev = x_prev + sig[idx] * noise
        return x_prev

    x = x_T.double()
    old = []
    order = ts[::-1]
    for i, t in enumerate(order):
        idx = len(ts) - 1 - i
        e = e_of(x, t)
        if not plms:
            x = step(x, e, idx, None if noises is None else noises[i].double())
            continue
        t_next = order[min(i + 1, len(order) - 1)]
        if not old:
            e_prime = (e + e_of(step(x, e, idx), t_next)) / 2
        elif len(old) == 1:
            e_prime = (3 * e - old[-1]) / 2
        elif len(old) == 2:
            e_prime = (23 * e - 16 * old[-1] + 5 * old[-2]) / 12
        else:
            e_prime = (55 * e - 59 * old[-1] + 37 * old[-2] - 9 * old[-3]) / 24
        x = step(x, e_prime, idx)
        old = (old + [e])[-3:]
    return x


@pytest.fixture(scope="module")
def conds(tiny_model):
    with torch.no_grad():
        return tiny_model.get_learned_conditioning(["a red circle", "a blue square"]), tiny_model.get_learned_conditioning(["", ""])


def _rel(a, b):
    return float((a.double() - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("S", [10, 30])
@pytest.mark.parametrize("plms", [False, True])
def test_ddim_plms_match_reference_with_guidance(tiny_model, conds, S, plms):
    cond, uncond = conds
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(S))
    sampler = (PLMSSampler if plms else DDIMSampler)(tiny_model)
    samples, inter = sampler.sample(S, 2, (4, 8, 8), cond, x_T=x_T, unconditional_guidance_scale=7.5, unconditional_conditioning=uncond, verbose=False)
    ref = reference(tiny_model, x_T, cond, uncond, S, 7.5, plms=plms)
    assert samples.shape == (2, 4, 8, 8)
    assert _rel(samples, ref) < 2e-5
    # The same without guidance differs: the test sees the guidance.
    unguided, _ = sampler.sample(S, 2, (4, 8, 8), cond, x_T=x_T, verbose=False)
    assert _rel(unguided, ref) > 1e-2
    assert len(inter["pred_x0"]) >= 2


def test_ddim_grid_length_and_first_prev_alpha(tiny_model):
    sampler = DDIMSampler(tiny_model)
    sampler.make_schedule(30, verbose=False)
    assert len(sampler.ddim_timesteps) == 31 and sampler.ddim_timesteps[-1] == 991  # as the original
    assert float(sampler.ddim_alphas_prev[0]) == pytest.approx(0.99915, abs=1e-6)
    sampler.make_schedule(50, verbose=False)
    assert sampler.ddim_timesteps[0] == 1 and sampler.ddim_timesteps[-1] == 981


@pytest.mark.parametrize("S", [27, 110, 600])
def test_step_counts_that_crash_the_original_are_clamped(tiny_model, conds, S):
    """The original indexes timestep 1000 for these S; we clamp the last step to 999 and drop duplicates."""
    ts = make_ddim_timesteps("uniform", S, 1000)
    assert ts.max() == 999 and len(set(ts.tolist())) == len(ts)
    if S != 27:
        return
    cond, uncond = conds
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    samples, _ = DDIMSampler(tiny_model).sample(S, 2, (4, 8, 8), cond, x_T=x_T, unconditional_guidance_scale=3.0, unconditional_conditioning=uncond, verbose=False)
    ref = reference(tiny_model, x_T, cond, uncond, S, 3.0, timesteps=ts)
    assert torch.isfinite(samples).all() and _rel(samples, ref) < 2e-5


def test_ddim_eta_matches_reference_with_same_noise(tiny_model, conds):
    cond, uncond = conds
    S, eta = 10, 0.7
    g = torch.Generator().manual_seed(5)
    x_T = torch.randn(2, 4, 8, 8, generator=g)
    noises = [torch.randn(2, 4, 8, 8, generator=g) for _ in range(S)]
    it = iter(noises)
    orig_randn_like = torch.randn_like
    try:
        torch.randn_like = lambda like, **kw: next(it).to(like.dtype)  # the adapter draws with randn_like, as the original
        samples, _ = DDIMSampler(tiny_model).sample(S, 2, (4, 8, 8), cond, eta=eta, x_T=x_T, unconditional_guidance_scale=5.0, unconditional_conditioning=uncond, verbose=False)
    finally:
        torch.randn_like = orig_randn_like
    # The original adds noise on every step, including the last (its sigma there is 0 only when eta is 0).
    ref = reference(tiny_model, x_T, cond, uncond, S, 5.0, eta=eta, noises=noises)
    assert _rel(samples, ref) < 2e-5


def test_plms_rejects_eta(tiny_model):
    with pytest.raises(ValueError, match="ddim_eta must be 0 for PLMS"):
        PLMSSampler(tiny_model).make_schedule(10, ddim_eta=0.5)


def test_img2img_stochastic_encode_and_decode_match_reference(tiny_model, conds):
    """The original img2img: noise to DDIM index t_enc, then denoise indices t_enc-1 ... 0 (its off-by-one)."""
    cond, uncond = conds
    S, strength = 20, 0.75
    t_enc = int(strength * S)
    g = torch.Generator().manual_seed(9)
    x0 = torch.randn(2, 4, 8, 8, generator=g)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    sampler = DDIMSampler(tiny_model)
    sampler.make_schedule(S, ddim_eta=0.0, verbose=False)
    z = sampler.stochastic_encode(x0, torch.tensor([t_enc] * 2), noise=noise)
    ac = tiny_model.alphas_cumprod.double()
    ts = np.arange(0, 1000, 1000 // S) + 1
    expected_z = ac[ts[t_enc]].sqrt() * x0.double() + (1 - ac[ts[t_enc]]).sqrt() * noise.double()
    assert _rel(z, expected_z) < 1e-6
    out = sampler.decode(z, cond, t_enc, unconditional_guidance_scale=5.0, unconditional_conditioning=uncond)
    ref = reference(tiny_model, z, cond, uncond, S, 5.0, timesteps=ts[:t_enc])
    assert _rel(out, ref) < 2e-5
