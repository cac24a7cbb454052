"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
Models"), the B(h) = e^h - 1 ("bh2") variant on the data prediction, as the paper's reference code and diffusers'
UniPCMultistepScheduler (default configuration).

Order implemented: predictor UniP-p with p = `order` (default 2) plus the UniC corrector, global order p + 1
(3 by default), 1 model evaluation per step. In lambda = -log sigma, with h = lambda' - lambda, the newest data
predictions m_0 (at x), m_1, ... at lambda_k, r_k = (lambda_k - lambda) / h and D1_k = (m_k - m_0) / r_k:
    UniP:  x' = (sigma'/sigma) x - (e^{-h} - 1) m_0 - B(h) sum_k rho^p_k D1_k
    UniC:  after m' = D(x', sigma') is computed (it is the next step's m_0 anyway),
           x'_c = (sigma'/sigma) x - (e^{-h} - 1) m_0 - B(h) (sum_k rho^c_k D1_k + rho^c_p (m' - m_0))
with B(h) = e^{-h} - 1 and rho solving R rho = b: R_ik = r_k^(i-1) (r = 1 for the new point) and, with
hh = -h, g_1 = (e^{hh} - 1) / hh - 1, g_{i+1} = g_i / hh - 1 / (i+1)!, b_i = i! g_i / B(h) (i = 1 .. p).
As in the reference code, UniP-2 uses rho = 1/2 and UniC-1 uses rho = 1/2 (their h -> 0 limits).
The corrected x'_c replaces x' (the next step starts from it) but the history keeps m' evaluated at x'.

Warm-up: step i uses order min(p, i + 1). Final step: a step to sigma' = 0 returns m_0 (first order, h = inf), and
with `lower_order_final` the steps before it are capped at the number of steps left (diffusers' rule: with p = 3
the next-to-last step is second order). A grid ending at sigma_min > 0 keeps full order to the end. The last point
is never corrected (no model evaluation there).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from samplers.ddim import Callback, NoiseFn
from samplers.denoiser import Denoiser


def _bh2_system(h: float, rks: list[float], order: int) -> tuple[float, float, np.ndarray, np.ndarray]:
    """(h phi_1, B(h), R [order, order], b [order]) of the bh2 data-prediction update over a step h in lambda;
    rks are r_k of the history points followed by 1 (the new point)."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    factorial = 1
    rows, b = [], []
    for i in range(1, order + 1):
        rows.append([rk ** (i - 1) for rk in rks])
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return h_phi_1, b_h, np.array(rows, dtype=np.float64), np.array(b, dtype=np.float64)


def _history_terms(ms: list[torch.Tensor], lambdas: list[float], lam: float, h: float, count: int) -> tuple[list[float], list[torch.Tensor]]:
    """r_k and D1_k = (m_k - m_0) / r_k for the `count` history points before the newest (m_0 = ms[-1])."""
    rks, d1s = [], []
    for k in range(1, count + 1):
        rk = (lambdas[-1 - k] - lam) / h
        rks.append(rk)
        d1s.append((ms[-1 - k] - ms[-1]) / rk)
    return rks, d1s


def unip_step(x: torch.Tensor, sigma: float, sigma_next: float, ms: list[torch.Tensor], lambdas: list[float], order: int) -> torch.Tensor:
    """UniP-order bh2 from x at sigma (m_0 = ms[-1] at lambdas[-1]) to sigma_next > 0."""
    lam, h = lambdas[-1], math.log(sigma) - math.log(sigma_next)
    rks, d1s = _history_terms(ms, lambdas, lam, h, order - 1)
    h_phi_1, b_h, R, b = _bh2_system(h, rks + [1.0], order)
    # x' = (sigma'/sigma) x - (e^{-h} - 1) m_0
    x_next = (sigma_next / sigma) * x - h_phi_1 * ms[-1]
    if d1s:
        rhos = [0.5] if order == 2 else list(np.linalg.solve(R[:-1, :-1], b[:-1]))
        # x' -= B(h) sum_k rho_k D1_k
        x_next = x_next - b_h * sum(float(rho) * d1 for rho, d1 in zip(rhos, d1s))
    return x_next


def unic_step(x: torch.Tensor, sigma: float, sigma_next: float, ms: list[torch.Tensor], lambdas: list[float], m_next: torch.Tensor, order: int) -> torch.Tensor:
    """UniC-order bh2: re-solve the step from x at sigma (m_0 = ms[-1]) to sigma_next with m_next = D(x'_pred)."""
    lam, h = lambdas[-1], math.log(sigma) - math.log(sigma_next)
    rks, d1s = _history_terms(ms, lambdas, lam, h, order - 1)
    h_phi_1, b_h, R, b = _bh2_system(h, rks + [1.0], order)
    rhos = [0.5] if order == 1 else [float(r) for r in np.linalg.solve(R, b)]
    # x'_c = (sigma'/sigma) x - (e^{-h} - 1) m_0 - B(h) (sum_k rho_k D1_k + rho_p (m' - m_0))
    correction = rhos[-1] * (m_next - ms[-1])
    for rho, d1 in zip(rhos[:-1], d1s):
        correction = correction + rho * d1
    return (sigma_next / sigma) * x - h_phi_1 * ms[-1] - b_h * correction


@torch.no_grad()
def sample_unipc(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    eta: float = 0.0,
    noise: Optional[NoiseFn] = None,
    callback: Optional[Callback] = None,
    order: int = 2,
    use_corrector: bool = True,
    lower_order_final: bool = True,
) -> torch.Tensor:
    """Run UniPC (bh2, data prediction) from x at sigmas[0] down to sigmas[-1].

    Args:
        denoiser: D(x, sigma).
        x: latent [B, C, h, w] at noise level sigmas[0] (sigma-space scaling).
        sigmas: descending noise levels [n + 1], ending at 0 or at a level > 0.
        eta: must be 0 (deterministic).
        order: predictor order p in 1..3; the corrector makes the method order p + 1.
        use_corrector: apply UniC (without it: UniP-p, order p; with p = 1 that is DDIM / DPM-Solver++(1)).
        lower_order_final: cap the order by the steps left when the grid ends at 0 (see the module docstring).
        callback: called after each step with i, x (the predicted next point), sigma, sigma_next, denoised.
    """
    if eta != 0.0:
        raise ValueError(f"unipc is deterministic: eta must be 0, got {eta}")
    if order not in (1, 2, 3):
        raise ValueError(f"unipc order must be 1, 2 or 3, got {order}")
    n = len(sigmas) - 1
    ends_at_zero = float(sigmas[-1]) == 0.0
    ms: list[torch.Tensor] = []  # data predictions, newest last
    lambdas: list[float] = []
    x_prev: Optional[torch.Tensor] = None  # the point the last predictor started from
    prev_order = 0
    for i in range(n):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoiser(x, sigma)
        if use_corrector and x_prev is not None:
            x = unic_step(x_prev, float(sigmas[i - 1]), sigma, ms, lambdas, denoised, prev_order)
        ms.append(denoised)
        lambdas.append(-math.log(sigma))
        if len(ms) > order:
            ms.pop(0)
            lambdas.pop(0)
        if sigma_next == 0.0:
            # lambda' = inf: the first-order step returns m_0
            this_order = 1
            x_next = denoised
        else:
            this_order = min(order, i + 1)
            if lower_order_final and ends_at_zero:
                this_order = min(this_order, n - i)
            x_next = unip_step(x, sigma, sigma_next, ms, lambdas, this_order)
        x_prev, prev_order = x, this_order
        x = x_next
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised})
    return x
