"""IDA (spec §6) on FSDP2-sharded models: 2 CPU processes over gloo.

One spawn runs two scenarios and writes rank 0's gathered full state dicts to ``tmp_path``:

* ``engine``: no-grad forward on both models (FSDP2 then leaves the *root's* own parameters
  unsharded), ``senseflow.parallel.reshard`` as the engine does, then IDA. Every trainable
  fake-score parameter must equal ``λ·φ + (1 − λ)·θ`` of the original unsharded weights.
* ``no_reshard``: the same without ``reshard``. IDA must still blend correctly (it reshards FSDP2
  roots itself) or refuse loudly; silently blending throw-away unsharded copies would be a bug.

The layers have odd sizes (5, 7, 3 rows over 2 ranks) so the shards are uneven, the root owns a
LayerNorm, a frozen parameter and a buffer.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

from .conftest import gloo_group, spawn_gloo

LAM = 0.97
WORLD = 2


class Net(nn.Module):
    """Three Linear layers (each its own FSDP unit) and root-owned parameters and buffer."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList([nn.Linear(6, 5), nn.Linear(5, 7), nn.Linear(7, 3)])
        self.norm = nn.LayerNorm(3)
        nn.init.normal_(self.norm.weight)
        nn.init.normal_(self.norm.bias)
        self.frozen = nn.Parameter(torch.randn(3), requires_grad=False)
        self.register_buffer("stat", torch.full((3,), float(seed + 1)))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.norm(x) + self.frozen + self.stat


def _shard(model: nn.Module, mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _full(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _is_dtensor(p: torch.Tensor) -> bool:
    return hasattr(p, "placements")


def _worker(rank: int, store_path: str, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from senseflow.losses.ida import implicit_distribution_alignment_
    from senseflow.parallel import reshard

    with gloo_group(rank, store_path, WORLD, timeout_s=60):
        mesh = init_device_mesh("cpu", (WORLD,))
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
        results = {}
        for scenario in ("engine", "no_reshard"):
            fake, gen = _shard(Net(0), mesh), _shard(Net(1), mesh)
            with torch.no_grad():
                fake(x)
                gen(x)
            root_unsharded = not _is_dtensor(fake.norm.weight)
            error = None
            if scenario == "engine":
                reshard(fake, gen)
                assert all(_is_dtensor(p) for p in fake.parameters()), "reshard left a parameter unsharded"
                assert all(_is_dtensor(p) for p in gen.parameters())
                n = implicit_distribution_alignment_(fake, gen, LAM)
            else:
                try:
                    n = implicit_distribution_alignment_(fake, gen, LAM)
                except Exception as exc:  # refusing is an acceptable outcome
                    n, error = -1, f"{type(exc).__name__}: {exc}"
                reshard(fake, gen)
            fake_sd, gen_sd = _full(fake), _full(gen)
            results[scenario] = {
                "n": n,
                "error": error,
                "root_unsharded_after_forward": root_unsharded,
                "fake": fake_sd,
                "gen": gen_sd,
                "fake_buffer": fake.stat.detach().clone(),
            }
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "results.pt"))
        dist.barrier()


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ida_fsdp")
    spawn_gloo(_worker, (str(tmp / "store"), str(tmp)), WORLD)
    return torch.load(tmp / "results.pt", weights_only=False)


def _expected() -> tuple[dict, dict, dict]:
    phi = {k: v.detach().clone() for k, v in Net(0).named_parameters()}
    theta = {k: v.detach().clone() for k, v in Net(1).named_parameters()}
    trainable = {k for k, p in Net(0).named_parameters() if p.requires_grad}
    blended = {k: (LAM * phi[k] + (1 - LAM) * theta[k]) if k in trainable else phi[k] for k in phi}
    return blended, theta, phi


def test_ida_under_fsdp2_matches_unsharded_blend(fsdp_results):
    res = fsdp_results["engine"]
    blended, theta, phi = _expected()
    # FSDP2 leaves the root's own parameters unsharded after a forward without gradient, which is
    # why the engine reshards before IDA
    assert res["root_unsharded_after_forward"]
    assert res["n"] == 8  # 3×(weight, bias) + norm.weight + norm.bias; `frozen` skipped
    fake, gen = res["fake"], res["gen"]
    assert set(fake) == set(blended) | {"stat"}
    for k, want in blended.items():
        torch.testing.assert_close(fake[k], want, atol=1e-6, rtol=0, msg=k)
    torch.testing.assert_close(fake["frozen"], phi["frozen"], atol=0, rtol=0)  # requires_grad False
    torch.testing.assert_close(fake["stat"], torch.full((3,), 1.0), atol=0, rtol=0)  # buffer untouched
    for k, want in theta.items():  # the generator is unchanged
        torch.testing.assert_close(gen[k], want, atol=0, rtol=0, msg=k)


def test_ida_without_reshard_blends_or_refuses(fsdp_results):
    res = fsdp_results["no_reshard"]
    assert res["root_unsharded_after_forward"]
    if res["error"] is not None:  # refusing loudly is acceptable
        return
    blended, _, _ = _expected()
    for k, want in blended.items():
        torch.testing.assert_close(res["fake"][k], want, atol=1e-6, rtol=0, msg=k)
