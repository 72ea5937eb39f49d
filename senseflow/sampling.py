"""Few-step samplers of the distilled generator, shared by training-time validation and the scripts.

Pure functions on tensors and callables (spec §15.3):

* :func:`sample_x0` — the x0 ("re-noise") sampler of every flow script of the original, and the
  generator's own step in training (backward simulation, spec §3.2): at each level predict the clean
  latent ``x̂₀``, then noise it afresh to the next level; the last step returns ``x̂₀``.
* :func:`sample_euler` — the deterministic step ``x ← schedule.step(x, pred, level, next)`` (Euler
  ``x + (σ' − σ)·v̂`` for flow matching, DDIM for ε-prediction), the "(Euler)" rows of the paper's tables.

Both take ``pred_fn(x, level) -> prediction`` with ``x`` (B, ...) float32 and a per-sample level tensor
(B,), and work for every :class:`~senseflow.schedules.NoiseSchedule` (flow matching or DDPM), so new
teacher families need no sampler code. :func:`inference_levels` turns a recipe's anchors into the
levels the generator was trained on (spec §15.4, fixing B5).

Fresh noise comes from a ``noise_fn(shape)``; :func:`per_sample_noise` builds one that draws every
sample from its own ``torch.Generator``, so an image depends only on its own seed, not on the batch
it was generated in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .errors import ConfigError
from .schedules import FlowMatchingSchedule, NoiseSchedule, shift_sigma

PredFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``pred_fn(x, level)``: the network's prediction (velocity or ε) at ``x`` (B, ...) and levels (B,)."""
NoiseFn = Callable[[tuple[int, ...]], torch.Tensor]
"""``noise_fn(shape)``: a fresh standard-normal tensor of ``shape`` (B, ...)."""


def per_sample_noise(generators: Sequence[torch.Generator], dtype: torch.dtype = torch.float32) -> NoiseFn:
    """A ``noise_fn`` drawing sample ``b`` of every call from ``generators[b]`` (on that generator's
    device): the noise of one sample never depends on the batch size or on its position in the batch."""

    def noise_fn(shape: tuple[int, ...]) -> torch.Tensor:
        if shape[0] != len(generators):
            raise ValueError(f"noise for a batch of {shape[0]} from {len(generators)} generators")
        one = (1, *shape[1:])
        return torch.cat([torch.randn(one, generator=g, device=g.device, dtype=dtype) for g in generators])

    return noise_fn


def _level_rows(levels: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Levels as (K, B) float32 on ``x``'s device: (K,) levels are shared by the batch, (K, B) are per sample."""
    levels = torch.as_tensor(levels, dtype=torch.float32, device=x.device)
    if levels.dim() == 1:
        levels = levels[:, None].expand(-1, x.shape[0])
    if levels.dim() != 2 or levels.shape[1] != x.shape[0] or levels.shape[0] < 1:
        raise ValueError(f"levels must be (K,) or (K, {x.shape[0]}) with K >= 1, got {tuple(levels.shape)}")
    return levels


def sample_x0(
    pred_fn: PredFn,
    noise: torch.Tensor,
    levels: torch.Tensor,
    schedule: NoiseSchedule,
    noise_fn: NoiseFn,
) -> torch.Tensor:
    """The x0 ("re-noise") sampler (spec §15.3), starting from ``noise`` at ``levels[0]``.

    For consecutive levels ``ℓ_i → ℓ_{i+1}`` (a final clean level appended):
    ``x̂₀ = schedule.x0_from_pred(x, pred_fn(x, ℓ_i), ℓ_i)`` in float32, then
    ``x = schedule.add_noise(x̂₀, ε_i, ℓ_{i+1})`` with fresh ``ε_i = noise_fn(shape)``. Noising to the
    clean level leaves ``x̂₀`` unchanged, so the last step returns ``x̂₀`` and draws no noise.

    Args:
        pred_fn: see :data:`PredFn`.
        noise: (B, ...) the starting sample (pure noise at the noisiest level).
        levels: (K,) levels shared by the batch or (K, B) per sample, noisiest first.
        schedule: the teacher's noise schedule.
        noise_fn: see :data:`NoiseFn` (use :func:`per_sample_noise` for batch-size independence).

    Returns:
        (B, ...) float32 clean latents.
    """
    rows = _level_rows(levels, noise)
    x = noise.float()
    x0 = x
    for i, level in enumerate(rows):
        x0 = schedule.x0_from_pred(x, pred_fn(x, level).float(), level)
        if i + 1 < len(rows):
            x = schedule.add_noise(x0, noise_fn(tuple(x0.shape)).to(x0), rows[i + 1])
    return x0


def sample_euler(
    pred_fn: PredFn, noise: torch.Tensor, levels: torch.Tensor, schedule: NoiseSchedule
) -> torch.Tensor:
    """The deterministic sampler: ``x ← schedule.step(x, pred, ℓ_i, ℓ_{i+1})``, ending at the clean point.

    For flow matching every step is Euler ``x + (σ' − σ)·v̂`` (spec §2.1) and the last one goes to
    σ = 0, i.e. ``x − σ·v̂``; for ε-prediction the steps are DDIM and the last one returns ``x̂₀``
    (ᾱ = 1, which the DDPM table's ``t = 0`` does not reach). Arguments and result as :func:`sample_x0`.
    """
    rows = _level_rows(levels, noise)
    x = noise.float()
    for i, level in enumerate(rows):
        pred = pred_fn(x, level).float()
        if i + 1 < len(rows):
            x = schedule.step(x, pred, level, rows[i + 1])
        else:  # the step to the clean point (bitwise equal to step(x, v, σ, 0) for flow matching)
            x = schedule.x0_from_pred(x, pred, level)
    return x


SAMPLERS = ("x0", "euler")


def run_sampler(
    sampler: str,
    pred_fn: PredFn,
    noise: torch.Tensor,
    levels: torch.Tensor,
    schedule: NoiseSchedule,
    noise_fn: NoiseFn,
) -> torch.Tensor:
    """Dispatch to :func:`sample_x0` (``"x0"``) or :func:`sample_euler` (``"euler"``)."""
    if sampler == "x0":
        return sample_x0(pred_fn, noise, levels, schedule, noise_fn)
    if sampler == "euler":
        return sample_euler(pred_fn, noise, levels, schedule)
    raise ConfigError(f"--sampler: unknown sampler {sampler!r} (choose {' or '.join(SAMPLERS)})")


# --- which levels --------------------------------------------------------------------------------------


def anchor_subset(num_anchors: int, num_steps: int) -> list[int]:
    """Positions of the anchors used by a ``num_steps`` sampler.

    All anchors for ``num_steps == num_anchors``; fewer steps use the anchor nearest to each of
    ``num_steps`` evenly spaced points of the anchor list, ``round(j·K/num_steps)`` for
    ``j = 0..num_steps−1`` (K = ``num_anchors``). With the four anchors of every recipe: 1 step
    ``[0]``, 2 steps ``[0, 2]``, 3 steps ``[0, 1, 3]``. Every anchor is a level the generator was trained
    at, and its x̂₀ prediction is valid from any of them, so a subset is a coarser few-step schedule.
    """
    if not 1 <= num_steps <= num_anchors:
        raise ConfigError(
            f"--num_steps: {num_steps} is not in 1..{num_anchors}; the generator was trained at "
            f"{num_anchors} anchor levels and can sample with at most that many steps"
        )
    return [int(j * num_anchors / num_steps + 0.5) for j in range(num_steps)]


def inference_levels(
    cfg, schedule: NoiseSchedule, num_steps: int, legacy_sd35_double_shift: bool = False
) -> torch.Tensor:
    """The sampling levels (num_steps,) float32: the recipe's trained anchors (spec §15.4, fixes B5).

    ``schedule.grid_to_level(cfg.distill.anchors, cfg.distill.timestep_grid)`` — SD3.5: σ = 1.0, 0.9,
    0.75, 0.5 — restricted to :func:`anchor_subset` for fewer steps.

    ``legacy_sd35_double_shift`` reproduces the original SD3.5 scripts (B5, known to be wrong): they
    passed the trained σ as user sigmas to a scheduler that shifts them again by its ``shift``, so the
    levels become ``S_k(σ)``: 1.0, 0.964286, 0.9, 0.75 for four steps, 1.0, 0.9 for the Large script's
    two steps (levels the generator never saw at 0.964, and 0.5 never visited).
    """
    anchors = cfg.distill.anchors
    grid = torch.tensor([anchors[i] for i in anchor_subset(len(anchors), num_steps)], dtype=torch.long)
    levels = schedule.grid_to_level(grid, cfg.distill.timestep_grid).float()
    if legacy_sd35_double_shift:
        if (
            not isinstance(schedule, FlowMatchingSchedule)
            or schedule.use_dynamic_shifting
            or cfg.distill.timestep_grid != "ascending_index"
        ):
            raise ConfigError(
                "--sd35_legacy_sigmas: applies only to the SD3.5 recipes (shifted flow schedule)"
            )
        levels = shift_sigma(levels.double(), schedule.shift).float()
    return levels


def scheduler_sigmas(levels: torch.Tensor, schedule: NoiseSchedule) -> list[float]:
    """The ``sigmas=`` to give a diffusers flow-matching scheduler so that it samples at ``levels``.

    diffusers' ``FlowMatchEulerDiscreteScheduler`` / ``FlowMatchLCMScheduler`` shift user sigmas by
    their ``shift`` when dynamic shifting is off (spec §15.4), so pass the inverse ``S_k⁻¹(σ) =
    σ / (k − (k − 1)·σ)``: SD3.5's 1.0, 0.9, 0.75, 0.5 become 1.0, 0.75, 0.5, 0.25. With dynamic
    shifting (FLUX) the levels themselves are returned; pass them with ``mu=0`` (no shift).
    """
    if not isinstance(schedule, FlowMatchingSchedule):
        raise ConfigError("scheduler sigmas exist only for flow-matching teachers")
    s = levels.double()
    if not schedule.use_dynamic_shifting:
        k = schedule.shift
        s = s / (k - (k - 1) * s)
    return [round(float(v), 6) for v in s]
