"""Projection heads of the VFM discriminator, one per DINOv2 tap (spec §8.4).

Per head, with ``h0`` the tap's feature map (B, width, gh, gw):

* main branch ``SN-Conv(1,1) → BNL → LReLU → [SN-Conv(3,2) → Res(SN-Conv(3,1) → BNL → LReLU)]·(n-1)
  → SN-Conv(3,2) → SN-Conv(1,1) to cmap_dim``: ``o`` (B, cmap_dim, g', g');
* reference branch, same layers with separate weights, on the reference image's tap: ``ρ``;
* text mapper, an equalised-LR linear layer c_dim → cmap_dim: ``κ`` (B, cmap_dim);
* ``logit(p) = (1/√cmap_dim) · Σ_c o_c(p)·(κ_c + ρ_c(p))`` (projection-discriminator style).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn


class SNConv2d(nn.Conv2d):
    """Spectrally normalised conv (circular padding ``k//2``, with bias): the weight is divided by its
    largest singular value, estimated by one power iteration per call in training mode (none in eval).

    The arithmetic of ``torch.nn.utils.parametrizations.spectral_norm(conv, n_power_iterations=1,
    eps=1e-12, dim=0)``: the same initialisation draws, 16 power iterations at construction (the 15 of
    its ``__init__`` and the one of ``register_parametrization``'s check), the same ops in the same
    order. Written out as one class because ``parametrize`` creates a new class per module, so
    ``torch.compile`` would compile every conv of every head again (``discriminator.compile_heads``).
    State: ``weight`` (the unnormalised weight), buffers ``_u`` and ``_v``.
    """

    def __init__(
        self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, eps: float = 1e-12
    ) -> None:
        super().__init__(
            in_ch,
            out_ch,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            padding_mode="circular",
            bias=True,
        )
        self.eps = eps
        # on CUDA the convolution's input is made channels-last (False: as it comes; tools/disc_probe.py --nchw)
        self.channels_last = True
        with torch.no_grad():
            w = self.weight.flatten(1)
            u = w.new_empty(w.shape[0]).normal_(0, 1)
            v = w.new_empty(w.shape[1]).normal_(0, 1)
            self.register_buffer("_u", F.normalize(u, dim=0, eps=eps))
            self.register_buffer("_v", F.normalize(v, dim=0, eps=eps))
            self._power_method(w, 16)

    @torch.no_grad()
    def _power_method(self, w: torch.Tensor, n: int) -> None:
        for _ in range(n):
            F.normalize(torch.mv(w, self._v), dim=0, eps=self.eps, out=self._u)
            F.normalize(torch.mv(w.t(), self._u), dim=0, eps=self.eps, out=self._v)

    def normalized_weight(self) -> torch.Tensor:
        """``weight / σ``, after one power iteration in training mode."""
        w = self.weight.flatten(1)
        if self.training:
            self._power_method(w, 1)
        u = self._u.clone(memory_format=torch.contiguous_format)
        v = self._v.clone(memory_format=torch.contiguous_format)
        sigma = torch.vdot(u, torch.mv(w, v))
        return self.weight / sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Circular padding (none for 1×1), then the convolution with the normalised weight. On CUDA its input is
        made channels-last: cuDNN runs these convolutions in NHWC, and an NCHW input (what the compiled padding
        and batch norm produce otherwise) costs a layout conversion of the input and of the output per call."""
        if any(self._reversed_padding_repeated_twice):
            x = F.pad(x, self._reversed_padding_repeated_twice, mode="circular")
        if x.is_cuda and self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return F.conv2d(x, self.normalized_weight(), self.bias, self.stride)


def sn_conv(in_ch: int, out_ch: int, kernel_size: int, stride: int = 1) -> SNConv2d:
    """Spectrally normalised conv, circular padding ``k//2``, with bias (one power iteration, ε 1e-12)."""
    return SNConv2d(in_ch, out_ch, kernel_size, stride)


class LocalBatchNorm(nn.Module):
    """BNL ("local batch norm"): batch norm with statistics over groups of at most ``virtual_batch`` samples and all positions.

    The batch is split into ``ceil(B / virtual_batch)`` near-equal consecutive groups; per group and
    channel the mean and the biased variance are taken over samples and space (ε 1e-5), followed by a
    learnable affine map. No running statistics: train and eval behave identically. Statistics are
    computed in float32.
    """

    def __init__(self, num_features: int, virtual_batch: int = 8, eps: float = 1e-5) -> None:
        super().__init__()
        self.virtual_batch = virtual_batch
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = math.ceil(x.shape[0] / self.virtual_batch)
        chunks = [self._normalize(c) for c in x.float().tensor_split(groups, dim=0)]
        y = chunks[0] if groups == 1 else torch.cat(chunks, dim=0)
        y = y * self.weight.view(1, -1, 1, 1).float() + self.bias.view(1, -1, 1, 1).float()
        return y.to(x.dtype)

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(x, dim=(0, 2, 3), keepdim=True, unbiased=False)
        return (x - mean) * torch.rsqrt(var + self.eps)


class Residual(nn.Module):
    """``Res(f)(h) = (f(h) + h)/√2``."""

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.fn(x) + x) * (1 / math.sqrt(2))


class EqualLinear(nn.Module):
    """Linear layer with equalised learning rate: weight ~ N(0, 1) scaled by 1/√in at run time, bias 0."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.gain = 1 / math.sqrt(in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.gain, self.bias)


def _block(width: int, kernel_size: int, virtual_batch: int) -> nn.Sequential:
    """SN-Conv(k, 1) → BNL → LReLU(0.2)."""
    return nn.Sequential(
        sn_conv(width, width, kernel_size), LocalBatchNorm(width, virtual_batch), nn.LeakyReLU(0.2)
    )


class Branch(nn.Sequential):
    """A head branch: ``nn.Sequential`` with its ``forward`` written out here, so that ``torch.compile`` of the
    branch (``discriminator.compile_heads``) starts tracing in this file. torch 2.11 does not trace a compiled
    module whose frame is torch's own ``Sequential.forward``: it compiled every layer as a graph of its own
    (20 graphs instead of 3 for the tiny heads, no fusion across layers), and the backward of one of them failed
    inductor's stride check on the tiny recipe. Same layers, state-dict keys and arithmetic."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x)
        return x


def make_branch(width: int, cmap_dim: int, num_downsamples: int = 3, virtual_batch: int = 8) -> Branch:
    """One head branch (main or reference), ending with the spectral-normalised 1×1 conv to ``cmap_dim``."""
    layers: list[nn.Module] = [_block(width, 1, virtual_batch)]
    for i in range(num_downsamples):
        layers.append(sn_conv(width, width, 3, stride=2))
        if i < num_downsamples - 1:
            layers.append(Residual(_block(width, 3, virtual_batch)))
    layers.append(sn_conv(width, cmap_dim, 1))
    return Branch(*layers)


def downsampled_size(size: int, num_downsamples: int = 3) -> int:
    """Grid side after the stride-2, padding-1, kernel-3 convs: 73 → 37 → 19 → 10."""
    for _ in range(num_downsamples):
        size = (size - 1) // 2 + 1
    return size


class DiscHead(nn.Module):
    """One projection head: ``forward(feat, ref_feat, c)`` -> logits (B, g'·g') (spec §8.4).

    ``feat`` and ``ref_feat`` are (B, width, gh, gw) taps of the image under test and of the reference
    image; ``c`` is the (B, c_dim) text embedding.
    """

    def __init__(
        self, width: int, c_dim: int, cmap_dim: int = 64, num_downsamples: int = 3, virtual_batch: int = 8
    ) -> None:
        super().__init__()
        self.cmap_dim = cmap_dim
        self.main = make_branch(width, cmap_dim, num_downsamples, virtual_batch)
        self.ref = make_branch(width, cmap_dim, num_downsamples, virtual_batch)
        self.cmapper = EqualLinear(c_dim, cmap_dim)

    def forward(self, feat: torch.Tensor, ref_feat: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        o = self.main(feat)  # (B, cmap, g', g')
        rho = self.ref(ref_feat)  # (B, cmap, g', g')
        kappa = self.cmapper(c.to(self.cmapper.weight.dtype))  # (B, cmap)
        # The 64-channel inner product is cheap: do it in float32 so the logits are float32 (spec N8).
        proj = kappa.float()[:, :, None, None] + rho.float()
        logits = (o.float() * proj).sum(dim=1) * (1 / math.sqrt(self.cmap_dim))
        return logits.flatten(1)


class DiscHeads(nn.Module):
    """The projection heads, one per DINOv2 tap: ``forward(feats, ref_feats, c)`` -> logits
    (B, n_heads·g'·g'), head 0 first.

    A module with a ``forward`` so that the heads can form one FSDP2 root whose forward runs every head
    (``model.shard_discriminator``). Not an ``nn.ModuleList``: FSDP2 refuses those whatever their
    ``forward`` in torch 2.11. Heads are registered as ``"0"``, ``"1"``, ..., so the state-dict keys are
    those of a ``ModuleList``; iteration, ``len`` and indexing work as for one.
    """

    def __init__(self, heads: Iterable[DiscHead]) -> None:
        super().__init__()
        for i, head in enumerate(heads):
            self.add_module(str(i), head)

    def __iter__(self) -> Iterator[DiscHead]:
        return iter(self._modules.values())

    def __len__(self) -> int:
        return len(self._modules)

    def __getitem__(self, i: int) -> DiscHead:
        return self._modules[str(i % len(self))]

    def forward(
        self, feats: list[torch.Tensor], ref_feats: list[torch.Tensor], c: torch.Tensor
    ) -> torch.Tensor:
        if len(ref_feats) != len(feats):
            raise ValueError(f"got {len(ref_feats)} reference feature maps for {len(feats)} heads")
        logits = []
        for head, feat, ref in zip(self, feats, ref_feats):
            if ref.shape != feat.shape:
                raise ValueError(
                    f"reference features {tuple(ref.shape)} do not match the input's {tuple(feat.shape)}; "
                    "the reference image must have the batch size and resolution of the input"
                )
            logits.append(head(feat, ref, c))
        return torch.cat(logits, dim=1)
