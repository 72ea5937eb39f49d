"""VFM discriminator (spec §8): frozen DINOv2 taps, CLIP text and reference-image conditioned heads."""

from .backbone import DinoBackbone, load_dinov2
from .config import DiscriminatorConfig
from .diffaug import diff_augment
from .heads import DiscHead, DiscHeads, LocalBatchNorm, downsampled_size
from .text import ClipTextEncoder
from .vfm import VFMDiscriminator

__all__ = [
    "ClipTextEncoder",
    "DinoBackbone",
    "DiscHead",
    "DiscHeads",
    "DiscriminatorConfig",
    "LocalBatchNorm",
    "VFMDiscriminator",
    "diff_augment",
    "downsampled_size",
    "load_dinov2",
]
