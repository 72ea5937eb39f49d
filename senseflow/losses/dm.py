"""Distribution-matching (DMD) loss with the normalised gradient (spec §4).

The generator's objective is ``D_KL(p_g ‖ p_real)``; its gradient w.r.t. a generated sample is
``∝ (x̂₀_fake − x̂₀_real)`` at a random noise level (DMD; SenseFlow's min-max analysis writes the
generator/fake game as ``V = KL(p_g‖p_r) − KL(p_g‖p_f)``). DMD normalises it per sample by the mean
absolute distance of the sample to the teacher's clean estimate.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

LevelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def normalized_dm_gradient(
    x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor, eps: float = 0.0
) -> torch.Tensor:
    """``g = (p_real − p_fake) / mean_CHW|p_real|`` with ``p = x − x̂₀`` (spec §4 step 6).

    NaN entries become 0 and ±Inf the largest finite value, as in the original. ``eps`` is added to
    the normaliser (0 in the original, spec N4). Shapes: all (B, ...); returns (B, ...) float32.
    """
    x, x0_real, x0_fake = x.float(), x0_real.float(), x0_fake.float()
    p_real = x - x0_real
    p_fake = x - x0_fake
    dims = tuple(range(1, x.dim()))
    denom = p_real.abs().mean(dim=dims, keepdim=True)
    return torch.nan_to_num((p_real - p_fake) / (denom + eps))


def dm_surrogate_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``½·mean((x − sg(x − g))²)``: value ``½·mean(g²)``, gradient ``g / N`` w.r.t. ``x`` (spec §4 step 7)."""
    return 0.5 * F.mse_loss(x.float(), (x.float() - grad).detach(), reduction="mean")


def distribution_matching_loss(
    x: torch.Tensor,
    noise: torch.Tensor,
    level: torch.Tensor,
    add_noise: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    real_x0_fn: LevelFn,
    fake_x0_fn: LevelFn,
    normalizer_eps: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DMD loss on generator samples ``x`` (B, ...) at per-sample noise ``level`` (B,).

    ``real_x0_fn(x_t, level)`` / ``fake_x0_fn(x_t, level)`` return the guided teacher's and the fake
    score's clean estimates; they are evaluated without gradient. Only ``x`` carries gradient.
    """
    with torch.no_grad():
        x_t = add_noise(x.detach(), noise, level)
        x0_real = real_x0_fn(x_t, level)
        x0_fake = fake_x0_fn(x_t, level)
        grad = normalized_dm_gradient(x.detach(), x0_real, x0_fake, normalizer_eps)
    loss = dm_surrogate_loss(x, grad)
    metrics = {
        "loss/dm": loss.detach(),
        "dm/grad_abs": grad.abs().mean(),
        "dm/real_fake_gap": (x0_real.float() - x0_fake.float()).abs().mean(),
    }
    return loss, metrics
