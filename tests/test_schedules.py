"""Noise-schedule maths (spec §2, §3.1, §4 step 1, §5, Appendix A): sigma tables, DDPM ᾱ, conversions,
steps, per-sample broadcasting, grids and table-index sampling."""

from __future__ import annotations

import math

import pytest
import torch

from senseflow.schedules import (
    DDPMSchedule,
    FlowMatchingSchedule,
    logit_normal_index,
    sample_table_index,
    shift_sigma,
)

# spec §2.2 "Useful SD3.5 values (k = 3)"
SD35_ASC = {999: 1.0, 749: 0.9, 499: 0.75, 249: 0.5, 0: 0.002994, 20: 0.06046, 980: 0.99359}
# spec §2.4 reference √ᾱ_t
DDPM_SQRT_ACP = {999: 0.068265, 749: 0.237957, 499: 0.526944, 249: 0.821847, 0: 0.999575}


@pytest.fixture(scope="module")
def flow():
    return FlowMatchingSchedule(shift=3.0)


@pytest.fixture(scope="module")
def ddpm():
    return DDPMSchedule()


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------- sigma tables


def test_shift_function_matches_formula():
    for u in (0.0, 0.25, 0.5, 0.75, 1.0, 0.123):
        assert shift_sigma(u, 3.0) == pytest.approx(3 * u / (1 + 2 * u), abs=1e-15)
    u = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(shift_sigma(u, 1.0), u)
    # anchors of §3.1 are the shift-3 images of 1, 0.75, 0.5, 0.25
    for u, s in ((1.0, 1.0), (0.75, 0.9), (0.5, 0.75), (0.25, 0.5)):
        assert shift_sigma(u, 3.0) == pytest.approx(s, abs=1e-12)


def test_sd35_ascending_table_reference_values(flow):
    assert flow.sigmas_asc.shape == (1000,) and flow.sigmas_desc.shape == (1000,)
    for i, ref in SD35_ASC.items():
        assert flow.sigmas_asc[i].item() == pytest.approx(ref, abs=1e-5), i
        # same values through the public accessor
        assert flow.table_level(torch.tensor([i]), "ascending").item() == pytest.approx(ref, abs=1e-5)


def test_sd35_ascending_table_closed_form(flow):
    i = torch.arange(1000, dtype=torch.float64)
    expected = shift_sigma((i + 1) / 1000, 3.0)  # Σ↑[i] = S_3((i + 1)/1000)
    torch.testing.assert_close(flow.sigmas_asc.double(), expected, atol=1e-7, rtol=0)
    assert torch.all(flow.sigmas_asc[1:] > flow.sigmas_asc[:-1])  # strictly ascending


def test_descending_is_flip_of_ascending(flow):
    torch.testing.assert_close(flow.sigmas_desc, flow.sigmas_asc.flip(0), atol=0, rtol=0)
    idx = torch.tensor([0, 1, 20, 500, 998, 999])
    torch.testing.assert_close(
        flow.table_level(idx, "descending"), flow.table_level(999 - idx, "ascending"), atol=0, rtol=0
    )
    assert flow.sigmas_desc[0].item() == 1.0
    # descending table = S_3(1 − j/1000) (spec §5 fake-score table)
    j = torch.arange(1000, dtype=torch.float64)
    torch.testing.assert_close(flow.sigmas_desc.double(), shift_sigma(1 - j / 1000, 3.0), atol=1e-7, rtol=0)


def test_flux_table_is_unshifted():
    s = FlowMatchingSchedule(shift=3.0, use_dynamic_shifting=True)  # shift ignored for the table
    j = torch.arange(1000, dtype=torch.float64)
    torch.testing.assert_close(s.sigmas_desc.double(), (1000 - j) / 1000, atol=1e-7, rtol=0)
    assert s.sigmas_desc[0].item() == 1.0 and s.sigmas_desc[999].item() == pytest.approx(0.001)
    torch.testing.assert_close(s.sigmas_asc, s.sigmas_desc.flip(0), atol=0, rtol=0)
    # shift 1 without dynamic shifting gives the same table
    torch.testing.assert_close(FlowMatchingSchedule(shift=1.0).sigmas_desc, s.sigmas_desc)


# ------------------------------------------------------------------------------------ DDPM table


def test_ddpm_sqrt_alphas_cumprod_reference(ddpm):
    t = torch.tensor(list(DDPM_SQRT_ACP), dtype=torch.float32)
    alpha, sigma = ddpm.alpha_sigma(t)
    torch.testing.assert_close(alpha, torch.tensor(list(DDPM_SQRT_ACP.values())), atol=2e-6, rtol=0)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(5), atol=1e-6, rtol=0)
    assert alpha.dtype == torch.float32 and sigma.dtype == torch.float32


@pytest.mark.parametrize("t", [0, 1, 500, 998, 999])
def test_ddpm_betas_hand_computed(ddpm, t):
    acp = ddpm.alphas_cumprod
    assert acp.dtype == torch.float64
    beta_hand = (math.sqrt(0.00085) + (math.sqrt(0.012) - math.sqrt(0.00085)) * t / 999) ** 2
    beta = 1 - acp[t].item() if t == 0 else 1 - acp[t].item() / acp[t - 1].item()
    assert beta == pytest.approx(beta_hand, rel=1e-9)


def test_ddpm_endpoints(ddpm):
    assert ddpm.alphas_cumprod[0].item() == pytest.approx(1 - 0.00085, rel=1e-12)
    assert torch.all(ddpm.alphas_cumprod[1:] < ddpm.alphas_cumprod[:-1])


def test_ddpm_linear_schedule_and_bad_schedule():
    d = DDPMSchedule(beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
    assert 1 - d.alphas_cumprod[0].item() == pytest.approx(0.0001)
    beta_last = 1 - (d.alphas_cumprod[999] / d.alphas_cumprod[998]).item()
    assert beta_last == pytest.approx(0.02, rel=1e-9)
    with pytest.raises(ValueError):
        DDPMSchedule(beta_schedule="cosine")


# ---------------------------------------------------------------------------------- round trips


def _data(shape, seed=0):
    g = gen(seed)
    return torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)


def test_flow_round_trip(flow):
    x0, eps = _data((3, 4, 5, 6))
    level = torch.tensor([0.9, 0.3, 0.002994])
    x_t = flow.add_noise(x0, eps, level)
    torch.testing.assert_close(
        x_t, (1 - level.view(-1, 1, 1, 1)) * x0 + level.view(-1, 1, 1, 1) * eps, atol=0, rtol=0
    )
    v = flow.pred_target(x0, eps, level)
    torch.testing.assert_close(v, eps - x0, atol=0, rtol=0)
    torch.testing.assert_close(flow.x0_from_pred(x_t, v, level), x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(flow.eps_from_pred(x_t, v, level), eps, atol=1e-5, rtol=0)
    assert flow.prediction == "velocity" and flow.clean_level == 0.0


def test_flow_extremes(flow):
    x0, eps = _data((2, 3, 4, 4), seed=1)
    torch.testing.assert_close(flow.add_noise(x0, eps, torch.ones(2)), eps, atol=0, rtol=0)
    torch.testing.assert_close(flow.add_noise(x0, eps, torch.zeros(2)), x0, atol=0, rtol=0)


def test_ddpm_round_trip(ddpm):
    x0, eps = _data((3, 4, 5, 6), seed=2)
    level = torch.tensor([999.0, 499.0, 0.0])
    x_t = ddpm.add_noise(x0, eps, level)
    acp = ddpm.alphas_cumprod[level.long()]
    a = acp.sqrt().float().view(-1, 1, 1, 1)
    s = (1 - acp).sqrt().float().view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, a * x0 + s * eps, atol=1e-6, rtol=0)
    target = ddpm.pred_target(x0, eps, level)
    torch.testing.assert_close(target, eps, atol=0, rtol=0)
    torch.testing.assert_close(ddpm.eps_from_pred(x_t, target, level), eps, atol=0, rtol=0)
    # x̂₀ at t = 999 divides by √ᾱ = 0.068: tolerance scales with 1/√ᾱ
    rec = ddpm.x0_from_pred(x_t, target, level)
    assert rec.dtype == torch.float32
    torch.testing.assert_close(rec, x0, atol=2e-5, rtol=0)
    assert ddpm.prediction == "epsilon"


def test_ddpm_x0_from_pred_is_float64_hand(ddpm):
    x_t, eps = _data((1, 2, 3, 3), seed=3)
    t = 749
    acp = ddpm.alphas_cumprod[t]
    hand = ((x_t.double() - (1 - acp).sqrt() * eps.double()) / acp.sqrt()).float()
    torch.testing.assert_close(ddpm.x0_from_pred(x_t, eps, torch.tensor([float(t)])), hand, atol=0, rtol=0)


def test_timesteps_for_model(flow):
    level = flow.table_level(torch.tensor([999, 749, 499, 249]), "ascending")
    torch.testing.assert_close(
        flow.timesteps_for_model(level), torch.tensor([1000.0, 900.0, 750.0, 500.0]), atol=1e-3, rtol=0
    )
    lv = torch.rand(7, generator=gen(4))
    torch.testing.assert_close(flow.timesteps_for_model(lv), 1000 * lv)


# ----------------------------------------------------------------------------------------- steps


def test_flow_step_is_euler(flow):
    x, v = _data((2, 3, 4, 4), seed=5)
    level = torch.tensor([0.9, 0.5])
    nxt = torch.tensor([0.75, 0.002994])
    out = flow.step(x, v, level, nxt)
    torch.testing.assert_close(out, x + (nxt - level).view(-1, 1, 1, 1) * v, atol=0, rtol=0)
    # equals α'·x̂₀ + σ'·ε̂ (the generic DDIM form of the base class)
    x0 = flow.x0_from_pred(x, v, level)
    eps = flow.eps_from_pred(x, v, level)
    generic = (1 - nxt).view(-1, 1, 1, 1) * x0 + nxt.view(-1, 1, 1, 1) * eps
    torch.testing.assert_close(out, generic, atol=1e-5, rtol=0)
    # stepping a true sample along its true velocity lands on the true point at the next level
    x0, eps = _data((2, 3, 4, 4), seed=6)
    x_t = flow.add_noise(x0, eps, level)
    torch.testing.assert_close(
        flow.step(x_t, eps - x0, level, nxt), flow.add_noise(x0, eps, nxt), atol=1e-5, rtol=0
    )


def test_ddpm_step_hand(ddpm):
    x, e = _data((2, 3, 4, 4), seed=7)
    level = torch.tensor([749.0, 249.0])
    nxt = torch.tensor([499.0, 0.0])
    out = ddpm.step(x, e, level, nxt)
    acp = ddpm.alphas_cumprod
    for b in range(2):
        a_t, a_n = acp[int(level[b])], acp[int(nxt[b])]
        x0 = (x[b].double() - (1 - a_t).sqrt() * e[b].double()) / a_t.sqrt()
        hand = a_n.sqrt() * x0 + (1 - a_n).sqrt() * e[b].double()
        torch.testing.assert_close(out[b], hand.float(), atol=1e-5, rtol=0)
    # a true sample with its true noise lands on the true point at the next level
    x0, eps = _data((2, 3, 4, 4), seed=8)
    x_t = ddpm.add_noise(x0, eps, level)
    torch.testing.assert_close(
        ddpm.step(x_t, eps, level, nxt), ddpm.add_noise(x0, eps, nxt), atol=1e-5, rtol=0
    )


# ----------------------------------------------------------------------------- per-sample levels


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (2, 11, 6)])
@pytest.mark.parametrize("family", ["flow", "ddpm"])
def test_per_sample_levels_broadcast(flow, ddpm, shape, family):
    sched = flow if family == "flow" else ddpm
    level = torch.tensor([0.9, 0.25]) if family == "flow" else torch.tensor([900.0, 100.0])
    nxt = torch.tensor([0.5, 0.1]) if family == "flow" else torch.tensor([500.0, 20.0])
    x0, eps = _data(shape, seed=9)
    x_t = sched.add_noise(x0, eps, level)
    pred = sched.pred_target(x0, eps, level)
    batched = {
        "add_noise": x_t,
        "x0": sched.x0_from_pred(x_t, pred, level),
        "eps": sched.eps_from_pred(x_t, pred, level),
        "step": sched.step(x_t, pred, level, nxt),
    }
    for b in range(2):
        sl = slice(b, b + 1)
        lv, nx = level[sl], nxt[sl]
        single_xt = sched.add_noise(x0[sl], eps[sl], lv)
        single_pred = sched.pred_target(x0[sl], eps[sl], lv)
        alpha, sigma = sched.alpha_sigma(lv)
        # each sample uses its own level: compare with a scalar-coefficient hand computation
        torch.testing.assert_close(batched["add_noise"][b], alpha.item() * x0[b] + sigma.item() * eps[b])
        torch.testing.assert_close(batched["add_noise"][sl], single_xt, atol=0, rtol=0)
        torch.testing.assert_close(batched["x0"][sl], sched.x0_from_pred(single_xt, single_pred, lv))
        torch.testing.assert_close(batched["eps"][sl], sched.eps_from_pred(single_xt, single_pred, lv))
        torch.testing.assert_close(batched["step"][sl], sched.step(single_xt, single_pred, lv, nx))
    # the two samples really did get different coefficients
    a0, _ = sched.alpha_sigma(level[:1])
    a1, _ = sched.alpha_sigma(level[1:])
    assert not torch.allclose(a0, a1)


# ----------------------------------------------------------------------------------------- grids


def test_grid_to_level_ascending_index(flow):
    lv = flow.grid_to_level(torch.tensor([999, 749, 499, 249, 0]), "ascending_index")
    torch.testing.assert_close(lv, torch.tensor([1.0, 0.9, 0.75, 0.5, 0.002994]), atol=1e-5, rtol=0)
    # out-of-range grid values are clamped into the table
    lv = flow.grid_to_level(torch.tensor([-5, 1200]), "ascending_index")
    torch.testing.assert_close(lv, torch.tensor([flow.sigmas_asc[0].item(), 1.0]))


def test_grid_to_level_t1000():
    flux = FlowMatchingSchedule(use_dynamic_shifting=True)
    lv = flux.grid_to_level(torch.tensor([1000, 904, 759, 512, 0]), "t1000")
    torch.testing.assert_close(lv, torch.tensor([1.0, 0.904, 0.759, 0.512, 0.0]))
    assert lv.dtype == torch.float32


def test_grid_to_level_ddpm(ddpm):
    lv = ddpm.grid_to_level(torch.tensor([999, 749, 499, 249, 0]), "ddpm")
    torch.testing.assert_close(lv, torch.tensor([999.0, 749.0, 499.0, 249.0, 0.0]))
    assert lv.dtype.is_floating_point


def test_grid_to_level_wrong_grid_raises(flow, ddpm):
    g = torch.tensor([10])
    with pytest.raises(ValueError):
        flow.grid_to_level(g, "ddpm")
    with pytest.raises(ValueError):
        flow.grid_to_level(g, "bogus")
    for kind in ("ascending_index", "t1000", "bogus"):
        with pytest.raises(ValueError):
            ddpm.grid_to_level(g, kind)


def test_ddpm_table_level(ddpm):
    idx = torch.tensor([0, 20, 999])
    torch.testing.assert_close(ddpm.table_level(idx, "ascending"), torch.tensor([0.0, 20.0, 999.0]))
    torch.testing.assert_close(ddpm.table_level(idx, "descending"), torch.tensor([999.0, 979.0, 0.0]))


# ------------------------------------------------------------------------------ index sampling


def test_uniform_index_inclusive_bounds():
    idx = sample_table_index(20000, "uniform", 20, 980, gen(0))
    assert idx.dtype == torch.int64 and idx.shape == (20000,)
    assert idx.min().item() == 20 and idx.max().item() == 980  # both ends hit
    # roughly uniform: mean ≈ 500
    assert abs(idx.float().mean().item() - 500) < 10
    small = sample_table_index(2000, "uniform", 0, 3, gen(1))
    assert set(small.tolist()) == {0, 1, 2, 3}


def test_logit_normal_index_distribution():
    idx = logit_normal_index(40000, gen(0))
    assert idx.dtype == torch.int64
    assert 0 <= idx.min().item() and idx.max().item() <= 999
    assert abs(idx.float().median().item() - 500) < 10
    # j = floor(1000·sigmoid(z)) for the same generator stream
    z = torch.randn(40000, generator=gen(0))
    torch.testing.assert_close(idx, (1000 * torch.sigmoid(z)).floor().long().clamp(0, 999), atol=0, rtol=0)
    # P(j < 500) = P(z < 0) = 1/2 and P(j < 269) = P(z < logit(0.269)) ≈ Φ(−1.0) ≈ 0.159
    assert abs((idx < 500).float().mean().item() - 0.5) < 0.01
    assert abs((idx < 269).float().mean().item() - 0.1587) < 0.01


def test_logit_normal_table_index_is_clamped():
    idx = sample_table_index(40000, "logit_normal", 20, 980, gen(3))
    assert idx.min().item() == 20 and idx.max().item() == 980  # tails piled on the clamp bounds
    assert abs(idx.float().median().item() - 500) < 10
    raw = logit_normal_index(40000, gen(3))
    torch.testing.assert_close(idx, raw.clamp(20, 980), atol=0, rtol=0)
    tight = sample_table_index(1000, "logit_normal", 400, 600, gen(4))
    assert tight.min().item() >= 400 and tight.max().item() <= 600


def test_unknown_distribution_raises():
    with pytest.raises(ValueError):
        sample_table_index(4, "beta", 0, 10, gen(0))


@pytest.mark.parametrize("dist", ["uniform", "logit_normal"])
def test_index_sampling_is_deterministic(dist):
    a = sample_table_index(64, dist, 20, 980, gen(123))
    b = sample_table_index(64, dist, 20, 980, gen(123))
    c = sample_table_index(64, dist, 20, 980, gen(124))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.equal(a, c)
    # consecutive draws from one generator differ
    g = gen(5)
    assert not torch.equal(sample_table_index(64, dist, 20, 980, g), sample_table_index(64, dist, 20, 980, g))
