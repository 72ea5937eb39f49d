"""Implicit distribution alignment (IDA; SenseFlow Eq. 9, spec §6).

Right after each generator update the fake score is pulled towards the generator in parameter space,
``φ ← λ·φ + (1 − λ)·θ``, which keeps the fake score an ε-best response to the generator (Prop. 3.1)
and lets a 5:1 fake/generator ratio converge. This requires identical architectures: the parameters
are matched by name, never by position.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from ..parallel import local_tensor


@torch.no_grad()
def implicit_distribution_alignment_(fake: nn.Module, generator: nn.Module, lam: float) -> int:
    """Blend every trainable fake-score parameter in place with the same-named generator parameter.

    Works shard-by-shard on FSDP2 models: both must be sharded identically (same placements and local
    shapes), which is checked. FSDP2 roots are resharded first: after a forward without gradient a
    root keeps its parameters unsharded, and blending those temporary copies would be lost.
    Buffers and the fake score's optimiser state are left untouched. Returns the number of blended
    parameters.
    """
    for module in (fake, generator):
        for sub in module.modules():
            if isinstance(sub, FSDPModule):
                sub.reshard()
    gen_params = dict(generator.named_parameters())
    fakes, gens = [], []
    for name, phi in fake.named_parameters():
        if not phi.requires_grad:
            continue
        if name not in gen_params:
            raise KeyError(f"IDA: fake-score parameter {name!r} has no generator counterpart")
        theta = gen_params[name]
        assert getattr(phi, "placements", None) == getattr(theta, "placements", None), name
        phi_l, theta_l = local_tensor(phi), local_tensor(theta)
        assert phi_l.shape == theta_l.shape, (name, phi_l.shape, theta_l.shape)
        fakes.append(phi_l)
        gens.append(theta_l.to(phi_l.dtype))
    if fakes:
        torch._foreach_mul_(fakes, lam)
        torch._foreach_add_(fakes, gens, alpha=1.0 - lam)
    return len(fakes)
