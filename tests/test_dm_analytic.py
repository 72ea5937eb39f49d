"""Analytic check that the DM gradient (spec §4) moves generator samples towards the teacher.

Under the flow-matching forward process ``x_σ = (1 − σ)·x₀ + σ·ε`` (spec §2.1), a 2-D isotropic Gaussian
mixture ``x₀ ~ Σ_k w_k N(μ_k, s_k² I)`` has the closed-form marginal

    p_σ(x) = Σ_k w_k N(x; (1 − σ)μ_k, v_k I),   v_k = (1 − σ)² s_k² + σ²,

and, per component, the Gaussian posterior mean

    E[x₀ | x_σ, k] = μ_k + (1 − σ) s_k² / v_k · (x_σ − (1 − σ)μ_k),

so ``E[x₀ | x_σ] = Σ_k r_k(x_σ) E[x₀ | x_σ, k]`` with responsibilities ``r_k ∝ w_k N(x_σ; (1 − σ)μ_k, v_k I)``.
This is the exact "x̂₀" of a perfectly trained teacher / fake score. It is unit-tested against an
importance-sampling Monte-Carlo estimate, against Tweedie's formula on the log marginal
(``x̂₀ = (x_σ + σ² ∇log p_σ(x_σ)) / (1 − σ)``), and through the tower and orthogonality properties.

The DM experiment: the "generator" is the identity on a set of particles; the fake score is the
closed form of a single Gaussian refitted to the particles every step; levels come from the SD3.5
ascending table (``U{20..980}``, spec §4 step 1) and noising from ``FlowMatchingSchedule.add_noise``.
Gradient descent on ``distribution_matching_loss`` w.r.t. the particles must bring them close to the
teacher mixture (energy distance and nearest-mode distance drop), and swapping teacher and fake must
drive them away.
"""

from __future__ import annotations

import math

import pytest
import torch

from senseflow.losses.dm import distribution_matching_loss
from senseflow.schedules import FlowMatchingSchedule, sample_table_index

# teacher: three modes with different weights and widths
T_MEANS = torch.tensor([[2.0, 2.0], [-2.0, 1.0], [0.5, -2.0]], dtype=torch.float64)
T_STDS = torch.tensor([0.3, 0.4, 0.25], dtype=torch.float64)
T_WEIGHTS = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------- closed-form mixture


def mixture_sample(n: int, means, stds, weights, g: torch.Generator) -> torch.Tensor:
    k = torch.multinomial(weights, n, replacement=True, generator=g)
    return means[k] + stds[k, None] * torch.randn(n, 2, generator=g, dtype=means.dtype)


def _components(x_t: torch.Tensor, sigma: torch.Tensor, means, stds, weights):
    """Per-sample, per-component log-responsibility terms and posterior means (float64)."""
    s = sigma.double().reshape(-1, 1)  # (B, 1)
    a = 1.0 - s
    x = x_t.double()
    var = a**2 * stds.double().reshape(1, -1) ** 2 + s**2  # (B, K) = v_k
    centre = a[:, :, None] * means.double()[None]  # (B, K, 2) = (1 − σ) μ_k
    d2 = ((x[:, None, :] - centre) ** 2).sum(-1)
    log_joint = torch.log(weights.double())[None] - d2 / (2 * var) - torch.log(2 * math.pi * var)
    gain = a * stds.double().reshape(1, -1) ** 2 / var  # (B, K)
    m = means.double()[None] + gain[..., None] * (x[:, None, :] - centre)  # (B, K, 2)
    return log_joint, m


def mixture_log_marginal(x_t, sigma, means, stds, weights) -> torch.Tensor:
    """``log p_σ(x_σ)`` (B,) of the noised mixture."""
    log_joint, _ = _components(x_t, sigma, means, stds, weights)
    return torch.logsumexp(log_joint, dim=1)


def mixture_x0(x_t, sigma, means, stds, weights) -> torch.Tensor:
    """``E[x₀ | x_σ]`` (B, 2) for a Gaussian-mixture ``x₀``; returned in ``x_t``'s dtype."""
    log_joint, m = _components(x_t, sigma, means, stds, weights)
    r = torch.softmax(log_joint, dim=1)
    return (r[..., None] * m).sum(1).to(x_t.dtype)


def teacher_x0(x_t, sigma):
    return mixture_x0(x_t, sigma, T_MEANS, T_STDS, T_WEIGHTS)


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return (2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean()).item()


def nearest_mode_distance(x: torch.Tensor) -> float:
    return torch.cdist(x.double(), T_MEANS).min(dim=1).values.mean().item()


# ------------------------------------------------------------------------- closed form unit tests


@pytest.mark.parametrize("sigma", [0.3, 0.6, 0.9])
def test_posterior_mean_matches_importance_sampling(sigma):
    x0 = mixture_sample(200_000, T_MEANS, T_STDS, T_WEIGHTS, gen(3))
    base = torch.tensor([[1.0, 1.5], [-1.0, 0.3], [0.2, -1.0], [0.0, 0.0]], dtype=torch.float64)
    pts = (1 - sigma) * base + sigma * torch.tensor([0.2, -0.1], dtype=torch.float64)
    closed = mixture_x0(pts, torch.full((4,), sigma), T_MEANS, T_STDS, T_WEIGHTS)
    for p, m in zip(pts, closed, strict=True):
        # self-normalised importance sampling with the prior as proposal: w ∝ N(x_σ; (1 − σ)x₀, σ² I)
        w = torch.softmax(-((p - (1 - sigma) * x0) ** 2).sum(1) / (2 * sigma**2), dim=0)
        est = (w[:, None] * x0).sum(0)
        ess = 1.0 / (w**2).sum()
        assert ess > 300
        stderr = ((w[:, None] * (x0 - est) ** 2).sum(0) / ess).sqrt()
        assert torch.all((m - est).abs() < 5 * stderr + 2e-3), (sigma, p, m, est, stderr)


def test_posterior_mean_matches_tweedie():
    g = gen(4)
    sigma = torch.tensor([0.05, 0.2, 0.5, 0.8, 0.95, 0.99], dtype=torch.float64)
    x_t = torch.randn(6, 2, generator=g, dtype=torch.float64) * 2
    x_req = x_t.clone().requires_grad_(True)
    (score,) = torch.autograd.grad(
        mixture_log_marginal(x_req, sigma, T_MEANS, T_STDS, T_WEIGHTS).sum(), x_req
    )
    tweedie = (x_t + sigma[:, None] ** 2 * score) / (1 - sigma[:, None])
    torch.testing.assert_close(teacher_x0(x_t, sigma), tweedie, atol=1e-9, rtol=1e-9)


def test_posterior_mean_tower_and_orthogonality():
    # E[E[x₀|x_σ]] = E[x₀] and E[(x₀ − E[x₀|x_σ])·f(x_σ)] = 0 for f(x) = x
    g = gen(5)
    n = 200_000
    x0 = mixture_sample(n, T_MEANS, T_STDS, T_WEIGHTS, g)
    sched = FlowMatchingSchedule(shift=3.0)
    sigma = sched.table_level(sample_table_index(n, "uniform", 20, 980, g), "ascending").double()
    eps = torch.randn(n, 2, generator=g, dtype=torch.float64)
    x_t = sched.add_noise(x0, eps, sigma)
    m = teacher_x0(x_t, sigma)
    resid = x0 - m
    torch.testing.assert_close(resid.mean(0), torch.zeros(2, dtype=torch.float64), atol=0.01, rtol=0)
    cross = (resid[:, :, None] * x_t[:, None, :]).mean(0)
    torch.testing.assert_close(cross, torch.zeros(2, 2, dtype=torch.float64), atol=0.02, rtol=0)
    # a wrong estimator (shrinking too little) violates orthogonality, so the test has teeth
    wrong = (x0 - x_t / (1 - sigma[:, None]).clamp(min=0.05))[:, :, None] * x_t[:, None, :]
    assert wrong.mean(0).abs().max() > 0.2


def test_single_gaussian_limits():
    mean, std = torch.tensor([[0.5, -1.0]], dtype=torch.float64), torch.tensor([0.7], dtype=torch.float64)
    x_t = torch.tensor([[0.3, 0.4], [-2.0, 1.0]], dtype=torch.float64)
    one = torch.ones(1, dtype=torch.float64)
    # σ → 0: the sample itself; σ = 1: the prior mean
    torch.testing.assert_close(mixture_x0(x_t, torch.zeros(2), mean, std, one), x_t)
    torch.testing.assert_close(mixture_x0(x_t, torch.ones(2), mean, std, one), mean.expand(2, 2))
    # σ = 0.5: μ + 0.5·s²/(0.25 s² + 0.25)·(x − 0.5 μ)
    s = 0.5
    gain = (1 - s) * 0.49 / ((1 - s) ** 2 * 0.49 + s**2)
    torch.testing.assert_close(
        mixture_x0(x_t, torch.full((2,), s), mean, std, one), mean + gain * (x_t - (1 - s) * mean)
    )


# ---------------------------------------------------------------------------------- DM dynamics


def run_dm_particles(steps: int, eta: float, swap: bool, n: int = 512, seed: int = 0) -> torch.Tensor:
    """Gradient descent on the DM loss w.r.t. particles; returns the final particles (float32).

    ``eta`` is the displacement per unit of normalised gradient: the surrogate's gradient is ``g/N``
    (spec §4 step 7), so the particle update is ``x ← x − eta·N·∂L/∂x = x − eta·g``.
    """
    g = gen(seed)
    sched = FlowMatchingSchedule(shift=3.0)
    x = torch.randn(n, 2, generator=g)  # initial generator distribution N(0, I)
    for _ in range(steps):
        xs = x.detach()
        # fake score = closed form of the current generator distribution (isotropic Gaussian fit)
        f_mean = xs.double().mean(0, keepdim=True)
        f_std = xs.double().std(0).pow(2).mean().sqrt().reshape(1)
        one = torch.ones(1, dtype=torch.float64)

        def fake_x0(x_t, lv, f_mean=f_mean, f_std=f_std, one=one):
            return mixture_x0(x_t, lv, f_mean, f_std, one)

        real_fn, fake_fn = (fake_x0, teacher_x0) if swap else (teacher_x0, fake_x0)
        level = sched.table_level(sample_table_index(n, "uniform", 20, 980, g), "ascending")
        noise = torch.randn(n, 2, generator=g)
        xr = xs.clone().requires_grad_(True)
        loss, _ = distribution_matching_loss(xr, noise, level, sched.add_noise, real_fn, fake_fn)
        loss.backward()
        x = xs - eta * xr.numel() * xr.grad
    return x


@pytest.fixture(scope="module")
def teacher_ref():
    return mixture_sample(4000, T_MEANS, T_STDS, T_WEIGHTS, gen(1)).float()


def test_dm_descent_moves_particles_to_teacher(teacher_ref):
    x_init = torch.randn(512, 2, generator=gen(0))
    e0, m0 = energy_distance(x_init, teacher_ref), nearest_mode_distance(x_init)
    x = run_dm_particles(steps=60, eta=0.1, swap=False)
    e1, m1 = energy_distance(x, teacher_ref), nearest_mode_distance(x)
    assert torch.isfinite(x).all()
    assert e0 > 0.8
    assert e1 < 0.15 * e0, (e0, e1)  # energy distance drops by > 85 % (0.90 → ~0.06)
    assert m1 < 0.6 * m0, (m0, m1)  # nearest-mode distance 1.58 → ~0.8 at most
    # particles end up spread over the modes, every mode populated
    owner = torch.cdist(x.double(), T_MEANS).argmin(dim=1)
    counts = torch.bincount(owner, minlength=3)
    assert (counts > 0.05 * x.shape[0]).all(), counts


def test_dm_swapped_real_and_fake_moves_away(teacher_ref):
    x_init = torch.randn(512, 2, generator=gen(0))
    e0, m0 = energy_distance(x_init, teacher_ref), nearest_mode_distance(x_init)
    x = run_dm_particles(steps=10, eta=0.1, swap=True)
    e1, m1 = energy_distance(x, teacher_ref), nearest_mode_distance(x)
    assert torch.isfinite(x).all()
    assert e1 > 1.5 * e0, (e0, e1)
    assert m1 > 1.2 * m0, (m0, m1)


def test_dm_teacher_is_a_fixed_point():
    # fake score == teacher ⇒ x̂_fake == x̂_real ⇒ zero normalised gradient and zero loss
    sched = FlowMatchingSchedule(shift=3.0)
    g = gen(6)
    x = mixture_sample(256, T_MEANS, T_STDS, T_WEIGHTS, g).float().requires_grad_(True)
    level = sched.table_level(sample_table_index(256, "uniform", 20, 980, g), "ascending")
    noise = torch.randn(256, 2, generator=g)
    loss, _ = distribution_matching_loss(x, noise, level, sched.add_noise, teacher_x0, teacher_x0)
    loss.backward()
    assert loss.item() == 0.0 and x.grad.abs().max().item() == 0.0
