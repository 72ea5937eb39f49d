"""``python -m senseflow.toy [--out DIR] [--preset {ci,cpu,gpu}] [--device DEV] ...``: the toy benchmark."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import sys
import time
from pathlib import Path

from ..errors import SenseFlowError
from ..output import emit
from ..stop import TrainingStopped
from .distill import VARIANTS
from .presets import PRESETS, Preset, get_preset

logger = logging.getLogger("senseflow.toy")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m senseflow.toy",
        description="Train a small SD3-family teacher on procedural captioned shapes, distil it with DMD, "
        "DMD+IDA, DMD+IDA+ISG and SenseFlow through the engine, and write a report. Finished stages are "
        "skipped when the command is run again.",
    )
    p.add_argument("--out", default=None, help="output folder (default: runs/toy_<preset>)")
    p.add_argument(
        "--preset",
        choices=list(PRESETS),
        default=None,
        help="ci: smoke test (about a minute on a CPU); cpu: real numbers on a 2-core CPU (~25 min); "
        "gpu: the benchmark (about 11 min on one H100). "
        "Default: gpu with CUDA, else cpu",
    )
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument(
        "--distill-iters",
        type=int,
        default=None,
        help="distillation iterations of every variant instead of the preset's (checkpoints at each quarter); "
        "a changed preset needs a new --out",
    )
    p.add_argument(
        "--distill-lr",
        type=float,
        default=None,
        help="learning rate of every variant's generator, fake score and discriminator heads instead of the "
        "preset's; a changed preset needs a new --out",
    )
    p.add_argument(
        "--distill-batch",
        type=int,
        default=None,
        help="images per distillation iteration of every variant instead of the preset's; a changed preset "
        "needs a new --out (--reuse works: the stages before distillation do not depend on it)",
    )
    p.add_argument(
        "--distill-warmup",
        type=int,
        default=None,
        help="iterations of every variant's linear learning-rate warm-up (from a tenth of the rate) instead of "
        "the preset's; a changed preset needs a new --out (--reuse works)",
    )
    p.add_argument(
        "--vfm-steps",
        type=int,
        default=None,
        help="masked-image-modelling steps of the discriminator's DINOv2 instead of the preset's (0: a random "
        "backbone, an ablation); a changed preset needs a new --out",
    )
    p.add_argument(
        "--dm-guidance",
        type=float,
        nargs="+",
        default=None,
        metavar="SCALE",
        help="the DM loss's teacher CFG scale (one value) or range LO HI, drawn per sample, instead of the "
        "preset's 2 (SD3.5 Medium's recipe: 2 8); a changed preset needs a new --out (--reuse works)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        dest="overrides",
        help="an engine override of configs/SD35/sd35_senseflow.yaml for every variant (repeatable), e.g. "
        "--set distill.gan.weight=1 --set distill.generator_period=5; the ablation switches win (the variants "
        "without GAN keep distill.gan.weight=0); the keys the toy sets itself (paths, sizes, learning rate, "
        "...) have their own options; a changed preset needs a new --out (--reuse works)",
    )
    p.add_argument(
        "--reuse",
        default=None,
        help="a finished run's --out: copy its stages before distillation (data, teacher, evaluation "
        "networks, teacher baselines) when its preset differs at most in the distillation settings "
        "(for sweeps of --distill-iters / --distill-lr / --distill-batch / --distill-warmup / --dm-guidance / "
        "--vfm-steps / --set; the backbone is rebuilt when it differs, the teacher at the DM guidance "
        "evaluated again)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="distillation variants trained at once, in separate processes (default: 4 on CUDA, 1 on CPU)",
    )
    p.add_argument(
        "--variants",
        nargs="+",
        default=None,
        metavar="NAME",
        help=f"the distillation variants to train and report, among {', '.join(VARIANTS)} (default: all); "
        "senseflow, the full recipe, is always one of them. E.g. sweep points of the full recipe alone, "
        "several commands at once on one GPU",
    )
    return p.parse_args(argv)


def check_variants(names: list[str] | None) -> list[str]:
    """``--variants``, validated (``SenseFlowError`` names a wrong one), in the report's order."""
    if names is None:
        return list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SenseFlowError(f"--variants: unknown {', '.join(unknown)} (choose among {', '.join(VARIANTS)})")
    if "senseflow" not in names:
        raise SenseFlowError(
            "--variants: must include senseflow (the report's goal is about the full recipe)"
        )
    return [n for n in VARIANTS if n in names]


REPLACEMENTS = (
    ("distill_lr", lambda v: v > 0, "must be positive"),
    ("distill_batch", lambda v: v >= 1, "must be >= 1"),
    ("distill_warmup", lambda v: v >= 0, "must be >= 0"),
    ("vfm_steps", lambda v: v >= 0, "must be >= 0"),
)
"""Options that replace the preset field of their name: (field, whether a value is valid, the rule)."""


def build_preset(args: argparse.Namespace, name: str) -> Preset:
    """The preset ``name`` with the command line's replacements; ``SenseFlowError`` names a bad option."""
    preset = get_preset(name)
    if args.distill_iters is not None:
        if args.distill_iters < 4:
            raise SenseFlowError("--distill-iters: must be at least 4")
        preset = dataclasses.replace(
            preset, distill_iters=args.distill_iters, save_interval=args.distill_iters // 4
        )
    for field, valid, rule in REPLACEMENTS:
        value = getattr(args, field)
        if value is not None:
            if not valid(value):
                raise SenseFlowError(f"--{field.replace('_', '-')}: {rule}")
            preset = dataclasses.replace(preset, **{field: value})
    if args.dm_guidance is not None:
        preset = dataclasses.replace(preset, dm_guidance=check_guidance(args.dm_guidance))
    if args.overrides:
        preset = dataclasses.replace(preset, distill_overrides=check_overrides(preset, args.overrides))
    return preset


def check_guidance(values: list[float]) -> tuple[float, float]:
    """``--dm-guidance``: one scale or a range ``LO HI`` as ``(lo, hi)`` (``SenseFlowError`` if invalid)."""
    if len(values) not in (1, 2):
        raise SenseFlowError(f"--dm-guidance: one scale or LO HI, got {len(values)} values")
    lo, hi = values[0], values[-1]
    if not 0 <= lo <= hi:
        raise SenseFlowError(f"--dm-guidance: need 0 <= LO <= HI, got {lo:g} {hi:g}")
    return (lo, hi)


def check_overrides(preset: Preset, overrides: list[str]) -> tuple[str, ...]:
    """``--set``'s engine overrides, validated against the recipe's config (``SenseFlowError`` names a bad
    one) before any stage runs."""
    from ..config import load_config
    from .distill import managed_keys
    from .teacher import BASE_CONFIG, toy_overrides

    managed = managed_keys(preset)
    for text in overrides:
        if "=" not in text:
            raise SenseFlowError(f"--set {text}: must look like KEY=VALUE (e.g. distill.gan.weight=1)")
        key = text.split("=", 1)[0].strip()
        if key in managed:
            raise SenseFlowError(
                f"--set {text}: the toy sets {key} itself (see the report's shared overrides); use its options "
                "(--distill-iters, --distill-lr, --distill-batch, --distill-warmup, --dm-guidance)"
            )
    for _, switches in VARIANTS.values():
        try:
            load_config(BASE_CONFIG, [*toy_overrides(), *overrides, *switches])
        except SenseFlowError as err:
            raise SenseFlowError(f"--set: {err}") from None
    return tuple(overrides)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from ..metrics import setup_logging

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preset_name = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    out = Path(args.out or f"runs/toy_{preset_name}")
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(0, out / "toy.log")
    command = "python -m senseflow.toy " + shlex.join(argv if argv is not None else sys.argv[1:])
    t0 = time.time()
    try:
        preset = build_preset(args, preset_name)
        variants = check_variants(args.variants)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SenseFlowError("--device: cuda requested but no CUDA device is visible")
        from .pipeline import run

        logger.info("toy benchmark: preset %s on %s into %s", preset.name, device, out.resolve())
        jobs = args.jobs or (4 if device.type == "cuda" else 1)
        reuse = Path(args.reuse) if args.reuse else None
        report = run(out, preset, device, command.strip(), jobs=jobs, reuse=reuse, variants=variants)
    except TrainingStopped as err:
        logger.warning("%s", err)
        return err.exit_code
    except SenseFlowError as err:
        logger.error("%s", err)
        return 2
    table, goal = report["table"], report["goal"]
    emit(
        "| " + " | ".join(table["columns"]) + " |",
        "| " + " | ".join(["---"] * len(table["columns"])) + " |",
        *("| " + " | ".join(row) + " |" for row in table["rows"]),
        f"SenseFlow / teacher-{preset.teacher_many_steps}-step FD ratio {goal['fd_ratio_to_teacher_many']:.2f} "
        f"(goal <= 1.25), attribute gap {goal['attribute_gap_points']:+.1f} points (goal <= 5), "
        f"beats the 4-step teacher: {goal['beats_teacher_4']}",
        f"report: {out.resolve() / 'report' / 'report.md'} ({time.time() - t0:.1f}s)",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
