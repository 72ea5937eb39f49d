"""Pure losses: DM normalised gradient and surrogate (spec §4), fake-score loss (§5), ISG (§7.1) and
IDA (§6)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from senseflow.losses.dm import distribution_matching_loss, dm_surrogate_loss, normalized_dm_gradient
from senseflow.losses.fake_score import fake_score_loss
from senseflow.losses.ida import implicit_distribution_alignment_
from senseflow.losses.isg import intra_segment_guidance_loss, isg_distance
from senseflow.schedules import DDPMSchedule, FlowMatchingSchedule

F32_MAX = torch.finfo(torch.float32).max


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------- DM


def test_dm_gradient_hand_computed():
    # two samples of shape (1, 2, 2) with different normalisers
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    x0_real = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]], [[[2.0, -2.0], [4.0, -4.0]]]])
    x0_fake = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]]], [[[0.0, 1.0], [2.0, 3.0]]]])
    # sample 0: p_real = x − x̂_real = [1,1,1,1], mean|p_real| = 1; g = x̂_fake − x̂_real = [1, 0, -1, -2]
    # sample 1: p_real = [-2, 2, -4, 4], mean|p_real| = 3; x̂_fake − x̂_real = [-2, 3, -2, 7] → /3
    expected = torch.tensor([[[[1.0, 0.0], [-1.0, -2.0]]], [[[-2 / 3, 1.0], [-2 / 3, 7 / 3]]]])
    g = normalized_dm_gradient(x, x0_real, x0_fake)
    assert g.dtype == torch.float32 and g.shape == x.shape
    torch.testing.assert_close(g, expected, atol=1e-7, rtol=0)
    # the normaliser eps is added to the denominator
    g_eps = normalized_dm_gradient(x, x0_real, x0_fake, eps=1.0)
    torch.testing.assert_close(
        g_eps, torch.stack([expected[0] * 1 / 2, expected[1] * 3 / 4]), atol=1e-7, rtol=0
    )


def test_dm_gradient_half_precision_inputs_give_float32():
    x = torch.randn(2, 3, 4, 4, generator=gen(0))
    r = torch.randn(2, 3, 4, 4, generator=gen(1))
    f = torch.randn(2, 3, 4, 4, generator=gen(2))
    g = normalized_dm_gradient(x.bfloat16(), r.bfloat16(), f.bfloat16())
    assert g.dtype == torch.float32
    torch.testing.assert_close(
        g, normalized_dm_gradient(x.bfloat16().float(), r.bfloat16().float(), f.bfloat16().float())
    )


def test_dm_gradient_nan_inf_replacement():
    # sample 0: x == x̂_real → normaliser 0; numerator [1, 0, -1] → [+Inf, NaN, -Inf]
    x = torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]])
    x0_real = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    x0_fake = torch.tensor([[2.0, 2.0, 2.0], [float("nan"), 1.0, 0.0]])
    g = normalized_dm_gradient(x, x0_real, x0_fake)
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g[0], torch.tensor([F32_MAX, 0.0, -F32_MAX]), atol=0, rtol=0)
    # sample 1: NaN in the fake estimate → 0; the rest unaffected (normaliser 1)
    torch.testing.assert_close(g[1], torch.tensor([0.0, 1.0, 0.0]), atol=0, rtol=0)


def test_dm_surrogate_value_and_gradient():
    x = torch.randn(2, 3, 4, 5, generator=gen(3), requires_grad=True)
    g = torch.randn(2, 3, 4, 5, generator=gen(4))
    loss = dm_surrogate_loss(x, g)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    torch.testing.assert_close(loss, 0.5 * (g**2).mean(), atol=1e-6, rtol=1e-6)
    loss.backward()
    torch.testing.assert_close(x.grad, g / g.numel(), atol=1e-6, rtol=0)
    # g itself receives no gradient path (it is constant), and a descent step moves x along −g
    assert not g.requires_grad


def test_dm_surrogate_gradient_with_grad_carrying_g_is_still_g_over_n():
    # g computed from x must be stop-gradient'ed by the surrogate: the gradient stays g/N
    x = torch.randn(3, 8, generator=gen(5), requires_grad=True)
    g = 2.0 * x  # depends on x
    loss = dm_surrogate_loss(x, g)
    (grad,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(grad, (2.0 * x).detach() / x.numel(), atol=1e-6, rtol=0)


def test_distribution_matching_loss_with_stubs():
    sched = FlowMatchingSchedule(shift=3.0)
    x = torch.randn(2, 3, 4, 4, generator=gen(6), requires_grad=True)
    noise = torch.randn(2, 3, 4, 4, generator=gen(7))
    level = sched.table_level(torch.tensor([900, 100]), "ascending")
    real_const = torch.full((2, 3, 4, 4), 0.5)
    seen: dict[str, object] = {}

    teacher_w = nn.Parameter(torch.tensor(2.0))  # a "network" parameter inside the callable

    def real_x0_fn(x_t, lv):
        seen["real_xt"], seen["real_lv"] = x_t, lv
        seen["real_grad_enabled"] = torch.is_grad_enabled()
        return real_const + 0.0 * teacher_w

    def fake_x0_fn(x_t, lv):
        seen["fake_xt"], seen["fake_lv"] = x_t, lv
        seen["fake_grad_enabled"] = torch.is_grad_enabled()
        return 0.25 * x_t * teacher_w

    loss, metrics = distribution_matching_loss(x, noise, level, sched.add_noise, real_x0_fn, fake_x0_fn)
    x_t_expected = sched.add_noise(x.detach(), noise, level)
    for who in ("real", "fake"):
        torch.testing.assert_close(seen[f"{who}_xt"], x_t_expected, atol=0, rtol=0)
        torch.testing.assert_close(seen[f"{who}_lv"], level, atol=0, rtol=0)
        assert seen[f"{who}_grad_enabled"] is False
        assert not seen[f"{who}_xt"].requires_grad

    x0_fake = 0.5 * x_t_expected
    g = normalized_dm_gradient(x.detach(), real_const, x0_fake)
    torch.testing.assert_close(loss, 0.5 * (g**2).mean(), atol=1e-6, rtol=1e-6)
    loss.backward()
    torch.testing.assert_close(x.grad, g / x.numel(), atol=1e-6, rtol=0)
    assert teacher_w.grad is None  # no gradient flows into the callables
    assert set(metrics) >= {"loss/dm", "dm/grad_abs", "dm/real_fake_gap"}
    assert not metrics["loss/dm"].requires_grad
    torch.testing.assert_close(metrics["dm/grad_abs"], g.abs().mean())
    torch.testing.assert_close(metrics["dm/real_fake_gap"], (real_const - x0_fake).abs().mean())


def test_distribution_matching_loss_descent_moves_towards_real():
    # one small gradient step decreases the distance to x̂_real when the fake estimate is x itself
    sched = FlowMatchingSchedule(shift=3.0)
    x = torch.randn(4, 2, 8, 8, generator=gen(8), requires_grad=True)
    target = torch.randn(4, 2, 8, 8, generator=gen(9))
    noise = torch.randn(4, 2, 8, 8, generator=gen(10))
    level = torch.full((4,), 0.5)
    x_ref = x.detach().clone()
    loss, _ = distribution_matching_loss(
        x, noise, level, sched.add_noise, lambda xt, lv: target, lambda xt, lv: x_ref
    )
    loss.backward()
    with torch.no_grad():
        stepped = x - 0.1 * x.numel() * x.grad
    assert (stepped - target).norm() < (x.detach() - target).norm()


# ----------------------------------------------------------------------------------- fake score


def test_fake_score_loss_flow_hand():
    sched = FlowMatchingSchedule(shift=3.0)
    x0 = torch.randn(3, 2, 4, 4, generator=gen(11), requires_grad=True)
    noise = torch.randn(3, 2, 4, 4, generator=gen(12))
    level = torch.tensor([0.95, 0.5, 0.1])
    w = nn.Parameter(torch.tensor(0.3))
    seen = {}

    def pred_fn(x_t, lv):
        seen["x_t"], seen["lv"] = x_t, lv
        return w * x_t

    loss, metrics = fake_score_loss(x0, noise, level, sched.add_noise, pred_fn, sched.pred_target)
    lv = level.view(-1, 1, 1, 1)
    x_t = (1 - lv) * x0.detach() + lv * noise
    torch.testing.assert_close(seen["x_t"], x_t, atol=1e-6, rtol=0)
    assert not seen["x_t"].requires_grad  # sg(x̂_G): the fake loss never reaches the generator
    target = noise - x0.detach()  # flow target ε − x₀
    hand = ((0.3 * x_t - target) ** 2).mean()
    # per-sample mean then batch mean equals the overall mean
    hand_ps = ((0.3 * x_t - target) ** 2).flatten(1).mean(1).mean()
    torch.testing.assert_close(loss, hand, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(loss, hand_ps, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(metrics["loss/fake"], loss.detach())
    loss.backward()
    assert x0.grad is None
    expected_dw = (2 * (0.3 * x_t - target) * x_t).mean()
    torch.testing.assert_close(w.grad, expected_dw, atol=1e-5, rtol=1e-5)


def test_fake_score_loss_ddpm_target_is_noise():
    sched = DDPMSchedule()
    x0 = torch.randn(2, 4, 3, 3, generator=gen(13))
    noise = torch.randn(2, 4, 3, 3, generator=gen(14))
    level = torch.tensor([10.0, 900.0])
    loss, _ = fake_score_loss(x0, noise, level, sched.add_noise, lambda xt, lv: noise, sched.pred_target)
    assert loss.item() == 0.0
    loss2, _ = fake_score_loss(
        x0, noise, level, sched.add_noise, lambda xt, lv: torch.zeros_like(xt), sched.pred_target
    )
    torch.testing.assert_close(loss2, (noise**2).mean())


def test_fake_score_loss_bf16_prediction_in_float32():
    sched = FlowMatchingSchedule(shift=3.0)
    x0 = torch.randn(2, 3, 4, 4, generator=gen(15))
    noise = torch.randn(2, 3, 4, 4, generator=gen(16))
    level = torch.tensor([0.3, 0.7])
    loss, _ = fake_score_loss(
        x0, noise, level, sched.add_noise, lambda xt, lv: xt.bfloat16(), sched.pred_target
    )
    assert loss.dtype == torch.float32
    x_t = sched.add_noise(x0, noise, level)
    torch.testing.assert_close(loss, ((x_t.bfloat16().float() - (noise - x0)) ** 2).mean())


# ------------------------------------------------------------------------------------------- ISG


def test_isg_distance_hand_values():
    a = torch.tensor([[0.0, 1.0], [-2.0, 0.5]])
    b = torch.tensor([[0.0, 0.0], [1.0, 0.5]])
    d = torch.tensor([0.0, 1.0, -3.0, 0.0])
    c = 1e-3
    ph = ((d**2 + c**2).sqrt() - c).mean()
    torch.testing.assert_close(isg_distance(a, b), ph)
    assert isg_distance(a, b).item() == pytest.approx((0 + (1 + 1e-6) ** 0.5 + (9 + 1e-6) ** 0.5 - 2e-3) / 4)
    assert isg_distance(a, b, "pseudo_huber", c=0.5).item() == pytest.approx(
        (0 + (1.25**0.5 - 0.5) + (9.25**0.5 - 0.5) + 0) / 4, rel=1e-6
    )
    assert isg_distance(a, b, "l2").item() == pytest.approx((0 + 1 + 9 + 0) / 4)
    assert isg_distance(a, a).item() == 0.0
    assert isg_distance(a.bfloat16(), b.bfloat16()).dtype == torch.float32


def test_isg_distance_unknown_kind_raises():
    with pytest.raises(ValueError):
        isg_distance(torch.zeros(2), torch.zeros(2), "l1")


@pytest.mark.parametrize("kind", ["pseudo_huber", "l2"])
def test_isg_loss_linear_velocity_fields(kind):
    sched = FlowMatchingSchedule(shift=3.0)
    x_in = torch.randn(2, 3, 4, 4, generator=gen(17))
    a_t, b_g = 0.7, -0.4  # teacher v_T(x, σ) = a·x; generator v(x, σ) = b·x
    b_param = nn.Parameter(torch.tensor(b_g))
    teacher_param = nn.Parameter(torch.tensor(a_t))
    level = sched.grid_to_level(torch.tensor([999, 499]), "ascending_index")  # 1.0, 0.75
    level_mid = sched.grid_to_level(torch.tensor([850, 350]), "ascending_index")
    level_prev = sched.grid_to_level(torch.tensor([749, 249]), "ascending_index")  # 0.9, 0.5
    calls = []

    def teacher(x, lv):
        calls.append(("T", torch.is_grad_enabled(), x, lv))
        return teacher_param * x

    def generator(x, lv):
        calls.append(("G", torch.is_grad_enabled(), x, lv))
        return b_param * x

    pred_gen = b_param * x_in  # the generator's prediction at (x_in, σ) with gradient
    loss, metrics = intra_segment_guidance_loss(
        x_in, pred_gen, level, level_mid, level_prev, teacher, generator, sched.step, kind=kind
    )

    s, sm, sp = (t.view(-1, 1, 1, 1) for t in (level, level_mid, level_prev))
    x_mid = x_in + (sm - s) * a_t * x_in
    x_target = x_mid + (sp - sm) * b_g * x_mid
    x_pred = x_in + (sp - s) * b_g * x_in
    hand = isg_distance(x_pred, x_target, kind)
    torch.testing.assert_close(loss, hand, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(metrics["loss/isg"], loss.detach())
    # call protocol: teacher at (x_in, σ), generator at (x_mid, σ_mid), both without gradient
    assert [c[0] for c in calls] == ["T", "G"]
    assert calls[0][1] is False and calls[1][1] is False
    torch.testing.assert_close(calls[0][2], x_in, atol=0, rtol=0)
    torch.testing.assert_close(calls[0][3], level, atol=0, rtol=0)
    torch.testing.assert_close(calls[1][2], x_mid, atol=1e-6, rtol=0)
    torch.testing.assert_close(calls[1][3], level_mid, atol=0, rtol=0)

    # only pred_gen carries gradient: d loss / d b through x_pred only, teacher untouched
    loss.backward()
    assert teacher_param.grad is None
    xp = x_pred.detach().requires_grad_(True)
    (dxp,) = torch.autograd.grad(isg_distance(xp, x_target, kind), xp)
    expected_db = (dxp * (sp - s) * x_in).sum()
    torch.testing.assert_close(b_param.grad, expected_db, atol=1e-6, rtol=1e-4)


def test_isg_loss_zero_when_generator_follows_teacher():
    # teacher and generator share a constant velocity field ⇒ two Euler segments equal one
    sched = FlowMatchingSchedule(shift=3.0)
    x_in = torch.randn(1, 2, 3, 3, generator=gen(18))
    v = torch.randn(1, 2, 3, 3, generator=gen(19))
    level, mid, prev = torch.tensor([0.9]), torch.tensor([0.8]), torch.tensor([0.75])
    loss, _ = intra_segment_guidance_loss(
        x_in, v, level, mid, prev, lambda x, lv: v, lambda x, lv: v, sched.step, kind="l2"
    )
    assert loss.item() == pytest.approx(0.0, abs=1e-12)


# ------------------------------------------------------------------------------------------- IDA


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin1 = nn.Linear(4, 5)
        self.bn = nn.BatchNorm1d(5)
        self.lin2 = nn.Linear(5, 3)
        self.frozen = nn.Parameter(torch.randn(3))

    def forward(self, x):
        return self.lin2(self.bn(self.lin1(x))) + self.frozen


def _pair(seed_fake=0, seed_gen=1):
    torch.manual_seed(seed_fake)
    fake = Tiny()
    torch.manual_seed(seed_gen)
    generator = Tiny()
    for m, s in ((fake, 10), (generator, 20)):  # distinct, non-default buffers
        m.bn.running_mean.fill_(float(s))
        m.bn.running_var.fill_(float(s + 1))
    return fake, generator


@pytest.mark.parametrize("lam", [0.98, 0.97, 0.5])
def test_ida_blends_every_trainable_parameter(lam):
    fake, generator = _pair()
    fake.frozen.requires_grad_(False)
    phi0 = {k: v.detach().clone() for k, v in fake.named_parameters()}
    theta0 = {k: v.detach().clone() for k, v in generator.named_parameters()}
    gbuf0 = {k: v.clone() for k, v in generator.named_buffers()}
    fbuf0 = {k: v.clone() for k, v in fake.named_buffers()}

    n = implicit_distribution_alignment_(fake, generator, lam)

    trainable = [k for k, p in fake.named_parameters() if p.requires_grad]
    assert n == len(trainable) == 6  # lin1.w/b, bn.w/b, lin2.w/b
    for k, p in fake.named_parameters():
        if k in trainable:
            torch.testing.assert_close(p.detach(), lam * phi0[k] + (1 - lam) * theta0[k], atol=1e-6, rtol=0)
        else:
            torch.testing.assert_close(p.detach(), phi0[k], atol=0, rtol=0)  # requires_grad False
    for k, b in fake.named_buffers():
        torch.testing.assert_close(b, fbuf0[k], atol=0, rtol=0)
    # the generator is never modified
    for k, p in generator.named_parameters():
        torch.testing.assert_close(p.detach(), theta0[k], atol=0, rtol=0)
    for k, b in generator.named_buffers():
        torch.testing.assert_close(b, gbuf0[k], atol=0, rtol=0)


def test_ida_lambda_one_and_zero():
    fake, generator = _pair(2, 3)
    phi0 = copy.deepcopy(fake.state_dict())
    implicit_distribution_alignment_(fake, generator, 1.0)
    for k, p in fake.named_parameters():
        torch.testing.assert_close(p.detach(), phi0[k], atol=0, rtol=0)
    implicit_distribution_alignment_(fake, generator, 0.0)
    for (k, p), (_, q) in zip(fake.named_parameters(), generator.named_parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), atol=0, rtol=0, msg=k)


def test_ida_lower_precision_generator_is_cast():
    fake, generator = _pair(4, 5)
    generator.to(torch.bfloat16)
    phi0 = {k: v.detach().clone() for k, v in fake.named_parameters()}
    implicit_distribution_alignment_(fake, generator, 0.9)
    for k, p in fake.named_parameters():
        assert p.dtype == torch.float32
        theta = dict(generator.named_parameters())[k].detach().float()
        torch.testing.assert_close(p.detach(), 0.9 * phi0[k] + 0.1 * theta, atol=1e-6, rtol=0)


def test_ida_name_mismatch_raises():
    fake, _ = _pair()
    other = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3))
    with pytest.raises(KeyError):
        implicit_distribution_alignment_(fake, other, 0.98)


def test_ida_leaves_optimiser_state_untouched():
    fake, generator = _pair(6, 7)
    opt = torch.optim.AdamW(fake.parameters(), lr=1e-3)
    fake.train()
    fake(torch.randn(8, 4, generator=gen(20))).pow(2).mean().backward()
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    grads = {k: p.grad.clone() for k, p in fake.named_parameters() if p.grad is not None}
    implicit_distribution_alignment_(fake, generator, 0.98)
    after = opt.state_dict()
    assert before["param_groups"] == after["param_groups"]
    assert before["state"].keys() == after["state"].keys()
    for i, st in before["state"].items():
        for key, val in st.items():
            torch.testing.assert_close(after["state"][i][key], val, atol=0, rtol=0)
    # gradients are not touched either, and the optimiser still holds the same parameter objects
    for k, p in fake.named_parameters():
        if k in grads:
            torch.testing.assert_close(p.grad, grads[k], atol=0, rtol=0)
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(p) for p in fake.parameters()]


def test_ida_does_not_record_autograd():
    fake, generator = _pair(8, 9)
    implicit_distribution_alignment_(fake, generator, 0.98)
    for p in fake.parameters():
        assert p.grad_fn is None and p.is_leaf
