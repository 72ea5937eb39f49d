"""senseflow.optim.adamw8bit: torchao's 8-bit AdamW with float32-looking states steps bf16 FSDP2
parameters (torchao's own states fail there) and gives exactly torchao's updates."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("torchao")


def _nets(dtype: torch.dtype, n: int, sharded: list[bool]):
    """``n`` identical small nets; those with ``sharded[i]`` FSDP2-sharded (one process: DTensor
    parameters whose local shard is the whole tensor, so block quantisation matches the plain net's)."""
    from torch.distributed.fsdp import fully_shard

    from senseflow.distributed import init_distributed

    init_distributed("cpu")  # a one-process group (FSDP2 needs one)
    torch.manual_seed(0)
    nets = [
        nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64), nn.LayerNorm(64)).to(dtype)
        for _ in range(n)
    ]
    for net in nets[1:]:
        net.load_state_dict(nets[0].state_dict())
    for net, shard in zip(nets, sharded):
        if shard:
            for block in net[0], net[2]:
                fully_shard(block)
            fully_shard(net)
    return nets


def _full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if hasattr(p, "full_tensor") else p


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_updates_match_torchao(dtype):
    """Ours on DTensors against torchao's AdamW8bit on plain tensors, and, in fp32, on DTensors too.
    (torchao's own states fail on bf16 DTensors: a bf16-looking state's local tensor is a float32 view,
    which torch.compile cannot convert; ours look float32.)"""
    from torchao.optim import AdamW8bit

    from senseflow.optim import adamw8bit

    sharded = [True, False, True][: 3 if dtype == torch.float32 else 2]
    nets = _nets(dtype, len(sharded), sharded)
    assert all(hasattr(p, "placements") for p in nets[0].parameters())  # DTensor parameters
    kwargs = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.01}
    opts = [adamw8bit(list(nets[0].parameters()), kwargs)]
    opts += [AdamW8bit(list(net.parameters()), **kwargs) for net in nets[1:]]
    for k in range(3):
        x = torch.randn(8, 64, generator=torch.Generator().manual_seed(k)).to(dtype)
        for net, opt in zip(nets, opts):
            net(x).float().square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        for other in nets[1:]:
            for a, b in zip(nets[0].parameters(), other.parameters()):
                assert torch.equal(_full(a), _full(b)), k
    # the 256x64 weights have quantised states, the others plain ones, as torchao decides
    kinds = {type(s["exp_avg"].to_local()).__name__ for s in opts[0].state.values()}
    assert kinds == {"OptimState8bit", "Tensor"}
    assert all(s["step"].item() == 3 for s in opts[0].state.values())
