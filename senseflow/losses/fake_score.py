"""Fake-score denoising loss (spec §5): the fake score tracks the generator's distribution."""

from __future__ import annotations

from collections.abc import Callable

import torch


def fake_score_loss(
    x0: torch.Tensor,
    noise: torch.Tensor,
    level: torch.Tensor,
    add_noise: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    pred_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    target_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Unweighted MSE between the fake score's prediction on noised ``sg(x0)`` and its target.

    ``x0`` (B, ...) are detached generator samples, ``level`` (B,). ``target_fn(x0, noise, level)``
    is ``ε − x₀`` for flow matching and ``ε`` for DDPM. The per-sample mean followed by the batch
    mean equals the mean over all elements for equally sized samples (spec §5 "Reduction").
    """
    x0 = x0.detach()
    x_t = add_noise(x0, noise, level)
    pred = pred_fn(x_t, level)
    target = target_fn(x0, noise, level)
    loss = (pred.float() - target.float()).pow(2).mean()
    return loss, {"loss/fake": loss.detach()}
