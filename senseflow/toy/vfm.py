"""The discriminator's vision backbone in the toy benchmark: a small DINOv2 pre-trained here.

The real recipe's discriminator reads a frozen, *pretrained* DINOv2-L: the GAN term is only as good as
the features its heads see. The random tiny DINOv2 of the CPU tests (:mod:`senseflow.discriminator.tiny`)
is no such feature extractor, and with its 14-pixel patches it sees a 64-pixel image as 4 x 4 tokens
and never sees the last 8 pixel rows and columns. The toy's backbone is therefore built for 64-pixel
images (patch 8: 8 x 8 tokens cover the image) and pre-trained on the toy's real training images with
masked image modelling in the manner of SimMIM (Xie et al., 2022): a random ``mask_ratio`` of the patch
tokens is replaced by the model's mask token, and a linear decoder on the last layer predicts the
pixels of the masked patches (L1 loss, in the backbone's normalised input space). The objective is
self-supervised: the backbone learns no labels of the evaluation networks. It is saved with
``save_pretrained`` and loaded by the engine through ``paths.dino`` like the real one; the decoder is
discarded. ``vfm_steps = 0`` keeps the backbone random (an ablation).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..discriminator.backbone import IMAGENET_MEAN, IMAGENET_STD
from .presets import RESOLUTION, Preset

logger = logging.getLogger(__name__)

PATCH = 8
"""Patch side of the toy backbone: 8 x 8 tokens on a 64-pixel image."""
TOKENS = (RESOLUTION // PATCH) ** 2
"""Patch tokens per image."""


def build_dino(preset: Preset, seed: int):
    """A randomly initialised ``Dinov2Model`` of the preset's width and depth, patch :data:`PATCH`."""
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(
        hidden_size=preset.vfm_width,
        num_hidden_layers=preset.vfm_depth,
        num_attention_heads=max(1, preset.vfm_width // 32),
        mlp_ratio=4,
        patch_size=PATCH,
        image_size=RESOLUTION,
        layerscale_value=1.0,
        drop_path_rate=0.0,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Dinov2Model(config)


def patchify(x: torch.Tensor, patch: int = PATCH) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p · W/p, p·p·C), patches in the row-major token order of the ViT."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def random_mask(batch: int, tokens: int, ratio: float, gen: torch.Generator) -> torch.Tensor:
    """(batch, tokens) bool: exactly ``round(ratio · tokens)`` (at least 1) masked tokens per image."""
    k = max(1, round(ratio * tokens))
    order = torch.rand(batch, tokens, generator=gen).argsort(dim=1)
    return order < k


class MaskedImageModel(nn.Module):
    """The backbone plus SimMIM's linear pixel decoder; ``forward`` returns the L1 loss on masked patches."""

    def __init__(self, dino: nn.Module):
        super().__init__()
        self.dino = dino
        width = dino.config.hidden_size
        self.decoder = nn.Linear(width, PATCH * PATCH * 3)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> the backbone's input (as :meth:`DinoBackbone.preprocess` feeds it)."""
        x = images.permute(0, 3, 1, 2).float() / 255.0
        return (x - self.mean) / self.std

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss of the model, and of predicting zeros (the mean image), on the masked patches."""
        x = self.normalise(images)
        hidden = self.dino(pixel_values=x, bool_masked_pos=mask).last_hidden_state[:, 1:]
        target = patchify(x)
        weight = mask.float()
        norm = weight.sum() * target.shape[-1]
        loss = ((self.decoder(hidden) - target).abs() * weight[..., None]).sum() / norm
        baseline = (target.abs() * weight[..., None]).sum() / norm
        return loss, baseline


@torch.no_grad()
def masked_loss(model: MaskedImageModel, images: np.ndarray, ratio: float, seed: int, device) -> dict:
    """Held-out masked-patch L1 of ``model`` and of the zero prediction, over ``images`` (uint8 NHWC)."""
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    losses, baselines = [], []
    for i in range(0, len(images), 256):
        batch = torch.from_numpy(np.ascontiguousarray(images[i : i + 256])).to(device)
        mask = random_mask(len(batch), TOKENS, ratio, gen).to(device)
        loss, baseline = model(batch, mask)
        losses.append(float(loss) * len(batch))
        baselines.append(float(baseline) * len(batch))
    return {"masked_l1": sum(losses) / len(images), "zero_prediction_l1": sum(baselines) / len(images)}


def pretrain(
    dino: nn.Module,
    images: np.ndarray,
    heldout: np.ndarray,
    preset: Preset,
    seed: int,
    device: torch.device,
) -> dict:
    """Train ``dino`` in place by masked image modelling on ``images`` (uint8 NHWC); returns the held-out
    masked-patch L1 before and after, next to the zero prediction's."""
    from .evalnets import train_loop

    with torch.random.fork_rng(devices=[]):  # the decoder's initialisation, whichever process runs the stage
        torch.manual_seed(seed + 1)
        model = MaskedImageModel(dino).to(device)
    ratio = preset.vfm_mask_ratio
    before = masked_loss(model, heldout, ratio, seed, device)
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device)

    def loss_fn(idx, gen):
        mask = random_mask(len(idx), TOKENS, ratio, gen).to(device)
        return model(x[idx.to(device)], mask)[0]

    train_loop(
        model, preset.vfm_steps, preset.vfm_batch, len(images), loss_fn, preset.vfm_lr, seed, "vfm", device
    )
    after = masked_loss(model, heldout, ratio, seed, device)
    dino.to("cpu")
    return {"heldout_before": before, "heldout_after": after}


def build_backbone(
    d: Path, train_images: np.ndarray, heldout: np.ndarray, preset: Preset, seed: int, device
) -> dict:
    """Build (and unless ``vfm_steps`` is 0, pre-train) the toy DINOv2 and save it to ``d``."""
    dino = build_dino(preset, seed)
    stats: dict = {
        "width": preset.vfm_width,
        "depth": preset.vfm_depth,
        "patch": PATCH,
        "parameters": sum(p.numel() for p in dino.parameters()),
        "steps": preset.vfm_steps,
    }
    if preset.vfm_steps > 0:
        stats.update(pretrain(dino, train_images, heldout, preset, seed, device))
        after = stats["heldout_after"]
        logger.info(
            "vfm: held-out masked-patch L1 %.4f (zero prediction %.4f, before training %.4f)",
            after["masked_l1"],
            after["zero_prediction_l1"],
            stats["heldout_before"]["masked_l1"],
        )
    dino.save_pretrained(str(d))
    return stats
