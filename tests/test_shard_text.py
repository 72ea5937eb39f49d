"""``model.shard_text_encoders``: the tiny SD3 and FLUX text encoders sharded with FSDP2 over 2 gloo
processes, per layer or two layers per unit (``model.fsdp_blocks_per_unit``), give the same prompt
encodings as unsharded copies, while each rank holds about half of the encoders' parameters."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from .conftest import REPO, gloo_group, spawn_gloo

WORLD = 2
CONFIGS = {"sd3": "configs/tiny/sd35_senseflow_tiny.yaml", "flux": "configs/tiny/flux_senseflow_tiny.yaml"}


def _local_numel(enc: torch.nn.Module) -> int:
    return sum(getattr(p, "_local_tensor", p).numel() for p in enc.parameters())


def _worker(rank: int, store_path: str, out_dir: str, teachers: dict) -> None:
    from senseflow.adapters import build_adapter
    from senseflow.config import load_config
    from senseflow.distributed import DistInfo
    from senseflow.parallel import fsdp_units

    with gloo_group(rank, store_path, WORLD, timeout_s=120):
        info = DistInfo(rank, WORLD, rank, torch.device("cpu"))
        prompts = [f"a red circle number {rank}", "a blue square at the top left"][: 1 + rank]  # ranks differ
        results = {}
        for family, teacher in teachers.items():
            for sharded, per_unit in ((False, 1), (True, 1), (True, 2)):
                cfg = load_config(
                    REPO / CONFIGS[family],
                    [
                        f"paths.pretrained_model={teacher}",
                        f"model.shard_text_encoders={str(sharded).lower()}",
                        f"model.fsdp_blocks_per_unit={per_unit}",
                    ],
                )
                adapter = build_adapter(cfg, info)
                with torch.no_grad():
                    cond = [adapter.encode_prompts(prompts) for _ in range(2)]  # twice: reshard in between
                    adapter.reshard_text_encoders()
                    empty = adapter.empty_cond(1)
                    adapter.reshard_text_encoders()
                results[(family, "grouped" if per_unit > 1 else sharded)] = {
                    "cond": cond[1],
                    "repeat_equal": all(torch.equal(cond[0][k], cond[1][k]) for k in cond[0]),
                    "empty": empty,
                    "local_numel": [_local_numel(e) for e in adapter.text_encoders],
                    "units": [[len(u) for u in fsdp_units(e)] for e in adapter.text_encoders],
                    "all_dtensor": all(
                        hasattr(p, "placements") for e in adapter.text_encoders for p in e.parameters()
                    ),
                }
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()


@pytest.fixture(scope="module")
def sharded_results(tiny_cache, tmp_path_factory):
    from senseflow.data.tiny import resolve_path

    teachers = {family: str(resolve_path(f"tiny:{family}")) for family in CONFIGS}  # built once, here
    tmp = tmp_path_factory.mktemp("shard_text")
    spawn_gloo(_worker, (str(tmp / "store"), str(tmp), teachers), WORLD)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("grouped", [False, True], ids=["per_layer", "two_layers_per_unit"])
@pytest.mark.parametrize("family", list(CONFIGS))
def test_sharded_text_encoders_match(sharded_results, family, grouped):
    for rank, results in enumerate(sharded_results):
        full, sharded = results[(family, False)], results[(family, "grouped" if grouped else True)]
        assert not full["all_dtensor"] and sharded["all_dtensor"], rank
        # every tiny encoder has 2 layers: the root and one unit per layer, or one unit of both
        assert full["units"] == [[]] * len(full["units"]), rank
        assert sharded["units"] == [[1, 2] if grouped else [1, 1, 1]] * len(full["units"]), rank
        for key in ("cond", "empty"):
            assert full[key].keys() == sharded[key].keys()
            for k in full[key]:
                # same weights, same ops; all-gathered weights may take another GEMM path (last-bit rounding)
                diff = (full[key][k] - sharded[key][k]).abs().max().item()
                assert diff <= 1e-5 * max(full[key][k].abs().max().item(), 1.0), (rank, key, k, diff)
        assert sharded["repeat_equal"]
    # the ranks' shards partition every encoder; each rank holds about half (dim 0 split, uneven rows)
    full = sharded_results[0][(family, False)]["local_numel"]
    per_rank = [
        results[(family, "grouped" if grouped else True)]["local_numel"] for results in sharded_results
    ]
    for i, n_full in enumerate(full):
        shards = [n[i] for n in per_rank]
        assert sum(shards) == n_full, (n_full, shards)
        assert max(shards) <= 0.52 * n_full, (n_full, shards)


def test_engine_with_sharded_text_encoders(tiny_cache, tmp_path):
    """The tiny SD3.5 recipe through the launcher on 2 processes: the same losses with sharded encoders."""
    import json

    from .conftest import launch
    from .test_e2e import FAST, LAUNCHER, TINY

    runs = {}
    for sharded in ("false", "true"):
        out = tmp_path / sharded
        r = launch(
            LAUNCHER,
            1,
            2,
            TINY,
            out,
            *FAST,
            "train.iter_num=3",
            f"model.shard_text_encoders={sharded}",
            cache=tiny_cache,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        assert ("text encoders sharded over 2 ranks" in r.stderr) == (sharded == "true")
        runs[sharded] = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    a, b = runs["false"], runs["true"]
    losses = [k for k in a if k.startswith("loss/")]
    assert {"loss/dm", "loss/fake"} <= set(losses)
    for k in losses:
        assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k
