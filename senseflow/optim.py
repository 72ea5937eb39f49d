"""8-bit AdamW (``optimizer.name=adamw8bit``): torchao's block-wise quantised states and compiled update,
with states that also work for bf16 FSDP2 parameters (see :func:`adamw8bit`)."""

from __future__ import annotations

import torch

from .errors import ConfigError


def adamw8bit(params, kwargs) -> torch.optim.Optimizer:
    """torchao's 8-bit AdamW over ``params`` (plain or FSDP2 DTensor parameters); ``kwargs``: lr, betas,
    eps, weight_decay.

    The states always show the dtype float32, whatever the weights' dtype. torchao gives them the
    parameter's dtype as an "appearance" dtype, but its ``view`` returns float32, so the local tensor of
    a bf16 parameter's DTensor state (``DTensor.from_local`` takes a view) is a float32 view of a bf16
    base, which ``torch.compile`` cannot convert: torchao's own step fails on bf16 FSDP2 parameters (seen
    with FLUX's bf16 weights on torch 2.11 GPUs and torch 2.15 on CPU). The appearance dtype changes
    nothing in the update, which dequantises to float32 either way (``tests/test_optim.py``).
    """
    try:
        from torchao.optim import AdamW8bit as TorchaoAdamW8bit
        from torchao.optim.subclass_8bit import OptimState8bit
    except ImportError:
        raise ConfigError("optimizer.name: adamw8bit needs torchao (pip install torchao)") from None

    class AdamW8bit(TorchaoAdamW8bit):
        @staticmethod
        def _subclass_zeros(p: torch.Tensor, signed: bool, block_size: int):
            return OptimState8bit.zeros(p.shape, signed, block_size, p.device, dtype=torch.float32)

    return AdamW8bit(params, **kwargs)
