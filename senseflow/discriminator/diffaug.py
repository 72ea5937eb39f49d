"""DiffAugment "color,translation,cutout" (Zhao et al. 2020) as used on the discriminator input (spec §8.8).

Every op draws its randomness per sample from the ``generator`` argument (``None``: the global RNG of the
image's device), so the caller decides how augmentations are seeded across ranks (spec §12.6). All ops
are differentiable with respect to the image. Value ranges for an input in [-1, 1]:

* brightness (add ``U(0,1) - 0.5``): [-1.5, 1.5];
* saturation (scale the deviation from the per-pixel channel mean by ``2·U(0,1)``): [-3, 3];
* contrast (scale the deviation from the per-sample mean by ``U(0,1) + 0.5``): [-2, 2];
* translation and cutout fill with 0 (mid-grey): they stay within [min(x, 0), max(x, 0)] ⊆ [-1, 1].

The colour ops therefore can, and are meant to, leave [-1, 1] (the original does not clamp).
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .config import DIFFAUG_OPS


def _uniform(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One ``U(0, 1)`` draw per sample, shaped (B, 1, 1, 1) in ``x``'s dtype and device."""
    device = generator.device if generator is not None else x.device
    u = torch.rand(x.shape[0], generator=generator, device=device, dtype=torch.float32)
    return u.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def _randint(low: int, high: int, n: int, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """``n`` integers from ``U{low..high-1}`` (high exclusive) on ``x``'s device."""
    device = generator.device if generator is not None else x.device
    return torch.randint(low, high, (n,), generator=generator, device=device).to(x.device)


def rand_brightness(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """x (B, C, H, W) -> x + (U(0,1) - 0.5), one draw per sample."""
    return x + (_uniform(x, generator) - 0.5)


def rand_saturation(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """x (B, C, H, W) -> (x - m_c)·2U(0,1) + m_c with m_c the per-pixel mean over channels."""
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (_uniform(x, generator) * 2) + mean


def rand_contrast(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """x (B, C, H, W) -> (x - m)·(U(0,1) + 0.5) + m with m the per-sample mean over channels and pixels."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_uniform(x, generator) + 0.5) + mean


def rand_translation(
    x: torch.Tensor, generator: torch.Generator | None = None, ratio: float = 0.125
) -> torch.Tensor:
    """Shift each sample by integer ``(Δy, Δx)``, ``Δ ~ U{-s..s}`` with ``s = round(ratio·side)``.

    ``out[y, x] = in[y + Δy, x + Δx]``; pixels shifted in from outside are 0. The shifts along H are
    drawn before those along W (the original's order). Implemented as a gather so that it needs no
    host synchronisation when the generator lives on the GPU.
    """
    b, c, h, w = x.shape
    shift_h, shift_w = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = _randint(-shift_h, shift_h + 1, b, x, generator).view(b, 1, 1)
    dx = _randint(-shift_w, shift_w + 1, b, x, generator).view(b, 1, 1)
    iy = torch.arange(h, device=x.device).view(1, h, 1) + dy  # (B, H, 1)
    ix = torch.arange(w, device=x.device).view(1, 1, w) + dx  # (B, 1, W)
    valid = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)  # (B, H, W)
    index = iy.clamp(0, h - 1) * w + ix.clamp(0, w - 1)  # (B, H, W)
    moved = x.reshape(b, c, h * w).gather(2, index.view(b, 1, h * w).expand(b, c, h * w)).view(b, c, h, w)
    return torch.where(valid.unsqueeze(1), moved, torch.zeros((), dtype=x.dtype, device=x.device))


def rand_cutout(
    x: torch.Tensor, generator: torch.Generator | None = None, ratio: float = 0.2
) -> torch.Tensor:
    """Set one square of side ``round(ratio·side)`` per sample to 0, clipped at the borders.

    Centres are drawn from ``U{0..H-1}`` × ``U{0..W-1}`` (``U{0..H}`` for an even side, as the original),
    the H coordinate first; the square covers ``[c - side//2, c - side//2 + side)``.
    """
    b, _, h, w = x.shape
    size_h, size_w = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = _randint(0, h + (1 - size_h % 2), b, x, generator).view(b, 1, 1)
    cx = _randint(0, w + (1 - size_w % 2), b, x, generator).view(b, 1, 1)
    y0, x0 = cy - size_h // 2, cx - size_w // 2
    iy = torch.arange(h, device=x.device).view(1, h, 1)
    ix = torch.arange(w, device=x.device).view(1, 1, w)
    cut = (iy >= y0) & (iy < y0 + size_h) & (ix >= x0) & (ix < x0 + size_w)  # (B, H, W)
    return torch.where(cut.unsqueeze(1), torch.zeros((), dtype=x.dtype, device=x.device), x)


def parse_policy(policy: str) -> list[str]:
    """``"color,translation,cutout"`` -> ``["color", "translation", "cutout"]``; unknown names raise."""
    ops = [op.strip() for op in policy.split(",") if op.strip()]
    unknown = [op for op in ops if op not in DIFFAUG_OPS]
    if unknown:
        raise ConfigError(
            f"discriminator.diffaug: unknown op(s) {unknown}; use a comma-separated subset of {', '.join(DIFFAUG_OPS)}"
        )
    return ops


def diff_augment(
    x: torch.Tensor,
    policy: str = "color,translation,cutout",
    generator: torch.Generator | None = None,
    translation_ratio: float = 0.125,
    cutout_ratio: float = 0.2,
) -> torch.Tensor:
    """Apply the policy's ops to ``x`` (B, C, H, W) in the order of the policy string (spec §8.8).

    ``color`` is brightness, then saturation, then contrast. Returns a tensor of the same shape.
    """
    for op in parse_policy(policy):
        if op == "color":
            x = rand_contrast(rand_saturation(rand_brightness(x, generator), generator), generator)
        elif op == "translation":
            x = rand_translation(x, generator, translation_ratio)
        else:
            x = rand_cutout(x, generator, cutout_ratio)
    return x
