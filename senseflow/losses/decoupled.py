"""Decoupled DMD (the fork's recipe R6, spec §17): the DM term split into a distribution-matching term
and a CFG-augmentation term, each normalised separately.

With per-sample normalised update vectors (``x̂`` are clean estimates at independently noised copies
of the generator sample ``x``)::

    u_dm = (x̂_T^c − x̂_F) / (mean|x̂_T^c − x̂_F| + ε)                 (conditional teacher vs fake score)
    u_ca = (s − 1)·(x̂^c − x̂^u) / (mean|x̂^c − x̂^u| + ε)               (teacher's CFG direction)
    L    = ½·mean((x − sg(x + u_dm))²) + ½·mean((x − sg(x + u_ca))²)

so a descent step moves ``x`` by ``+u``: towards the conditional teacher and along the CFG direction.
The fork's last commit used ``sg(x − u)`` (bug B3, reproduced by ``legacy_sign``), which pushes the
samples the other way.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .dm import dm_surrogate_loss

X0Fn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def normalized_direction(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``(a − b) / (mean_CHW|a − b| + eps)`` per sample, in float32."""
    diff = a.float() - b.float()
    return diff / (diff.abs().mean(dim=tuple(range(1, diff.dim())), keepdim=True) + eps)


def decoupled_dmd_loss(
    x: torch.Tensor,
    level_dm: torch.Tensor,
    level_ca: torch.Tensor,
    noise_dm: torch.Tensor,
    noise_ca: torch.Tensor,
    scale: torch.Tensor,
    add_noise: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    teacher_x0_fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    teacher_cond_x0_fn: X0Fn,
    fake_x0_fn: X0Fn,
    legacy_sign: bool = False,
    eps: float = 1e-8,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Decoupled DMD loss on generator samples ``x`` (B, ...) with gradient (spec §17.1 steps 5-10).

    ``teacher_x0_fn(x_t, level)`` returns the teacher's (conditional, unconditional) clean estimates,
    ``teacher_cond_x0_fn`` the conditional one only, ``fake_x0_fn`` the fake score's; all are
    evaluated without gradient. ``scale`` (B,) is the CFG scale s of the CA term.
    """
    with torch.no_grad():
        xd = x.detach()
        x_dm = add_noise(xd, noise_dm, level_dm)
        u_dm = normalized_direction(teacher_cond_x0_fn(x_dm, level_dm), fake_x0_fn(x_dm, level_dm), eps)
        x0_c, x0_u = teacher_x0_fn(add_noise(xd, noise_ca, level_ca), level_ca)
        s = scale.reshape(-1, *([1] * (x.dim() - 1))).float()
        u_ca = (s - 1.0) * normalized_direction(x0_c, x0_u, eps)
    sign = -1.0 if legacy_sign else 1.0
    # dm_surrogate_loss(x, g) pulls x towards x − g; descending towards x + u means g = −u
    loss_dm = dm_surrogate_loss(x, -sign * u_dm)
    loss_ca = dm_surrogate_loss(x, -sign * u_ca)
    loss = loss_dm + loss_ca
    return loss, {"loss/dm": loss_dm.detach(), "loss/ca": loss_ca.detach(), "loss/decoupled": loss.detach()}
