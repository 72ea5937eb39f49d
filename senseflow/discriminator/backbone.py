"""Frozen DINOv2 feature extractor of the VFM discriminator (spec §8.1-8.3).

The forward is written out here instead of calling ``Dinov2Model.forward`` because the original resizes
the position embeddings **bilinearly** (transformers' own embedding forward is bicubic) and taps
intermediate blocks, running only up to the last tapped one.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_dinov2(path: str | os.PathLike, random_init: bool = False) -> nn.Module:
    """Load a ``transformers.Dinov2Model`` from a local directory (``paths.dino``), float32, frozen, eval.

    ``random_init`` builds it from the folder's config.json with random weights (benchmarks).
    """
    from transformers import Dinov2Config, Dinov2Model

    path = Path(path)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ConfigError(
            f"paths.dino: {path} is not a DINOv2 directory in the transformers layout (no config.json); "
            "point it to a local copy of facebook/dinov2-large"
        )
    try:
        if random_init:
            model = Dinov2Model(Dinov2Config.from_pretrained(str(path)))
        else:
            model = Dinov2Model.from_pretrained(str(path))
    except OSError as err:
        raise ConfigError(
            f"paths.dino: cannot load DINOv2 weights from {path}: {err}".replace("\n", " ")
        ) from None
    model = model.to(torch.float32).eval().requires_grad_(False)
    return model


def _layer_output(out: torch.Tensor | tuple) -> torch.Tensor:
    """transformers 5.x ``Dinov2Layer`` returns a tensor, 4.x a tuple ``(hidden_states, ...)``."""
    return out[0] if isinstance(out, tuple | list) else out


class DinoBackbone(nn.Module):
    """DINOv2 taps as channels-first feature maps.

    ``forward(images)`` takes images (B, 3, H, W) in [-1, 1] and returns one (B, width, H//14, W//14)
    feature map per tap: first the outputs of the blocks in ``hooks`` (list order), then, if
    ``tap_patch_embed``, the embeddings before block 0. Weights are frozen and the module stays in eval
    mode, but gradients flow to the input image.
    """

    def __init__(
        self,
        model: nn.Module,
        hooks: Sequence[int] = (2, 5, 8, 10, 14, 19, 23),
        tap_patch_embed: bool = True,
        checkpoint_blocks: bool = True,
        resolution: int | None = None,
    ) -> None:
        super().__init__()
        num_layers = len(model.encoder.layer)
        bad = [h for h in hooks if not 0 <= h < num_layers]
        if bad:
            raise ConfigError(
                f"discriminator.hooks: block indices {bad} out of range for a DINOv2 with {num_layers} blocks"
            )
        if not hooks and not tap_patch_embed:
            raise ConfigError("discriminator.hooks: no tap (empty hooks and tap_patch_embed false)")
        self.model = model.eval().requires_grad_(False)
        self.hooks = [int(h) for h in hooks]
        self.tap_patch_embed = bool(tap_patch_embed)
        self.checkpoint_blocks = bool(checkpoint_blocks)
        self.resolution = resolution
        self.width = int(model.config.hidden_size)
        patch = model.embeddings.patch_embeddings.patch_size
        self.patch_size = (int(patch[0]), int(patch[1])) if isinstance(patch, Sequence) else (int(patch),) * 2
        n_pos = model.embeddings.position_embeddings.shape[1] - 1
        side = math.isqrt(n_pos)
        if side * side != n_pos:
            raise ValueError(f"DINOv2 position embedding of {n_pos} patches is not a square grid")
        self.pos_grid = (side, side)
        device = model.embeddings.cls_token.device
        self.register_buffer(
            "mean", torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1), persistent=False
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> DinoBackbone:
        """Build from a local ``facebook/dinov2-large``-layout directory (``paths.dino``)."""
        return cls(load_dinov2(path), **kwargs)

    @property
    def num_taps(self) -> int:
        return len(self.hooks) + int(self.tap_patch_embed)

    def train(self, mode: bool = True) -> DinoBackbone:
        """Stay in eval mode whatever the parent asks (spec §8.1)."""
        return super().train(False)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Token grid of an input of that size (after the optional resize); the remainder pixels are dropped."""
        if self.resolution is not None:
            height = width = self.resolution
        return height // self.patch_size[0], width // self.patch_size[1]

    def position_embeddings(self, grid: tuple[int, int]) -> torch.Tensor:
        """(1, 1 + gh·gw, width): class slot kept, stored grid resized bilinearly (align_corners False)."""
        pos = self.model.embeddings.position_embeddings
        if tuple(grid) == self.pos_grid:
            return pos
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
        patch_pos = patch_pos.reshape(1, *self.pos_grid, -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos.float(), size=grid, mode="bilinear", align_corners=False)
        patch_pos = patch_pos.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] -> [0, 1] -> optional resize -> ImageNet normalisation (spec §8.2)."""
        x = (images + 1) / 2
        if self.resolution is not None and tuple(x.shape[-2:]) != (self.resolution,) * 2:
            antialias = min(x.shape[-2:]) > self.resolution
            x = F.interpolate(
                x, size=(self.resolution,) * 2, mode="bilinear", align_corners=False, antialias=antialias
            )
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Images in [-1, 1] -> token sequence (B, 1 + gh·gw, width) before block 0, and the grid."""
        emb = self.model.embeddings
        proj = emb.patch_embeddings.projection
        x = self.preprocess(images).to(proj.weight.dtype)
        tokens = proj(x)  # stride-14 conv: trailing pixels that do not fill a patch are dropped
        grid = (tokens.shape[-2], tokens.shape[-1])
        tokens = tokens.flatten(2).transpose(1, 2)
        cls = emb.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.position_embeddings(grid)
        return emb.dropout(tokens), grid

    def _run_block(self, block: nn.Module, h: torch.Tensor) -> torch.Tensor:
        if self.checkpoint_blocks and torch.is_grad_enabled() and h.requires_grad:
            # Non-reentrant checkpointing restores the autocast state on recompute (spec N6).
            return checkpoint(
                lambda t: _layer_output(block(t)), h, use_reentrant=False, preserve_rng_state=False
            )
        return _layer_output(block(h))

    @staticmethod
    def to_feature_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, 1 + gh·gw, C) -> (B, C, gh, gw): the class token is added to every patch token, then dropped."""
        patches = tokens[:, 1:] + tokens[:, :1]
        return patches.reshape(tokens.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images (B, 3, H, W) in [-1, 1] -> list of ``num_taps`` feature maps (B, width, gh, gw)."""
        h, grid = self.embed(images)
        taps: dict[int, torch.Tensor] = {}
        patch_tap = h
        last = max(self.hooks, default=-1)
        for i, block in enumerate(self.model.encoder.layer[: last + 1]):
            h = self._run_block(block, h)
            if i in self.hooks:
                taps[i] = h
        seqs = [taps[i] for i in self.hooks] + ([patch_tap] if self.tap_patch_embed else [])
        return [self.to_feature_map(s, grid) for s in seqs]
