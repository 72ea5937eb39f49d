"""SDXL adapter and recipes: conditioning, DDPM conventions, pure-noise anchor, ISG (B2), DMD2 head."""

from __future__ import annotations

import pytest
import torch

from senseflow.config import load_config
from senseflow.distributed import init_distributed
from senseflow.engine import Engine
from senseflow.losses.isg import isg_distance, sdxl_legacy_isg_loss
from senseflow.parallel import full_state_dict
from senseflow.schedules import DDPMSchedule

SENSEFLOW = "configs/tiny/sdxl_senseflow_tiny.yaml"
DMD2 = "configs/tiny/sdxl_dmd2_tiny.yaml"


def make_engine(config, tmp_path, *overrides):
    cfg = load_config(config, ["log.progress_bar=false", "train.image_interval=0", *overrides])
    return Engine(cfg, init_distributed("cpu"), tmp_path)


@pytest.fixture(scope="module")
def sdxl(tiny_cache, tmp_path_factory):
    return make_engine(SENSEFLOW, tmp_path_factory.mktemp("sdxl"))


def test_conditioning_and_unconditional_branch(sdxl):
    cond = sdxl.adapter.encode_prompts(["a red circle", "a blue square"])
    assert cond["prompt_embeds"].shape == (2, 77, 32) and cond["pooled"].shape == (2, 24)
    assert cond["time_ids"].tolist() == [[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]] * 2
    uncond = sdxl.adapter.empty_cond(2)
    assert uncond["prompt_embeds"].abs().sum() == 0 and uncond["pooled"].abs().sum() == 0
    assert torch.equal(uncond["time_ids"], cond["time_ids"])


def test_ddpm_anchor_levels_and_weights(sdxl):
    assert sdxl.anchor_levels.tolist() == [999.0, 749.0, 499.0, 249.0]
    # sqrt(alpha_bar) at the anchors (spec §2.4, §8.7)
    torch.testing.assert_close(
        sdxl.gan_weights, torch.tensor([0.068265, 0.237957, 0.526944, 0.821847]), atol=2e-6, rtol=0
    )


def test_first_anchor_is_pure_noise(sdxl):
    x0 = torch.randn(4, *sdxl.latent_shape)
    state = sdxl.rng.noise.get_state()
    x = sdxl._anchor_input(x0, torch.tensor([0, 1, 0, 3]))
    sdxl.rng.noise.set_state(state)
    noise = torch.randn(x0.shape, generator=sdxl.rng.noise)
    assert torch.equal(x[0], noise[0]) and torch.equal(x[2], noise[2])  # t = 999: x_in := eps exactly
    expected = sdxl.schedule.add_noise(x0, noise, torch.tensor([0.0, 749.0, 0.0, 249.0]))
    torch.testing.assert_close(x[[1, 3]], expected[[1, 3]])


def test_legacy_isg_is_a_clean_estimate_regression():
    """B2: the legacy SDXL ISG equals pseudo-Huber(√ᾱ_prev·(x̂_G − x̂_T)) whatever the intermediate point."""
    s = DDPMSchedule()
    torch.manual_seed(0)
    x_in, eps_g = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t, t_prev = torch.tensor([749.0, 249.0]), torch.tensor([499.0, 0.0])
    eps_t = torch.randn(2, 4, 8, 8)

    def run(t_mid, generator):
        return sdxl_legacy_isg_loss(
            x_in, eps_g, t, t_mid, t_prev, lambda x, lv: eps_t, generator, s.x0_from_pred, s.add_noise
        )[0]

    a, _ = s.alpha_sigma(t_prev)
    want = isg_distance(
        a.view(-1, 1, 1, 1) * s.x0_from_pred(x_in, eps_g, t),
        a.view(-1, 1, 1, 1) * s.x0_from_pred(x_in, eps_t, t),
    )
    for t_mid, gen in (
        (torch.tensor([600.0, 100.0]), lambda x, lv: x * 0.3),
        (torch.tensor([700.0, 30.0]), lambda x, lv: -x),
    ):
        torch.testing.assert_close(run(t_mid, gen), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("legacy", [False, True])
def test_sdxl_isg_legacy_switch(tiny_cache, tmp_path, legacy, monkeypatch):
    import senseflow.engine as engine_mod

    e = make_engine(
        SENSEFLOW, tmp_path, f"compat.sdxl_isg_legacy={str(legacy).lower()}", "distill.gan.weight=0"
    )
    called = []
    monkeypatch.setattr(
        engine_mod, "sdxl_legacy_isg_loss", lambda *a, **k: called.append("legacy") or (torch.zeros(()), {})
    )
    real = engine_mod.intra_segment_guidance_loss
    monkeypatch.setattr(
        engine_mod, "intra_segment_guidance_loss", lambda *a, **k: called.append("new") or real(*a, **k)
    )
    loader = iter(e.loader)
    for k in range(1, 6):  # P = 5: iteration 5 is a generator step
        e.run_iteration(k, next(loader))
    assert called == ["legacy" if legacy else "new"]


def test_dmd2_head_lives_on_the_fake_score_only(tiny_cache, tmp_path):
    e = make_engine(DMD2, tmp_path, "distill.generator_period=2")
    assert e.disc is None and e.d.backsim_prob == 0 and not e.d.ida.enabled
    assert hasattr(e.F.net, "cls_head") and not hasattr(e.G.net, "cls_head")
    head = {id(p) for p in e.F.net.cls_head.parameters()}
    assert head <= {id(p) for p in e.F.params}  # trained by the fake score's optimizer
    logits = e.classifier_logits(torch.randn(3, *e.latent_shape), e.adapter.encode_prompts(["x"] * 3))
    assert logits.shape == (3,) and logits.dtype == torch.float32

    loader = iter(e.loader)
    e.run_iteration(1, next(loader))  # fake step (with the classifier terms)
    before = {k: v.clone() for k, v in full_state_dict(e.F.net).items()}
    x0_real = next(loader)["latent"]
    cond = e.adapter.encode_prompts(["x"])
    x_in, idx = e.generator_input(x0_real, cond, None, 1)
    _, _, metrics = e.generator_step(
        x_in, e.anchor_levels[idx], e.anchor_cond_levels[idx], idx, cond, e.adapter.empty_cond(1), None
    )
    assert metrics["loss/cls_gen"] > 0
    after = full_state_dict(e.F.net)  # the generator turn leaves the fake UNet and head untouched
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in e.F.params)
