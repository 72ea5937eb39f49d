"""Distillation runs of the toy benchmark: the real engine with the SD3.5 SenseFlow recipe.

Every variant loads ``configs/SD35/sd35_senseflow.yaml`` and overrides only paths, sizes, the device and
precision, the learning rate and the DM loss's guidance range (the toy teacher's, ``Preset.dm_guidance``;
the same for every variant) and the switches of the ablation:

==================  ===================================================================================
``dmd``             vanilla DMD: ``distill.ida.enabled=false distill.isg.weight=0 distill.gan.weight=0``
``dmd_ida``         DMD + IDA: ``distill.isg.weight=0 distill.gan.weight=0``
``dmd_ida_isg``     DMD + IDA + ISG: ``distill.gan.weight=0``
``senseflow``       the full recipe (DMD + IDA + ISG + the VFM discriminator)
==================  ===================================================================================

The discriminator reads the toy's DINOv2, pre-trained here by masked image modelling
(:mod:`senseflow.toy.vfm`; heads on its odd blocks and its patch embedding, :func:`disc_hooks`), and the
tiny random open_clip CLIP of :mod:`senseflow.discriminator.tiny` (``discriminator.c_dim=16``): both
frozen, only the heads learn, as in the real recipe (there on a pretrained DINOv2-L).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch

from ..config import load_config, resolve_paths, save_config
from .presets import RESOLUTION, Preset
from .teacher import BASE_CONFIG, toy_overrides

logger = logging.getLogger(__name__)

VARIANTS: dict[str, tuple[str, list[str]]] = {
    "dmd": ("Vanilla DMD", ["distill.ida.enabled=false", "distill.isg.weight=0", "distill.gan.weight=0"]),
    "dmd_ida": ("DMD + IDA", ["distill.isg.weight=0", "distill.gan.weight=0"]),
    "dmd_ida_isg": ("DMD + IDA + ISG", ["distill.gan.weight=0"]),
    "senseflow": ("SenseFlow (DMD + IDA + ISG + GAN)", []),
}
"""name -> (label, the overrides that switch components off)."""


def disc_hooks(preset: Preset) -> list[int]:
    """The toy DINOv2 blocks whose outputs feed a discriminator head: the odd ones (1, 3 of 4 blocks)."""
    return list(range(1, preset.vfm_depth, 2))


def engine_overrides(preset: Preset, out: Path, device: torch.device) -> list[str]:
    """Overrides shared by every variant (paths, sizes, precision, learning rate, logging)."""
    precision = (
        ["precision.compute=bf16", "precision.teacher=bf16"]
        if device.type == "cuda"
        else ["precision.compute=fp32", "precision.teacher=fp32"]
    )
    lr = preset.distill_lr
    lo, hi = preset.dm_guidance
    compiled = preset.distill_compile and device.type == "cuda"
    return [
        f"recipe=toy_{preset.name}",
        f"paths.pretrained_model={out / 'teacher'}",
        f"paths.dataset={out / 'data' / 'engine' / 'dataset.json'}",
        f"paths.dino={out / 'backbones' / 'dino'}",
        f"paths.clip={out / 'backbones' / 'clip' / 'open_clip_model.safetensors'}",
        f"discriminator.hooks=[{','.join(map(str, disc_hooks(preset)))}]",
        "discriminator.c_dim=16",
        *toy_overrides(),
        *(["model.compile_blocks=true", "discriminator.compile_heads=true"] if compiled else []),
        *precision,
        "precision.text_encoders=fp32",
        "precision.vae=fp32",
        f"distill.dm.guidance=[{float(lo)},{float(hi)}]",
        f"lr_scheduler.warm_up_steps={preset.distill_warmup}",
        f"lr_scheduler.lr_start={lr / 10}",
        f"lr_scheduler.lr_max={lr}",
        f"train.iter_num={preset.distill_iters}",
        f"train.batch_size={preset.distill_batch}",
        f"train.resolution={RESOLUTION}",
        f"train.save_interval={preset.save_interval}",
        f"train.log_interval={min(10, preset.save_interval)}",
        f"train.image_interval={preset.distill_iters}",
        f"train.device={device.type}",
        f"data.num_workers={0 if device.type == 'cpu' else 2}",
        "log.progress_bar=false",
        "checkpoint.keep_last=1",
        "checkpoint.keep_last_exports=0",
        *preset.distill_overrides,
    ]


def managed_keys(preset: Preset) -> set[str]:
    """The config keys the toy sets itself (paths, sizes, precision, learning rate, ...): ``--set`` must not
    change them (the toy's checkpoints and report follow its preset)."""
    bare = dataclasses.replace(preset, distill_overrides=(), distill_compile=True)
    keys = set()
    for device in ("cpu", "cuda"):
        keys |= {o.split("=", 1)[0] for o in engine_overrides(bare, Path("out"), torch.device(device))}
    return keys


def variant_overrides(name: str, preset: Preset, out: Path, device: torch.device) -> list[str]:
    """All overrides of one variant."""
    return [*engine_overrides(preset, out, device), *VARIANTS[name][1]]


def checkpoints(run_dir: Path, preset: Preset | None = None) -> dict[int, Path]:
    """The run's exported generators ``ckpt_model_{iter}.pth`` by iteration; with ``preset``, only those
    at its save interval and the last iteration (not those a stopped and resumed run wrote in between)."""
    found = {}
    for p in run_dir.glob("ckpt_model_*.pth"):
        try:
            k = int(p.stem.rsplit("_", 1)[1])
        except ValueError:
            continue
        if preset is None or k % preset.save_interval == 0 or k == preset.distill_iters:
            found[k] = p
    return dict(sorted(found.items()))


def run_variant(name: str, preset: Preset, out: Path, device: torch.device, info) -> dict:
    """Train one variant in this process with :class:`senseflow.engine.Engine` (resumes if interrupted)."""
    from ..engine import Engine

    run_dir = out / "distill" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    overrides = variant_overrides(name, preset, out, device)
    cfg = load_config(BASE_CONFIG, overrides)
    resolve_paths(cfg)
    save_config(cfg, run_dir / "config.yaml")
    (run_dir / "overrides.txt").write_text("\n".join(overrides) + "\n")
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        Engine(cfg, info, run_dir).train()
    finally:
        root.removeHandler(handler)
        handler.close()
    records = []
    if (run_dir / "metrics.jsonl").is_file():
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    last = records[-1] if records else {}
    return {
        "variant": name,
        "label": VARIANTS[name][0],
        "switches": VARIANTS[name][1],
        "iterations": preset.distill_iters,
        "generator_updates": preset.distill_iters // cfg.distill.generator_period,
        "checkpoints": sorted(checkpoints(run_dir, preset)),
        "final_losses": {k: v for k, v in last.items() if k.startswith("loss/")},
    }
