"""Configuration of the VFM discriminator (spec §8); standard library only, so the schema imports no torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError

DIFFAUG_OPS = ("color", "translation", "cutout")


@dataclass
class DiscriminatorConfig:
    """DINOv2 feature taps, projection heads, CLIP text conditioning and DiffAugment (spec §8)."""

    hooks: list[int] = field(default_factory=lambda: [2, 5, 8, 10, 14, 19, 23])
    """0-based DINOv2 blocks whose outputs feed one head each, in head order (spec §8.3)."""
    tap_patch_embed: bool = True
    """Add one more head on the patch + position embeddings before block 0 (the last head, spec §8.3)."""
    cmap_dim: int = 64
    """Channels of the projection (o, κ, ρ) in which the head's logit is an inner product (spec §8.4)."""
    num_downsamples: int = 3
    """Stride-2 convolutions per head branch: 73×73 tokens → 37 → 19 → 10 (spec §8.4)."""
    virtual_batch: int = 8
    """Largest group of samples sharing the statistics of the heads' local batch norm (spec §8.4)."""
    c_dim: int = 768
    """Width of the L2-normalised CLIP text embedding fed to each head's text mapper (spec §8.5)."""
    clip_model: str = "ViT-L-14"
    """open_clip architecture of paths.clip, used when no open_clip_config.json lies next to the weights."""
    clip_quick_gelu: bool | None = None
    """QuickGELU in the CLIP text tower; null: from open_clip_config.json, else true (OpenAI weights)."""
    clip_context_length: int = 77
    """CLIP tokenizer length; longer prompts are truncated (spec §8.5)."""
    diffaug: str = "color,translation,cutout"
    """Comma-separated DiffAugment ops applied to the image under test, never the reference (spec §8.8)."""
    translation_ratio: float = 0.125
    """Largest DiffAugment shift as a fraction of the image side (±128 px at 1024)."""
    cutout_ratio: float = 0.2
    """Side of the DiffAugment cutout square as a fraction of the image side (205 px at 1024)."""
    checkpoint_backbone: bool = True
    """Recompute each DINOv2 block in backward (activation checkpointing, autocast-preserving; spec N6)."""
    resolution: int | None = None
    """Resize images to this square size before DINOv2; null feeds them at their own size (spec §8.2)."""
    compile_heads: bool = False
    """``torch.compile`` each head's two branches (spectral-norm convs, local batch norm, activations): one
    compiled graph serves every branch of every head, with a few more for the generator's pass (frozen
    heads) and gradient-free calls. The heads issue tens of thousands of small operators per
    discriminator step, so eager execution is bound by the host, not the GPU. Costs compilation in the
    first iterations; same arithmetic up to fused-kernel rounding."""

    compile_backbone: bool = False
    """``torch.compile`` each transformer block of the frozen DINOv2 (one graph per gradient mode serves all
    blocks): its three to four passes per iteration (reference, real, fake, and the generator's GAN term
    with gradient to the image) are otherwise a few hundred small operators each, issued by the host.
    Costs compilation in the first iterations; same arithmetic up to fused-kernel rounding. Measured (SD3.5
    Medium, 1 x H200, lean options): 1.13 against 1.14 s/it, no gain; off in the shipped configs."""

    compile_mode: str | None = None
    """``torch.compile`` mode of the compiled heads' branches (``compile_heads``), e.g. ``reduce-overhead``:
    CUDA graphs replayed instead of kernels issued one by one by the host. The engine marks each iteration
    as a new CUDA-graph step. The DINOv2 blocks (``compile_backbone``) keep the default mode: their taps are
    kept across the blocks' calls, which CUDA-graph replays would overwrite. The spectral-norm vectors are
    updated in place inside the graphs. Measured on one H200 (SD3.5 Medium, the 1-GPU command of the
    README): discriminator step 217-341 -> 121-143 ms, 0.61-0.63 s/it at 55.0 GiB; on an H200 the tiny recipe
    logs the losses and ends with the spectral-norm vectors of a run without it (``tests/test_compile.py``).
    Unsharded heads only: ``model.shard_discriminator`` on several GPUs refuses it. ``null``: torch's
    default."""

    def validate(self, prefix: str = "discriminator") -> None:
        """Raise :class:`ConfigError` naming the key when a value cannot work."""

        def fail(key: str, msg: str) -> None:
            raise ConfigError(f"{prefix}.{key}: {msg}")

        if len(set(self.hooks)) != len(self.hooks) or any(h < 0 for h in self.hooks):
            fail("hooks", f"must be distinct non-negative block indices, got {self.hooks}")
        if not self.hooks and not self.tap_patch_embed:
            fail("hooks", "is empty and tap_patch_embed is false: the discriminator would have no head")
        for key in ("cmap_dim", "virtual_batch", "c_dim", "clip_context_length"):
            if getattr(self, key) < 1:
                fail(key, "must be >= 1")
        if self.num_downsamples < 0:
            fail("num_downsamples", "must be >= 0")
        ops = [op.strip() for op in self.diffaug.split(",") if op.strip()]
        unknown = [op for op in ops if op not in DIFFAUG_OPS]
        if unknown:
            fail(
                "diffaug",
                f"unknown op(s) {unknown}; use a comma-separated subset of {', '.join(DIFFAUG_OPS)}",
            )
        if not 0.0 <= self.translation_ratio <= 1.0:
            fail("translation_ratio", "must be in [0, 1]")
        if not 0.0 <= self.cutout_ratio <= 1.0:
            fail("cutout_ratio", "must be in [0, 1]")
        if self.resolution is not None and self.resolution < 14:
            fail("resolution", "must be null or at least one DINOv2 patch (14 px)")
