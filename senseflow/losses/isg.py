"""Intra-segment guidance (ISG; SenseFlow Eq. 12, spec §7).

For a generator segment from level σ to the next, less noisy anchor σ_prev, the teacher moves the
generator input to an intermediate level σ_mid, the generator continues from there to σ_prev, and the
generator's direct jump σ → σ_prev is pulled towards that (stop-gradient) target. The paper states
squared L2; the released code uses pseudo-Huber with c = 1e-3 (spec §7.1; PAPER_NOTES §1.3).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

PredFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def isg_distance(x_pred: torch.Tensor, x_target: torch.Tensor, kind: str = "pseudo_huber", c: float = 1e-3):
    """Mean over all elements of ``sqrt(d² + c²) − c`` (``pseudo_huber``) or ``d²`` (``l2``), in float32."""
    d = x_pred.float() - x_target.float()
    if kind == "pseudo_huber":
        return (torch.sqrt(d * d + c * c) - c).mean()
    if kind == "l2":
        return (d * d).mean()
    raise ValueError(f"unknown ISG distance {kind!r} (pseudo_huber or l2)")


def intra_segment_guidance_loss(
    x_in: torch.Tensor,
    pred_gen: torch.Tensor,
    level: torch.Tensor,
    level_mid: torch.Tensor,
    level_prev: torch.Tensor,
    teacher_pred_fn: PredFn,
    generator_pred_fn: PredFn,
    step_fn: StepFn,
    kind: str = "pseudo_huber",
    c: float = 1e-3,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ISG loss (spec §7.1 steps 3-5).

    Args:
        x_in: generator input at ``level`` (B, ...), no gradient.
        pred_gen: the generator's prediction at ``(x_in, level)`` *with* gradient (reused, not recomputed).
        level, level_mid, level_prev: (B,) segment start, intermediate and end levels.
        teacher_pred_fn: guided teacher prediction ``(x, level) -> pred`` (no gradient taken).
        generator_pred_fn: generator prediction ``(x, level) -> pred`` (no gradient taken).
        step_fn: deterministic step ``(x, pred, level, level_next) -> x_next`` (Euler for flow).
    """
    with torch.no_grad():
        pred_teacher = teacher_pred_fn(x_in, level)
        x_mid = step_fn(x_in, pred_teacher, level, level_mid)
        pred_mid = generator_pred_fn(x_mid, level_mid)
        x_target = step_fn(x_mid, pred_mid, level_mid, level_prev)
    x_pred = step_fn(x_in, pred_gen, level, level_prev)
    loss = isg_distance(x_pred, x_target, kind, c)
    return loss, {"loss/isg": loss.detach()}


def sdxl_legacy_isg_loss(
    x_in: torch.Tensor,
    pred_gen: torch.Tensor,
    level: torch.Tensor,
    level_mid: torch.Tensor,
    level_prev: torch.Tensor,
    teacher_pred_fn: PredFn,
    generator_pred_fn: PredFn,
    x0_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    add_noise: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    c: float = 1e-3,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SDXL ISG as the original implemented it (spec §7.2, bug B2; ``compat.sdxl_isg_legacy``).

    The target re-uses the teacher's clean estimate at the intermediate point, and both sides are
    re-noised with the generator's ε at ``x_mid``, so the loss reduces to a pseudo-Huber regression of
    ``√ᾱ_prev·x̂_G`` onto ``√ᾱ_prev·x̂_T``. ``x0_fn(x, pred, level)`` converts ε to x0.
    """
    with torch.no_grad():
        eps_teacher = teacher_pred_fn(x_in, level)
        x0_teacher = x0_fn(x_in, eps_teacher, level)
        x_mid = add_noise(x0_teacher, eps_teacher, level_mid)
        eps_mid = generator_pred_fn(x_mid, level_mid)
        x_target = add_noise(x0_teacher, eps_mid, level_prev)
    x_pred = add_noise(x0_fn(x_in, pred_gen, level), eps_mid, level_prev)
    loss = isg_distance(x_pred, x_target, "pseudo_huber", c)
    return loss, {"loss/isg": loss.detach()}
