"""All noise-schedule maths: sigma tables, index <-> level maps, x0/eps/velocity conversions, steps.

Two families share one interface (spec §2):

* :class:`FlowMatchingSchedule` (SD3.5, FLUX): ``x_σ = (1 − σ)·x₀ + σ·ε``, networks predict the
  velocity ``v = ε − x₀``; a noise *level* is the float ``σ ∈ [0, 1]``.
* :class:`DDPMSchedule` (SDXL): ``x_t = √ᾱ_t·x₀ + √(1 − ᾱ_t)·ε``, networks predict ``ε``; a level is
  the integer DDPM step ``t ∈ {0..999}`` (held in a float tensor so both families batch alike).

A level tensor has shape ``(B,)``; latents ``(B, C, H, W)`` (or ``(B, L, D)`` for packed FLUX latents).
Every function broadcasts the per-sample level over the trailing dimensions (fixes B7 of the original).

The integer *grid* in which recipes state anchors and ISG margins (spec §3.1, §7) is mapped to levels
by :meth:`grid_to_level`: ``"ascending_index"`` (SD3.5: index into the ascending shifted table Σ↑),
``"t1000"`` (FLUX: σ = t/1000) or ``"ddpm"`` (SDXL: the DDPM step itself).
"""

from __future__ import annotations

import torch

GRIDS = ("ascending_index", "t1000", "ddpm")


def shift_sigma(u: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """The SD3 time shift ``S_k(u) = k·u / (1 + (k − 1)·u)`` (spec §0)."""
    return shift * u / (1 + (shift - 1) * u)


def _per_sample(level: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a (B,) level-derived tensor to broadcast over ``like`` (B, ...)."""
    return level.reshape(level.shape[0], *([1] * (like.dim() - 1))).to(like.dtype)


class NoiseSchedule:
    """Interface shared by both families; see the module docstring for conventions."""

    num_train_timesteps: int = 1000
    prediction: str  # "velocity" or "epsilon"
    clean_level: float  # the level of a clean sample (σ = 0, or t = 0)

    def alpha_sigma(self, level: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Signal and noise coefficients ``(α, σ)`` of ``x_t = α·x₀ + σ·ε``, each (B,) float32."""
        raise NotImplementedError

    def table_level(self, index: torch.Tensor, table: str) -> torch.Tensor:
        """Level at integer ``index`` of the ascending or descending 1000-entry training table."""
        raise NotImplementedError

    def grid_to_level(self, grid: torch.Tensor, kind: str) -> torch.Tensor:
        """Map integer anchor/ISG grid values to levels (see module docstring)."""
        raise NotImplementedError

    # --- conversions shared by both families -------------------------------------------------------

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """``x_t = α·x₀ + σ·ε`` (spec §2.1, §2.4)."""
        alpha, sigma = self.alpha_sigma(level)
        return _per_sample(alpha, x0) * x0 + _per_sample(sigma, x0) * noise

    def x0_from_pred(self, x_t: torch.Tensor, pred: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """Clean estimate ``x̂₀`` from a network prediction at ``(x_t, level)``."""
        raise NotImplementedError

    def eps_from_pred(self, x_t: torch.Tensor, pred: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """Noise estimate ``ε̂`` from a network prediction at ``(x_t, level)``."""
        raise NotImplementedError

    def pred_target(self, x0: torch.Tensor, noise: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """Regression target of the denoising loss (``ε − x₀`` or ``ε``; spec §5)."""
        raise NotImplementedError

    def step(
        self, x_t: torch.Tensor, pred: torch.Tensor, level: torch.Tensor, level_next: torch.Tensor
    ) -> torch.Tensor:
        """Deterministic (DDIM) step ``x_{t'} = α'·x̂₀ + σ'·ε̂``.

        For flow matching this is exactly the Euler step ``x + (σ' − σ)·v`` (spec §2.1), computed in
        that form so it is exact to rounding.
        """
        alpha_n, sigma_n = self.alpha_sigma(level_next)
        x0 = self.x0_from_pred(x_t, pred, level)
        eps = self.eps_from_pred(x_t, pred, level)
        return _per_sample(alpha_n, x0) * x0 + _per_sample(sigma_n, x0) * eps


class FlowMatchingSchedule(NoiseSchedule):
    """Rectified-flow schedule with the SD3 shift (spec §2.1-2.2).

    Args:
        shift: the scheduler config's ``shift`` (3.0 for SD3.5).
        use_dynamic_shifting: FLUX sets this; the *training* table is then unshifted (spec §2.2).
    """

    prediction = "velocity"
    clean_level = 0.0

    def __init__(
        self, shift: float = 1.0, use_dynamic_shifting: bool = False, num_train_timesteps: int = 1000
    ):
        self.num_train_timesteps = num_train_timesteps
        self.shift = float(shift)
        self.use_dynamic_shifting = bool(use_dynamic_shifting)
        n = num_train_timesteps
        s = torch.arange(n, 0, -1, dtype=torch.float64) / n  # s_j = (1000 − j)/1000, j = 0..999
        table = s if use_dynamic_shifting else shift_sigma(s, self.shift)
        self.sigmas_desc = table.to(torch.float32)  # Σ↓[j]
        self.sigmas_asc = self.sigmas_desc.flip(0)  # Σ↑[i] = Σ↓[999 − i]

    def alpha_sigma(self, level):
        sigma = level.float()
        return 1.0 - sigma, sigma

    def table_level(self, index, table):
        src = {"ascending": self.sigmas_asc, "descending": self.sigmas_desc}[table]
        return src.to(index.device)[index.long()]

    def grid_to_level(self, grid, kind):
        if kind == "ascending_index":
            return self.table_level(grid.clamp(0, self.num_train_timesteps - 1), "ascending")
        if kind == "t1000":
            return grid.float() / 1000.0
        raise ValueError(f"grid {kind!r} is not defined for flow matching (use ascending_index or t1000)")

    def x0_from_pred(self, x_t, pred, level):
        return x_t - _per_sample(level, x_t) * pred

    def eps_from_pred(self, x_t, pred, level):
        return x_t + (1.0 - _per_sample(level, x_t)) * pred

    def pred_target(self, x0, noise, level):
        return noise - x0

    def step(self, x_t, pred, level, level_next):
        return x_t + _per_sample(level_next - level, x_t) * pred

    def timesteps_for_model(self, level: torch.Tensor) -> torch.Tensor:
        """The scheduler's timestep value ``τ = 1000·σ`` (what the SD3 transformer receives)."""
        return level.float() * self.num_train_timesteps


class DDPMSchedule(NoiseSchedule):
    """Discrete VP schedule with epsilon prediction (SDXL; spec §2.4)."""

    prediction = "epsilon"
    clean_level = 0.0

    def __init__(
        self,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        num_train_timesteps: int = 1000,
    ):
        self.num_train_timesteps = num_train_timesteps
        n = num_train_timesteps
        if beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
        elif beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
        else:
            raise ValueError(f"unsupported beta_schedule {beta_schedule!r} (scaled_linear or linear)")
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # float64, ᾱ_t

    def alpha_sigma(self, level):
        acp = self.alphas_cumprod.to(level.device)[level.long()]
        return acp.sqrt().float(), (1.0 - acp).sqrt().float()

    def table_level(self, index, table):
        index = index.long()
        return (index if table == "ascending" else self.num_train_timesteps - 1 - index).float()

    def grid_to_level(self, grid, kind):
        if kind != "ddpm":
            raise ValueError(f"grid {kind!r} is not defined for DDPM (use ddpm)")
        return grid.float()

    def _coeffs64(self, level, like):
        acp = self.alphas_cumprod.to(level.device)[level.long()]
        shape = (level.shape[0], *([1] * (like.dim() - 1)))
        return acp.sqrt().reshape(shape), (1.0 - acp).sqrt().reshape(shape)

    def x0_from_pred(self, x_t, pred, level):
        # float64 as in the original (spec §2.4), cast back to the input dtype
        a, s = self._coeffs64(level, x_t)
        return ((x_t.double() - s * pred.double()) / a).to(x_t.dtype)

    def eps_from_pred(self, x_t, pred, level):
        return pred

    def pred_target(self, x0, noise, level):
        return noise


def logit_normal_index(
    n: int, generator: torch.Generator, device: torch.device | str = "cpu", num: int = 1000
) -> torch.Tensor:
    """``j = floor(num·sigmoid(z))``, ``z ~ N(0, 1)``: the logit-normal table index (spec §0, §5)."""
    z = torch.randn(n, generator=generator, device=generator.device)
    return (num * torch.sigmoid(z)).floor().long().clamp(0, num - 1).to(device)


def sample_table_index(
    n: int,
    dist: str,
    min_index: int,
    max_index: int,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Draw ``n`` table indices: ``uniform`` on ``{min..max}`` or ``logit_normal`` clamped to it."""
    if dist == "uniform":
        idx = torch.randint(min_index, max_index + 1, (n,), generator=generator, device=generator.device)
        return idx.to(device)
    if dist == "logit_normal":
        return logit_normal_index(n, generator, device).clamp(min_index, max_index)
    raise ValueError(f"unknown timestep distribution {dist!r} (uniform or logit_normal)")
