"""Tiny random DINOv2 and CLIP saved in the real on-disk layouts, for CPU tests of the discriminator.

Both are loaded back through the same code as the real models (``load_dinov2``, ``ClipTextEncoder``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .config import DiscriminatorConfig
from .text import CONFIG_NAME

TINY_DINO_CONFIG = dict(
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=2,
    mlp_ratio=2,
    patch_size=14,
    image_size=56,  # stored position-embedding grid 4×4
    layerscale_value=0.5,
    drop_path_rate=0.0,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)

TINY_CLIP_MODEL_CFG = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def build_tiny_dino(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Save a random tiny ``Dinov2Model`` (width 32, 4 blocks, 2 heads, patch 14, 4×4 grid) with save_pretrained."""
    from transformers import Dinov2Config, Dinov2Model

    out_dir = Path(out_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Dinov2Model(Dinov2Config(**TINY_DINO_CONFIG))
        # Random position embeddings and layer scales of visible size, so that interpolation and taps matter.
        with torch.no_grad():
            model.embeddings.position_embeddings.normal_(0.0, 0.5)
            model.embeddings.cls_token.normal_(0.0, 0.5)
    model.save_pretrained(str(out_dir))
    return out_dir


def build_tiny_clip(out_path: str | os.PathLike, seed: int = 0) -> Path:
    """Save a random tiny open_clip CLIP (text width 32, 2 layers, embed 16, vocab 49408, context 77).

    ``out_path`` is the weights file (``.safetensors`` or a ``torch.save`` file); the architecture goes to
    ``open_clip_config.json`` beside it, as in the open_clip layout on the Hugging Face hub.
    """
    from open_clip.model import CLIP

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    cfg = json.loads(json.dumps(TINY_CLIP_MODEL_CFG))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIP(**cfg)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if out_path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(out_path))
    else:
        torch.save(state, out_path)
    (out_path.parent / CONFIG_NAME).write_text(json.dumps({"model_cfg": cfg}, indent=2))
    return out_path


def tiny_discriminator_config() -> DiscriminatorConfig:
    """Config for the tiny backbones: taps after blocks 1 and 3 plus the patch tap (3 heads), c_dim 16."""
    return DiscriminatorConfig(hooks=[1, 3], tap_patch_embed=True, c_dim=16)
