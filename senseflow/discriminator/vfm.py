"""The VFM discriminator: frozen DINOv2 taps + trainable projection heads conditioned on CLIP text and on
the DINOv2 features of a reference image (spec §8).

Per iteration the caller computes ``text_emb = encode_text(captions)`` and
``ref = reference_features(reference_images)`` once (both without gradient, the reference not augmented,
spec §8.9) and reuses them for the generator, real and fake passes, each a separate ``forward`` so that
the heads' local batch norm takes per-pass statistics (spec §8.7).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import torch
from torch import nn

from ..errors import ConfigError
from ..parallel import compile_modules
from .backbone import DinoBackbone, load_dinov2
from .config import DiscriminatorConfig
from .diffaug import diff_augment
from .heads import DiscHead, DiscHeads, downsampled_size
from .text import ClipTextEncoder

logger = logging.getLogger(__name__)


class VFMDiscriminator(nn.Module):
    """``forward(images, text_emb, ref_feats, generator)`` -> logits (B, n_heads·g'·g'), head 0 first.

    With the default config and 1024-px inputs: 8 heads × 10×10 = 800 logits per sample.
    Only ``heads`` is trainable; ``backbone`` (DINOv2) and ``text_encoder`` (CLIP) are frozen and stay in
    eval mode.
    """

    def __init__(
        self,
        cfg: DiscriminatorConfig,
        dino_path: str | os.PathLike,
        clip_path: str | os.PathLike,
        random_init: bool = False,
    ) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.backbone = DinoBackbone(
            load_dinov2(dino_path, random_init),
            hooks=cfg.hooks,
            tap_patch_embed=cfg.tap_patch_embed,
            checkpoint_blocks=cfg.checkpoint_backbone,
            resolution=cfg.resolution,
        )
        self.text_encoder = ClipTextEncoder(
            clip_path,
            cfg.clip_model,
            quick_gelu=cfg.clip_quick_gelu,
            context_length=cfg.clip_context_length,
            random_init=random_init,
        )
        if self.text_encoder.embed_dim != cfg.c_dim:
            raise ConfigError(
                f"discriminator.c_dim: is {cfg.c_dim} but the CLIP text embedding of {clip_path} has width "
                f"{self.text_encoder.embed_dim}"
            )
        width = self.backbone.width
        self.heads = DiscHeads(
            DiscHead(width, cfg.c_dim, cfg.cmap_dim, cfg.num_downsamples, cfg.virtual_batch)
            for _ in range(self.backbone.num_taps)
        )
        if cfg.compile_heads:
            compile_modules((m for head in self.heads for m in (head.main, head.ref)), mode=cfg.compile_mode)
        if cfg.compile_backbone:
            compile_modules(self.backbone.model.encoder.layer)
        n_params = sum(p.numel() for p in self.heads.parameters())
        logger.info(
            "VFM discriminator: %d heads of width %d on DINOv2 taps %s%s, %.1f M trainable parameters%s",
            len(self.heads),
            width,
            cfg.hooks,
            " + patch embedding" if cfg.tap_patch_embed else "",
            n_params / 1e6,
            ", branches compiled" if cfg.compile_heads else "",
        )
        if cfg.compile_backbone:
            logger.info("DINOv2 blocks compiled (discriminator.compile_backbone)")

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The heads' parameters: the only ones the discriminator optimiser updates (spec §8.7)."""
        return self.heads.parameters()

    def num_logits(self, height: int, width: int) -> int:
        """Logits per sample for an input image of that size."""
        gh, gw = self.backbone.grid_size(height, width)
        per_head = downsampled_size(gh, self.cfg.num_downsamples) * downsampled_size(
            gw, self.cfg.num_downsamples
        )
        return len(self.heads) * per_head

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """(B,) captions -> (B, c_dim) float32 L2-normalised CLIP embeddings, no gradient."""
        return self.text_encoder.encode(prompts)

    @torch.no_grad()
    def reference_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Reference images (B, 3, H, W) in [-1, 1], not augmented -> DINOv2 taps, no gradient."""
        return [f.detach() for f in self.backbone(images)]

    def forward(
        self,
        images: torch.Tensor,
        text_emb: torch.Tensor,
        ref_feats: list[torch.Tensor],
        generator: torch.Generator | None = None,
        augment: bool = True,
    ) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1], text_emb (B, c_dim), ref_feats from ``reference_features``
        -> logits (B, n_heads·g'·g'). DiffAugment (drawing from ``generator``) is applied to ``images`` only.
        """
        return self.logits(self.features(images, generator, augment), text_emb, ref_feats)

    def logits(
        self, feats: list[torch.Tensor], text_emb: torch.Tensor, ref_feats: list[torch.Tensor]
    ) -> torch.Tensor:
        """The heads on DINOv2 taps from ``features`` or ``paired_features`` -> logits (B, n_heads·g'·g')."""
        return self.heads(feats, ref_feats, text_emb)

    def augmented(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """DiffAugment of images under test (drawing from ``generator``; spec §8.8)."""
        return diff_augment(
            images, self.cfg.diffaug, generator, self.cfg.translation_ratio, self.cfg.cutout_ratio
        )

    def features(
        self, images: torch.Tensor, generator: torch.Generator | None = None, augment: bool = True
    ) -> list[torch.Tensor]:
        """The DINOv2 taps of (augmented) images, the heads' input: ``forward`` is ``heads(features(...))``."""
        return self.backbone(self.augmented(images, generator) if augment else images)

    @torch.no_grad()
    def paired_features(
        self, first: torch.Tensor, second: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``features(first)`` and ``features(second)``, without gradient, in one DINOv2 pass over both batches.

        Each batch is augmented on its own, ``first`` then ``second``: the draws of two ``features`` calls
        in that order. The discriminator step's real and fake passes need no gradient through the frozen
        backbone, so one pass of batch 2B replaces two of batch B (half the host work, fuller kernels);
        the heads still see each batch separately (per-pass local batch-norm statistics, spec §8.7).
        """
        both = torch.cat([self.augmented(first, generator), self.augmented(second, generator)])
        n = first.shape[0]
        taps = self.backbone(both)
        return [t[:n] for t in taps], [t[n:] for t in taps]
