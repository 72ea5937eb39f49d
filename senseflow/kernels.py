"""Faster formulations of standard layers, with the same arithmetic in fp32.

:class:`SplitGroupNorm`: the VAE's GroupNorm (32 groups) at 1024 px. torch's CUDA GroupNorm computes each
(sample, group) row's statistics in one thread block, so a batch of one image runs 32 blocks over rows of
up to 16 M values (1.4 ms per call on an H200 for 0.2 ms of memory traffic; about 40 % of the VAE's
decode). The same statistics from :func:`torch.var_mean`, whose reduction kernels split long rows over
many blocks, then the same normalisation as element-wise operations.
"""

from __future__ import annotations

import torch
from torch import nn


def split_group_norm(
    x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """``F.group_norm`` through ``torch.var_mean`` (biased variance, as GroupNorm) and element-wise ops."""
    n, c = x.shape[:2]
    xg = x.reshape(n, groups, -1)
    var, mean = torch.var_mean(xg, dim=-1, keepdim=True, correction=0)
    y = ((xg - mean) * torch.rsqrt(var + eps)).view(x.shape)
    shape = (1, c) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return y


class SplitGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that uses :func:`split_group_norm` for fp32 CUDA inputs (see the module docstring);
    other inputs take torch's kernel. Swap it in with :func:`use_split_group_norm` (parameters kept)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.is_cuda
            and x.dtype == torch.float32
            and (self.weight is None or self.weight.dtype == torch.float32)
        ):
            return split_group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return super().forward(x)


def use_split_group_norm(module: nn.Module) -> int:
    """Turn every ``nn.GroupNorm`` of ``module`` into a :class:`SplitGroupNorm` in place; returns how many."""
    count = 0
    for m in module.modules():
        if type(m) is nn.GroupNorm:
            m.__class__ = SplitGroupNorm
            count += 1
    return count


def cast_matmul_weights_(module: nn.Module, dtype: torch.dtype) -> int:
    """Store the weights and biases of a frozen module's ``nn.Linear`` and ``nn.Conv2d`` layers in ``dtype``.

    For a module that only ever runs under autocast to ``dtype`` this changes no result: autocast casts
    those weights to ``dtype`` at every call anyway (it caches casts only for weights that require
    gradient), which costs a cast kernel per weight and call, issued by the host. Normalisation layers
    and other parameters keep their dtype (autocast runs them in fp32). Returns the number of layers cast.
    """
    count = 0
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            if any(p.requires_grad for p in m.parameters()):
                raise ValueError(f"cast_matmul_weights_: {type(m).__name__} has trainable parameters")
            m.to(dtype)
            count += 1
    return count


class MathAttention:
    """An attention processor of a diffusers ``Attention`` layer that runs the layer's own processor with
    ``scaled_dot_product_attention`` restricted to torch's math backend (see :func:`use_matmul_attention`)."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kw)


def use_matmul_attention(module: nn.Module) -> int:
    """Run the attention layers of a diffusers ``module`` (the VAE's mid-block attention) on torch's math
    backend of ``scaled_dot_product_attention``: explicit matrix products and a softmax, in TF32 where
    ``torch.backends.cuda.matmul.allow_tf32`` is set, instead of the fp32 memory-efficient kernel, which
    uses no tensor cores. The attention matrix is materialised (at 1024 px: 16,384² fp32, 1 GiB).
    Returns the number of layers changed."""
    count = 0
    for m in module.modules():
        processor = getattr(m, "processor", None)
        if processor is not None and hasattr(m, "set_processor") and not isinstance(processor, MathAttention):
            m.set_processor(MathAttention(processor))
            count += 1
    return count


ATTENTION_BACKENDS = ("flash", "cudnn", "efficient", "math")


def attention_backend(name: str | None):
    """A context under which ``scaled_dot_product_attention`` runs only on torch's backend ``name`` (one of
    :data:`ATTENTION_BACKENDS`; None: torch's own choice). Code compiled under it keeps that backend."""
    import contextlib

    if name is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }
    if name not in backends:
        raise ValueError(f"attention backend {name!r}: expected one of {', '.join(ATTENTION_BACKENDS)}")
    return sdpa_kernel(backends[name])
