"""The teacher-adapter interface: everything the engine needs to know about one model family.

An adapter loads the family's components from a diffusers-layout folder, builds the three sharded
transformers (generator, fake score, frozen teacher), encodes prompts and images, and calls a network
in the family's conventions. Predictions are returned in the family's own parameterisation
(velocity or ε, float32); :attr:`schedule` converts them. The engine knows nothing else.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from ..config import Config
from ..distributed import DistInfo
from ..errors import ConfigError
from ..parallel import DTYPE
from ..schedules import NoiseSchedule

logger = logging.getLogger(__name__)

Cond = dict[str, torch.Tensor]
"""Text conditioning of a batch: named tensors whose first dimension is the batch."""


def cat_cond(a: Cond, b: Cond) -> Cond:
    """Concatenate two conditionings along the batch (``[a; b]``)."""
    return {k: torch.cat([a[k], b[k]]) for k in a}


def expand_cond(c: Cond, batch: int) -> Cond:
    """Repeat a batch-1 conditioning ``batch`` times."""
    return {k: v.expand(batch, *v.shape[1:]) for k, v in c.items()}


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load ``state`` into ``model`` (which may hold meta tensors) or raise one clear error naming a few
    missing and unexpected keys: a checkpoint of another architecture is never loaded partially."""
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        raise ConfigError(
            f"{what} does not match the {type(model).__name__} architecture: {'; '.join(parts)}"
        )
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:  # shape mismatches
        first = " ".join(str(err).split())[:300]
        raise ConfigError(f"{what} does not match the {type(model).__name__} architecture: {first}") from None


def resolve_teacher_dir(spec: str, required: Iterable[str], key: str = "paths.pretrained_model") -> Path:
    """Check that the teacher folder exists and holds every ``required`` file."""
    root = Path(spec).expanduser()
    if not root.is_dir():
        raise ConfigError(f"{key}: {spec} is not a directory (expected a teacher folder in diffusers layout)")
    missing = [r for r in required if not (root / r).exists()]
    if missing:
        raise ConfigError(
            f"{key}: {root} is not a complete teacher folder: missing {', '.join(missing[:4])}"
            + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        )
    return root


class TeacherAdapter:
    """Base class of the family adapters (see the module docstring)."""

    family: str = ""
    schedule: NoiseSchedule
    vae: nn.Module

    def __init__(self, cfg: Config, info: DistInfo):
        self.cfg = cfg
        self.info = info
        self.device = info.device
        self.compute_dtype = DTYPE[cfg.precision.compute]

    # --- networks -----------------------------------------------------------------------------------

    def build_networks(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        """The sharded generator, fake score (trainable, fp32 master weights) and frozen teacher."""
        raise NotImplementedError

    transformer_cls: type
    transformer_config: dict

    def generator_config(self) -> dict:
        """Config of the generator and fake score (the teacher's unless the family changes it)."""
        return self.transformer_config

    def load_generator(self, state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> nn.Module:
        """An unsharded generator in eval mode on the adapter's device, loaded strictly (inference)."""
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):
            model = self.transformer_cls.from_config(self.generator_config())
        load_state_dict_strict(model, state_dict, "the generator checkpoint")
        return nn.Module.to(model, device=self.device, dtype=dtype).eval().requires_grad_(False)

    def blocks(self, net: nn.Module) -> list[nn.Module]:
        """The repeated blocks of a transformer (sharding and checkpointing units)."""
        raise NotImplementedError

    def forward(self, net: nn.Module, x: torch.Tensor, level: torch.Tensor, cond: Cond) -> torch.Tensor:
        """One network call at per-sample ``level`` (B,); returns the prediction in float32."""
        raise NotImplementedError

    def guided(
        self,
        net: nn.Module,
        x: torch.Tensor,
        level: torch.Tensor,
        cond: Cond,
        uncond: Cond,
        scale: torch.Tensor,
    ) -> torch.Tensor:
        """Classifier-free guidance ``ŷ_u + s·(ŷ_c − ŷ_u)`` on one doubled batch ``[uncond; cond]``.

        ``scale`` is per sample (B,). Guidance-distilled teachers (FLUX) override this.
        """
        both = self.forward(net, torch.cat([x, x]), torch.cat([level, level]), cat_cond(uncond, cond))
        pred_u, pred_c = both.chunk(2)
        s = scale.reshape(-1, *([1] * (x.dim() - 1))).to(pred_c.dtype)
        return pred_u + s * (pred_c - pred_u)

    # --- conditioning and latents -------------------------------------------------------------------

    def encode_prompts(self, prompts: list[str]) -> Cond:
        """Teacher text conditioning of a batch of captions (no gradient)."""
        raise NotImplementedError

    def empty_cond(self, batch: int) -> Cond:
        """The unconditional branch (the empty prompt), encoded once and cached."""
        if not hasattr(self, "_empty"):
            self._empty = self.encode_prompts([""])
        return expand_cond(self._empty, batch)

    def latent_shape(self, resolution: int) -> tuple[int, ...]:
        """Shape of one latent for a square image of ``resolution`` pixels."""
        raise NotImplementedError

    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) to training latents (posterior sample, shifted and scaled)."""
        raise NotImplementedError

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents to images, nominally in [-1, 1] and not clamped; differentiable."""
        raise NotImplementedError
