"""Sizes of the toy benchmark: ``ci`` (smoke test, about a minute on a CPU), ``cpu`` (real numbers on a
2-core CPU in about 25 minutes) and ``gpu`` (the benchmark of issue 9, about 11 minutes on one H100: 10.7 by
the log of a run stopped once, 11.9 and 11.2 by the reports of two others, 2026-11-23)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from ..errors import ConfigError

RESOLUTION = 64
"""Image side in pixels (the VAE down-samples by 4: 16x16x8 latents, 8x8 tokens of the patch-2 MMDiT)."""
T5_MAX_LENGTH = 40
"""T5 tokens of the prompt encoding (captions have at most 36; the SD3.5 recipe's 77 would only add
padding). CLIP always uses 77 tokens in the SD3 adapter."""
TEXT_WIDTHS = (32, 32, 64)
"""Hidden widths of the random-but-fixed CLIP-L, CLIP-G and T5 encoders (joint attention width = T5's)."""


# fields that only the discriminator's backbone (and the distillation) depend on
BACKBONE_FIELDS = ("vfm_width", "vfm_steps", "vfm_depth", "vfm_batch", "vfm_lr", "vfm_mask_ratio")

# fields that only the distillation stages (and what follows them) depend on
DISTILL_FIELDS = (
    "distill_iters",
    "distill_batch",
    "save_interval",
    "distill_lr",
    "distill_warmup",
    "distill_compile",
    "distill_overrides",
    "dm_guidance",
)


@dataclass(frozen=True)
class Preset:
    """Every size and step count of one run of the benchmark."""

    name: str
    # --- data
    num_train: int
    """Rendered training scenes (teacher, VAE and evaluation networks)."""
    num_distill_images: int
    """Scenes written as PNG + dataset.json for the distillation engine (the real images of DMD/GAN)."""
    num_eval: int
    """Fixed evaluation prompts with known attributes (and as many real images of another seed: a reference point for the Frechet distance)."""
    # --- VAE (AutoencoderKL, trained here)
    vae_channels: tuple[int, ...]
    vae_steps: int
    vae_batch: int
    # --- teacher transformer (SD3Transformer2DModel, trained here)
    width: int
    heads: int
    depth: int
    teacher_steps: int
    teacher_batch: int
    # --- the discriminator's DINOv2 (senseflow.toy.vfm; pre-trained here by masked image modelling)
    vfm_width: int
    vfm_steps: int
    """Masked-image-modelling steps; 0 keeps the backbone random."""
    # --- evaluation networks
    featnet_steps: int
    classifier_steps: int
    # --- distillation (the same for every variant)
    distill_iters: int
    distill_batch: int
    save_interval: int
    # --- evaluation
    teacher_many_steps: int
    """Euler steps of the many-step teacher baseline (on the scheduler's shifted sigmas, with CFG)."""
    eval_batch: int
    # --- optimisation (shared defaults)
    vae_lr: float = 2e-3
    teacher_lr: float = 1e-3
    teacher_warmup: int = 100
    ema_decay: float = 0.999
    nets_lr: float = 2e-3
    vfm_depth: int = 4
    """Blocks of the toy DINOv2; the heads tap the odd ones (``discriminator.hooks``) and the patch embedding."""
    vfm_batch: int = 128
    vfm_lr: float = 1e-3
    vfm_mask_ratio: float = 0.5
    distill_lr: float = 5e-5
    """Learning rate of the generator, fake score and discriminator heads (all variants). 2e-4 until
    2026-11-22: on the ``cpu`` preset it made every student's Frechet distance jump between checkpoints
    and the full recipe end at 1.53x the teacher's; 5e-5 gave steady curves and 1.12x
    (``benchmarks/results/toy_cpu_lr*/``)."""
    distill_warmup: int = 20
    distill_compile: bool = False
    """``model.compile_blocks`` and ``discriminator.compile_heads`` in the distillation runs (CUDA only).
    At 8 x 8 tokens every step is bound by Python and kernel launches; on an H100 compiling took the
    full recipe from 0.56 to 0.40 s per iteration alone (batch 32; four variants at once: 0.49 to 0.39,
    the others ~0.24 either way), but the four variants' cold compilation took ~140 s of wall-clock time
    (``tools/toy_probe.py --toy-distill 12``, 2026-11-23: 12 iterations in 170 s). Over the ``gpu``
    preset's 400 iterations that is more than it saves (~40 s for the full recipe), so no preset turns it
    on; it pays from about 1,500 iterations."""
    distill_overrides: tuple[str, ...] = ()
    """Engine overrides (``key=value`` on ``configs/SD35/sd35_senseflow.yaml``) applied to every variant after
    the toy's own and before the ablation switches, which win (``--set``; e.g. ``distill.gan.weight=1`` changes
    only the full recipe, the variants without GAN keep 0). Empty in every preset: the recipe's values."""
    teacher_compile: bool = False
    """``torch.compile`` of the teacher transformer's blocks while it trains (CUDA only; the saved EMA copy
    stays uncompiled). At 8 x 8 tokens an eager step is bound by Python and kernel launches: on an H100
    the ``gpu`` preset spent ~130 ms per step on ~22 ms of matrix work; compiled, ~67 ms after ~45 s of
    compilation (2026-11-23). It changes the teacher (rounding of the fused kernels), so it is not in
    ``DISTILL_FIELDS``: on the ``gpu`` preset it trained better teachers than eager mode (50-step FD 26 and 35
    against 70-80, loss 1.181 and 1.188 against 1.199) but, unlike eager mode, not the same one twice from
    the same seeds (README)."""
    dm_guidance: tuple[float, float] = (2.0, 2.0)
    """The DM loss's teacher CFG range ``[lo, hi]`` (``distill.dm.guidance``; ``--dm-guidance``), drawn per
    sample. Like the real recipes (SD3.5 Medium U(2, 8), Large U(3, 10), SDXL 8; FLUX embeds U(1, 8)), each
    teacher has its own. For the toy's teacher, 2: on one H100 (2026-11-23, ``benchmarks/results/
    toy_gpu_H100_guidance/``) the full recipe reached FD 1.13x the 50-step teacher's at 2, 1.23x at U(2, 4),
    1.80x at SD3.5 Medium's U(2, 8) (1.51-2.59x over 17 sweep points of other keys) and 1.53x at 1 (no
    CFG, 6.8 attribute points lower). Runs written before this field existed used U(2, 8)."""
    cfg_scale: float = 5.0
    """CFG scale of the teacher baselines (the many-step and the undistilled 4-step teacher): the mean of
    SD3.5 Medium's DM range U(2, 8). The report also has the many-step teacher at ``dm_guidance``."""
    grid_prompts: int = 16
    seed: int = 0

    @property
    def params_label(self) -> str:
        """Transformer size, for the report."""
        return f"width {self.width}, {self.depth} blocks, {self.heads} heads"

    def to_dict(self) -> dict:
        """Plain dict (JSON)."""
        return dataclasses.asdict(self)


def scale_label(guidance: tuple[float, float]) -> str:
    """A CFG scale or range as the report writes it: ``2`` or ``U(2, 8)``."""
    lo, hi = guidance
    return f"{lo:g}" if lo == hi else f"U({lo:g}, {hi:g})"


FORMER_VALUES = {"dm_guidance": (2.0, 8.0)}
"""Fields added with a default that changed what a run does: the value runs written before them had."""


def with_defaults(fields: dict) -> dict:
    """A ``preset.json`` of an older run completed with the fields added since (as JSON values): their
    defaults, or what those runs did (``FORMER_VALUES``), so that it compares equal to the same preset
    today only if it ran the same settings."""
    defaults = {f.name: f.default for f in dataclasses.fields(Preset) if f.default is not dataclasses.MISSING}
    return {**json.loads(json.dumps({**defaults, **FORMER_VALUES})), **fields}


PRESETS: dict[str, Preset] = {
    "ci": Preset(
        name="ci",
        num_train=384,
        num_distill_images=64,
        num_eval=32,
        vae_channels=(8, 16, 16),
        vae_steps=40,
        vae_batch=16,
        width=32,
        heads=2,
        depth=2,
        teacher_steps=40,
        teacher_batch=16,
        teacher_warmup=10,
        vfm_width=32,
        vfm_steps=20,
        featnet_steps=80,
        classifier_steps=80,
        distill_iters=10,
        distill_batch=2,
        save_interval=5,
        distill_warmup=2,
        teacher_many_steps=8,
        eval_batch=32,
        grid_prompts=8,
    ),
    "cpu": Preset(
        name="cpu",
        num_train=12000,
        num_distill_images=2000,
        num_eval=256,
        vae_channels=(16, 32, 32),
        vae_steps=700,
        vae_batch=16,
        width=128,
        heads=4,
        depth=4,
        teacher_steps=1200,
        teacher_batch=32,
        vfm_width=64,
        vfm_steps=600,
        featnet_steps=400,
        classifier_steps=300,
        distill_iters=200,
        distill_batch=8,
        save_interval=50,
        teacher_many_steps=20,
        eval_batch=64,
    ),
    "gpu": Preset(
        name="gpu",
        num_train=100000,
        num_distill_images=20000,
        num_eval=1000,
        vae_channels=(32, 64, 128),
        vae_steps=2500,
        vae_batch=64,
        width=384,
        heads=6,
        depth=8,
        teacher_steps=2000,
        teacher_batch=128,
        teacher_warmup=200,
        vfm_width=128,
        vfm_steps=4000,
        featnet_steps=1500,
        classifier_steps=1000,
        distill_iters=400,
        distill_batch=32,
        teacher_compile=True,
        save_interval=100,
        teacher_many_steps=50,
        eval_batch=250,
        grid_prompts=16,
    ),
}


def get_preset(name: str) -> Preset:
    """The named preset (``ci``, ``cpu`` or ``gpu``)."""
    if name not in PRESETS:
        raise ConfigError(f"--preset: unknown preset {name!r} (choose {', '.join(PRESETS)})")
    return PRESETS[name]
