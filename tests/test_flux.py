"""FLUX adapter: latent packing, position ids, the guidance-free student, bf16 anchor sigmas (N1)."""

from __future__ import annotations

import json

import pytest
import torch

from senseflow.adapters.flux import GUIDANCE_PREFIX, image_ids, pack_latents, unpack_latents
from senseflow.config import load_config
from senseflow.distributed import init_distributed
from senseflow.engine import Engine
from senseflow.errors import ConfigError
from senseflow.parallel import full_state_dict

TINY = "configs/tiny/flux_senseflow_tiny.yaml"


def make_engine(tmp_path, *overrides):
    cfg = load_config(TINY, ["log.progress_bar=false", "train.image_interval=0", *overrides])
    return Engine(cfg, init_distributed("cpu"), tmp_path)


def test_pack_unpack_round_trip_and_layout():
    x = torch.randn(2, 16, 6, 8)
    packed = pack_latents(x)
    assert packed.shape == (2, 12, 64)
    assert torch.equal(unpack_latents(packed, 6, 8), x)
    # token (row 1, col 2) holds the 2x2 patch at rows 2-3, cols 4-5; feature c*4 + dy*2 + dx
    tok = packed[0, 1 * 4 + 2]
    assert tok[3 * 4 + 1 * 2 + 0] == x[0, 3, 3, 4]
    ids = image_ids(6, 8)
    assert ids.shape == (12, 3) and ids[6].tolist() == [0.0, 1.0, 2.0] and ids[:, 0].abs().sum() == 0


def test_student_has_no_guidance_embedder_and_shares_the_rest(tiny_cache, tmp_path):
    e = make_engine(tmp_path)
    g, f, t = (full_state_dict(m) for m in (e.G.net, e.F.net, e.teacher))
    assert not any(k.startswith(GUIDANCE_PREFIX) for k in g) and g.keys() == f.keys()
    assert {k for k in t if k.startswith(GUIDANCE_PREFIX)} == set(t) - set(g) != set()
    assert all(torch.equal(g[k], t[k]) and torch.equal(f[k], t[k]) for k in g)
    assert e.adapter.generator_config()["guidance_embeds"] is False
    assert e.G.net.time_text_embed.__class__.__name__ == "CombinedTimestepTextProjEmbeddings"


@pytest.mark.parametrize("bf16", [True, False])
def test_flux_bf16_sigma(tiny_cache, tmp_path, bf16):
    e = make_engine(tmp_path, f"compat.flux_bf16_sigma={str(bf16).lower()}")
    torch.testing.assert_close(e.anchor_cond_levels, torch.tensor([1.0, 0.904, 0.759, 0.512]))
    noised = [1.0, 0.90234375, 0.7578125, 0.51171875] if bf16 else [1.0, 0.904, 0.759, 0.512]
    torch.testing.assert_close(e.anchor_levels, torch.tensor(noised))
    # (1 - sigma_a)^2 with the noising sigma (spec §8.7: 0, 0.0095367, 0.058655, 0.238419)
    torch.testing.assert_close(e.gan_weights, (1 - torch.tensor(noised)) ** 2)
    if bf16:
        torch.testing.assert_close(
            e.gan_weights, torch.tensor([0.0, 0.0095367, 0.058655, 0.238419]), atol=1e-6, rtol=0
        )


def test_teacher_is_driven_by_the_guidance_embedding(tiny_cache, tmp_path):
    e = make_engine(tmp_path)
    cond = e.adapter.encode_prompts(["a blue square"])
    assert cond["prompt_embeds"].shape == (1, 512, 32) and cond["pooled"].shape == (1, 8)
    x, level = torch.randn(1, *e.latent_shape), torch.tensor([0.7])
    with torch.no_grad():
        a = e.adapter.guided(e.teacher, x, level, cond, None, torch.tensor([2.0]))
        b = e.adapter.guided(e.teacher, x, level, cond, None, torch.tensor([7.0]))
    assert a.shape == x.shape and not torch.allclose(a, b)


def test_user_guidance_free_folder(tiny_cache, tmp_path):
    folder = tmp_path / "wo" / "transformer"
    folder.mkdir(parents=True)
    teacher_cfg = json.loads((tiny_cache / "tiny" / "flux-v1" / "transformer" / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**teacher_cfg, "guidance_embeds": False}))
    e = make_engine(tmp_path / "run", f"paths.flux_wo_guidance_embed={tmp_path / 'wo'}")
    assert not any(k.startswith(GUIDANCE_PREFIX) for k in full_state_dict(e.G.net))
    (folder / "config.json").write_text(json.dumps({**teacher_cfg, "guidance_embeds": True}))
    with pytest.raises(ConfigError, match="guidance_embeds false"):
        make_engine(tmp_path / "run2", f"paths.flux_wo_guidance_embed={tmp_path / 'wo'}")


def test_shipped_guidance_free_config_matches_flux_dev():
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    wo = json.loads((repo / "exp_flux/flux-wo-guidance-embed/transformer/config.json").read_text())
    dev = json.loads((repo / "senseflow/arch/flux_dev/transformer/config.json").read_text())
    assert wo == {**dev, "guidance_embeds": False}


def test_adamw8bit_steps(tiny_cache):
    """The 8-bit optimizer option (R2, R3) builds and steps (torchao; compiled kernels on CPU)."""
    pytest.importorskip("torchao")
    from senseflow.optim import adamw8bit

    lin = torch.nn.Linear(256, 256)
    opt = adamw8bit(
        list(lin.parameters()), {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}
    )
    before = lin.weight.detach().clone()
    lin(torch.randn(4, 256)).pow(2).mean().backward()
    opt.step()
    assert not torch.equal(before, lin.weight) and "exp_avg" in opt.state[lin.weight]


def test_first_8bit_step_is_announced(caplog):
    """The first 8-bit AdamW step (torchao compiles it per parameter shape) is logged with its time, once."""
    pytest.importorskip("torchao")
    import logging
    from types import SimpleNamespace

    from senseflow.engine import Engine, Trainee
    from senseflow.optim import adamw8bit

    lin = torch.nn.Linear(256, 256)
    params = list(lin.parameters())
    kwargs = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}
    for name, opt in (
        ("adamw8bit", adamw8bit(params, kwargs)),
        ("adamw", torch.optim.AdamW(params, **kwargs)),
    ):
        engine = SimpleNamespace(cfg=SimpleNamespace(optimizer=SimpleNamespace(name=name)))
        trainee = Trainee(lin, opt, None, params)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="senseflow.engine"):
            for _ in range(2):
                before = lin.weight.detach().clone()
                lin(torch.randn(4, 256)).pow(2).mean().backward()
                Engine._opt_step(engine, trainee, "fake")
                opt.zero_grad()
                assert not torch.equal(before, lin.weight)
        announced = [r.getMessage() for r in caplog.records if "first fake optimiser step" in r.getMessage()]
        if name == "adamw8bit":
            assert len(announced) == 2 and "2 parameter shapes" in announced[0] and "done in" in announced[1]
        else:
            assert not announced
        assert trainee.stepped


@pytest.mark.parametrize("master", ["bf16", "fp32"])
def test_failed_first_8bit_step_names_the_fix(master):
    """A torchao compile failure of the first 8-bit step (seen on torch 2.11 with bf16 weights) becomes
    one SenseFlowError naming the config keys that avoid it."""
    from types import SimpleNamespace

    from senseflow.engine import Engine, Trainee
    from senseflow.errors import SenseFlowError

    class Failing(torch.optim.Optimizer):
        def step(self, closure=None):
            raise NotImplementedError("OptimState8bit dispatch: attempting to run unimplemented aten.view")

    lin = torch.nn.Linear(4, 4)
    cfg = SimpleNamespace(
        optimizer=SimpleNamespace(name="adamw8bit"), precision=SimpleNamespace(master=master)
    )
    trainee = Trainee(lin, Failing(lin.parameters(), {}), None, list(lin.parameters()))
    with pytest.raises(SenseFlowError) as err:
        Engine._opt_step(SimpleNamespace(cfg=cfg), trainee, "gen")
    msg = str(err.value)
    assert (
        "unimplemented aten.view" in msg and f"for {master} weights" in msg and "optimizer.name=adamw" in msg
    )
    assert ("precision.master=fp32" in msg) == (master == "bf16") and not trainee.stepped
