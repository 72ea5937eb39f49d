"""Few-step samplers (spec §15.3-15.4) against analytic models: exact steps, per-sample levels,
batch-size independence of the noise, and the inference levels of the SD3.5 recipes."""

from __future__ import annotations

import pytest
import torch

from senseflow.config import Config
from senseflow.errors import ConfigError
from senseflow.sampling import (
    anchor_subset,
    inference_levels,
    per_sample_noise,
    run_sampler,
    sample_euler,
    sample_x0,
    scheduler_sigmas,
)
from senseflow.schedules import DDPMSchedule, FlowMatchingSchedule

SHAPE = (3, 2, 4, 4)


@pytest.fixture(scope="module")
def flow():
    return FlowMatchingSchedule(shift=3.0)


def point_mass_velocity(target: torch.Tensor):
    """Exact velocity of a point mass at ``target``: x_σ = (1 − σ)·x* + σ·ε ⇒ v = ε − x* = (x − x*)/σ."""

    def pred_fn(x, level):
        return (x - target) / level.reshape(-1, 1, 1, 1)

    return pred_fn


def gaussian_velocity(mu: float, s: float):
    """Exact velocity for data N(mu, s²): E[x₀|x_σ] = mu + (1−σ)s²/((1−σ)²s² + σ²)·(x − (1−σ)mu)."""

    def pred_fn(x, level):
        sig = level.reshape(-1, 1, 1, 1).double()
        x = x.double()
        x0 = mu + (1 - sig) * s**2 / ((1 - sig) ** 2 * s**2 + sig**2) * (x - (1 - sig) * mu)
        return ((x - x0) / sig).float()

    return pred_fn


def fixed_noise(draws: list[torch.Tensor]):
    """A noise_fn returning the given tensors in order (and recording how many were drawn)."""
    it = iter(draws)

    def noise_fn(shape):
        out = next(it)
        assert tuple(out.shape) == tuple(shape)
        return out

    return noise_fn


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------- exact models


def test_x0_sampler_with_exact_point_mass_model_returns_data_in_one_step(flow):
    target = torch.randn(SHAPE, generator=gen(0))
    noise = torch.randn(SHAPE, generator=gen(1))
    out = sample_x0(point_mass_velocity(target), noise, torch.tensor([1.0]), flow, fixed_noise([]))
    torch.testing.assert_close(out, target, atol=1e-6, rtol=0)
    # and from any starting level, over any number of steps
    levels = torch.tensor([0.9, 0.6, 0.3])
    draws = [torch.randn(SHAPE, generator=gen(k)) for k in (2, 3)]
    out = sample_x0(point_mass_velocity(target), noise, levels, flow, fixed_noise(draws))
    torch.testing.assert_close(out, target, atol=1e-5, rtol=0)


def test_euler_integrates_the_point_mass_ode_exactly(flow):
    """dx/dσ = (x − x*)/σ is linear in σ along a path: every Euler step is exact, x_σ' = x* + σ'(x − x*)/σ."""
    target = torch.randn(SHAPE, generator=gen(0))
    noise = torch.randn(SHAPE, generator=gen(1))
    pred = point_mass_velocity(target)
    seen = []

    def recording(x, level):
        seen.append(x.clone())
        return pred(x, level)

    levels = torch.tensor([1.0, 0.9, 0.75, 0.5])
    out = sample_euler(recording, noise, levels, flow)
    torch.testing.assert_close(out, target, atol=1e-5, rtol=0)
    for x, s in zip(seen, levels):  # x_σ = x* + σ·(ε − x*) on the straight path
        torch.testing.assert_close(x, target + s * (noise - target), atol=1e-5, rtol=0)


def test_x0_sampler_matches_hand_computed_steps_for_gaussian_data(flow):
    mu, s = 0.3, 0.5
    pred = gaussian_velocity(mu, s)
    noise = torch.randn(SHAPE, generator=gen(0))
    draws = [torch.randn(SHAPE, generator=gen(k)) for k in (1, 2, 3)]
    levels = torch.tensor([1.0, 0.9, 0.75, 0.5])
    out = sample_x0(pred, noise, levels, flow, fixed_noise(draws))

    x = noise
    for i, sig in enumerate(levels.tolist()):
        c = (1 - sig) * s**2 / ((1 - sig) ** 2 * s**2 + sig**2)
        x0 = mu + c * (x - (1 - sig) * mu)  # E[x₀ | x_σ]
        if i < 3:
            nxt = levels[i + 1].item()
            x = (1 - nxt) * x0 + nxt * draws[i]
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)


def test_euler_matches_hand_computed_steps_for_gaussian_data(flow):
    mu, s = -0.2, 0.7
    pred = gaussian_velocity(mu, s)
    noise = torch.randn(SHAPE, generator=gen(0))
    levels = [1.0, 0.9, 0.75, 0.5]
    out = sample_euler(pred, noise, torch.tensor(levels), flow)

    x = noise.double()
    for sig, nxt in zip(levels, [*levels[1:], 0.0]):
        c = (1 - sig) * s**2 / ((1 - sig) ** 2 * s**2 + sig**2)
        v = (x - (mu + c * (x - (1 - sig) * mu))) / sig
        x = x + (nxt - sig) * v
    torch.testing.assert_close(out, x.float(), atol=1e-5, rtol=0)


def test_euler_last_step_is_the_flow_step_to_sigma_zero(flow):
    """The final x − σ·v̂ is bitwise the scheduler step to σ = 0 (what diffusers' Euler computes)."""
    x = torch.randn(SHAPE, generator=gen(0))
    v = torch.randn(SHAPE, generator=gen(1))
    lv = torch.full((SHAPE[0],), 0.5)
    out = sample_euler(lambda *_: v, x, lv[None, :], flow)
    assert torch.equal(out, flow.step(x, v, lv, torch.zeros_like(lv)))


def test_x0_sampler_with_exact_ddpm_model_returns_data():
    """The samplers are family-agnostic: an exact ε model of a point mass under the DDPM schedule."""
    ddpm = DDPMSchedule()
    target = torch.randn(SHAPE, generator=gen(0))

    def eps_fn(x, level):
        a, s = ddpm.alpha_sigma(level)
        return (x - a.reshape(-1, 1, 1, 1) * target) / s.reshape(-1, 1, 1, 1)

    noise = torch.randn(SHAPE, generator=gen(1))
    levels = torch.tensor([999.0, 749.0, 499.0, 249.0])
    draws = [torch.randn(SHAPE, generator=gen(k)) for k in (2, 3, 4)]
    torch.testing.assert_close(
        sample_x0(eps_fn, noise, levels, ddpm, fixed_noise(draws)), target, atol=1e-4, rtol=0
    )
    torch.testing.assert_close(sample_euler(eps_fn, noise, levels, ddpm), target, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------- levels and noise


def test_per_sample_levels_equal_separate_runs(flow):
    """(K, B) levels: each sample follows its own schedule, as if sampled alone."""
    target = torch.randn(SHAPE, generator=gen(0))
    pred = gaussian_velocity(0.1, 0.6)
    levels = torch.tensor([[1.0, 0.9, 1.0], [0.75, 0.5, 0.9], [0.5, 0.25, 0.75]])
    seen = []

    def recording(x, level):
        assert level.shape == (SHAPE[0],)
        seen.append(level.clone())
        return pred(x, level)

    noise = torch.randn(SHAPE, generator=gen(1))
    seeds = [10, 11, 12]
    batch = sample_x0(recording, noise, levels, flow, per_sample_noise([gen(s) for s in seeds]))
    assert torch.equal(torch.stack(seen), levels)
    euler = sample_euler(pred, noise, levels, flow)
    for b in range(3):
        alone = sample_x0(pred, noise[b : b + 1], levels[:, b], flow, per_sample_noise([gen(seeds[b])]))
        torch.testing.assert_close(batch[b : b + 1], alone, atol=1e-6, rtol=0)
        torch.testing.assert_close(
            euler[b : b + 1], sample_euler(pred, noise[b : b + 1], levels[:, b], flow), atol=1e-6, rtol=0
        )
    assert not torch.allclose(batch, target)


def test_per_sample_noise_does_not_depend_on_the_batch(flow):
    draw_all = per_sample_noise([gen(5), gen(6), gen(7)])
    a1, a2 = draw_all((3, 2, 4, 4)), draw_all((3, 2, 4, 4))
    singles = [per_sample_noise([gen(s)]) for s in (5, 6, 7)]
    for b, fn in enumerate(singles):
        assert torch.equal(a1[b : b + 1], fn((1, 2, 4, 4)))
        assert torch.equal(a2[b : b + 1], fn((1, 2, 4, 4)))  # the second draw continues each stream
    assert not torch.equal(a1, a2)
    with pytest.raises(ValueError):
        draw_all((2, 2, 4, 4))

    # a whole x0 sampling in one batch of 3 equals three batches of 1
    pred = gaussian_velocity(0.0, 0.5)
    levels = torch.tensor([1.0, 0.9, 0.75, 0.5])
    gens = [gen(s) for s in (5, 6, 7)]
    fn = per_sample_noise(gens)
    batch = sample_x0(pred, fn(SHAPE), levels, flow, fn)
    for b, s in enumerate((5, 6, 7)):
        fn1 = per_sample_noise([gen(s)])
        assert torch.equal(batch[b : b + 1], sample_x0(pred, fn1((1, *SHAPE[1:])), levels, flow, fn1))


def test_run_sampler_dispatch(flow):
    target = torch.randn(SHAPE, generator=gen(0))
    noise = torch.randn(SHAPE, generator=gen(1))
    pred = point_mass_velocity(target)
    levels = torch.tensor([1.0, 0.5])
    draws = fixed_noise([torch.zeros(SHAPE)])
    assert torch.equal(
        run_sampler("euler", pred, noise, levels, flow, draws), sample_euler(pred, noise, levels, flow)
    )
    with pytest.raises(ConfigError, match="--sampler"):
        run_sampler("heun", pred, noise, levels, flow, draws)
    with pytest.raises(ValueError):
        sample_x0(pred, noise, torch.ones(2, 2), flow, draws)


def test_anchor_subsets():
    assert anchor_subset(4, 4) == [0, 1, 2, 3]
    assert anchor_subset(4, 3) == [0, 1, 3]
    assert anchor_subset(4, 2) == [0, 2]
    assert anchor_subset(4, 1) == [0]
    for bad in (0, 5):
        with pytest.raises(ConfigError, match="--num_steps"):
            anchor_subset(4, bad)


def test_sd35_inference_levels_are_the_trained_anchors(flow):
    cfg = Config()  # the SD3.5 Medium recipe: anchors 999, 749, 499, 249 on the ascending table
    torch.testing.assert_close(inference_levels(cfg, flow, 4), torch.tensor([1.0, 0.9, 0.75, 0.5]))
    torch.testing.assert_close(inference_levels(cfg, flow, 2), torch.tensor([1.0, 0.75]))
    torch.testing.assert_close(inference_levels(cfg, flow, 3), torch.tensor([1.0, 0.9, 0.5]))
    with pytest.raises(ConfigError, match="--num_steps"):
        inference_levels(cfg, flow, 5)
    # B5: the original scripts' double shift
    legacy = inference_levels(cfg, flow, 4, legacy_sd35_double_shift=True)
    torch.testing.assert_close(legacy, torch.tensor([1.0, 0.964286, 0.9, 0.75]), atol=1e-6, rtol=0)
    # ... and the Large script's 2 steps [1.0, 0.75] -> effective [1.0, 0.9]
    legacy2 = inference_levels(cfg, flow, 2, legacy_sd35_double_shift=True)
    torch.testing.assert_close(legacy2, torch.tensor([1.0, 0.9]), atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="--sd35_legacy_sigmas"):
        inference_levels(
            cfg, FlowMatchingSchedule(use_dynamic_shifting=True), 4, legacy_sd35_double_shift=True
        )


def test_scheduler_sigmas_undo_the_scheduler_shift(flow):
    levels = inference_levels(Config(), flow, 4)
    sig = scheduler_sigmas(levels, flow)
    assert sig == pytest.approx([1.0, 0.75, 0.5, 0.25], abs=1e-6)
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(sigmas=sig)
    torch.testing.assert_close(sched.sigmas[:-1], levels, atol=1e-6, rtol=0)
    dyn = FlowMatchingSchedule(use_dynamic_shifting=True)
    assert scheduler_sigmas(torch.tensor([1.0, 0.904]), dyn) == pytest.approx([1.0, 0.904])
    with pytest.raises(ConfigError):
        scheduler_sigmas(levels, DDPMSchedule())
