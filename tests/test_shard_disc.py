"""``model.shard_discriminator``: the tiny SD3.5 recipe on 2 gloo processes with the VFM discriminator's
heads sharded by FSDP2 trains like the replicated heads (losses, logits, gradient norms, the clipped
gradients of every D step, the final heads), each rank holds about half the heads, spectral norm's
power-iteration buffers stay identical on the ranks, the generator's adversarial gradient stays out of
the heads (B1) unless ``compat.d_grad_leak``, and a stopped and resumed sharded run continues exactly.
With both transformer blocks in one FSDP2 unit (``model.fsdp_blocks_per_unit=2``) the sharded run is
the same as with one unit per block.

One spawn runs everything (in-process ``Engine.train`` calls, as the launcher makes them) and writes each
rank's results to ``tmp_path``; about 25 s on 2 CPU cores."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from .conftest import REPO, gloo_group, spawn_engine_runs
from .conftest import loss_metrics as _losses
from .conftest import max_abs_diff as _max_diff

WORLD = 2
TINY = "configs/tiny/sd35_senseflow_tiny.yaml"
# Iteration 2 is a generator step. Real latents at random anchors: backward simulation would often pick
# the noisiest anchor, whose adversarial weight is ~0. A small clip norm, so that every D step clips.
BASE = (
    "log.progress_bar=false",
    "train.image_interval=0",
    "train.log_interval=1",
    "train.iter_num=3",
    "train.grad_clip=0.05",
    "distill.generator_period=2",
    "distill.backsim_prob=0",
    "checkpoint.enabled=false",
)
RUNS = {  # name: (shard_discriminator, d_grad_leak)
    "replicated": (False, False),
    "sharded": (True, False),
    "replicated_leak": (False, True),
    "sharded_leak": (True, True),
}
GROUPED = ["model.shard_discriminator=true", "model.fsdp_blocks_per_unit=2"]


class _Messages(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _full_params(heads) -> dict[str, torch.Tensor]:
    """The heads' full parameters (complete on rank 0), copied: on CPU they may alias the live ones."""
    from senseflow.parallel import full_state_dict

    names = {name for name, _ in heads.named_parameters()}
    return {k: v.clone() for k, v in full_state_dict(heads).items() if k in names}


def _full_generator(engine) -> dict[str, torch.Tensor]:
    """The generator's full state (complete on rank 0), copied."""
    from senseflow.parallel import full_state_dict

    return {k: v.clone() for k, v in full_state_dict(engine.G.net).items()}


def _train(overrides: list[str], save_dir: Path, info, messages: _Messages) -> dict:
    """Build an engine, train it, and describe its heads before and after (rank-local values, and full
    parameters complete on rank 0). Per D step, ``had_grad`` tells whether the heads already held a
    gradient when it began (the generator's adversarial gradient on generator iterations, B1), and
    ``grads`` holds the full clipped gradient that the optimiser applied."""
    from senseflow.config import load_config
    from senseflow.engine import Engine
    from senseflow.parallel import fsdp_units

    save_dir.mkdir(parents=True, exist_ok=True)
    messages.lines.clear()
    engine = Engine(load_config(REPO / TINY, [*BASE, *overrides]), info, save_dir)
    heads, disc_step, opt_step = engine.disc.heads, engine.disc_step, engine._opt_step
    had_grad, grads = [], []

    def recording_disc_step(*args):
        had_grad.append(any(p.grad is not None for p in engine.D.params))
        return disc_step(*args)

    def recording_opt_step(t, name):
        if name == "disc":  # the full clipped gradient (gathering a DTensor is a collective: all ranks)
            full = [getattr(p.grad, "full_tensor", p.grad.detach)() for p in t.params]
            grads.append(torch.cat([g.flatten() for g in full]).clone())
        opt_step(t, name)

    engine.disc_step, engine._opt_step = recording_disc_step, recording_opt_step
    init, init_buffers = _full_params(heads), {k: b.clone() for k, b in heads.named_buffers()}
    gen_init = _full_generator(engine)
    engine.train()
    return {
        "units": [sorted(fsdp_units(net)) for net in (engine.G.net, engine.F.net, engine.teacher)],
        "gen_init": gen_init,
        "gen": _full_generator(engine),
        "had_grad": had_grad,
        "grads": grads,
        "log": list(messages.lines),
        "local_numel": sum(getattr(p, "_local_tensor", p).numel() for p in heads.parameters()),
        "all_dtensor": all(hasattr(p, "placements") for p in heads.parameters()),
        "init": init,
        "params": _full_params(heads),
        "init_buffers": init_buffers,
        "buffers": {k: b.clone() for k, b in heads.named_buffers()},
    }


def _worker(rank: int, store_path: str, out_dir: str) -> None:
    from senseflow.distributed import DistInfo

    messages = _Messages()
    logging.getLogger("senseflow.engine").addHandler(messages)
    logging.getLogger("senseflow.engine").setLevel(logging.INFO)
    with gloo_group(rank, store_path, WORLD):
        info = DistInfo(rank, WORLD, rank, torch.device("cpu"))
        out = Path(out_dir)
        results = {}
        for name, (sharded, leak) in RUNS.items():
            overrides = [
                f"model.shard_discriminator={str(sharded).lower()}",
                f"compat.d_grad_leak={str(leak).lower()}",
            ]
            results[name] = _train(overrides, out / name, info, messages)
        results["grouped"] = _train(GROUPED, out / "grouped", info, messages)
        # "sharded", stopped after the generator iteration (2) and resumed
        split = ["model.shard_discriminator=true", "checkpoint.enabled=true", "train.save_interval=2"]
        _train([*split, "train.iter_num=2"], out / "split", info, messages)
        results["split"] = _train([*split, "train.iter_num=3"], out / "split", info, messages)
        torch.save(results, out / f"rank{rank}.pt")
        dist.barrier()


@pytest.fixture(scope="module")
def runs(tiny_cache, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shard_disc")
    return spawn_engine_runs(_worker, tmp, WORLD, [*RUNS, "grouped", "split"])


@pytest.mark.parametrize("leak", [False, True], ids=["fixed", "leak"])
def test_sharded_heads_train_like_replicated(runs, leak):
    """Same metrics and clipped D gradients (global-norm clip, averaged over the ranks), so the same
    heads. AdamW moves every parameter by about the learning rate, also those whose gradient is rounding
    noise (conv biases in front of a batch norm; the main branch's output bias, whose real- and fake-pass
    gradients cancel): their updates differ with the summation order, by about 1% of the largest update."""
    results, metrics = runs
    rep, shd = ("replicated_leak", "sharded_leak") if leak else ("replicated", "sharded")
    assert [r["iter"] for r in metrics[shd]] == [1, 2, 3]
    assert "loss/gan" in metrics[shd][1] and "loss/disc_fake" in metrics[shd][1]  # a generator iteration
    for a, b in zip(metrics[rep], metrics[shd]):
        want = _losses(a)
        assert _losses(b).keys() == want.keys()
        for k, v in want.items():
            assert _losses(b)[k] == pytest.approx(v, rel=1e-4, abs=1e-7), (a["iter"], k)
    for r in results:
        assert len(r[rep]["grads"]) == len(r[shd]["grads"]) == 3
        for step, (g_rep, g_shd) in enumerate(zip(r[rep]["grads"], r[shd]["grads"])):
            norm = g_rep.norm().item()
            assert norm == pytest.approx(0.05, rel=1e-3), step  # clipped to train.grad_clip
            assert (g_shd - g_rep).abs().max().item() <= 1e-4 * g_rep.abs().max().item(), step
    r0 = results[0]
    assert _max_diff(r0[rep]["init"], r0[shd]["init"]) == 0
    scale = _max_diff(r0[rep]["params"], r0[rep]["init"])  # largest update
    assert _max_diff(r0[shd]["params"], r0[rep]["params"]) <= 0.05 * scale


def test_sharded_heads_are_split_over_the_ranks(runs):
    """Each rank holds about half the heads' parameters, sharded again after the run; one log line."""
    results, _ = runs
    total = results[0]["replicated"]["local_numel"]
    shards = [r["sharded"]["local_numel"] for r in results]
    assert sum(shards) == total and max(shards) <= 0.55 * total, (total, shards)
    for r in results:
        assert r["sharded"]["all_dtensor"] and not r["replicated"]["all_dtensor"]  # resharded after the run
        logged = {name: [m for m in r[name]["log"] if "discriminator heads sharded" in m] for name in RUNS}
        assert len(logged["sharded"]) == 1 and "sharded over 2 ranks" in logged["sharded"][0]
        assert not logged["replicated"]


def test_spectral_norm_buffers_stay_replicated(runs):
    """Every rank runs the power iteration on the same all-gathered weight: ``_u``/``_v`` stay identical on
    the ranks, and equal to the replicated heads' (up to the weights' rounding)."""
    results, _ = runs
    bufs = [r["sharded"]["buffers"] for r in results]
    assert any(k.endswith("._u") for k in bufs[0])
    for k, b in bufs[0].items():
        assert torch.equal(b, bufs[1][k]), k
        assert not torch.equal(b, results[0]["sharded"]["init_buffers"][k]), k  # power iterations ran
        torch.testing.assert_close(b, results[0]["replicated"]["buffers"][k], rtol=0, atol=1e-5)


def test_generator_gradient_stays_out_of_sharded_heads(runs):
    """B1: on the generator iteration (2) the D step starts without gradient on the heads, in both modes;
    with ``compat.d_grad_leak`` it starts with the generator's, which changes that step's gradient and
    the heads."""
    results, _ = runs
    for r in results:
        for name, (_, leak) in RUNS.items():
            assert r[name]["had_grad"] == [False, leak, False], name
        fixed, leak = r["sharded"]["grads"], r["sharded_leak"]["grads"]
        assert torch.equal(fixed[0], leak[0])
        assert (fixed[1] - leak[1]).abs().max().item() > 0.01 * fixed[1].abs().max().item()
    r0 = results[0]
    scale = _max_diff(r0["sharded"]["params"], r0["sharded"]["init"])
    assert _max_diff(r0["sharded"]["params"], r0["sharded_leak"]["params"]) > 0.5 * scale


def test_sharded_run_resumes_exactly(runs):
    """Stopped after the generator iteration (2) and resumed: the same losses and heads as the run
    without interruption."""
    results, metrics = runs
    for r in results:
        resumed = [m for m in r["split"]["log"] if m.startswith("resumed from")]
        assert len(resumed) == 1 and "at iteration 2" in resumed[0]
    assert [r["iter"] for r in metrics["split"]] == [1, 2, 3]
    for a, b in zip(metrics["sharded"], metrics["split"]):
        assert _losses(a) == _losses(b), a["iter"]
    full, split = results[0]["sharded"]["params"], results[0]["split"]["params"]
    assert full.keys() == split.keys() and all(torch.equal(full[k], split[k]) for k in full)


def test_grouped_blocks_train_like_one_unit_per_block(runs):
    """``model.fsdp_blocks_per_unit=2``: the two blocks of each tiny SD3.5 transformer form one FSDP2 unit
    on both ranks, and the sharded run logs the same losses and gradient norms and ends at the same
    generator and heads as with one unit per block."""
    results, metrics = runs
    per_block = [[""], ["transformer_blocks.0"], ["transformer_blocks.1"]]
    for r in results:
        assert r["sharded"]["units"] == [per_block] * 3
        assert r["grouped"]["units"] == [[[""], ["transformer_blocks.0", "transformer_blocks.1"]]] * 3
    assert [r["iter"] for r in metrics["grouped"]] == [1, 2, 3]
    for a, b in zip(metrics["sharded"], metrics["grouped"]):
        la, lb = _losses(a), _losses(b)
        # after the generator's step (below: last bits of the time embedder) up to rounding
        assert la.keys() == lb.keys() and all(lb[k] == pytest.approx(v, rel=1e-5) for k, v in la.items())
    r0 = results[0]
    full, grouped = r0["sharded"]["params"], r0["grouped"]["params"]
    assert full.keys() == grouped.keys()
    # the gradient of the time embedding, which both blocks take, is summed in another order (FSDP2's
    # identity autograd node on each unit's inputs): last bits of the timestep embedder's weights, and so
    # of the images the heads see after the generator's step (AdamW's first steps move a weight by about
    # the learning rate however small its gradient: 0.5 % of the largest update seen with torch 2.15)
    assert _max_diff(grouped, full) <= 2e-2 * _max_diff(full, r0["sharded"]["init"])
    assert r0["sharded"]["gen"].keys() == r0["grouped"]["gen"].keys()
    scale = _max_diff(r0["sharded"]["gen"], r0["sharded"]["gen_init"])  # largest update
    assert scale > 0
    assert _max_diff(r0["grouped"]["gen"], r0["sharded"]["gen"]) <= 1e-3 * scale


def test_no_effect_in_one_process(tiny_cache, tmp_path):
    """A single process keeps its heads as they are."""
    from .test_engine import make_engine

    e = make_engine(tmp_path, "model.shard_discriminator=true")
    assert not e.shard_disc and not any(hasattr(p, "placements") for p in e.disc.heads.parameters())
