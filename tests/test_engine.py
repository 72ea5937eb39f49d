"""The engine in-process on the tiny SD3 teacher: every compat switch does what it says, batch > 1,
and the adversarial gradient path (spec Appendix B, §8.7, B7); several blocks per FSDP2 unit on the tiny
FLUX and SDXL teachers."""

from __future__ import annotations

import pytest
import torch

from senseflow.config import load_config
from senseflow.distributed import init_distributed
from senseflow.engine import Engine, RandomStreams

TINY = "configs/tiny/sd35_senseflow_tiny.yaml"


def make_engine(tmp_path, *overrides: str, config: str = TINY) -> Engine:
    cfg = load_config(config, ["log.progress_bar=false", "train.image_interval=0", *overrides])
    return Engine(cfg, init_distributed("cpu"), tmp_path)


@pytest.fixture(scope="module")
def engine(tiny_cache, tmp_path_factory):
    return make_engine(tmp_path_factory.mktemp("engine"))


@pytest.mark.parametrize("legacy", [True, False])
def test_sd35_gan_weight_legacy(tiny_cache, tmp_path, legacy):
    e = make_engine(tmp_path, f"compat.sd35_gan_weight_legacy={str(legacy).lower()}")
    want = [8.96e-6, 0.25133, 0.56362, 0.81086] if legacy else [0.0, 0.01, 0.0625, 0.25]  # spec §8.7
    torch.testing.assert_close(e.gan_weights, torch.tensor(want), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("legacy", [True, False])
def test_sd35_isg_last_sigma_legacy(tiny_cache, tmp_path, legacy):
    e = make_engine(tmp_path, f"compat.sd35_isg_last_sigma_legacy={str(legacy).lower()}")
    idx = torch.tensor([0, 1, 2, 3])
    mid, prev = e.isg_levels(idx)
    torch.testing.assert_close(prev[:3], torch.tensor([0.9, 0.75, 0.5]), atol=1e-6, rtol=0)
    assert prev[3].item() == pytest.approx(0.002994, abs=1e-6) if legacy else prev[3].item() == 0.0
    # intermediate points respect the 50-index margins (spec §7.1 table)
    lo = torch.tensor([0.9231, 0.7857, 0.5625, 0.1388])
    hi = torch.tensor([0.9828, 0.8750, 0.7105, 0.4286])
    assert torch.all(mid >= lo - 1e-4) and torch.all(mid <= hi + 1e-4)


def test_shared_noise_across_ranks():
    for shared, same in ((True, True), (False, False)):
        a = RandomStreams(7, rank=0, device=torch.device("cpu"), shared_noise=shared)
        b = RandomStreams(7, rank=1, device=torch.device("cpu"), shared_noise=shared)
        na, nb = torch.randn(4, generator=a.noise), torch.randn(4, generator=b.noise)
        assert torch.equal(na, nb) is same
        # control-flow draws are shared by all ranks in both modes (spec §12.6)
        assert torch.equal(torch.rand(3, generator=a.control), torch.rand(3, generator=b.control))


@pytest.mark.parametrize("per_iteration", [True, False])
def test_lr_schedule_per_iteration(tiny_cache, tmp_path, per_iteration):
    e = make_engine(
        tmp_path,
        f"compat.lr_schedule_per_iteration={str(per_iteration).lower()}",
        "distill.generator_period=3",
    )
    loader = iter(e.loader)
    for k in (1, 2, 3):
        e.run_iteration(k, next(loader))
    assert e.F.sched.last_epoch == 3  # the fake score's schedule advances every iteration
    assert e.G.sched.last_epoch == (3 if per_iteration else 1)


def test_no_image_resize(tiny_cache, tmp_path):
    from senseflow.errors import DataError

    e = make_engine(tmp_path)
    assert e.dataset[1]["image"].shape == (3, 128, 128)  # a 160x128 image, resized and cropped
    with pytest.raises(DataError, match="160x128"):
        make_engine(tmp_path, "compat.no_image_resize=true").dataset[1]


@pytest.mark.parametrize("same", [True, False])
def test_reference_is_real_input(tiny_cache, tmp_path, same):
    e = make_engine(tmp_path, f"compat.reference_is_real_input={str(same).lower()}")
    batch = next(iter(e.loader))
    images = batch["image"]
    adv = e.adversarial_inputs(list(batch["prompt"]), images, torch.zeros(1, dtype=torch.long))
    plain = e.disc.reference_features(images)
    equal = all(torch.equal(a, b) for a, b in zip(adv.ref, plain))
    assert equal is same


def _generator_step(e):
    batch = next(iter(e.loader))
    prompts = list(batch["prompt"])
    n = len(prompts)
    cond, uncond = e.adapter.encode_prompts(prompts), e.adapter.empty_cond(n)
    x0_real = e.adapter.encode_images(batch["image"], e.rng.noise)
    x_in, idx = e.generator_input(x0_real, cond, None, n)
    idx = torch.full_like(idx, 3)  # cleanest anchor: non-zero GAN weight
    x_in = e.schedule.add_noise(x0_real, torch.randn_like(x0_real), e.anchor_levels[idx])
    adv = e.adversarial_inputs(prompts, batch["image"], idx)
    return e.generator_step(x_in, e.anchor_levels[idx], e.anchor_cond_levels[idx], idx, cond, uncond, adv)


@pytest.mark.parametrize("leak", [False, True])
def test_d_grad_leak(tiny_cache, tmp_path, leak):
    """B1: fixed, the generator's adversarial loss leaves no gradient on the heads; leak keeps it."""
    e = make_engine(tmp_path, f"compat.d_grad_leak={str(leak).lower()}")
    _, image, metrics = _generator_step(e)
    assert image is not None and metrics["loss/gan"] != 0
    grads = [p.grad for p in e.disc.heads.parameters()]
    if leak:
        assert any(g is not None and g.abs().sum() > 0 for g in grads)
    else:
        assert all(g is None for g in grads)
    assert all(p.requires_grad for p in e.disc.heads.parameters())  # unfrozen again for the D step


def test_adversarial_gradient_reaches_generator_sample(engine):
    """Gradients flow from the hinge loss through the discriminator and the VAE decode to x0."""
    from senseflow.losses.gan import hinge_g

    x0 = torch.randn(1, *engine.latent_shape, requires_grad=True)
    image = engine.adapter.decode_latents(x0)
    batch = next(iter(engine.loader))
    adv = engine.adversarial_inputs(list(batch["prompt"]), batch["image"], torch.tensor([3]))
    hinge_g(engine.disc(image, adv.text, adv.ref, generator=engine.rng.noise)).sum().backward()
    assert x0.grad is not None and x0.grad.abs().sum() > 0
    assert all(p.grad is None for p in engine.disc.backbone.parameters())  # frozen backbone


@pytest.mark.parametrize("fp32_no_grad", [False, True])
def test_generator_fp32_when_no_grad(tiny_cache, tmp_path, monkeypatch, fp32_no_grad):
    e = make_engine(
        tmp_path,
        "precision.compute=bf16",
        "precision.fsdp_mixed=false",
        f"compat.generator_fp32_when_no_grad={str(fp32_no_grad).lower()}",
    )
    seen = []
    forward = e.adapter.forward

    def spy(net, *args):
        if net is e.G.net:
            seen.append((torch.is_grad_enabled(), torch.is_autocast_enabled("cpu")))
        return forward(net, *args)

    monkeypatch.setattr(e.adapter, "forward", spy)
    x = torch.randn(1, *e.latent_shape)
    cond = e.adapter.encode_prompts(["a red circle"])
    level = torch.tensor([0.9])
    e._gen_pred(x, level, cond, grad=False)
    e._gen_pred(x, level, cond, grad=True)
    assert seen == [(False, not fp32_no_grad), (True, True)]


def test_generator_fp32_when_no_grad_needs_fp32_weights(tiny_cache):
    from senseflow.errors import ConfigError

    with pytest.raises(ConfigError, match="precision.fsdp_mixed"):
        load_config(TINY, ["precision.compute=bf16", "compat.generator_fp32_when_no_grad=true"])


def test_batch_size_above_one(tiny_cache, tmp_path):
    """B7 fixed: per-sample levels everywhere; every loss is finite with 3 images per process."""
    e = make_engine(tmp_path, "train.batch_size=3", "distill.generator_period=1")
    loader = iter(e.loader)
    for k in (1, 2):
        metrics = e.run_iteration(k, next(loader))
    for key in ("loss/dm", "loss/isg", "loss/gan", "loss/fake", "loss/disc_real", "loss/disc_fake"):
        assert torch.isfinite(metrics[key]), key
    x_in, idx = e.generator_input(e.adapter.encode_images(next(loader)["image"], e.rng.noise), None, None, 3)
    assert x_in.shape == (3, *e.latent_shape) and idx.shape == (3,)


# The FSDP2 units of the tiny FLUX (1 double- and 2 single-stream blocks) and SDXL (2 down blocks, the mid
# block, 2 up blocks) transformers, root excluded, by model.fsdp_blocks_per_unit.
FLUX_UNITS = {
    1: [["transformer_blocks.0"], ["single_transformer_blocks.0"], ["single_transformer_blocks.1"]],
    2: [["transformer_blocks.0", "single_transformer_blocks.0"], ["single_transformer_blocks.1"]],
    3: [["transformer_blocks.0", "single_transformer_blocks.0", "single_transformer_blocks.1"]],
}
# the up blocks start a unit (DMD2's bottleneck runs the down and mid blocks only)
SDXL_UNITS = {
    1: [["down_blocks.0"], ["down_blocks.1"], ["mid_block"], ["up_blocks.0"], ["up_blocks.1"]],
    2: [["down_blocks.0", "down_blocks.1"], ["mid_block"], ["up_blocks.0", "up_blocks.1"]],
    3: [["down_blocks.0", "down_blocks.1", "mid_block"], ["up_blocks.0", "up_blocks.1"]],
}


def _units(net) -> list[list[str]]:
    from senseflow.parallel import fsdp_units

    return sorted(fsdp_units(net))


def _metrics(path) -> list[dict]:
    """The records of a run's metrics.jsonl."""
    import json

    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def _losses(records: list[dict]) -> list[dict]:
    """The losses, gradient norms and discriminator metrics of ``records`` (no timings)."""
    keep = ("loss/", "grad_norm/", "disc/")
    return [{k: v for k, v in r.items() if k.startswith(keep)} for r in records]


@pytest.mark.parametrize(
    "family, config, units",
    [
        ("flux", "configs/tiny/flux_senseflow_tiny.yaml", FLUX_UNITS),
        ("sdxl_dmd2", "configs/tiny/sdxl_dmd2_tiny.yaml", SDXL_UNITS),
    ],
)
def test_fsdp_blocks_per_unit(tiny_cache, tmp_path, family, config, units):
    """``model.fsdp_blocks_per_unit`` 2 and 3: the generator, fake score and teacher have the predicted
    FSDP2 units (DMD2's fp32 classifier head a unit of its own), and three iterations (fake step, generator
    and fake step, fake step) log the losses and gradient norms of one unit per block and end at its
    weights (the generator's and fake score's, gathered), with the same parameter names.

    FLUX: bitwise. SDXL: FSDP2 puts an identity autograd node on each unit's inputs, so with fewer units
    the gradients reaching the UNet's skip connections and shared time embedding are summed in another
    order (last bits; in a check, the grouped units' gradients were the closer to an unsharded UNet's);
    AdamW's first steps move a weight whose gradient is rounding noise by about the learning rate."""
    from senseflow.parallel import full_state_dict

    common = [
        "train.log_interval=1",
        "distill.generator_period=2",
        "train.iter_num=3",
        "checkpoint.enabled=false",
        "model.fsdp=always",  # FSDP2 units in this single process
    ]
    runs = {}
    for n in (1, 2, 3):
        (tmp_path / str(n)).mkdir()
        e = make_engine(tmp_path / str(n), *common, f"model.fsdp_blocks_per_unit={n}", config=config)
        extra = [["cls_head"]] if family == "sdxl_dmd2" else []
        for net, more in ((e.G.net, []), (e.F.net, extra), (e.teacher, [])):
            assert _units(net) == sorted([[""], *units[n], *more]), (n, _units(net))
        init = {k: v.clone() for k, v in full_state_dict(e.G.net).items()}
        init.update({f"fake.{k}": v.clone() for k, v in full_state_dict(e.F.net).items()})
        e.train()
        final = dict(full_state_dict(e.G.net))
        final.update({f"fake.{k}": v for k, v in full_state_dict(e.F.net).items()})
        runs[n] = (_losses(_metrics(tmp_path / str(n))), init, final)
    metrics, init, final = runs[1]
    assert len(metrics) == 3 and {"loss/dm", "loss/fake", "grad_norm/gen", "grad_norm/fake"} <= set(
        metrics[1]
    )
    update = torch.cat([(final[k] - init[k]).flatten() for k in final])
    assert update.norm() > 0
    for n in (2, 3):
        m, i, f = runs[n]
        assert f.keys() == final.keys() and all(torch.equal(i[k], init[k]) for k in init), n
        if family == "flux":
            assert m == metrics, n
            assert all(torch.equal(f[k], final[k]) for k in final), n
        else:
            for a, b in zip(metrics, m):
                assert a.keys() == b.keys()
                for k in a:
                    assert b[k] == pytest.approx(a[k], rel=1e-4), (n, k)
            diff = torch.cat([(f[k] - final[k]).flatten() for k in final])
            assert diff.norm() < 1e-2 * update.norm(), (n, diff.norm() / update.norm())


@pytest.mark.parametrize("fused", [False, True])
def test_nonfinite_gradient_skips_the_step(tiny_cache, tmp_path, fused):
    """A non-finite gradient norm skips the optimiser step (weights, moments and step count unchanged) and
    is counted; a finite one then steps. The fused AdamW of CUDA runs skips on the device (``found_inf``,
    no host synchronisation) and counts them at the next log; the other optimisers check on the host."""
    engine = make_engine(tmp_path)
    t = engine.F
    t.opt = torch.optim.AdamW(t.params, lr=1e-3, fused=fused)
    weights = [p.detach().clone() for p in t.params]
    before = dict(engine.counters)

    def loss(scale: float) -> torch.Tensor:
        return scale * sum(p.float().sum() for p in t.params)

    engine._step(t, [loss(float("nan"))], "fake")
    assert all(torch.equal(p, w) for p, w in zip(t.params, weights))
    assert all(torch.count_nonzero(s.get("exp_avg", torch.zeros(1))) == 0 for s in t.opt.state.values())
    assert all(int(s.get("step", 0)) == 0 for s in t.opt.state.values())
    # fused: nothing counted on the host yet (that would have synchronised)
    assert engine.counters["nonfinite_fake"] == before["nonfinite_fake"] + (0 if fused else 1)
    engine._count_nonfinite()
    assert engine.counters["nonfinite_fake"] == before["nonfinite_fake"] + 1
    engine._step(t, [loss(1.0)], "fake")
    assert not any(torch.equal(p, w) for p, w in zip(t.params, weights))
    assert all(int(s["step"]) == 1 for s in t.opt.state.values())
    engine._count_nonfinite()
    assert engine.counters["nonfinite_fake"] == before["nonfinite_fake"] + 1
