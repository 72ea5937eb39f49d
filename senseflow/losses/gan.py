"""Hinge GAN losses of the VFM discriminator (spec §8.7), per sample and in float32 (spec N8).

Each takes logits (B, n_logits) (any trailing shape) and returns (B,): the mean over that sample's
logits. Time weights and the batch mean are the caller's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def hinge_d_real(logits: torch.Tensor) -> torch.Tensor:
    """Discriminator loss on real inputs: ``mean(relu(1 - D))`` per sample, (B,) float32."""
    return F.relu(1.0 - logits.float()).flatten(1).mean(dim=1)


def hinge_d_fake(logits: torch.Tensor) -> torch.Tensor:
    """Discriminator loss on generated inputs: ``mean(relu(1 + D))`` per sample, (B,) float32."""
    return F.relu(1.0 + logits.float()).flatten(1).mean(dim=1)


def hinge_g(logits: torch.Tensor) -> torch.Tensor:
    """Generator adversarial loss: ``-mean(D)`` per sample, (B,) float32."""
    return -logits.float().flatten(1).mean(dim=1)


def dmd2_classifier_loss(logits_fake: torch.Tensor, logits_real: torch.Tensor) -> torch.Tensor:
    """DMD2's classifier loss on the fake-score turn: ``mean softplus(D(fake)) + mean softplus(−D(real))``."""
    return F.softplus(logits_fake.float()).mean() + F.softplus(-logits_real.float()).mean()


def dmd2_generator_loss(logits: torch.Tensor) -> torch.Tensor:
    """DMD2's generator term: ``mean softplus(−D(x̂_G))`` (non-saturating)."""
    return F.softplus(-logits.float()).mean()
