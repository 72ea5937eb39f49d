"""``model.fsdp=never``: the tiny SD3.5 recipe on 2 gloo processes with the generator, fake score and
teacher replicated (plain modules, gradients averaged over the ranks in buckets) trains like the FSDP2
run (``model.fsdp=auto``): the same losses and gradient norms, the same weights at the end, identical on
both ranks; a replicated run stopped and resumed continues exactly, and an FSDP2 checkpoint resumes
replicated. :class:`senseflow.distributed.GradReducer` averages fp32 and bf16 gradients bucket by
bucket while the backward runs.

One spawn runs everything (in-process ``Engine.train`` calls, as the launcher makes them); about 25 s on
2 CPU cores."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from .conftest import REPO, gloo_group, spawn_engine_runs
from .conftest import loss_metrics as _losses
from .conftest import max_abs_diff as _max_diff

WORLD = 2
TINY = "configs/tiny/sd35_senseflow_tiny.yaml"
BASE = (
    "log.progress_bar=false",
    "train.image_interval=0",
    "train.log_interval=1",
    "train.iter_num=3",
    "distill.generator_period=2",  # iteration 2 is a generator iteration
    "checkpoint.enabled=false",
)
SPLIT = ("checkpoint.enabled=true", "train.save_interval=2")


def _full(net) -> dict[str, torch.Tensor]:
    """``net``'s full state (complete on rank 0 when sharded; every rank's own when replicated), copied."""
    from senseflow.parallel import full_state_dict

    if any(hasattr(p, "placements") for p in net.parameters()):
        return {k: v.clone() for k, v in full_state_dict(net).items()}
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _train(overrides: list[str], save_dir: Path, info) -> dict:
    from senseflow.config import load_config
    from senseflow.engine import Engine

    save_dir.mkdir(parents=True, exist_ok=True)
    engine = Engine(load_config(REPO / TINY, [*BASE, *overrides]), info, save_dir)
    start = {"G0": _full(engine.G.net), "F0": _full(engine.F.net)}
    engine.train()
    nets = {"G": engine.G.net, "F": engine.F.net, "T": engine.teacher, "D": engine.disc.heads}
    return {
        "dtensors": {k: any(hasattr(p, "placements") for p in n.parameters()) for k, n in nets.items()},
        "replicated": [engine.G.replicated, engine.F.replicated, engine.D.replicated],
        "G": _full(engine.G.net),
        "F": _full(engine.F.net),
        **start,
    }


def _reducer_check(rank: int) -> dict:
    """:class:`GradReducer` on a small net with fp32 parameters, a bf16 one and one that never gets a
    gradient, in buckets of one or two tensors, over three steps: in the first the bf16 parameter gets no
    gradient and the unused one holds every bucket back; in the second the bf16 one gets its first
    gradient after its bucket left (a gradient of its own, reduced at the end); the third has two
    backwards (the first before :meth:`arm`, as the discriminator's real pass), and the bf16 gradient is
    now a view too, reduced through fp32. Each gradient becomes the mean of the ranks' gradients, and
    those expected are views into the buckets. A parameter accumulated twice in one backward (shared by two
    reentrant checkpoints) is an error."""
    from torch import nn

    from senseflow.distributed import GradReducer

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    scale = nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    unused = nn.Parameter(torch.zeros(2))
    params = [*net.parameters(), scale, unused]
    backwards = [1, 1, 2]

    def backward(r: int, step: int, i: int) -> None:
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(10 * step + 3 * i + r))
        y = net(x) * scale.float() if step else net(x)
        y.square().sum().backward()

    def zero():
        for p in params:
            p.grad = None

    want, got, launched, views = [], [], [], []
    reducer = GradReducer(params, bucket_bytes=64)
    for step, n in enumerate(backwards):
        local = []
        for r in range(WORLD):  # every rank's gradients, computed here
            for i in range(n):
                backward(r, step, i)
            local.append([p.grad for p in params])
            zero()
        want.append(
            [None if a is None else ((a.float() + b.float()) / 2).to(a.dtype) for a, b in zip(*local)]
        )
        reducer.begin()
        for i in range(n):
            if i == n - 1:
                reducer.arm()
            backward(rank, step, i)
        reducer.finish()
        got.append([p.grad for p in params])
        views.append([p.grad is not None and p.grad._base is not None for p in params])
        launched.append(reducer.launched_in_backward)
        zero()
    lin = nn.Linear(3, 3)
    twice = GradReducer(list(lin.parameters()))
    twice.arm()
    x = torch.randn(2, 3, requires_grad=True)
    ckpt = torch.utils.checkpoint.checkpoint
    error = ""
    try:
        ckpt(lin, ckpt(lin, x, use_reentrant=True), use_reentrant=True).sum().backward()
    except RuntimeError as e:
        error = str(e)
    twice.finish()
    return {
        "want": want,
        "got": got,
        "views": views,
        "buckets": len(reducer.buckets),
        "launched": launched,
        "error": error,
    }


def _worker(rank: int, store_path: str, out_dir: str) -> None:
    from senseflow.distributed import DistInfo

    with gloo_group(rank, store_path, WORLD):
        info = DistInfo(rank, WORLD, rank, torch.device("cpu"))
        out = Path(out_dir)
        results = {"reducer": _reducer_check(rank)}
        results["sharded"] = _train([], out / "sharded", info)
        results["replicated"] = _train(["model.fsdp=never"], out / "replicated", info)
        # replicated, stopped after the generator iteration (2) and resumed
        _train(["model.fsdp=never", *SPLIT, "train.iter_num=2"], out / "split", info)
        results["split"] = _train(["model.fsdp=never", *SPLIT], out / "split", info)
        # written by FSDP2, resumed replicated
        _train([*SPLIT, "train.iter_num=2"], out / "cross", info)
        results["cross"] = _train(["model.fsdp=never", *SPLIT], out / "cross", info)
        torch.save(results, out / f"rank{rank}.pt")
        dist.barrier()


@pytest.fixture(scope="module")
def runs(tiny_cache, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("replicate")
    return spawn_engine_runs(_worker, tmp, WORLD, ["sharded", "replicated", "split", "cross"])


def test_grad_reducer_averages_during_backward(runs):
    results, _ = runs
    for r in results:
        red = r["reducer"]
        for step in range(3):
            got, want = red["got"][step], red["want"][step]
            assert len(got) == 6 and got[-1] is None and (got[-2] is None) == (step == 0)
            for g, w in zip(got, want):
                assert (g is None and w is None) or (g.dtype == w.dtype and torch.equal(g, w)), step
        # gradients are bucket views, except the bf16 one's first (it arrived unexpected, after its bucket)
        assert red["views"] == [[True] * 4 + [False] * 2, [True] * 4 + [False] * 2, [True] * 5 + [False]]
        assert red["buckets"] >= 4
        # the first backward waits for the parameter without gradient; the others send during the backward
        assert red["launched"] == [0, red["buckets"], red["buckets"]]
        assert "accumulated after it was sent" in red["error"]


def test_replicated_nets_are_plain(runs):
    results, _ = runs
    for r in results:
        assert r["sharded"]["dtensors"] == {"G": True, "F": True, "T": True, "D": False}
        assert r["replicated"]["dtensors"] == {"G": False, "F": False, "T": False, "D": False}
        assert r["replicated"]["replicated"] == [True, True, True]
        assert r["sharded"]["replicated"] == [False, False, True]  # the heads are replicated either way


def test_replicated_trains_like_fsdp2(runs):
    """Same metrics (rank means) within fp32 rounding, the same generator and fake score at the end, and
    the replicas identical on both ranks."""
    results, metrics = runs
    assert [m["iter"] for m in metrics["replicated"]] == [1, 2, 3]
    assert "loss/gan" in metrics["replicated"][1]  # a generator iteration
    for a, b in zip(metrics["sharded"], metrics["replicated"]):
        want, got = _losses(a), _losses(b)
        assert got.keys() == want.keys()
        for k, v in want.items():
            assert got[k] == pytest.approx(v, rel=1e-4, abs=1e-7), (a["iter"], k)
    r0, r1 = results
    for net in ("G", "F"):
        assert _max_diff(r0["replicated"][net], r1["replicated"][net]) == 0  # the same step on each rank
        update = _max_diff(r0["sharded"][net], r0["sharded"][f"{net}0"])  # the largest update
        assert update > 0
        assert _max_diff(r0["replicated"][net], r0["sharded"][net]) <= 1e-3 * update


def test_replicated_run_resumes_exactly(runs):
    """Stopped after the generator iteration (2) and resumed replicated: the same losses and weights as the
    run without interruption; an FSDP2 checkpoint resumes replicated with the same losses."""
    results, metrics = runs
    assert [m["iter"] for m in metrics["split"]] == [1, 2, 3]
    for a, b in zip(metrics["replicated"], metrics["split"]):
        assert _losses(a) == _losses(b), a["iter"]
    r0 = results[0]
    for net in ("G", "F"):
        assert _max_diff(r0["replicated"][net], r0["split"][net]) == 0
    assert [m["iter"] for m in metrics["cross"]] == [1, 2, 3]
    for a, b in zip(metrics["replicated"], metrics["cross"]):
        want, got = _losses(a), _losses(b)
        for k, v in want.items():
            assert got[k] == pytest.approx(v, rel=1e-4, abs=1e-7), (a["iter"], k)
