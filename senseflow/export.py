"""Export a distilled generator as a diffusers model folder that the stock pipelines load.

    python -m senseflow.export --config CONFIG --teacher DIR --checkpoint PATH --out DIR [--dtype bf16]

``--checkpoint`` is any format :func:`senseflow.inference.load_checkpoint_state` reads. ``--out`` receives
``config.json`` and safetensors weights written by ``save_pretrained`` (the teacher transformer's
architecture), plus ``senseflow.json`` with the trained sampling levels and the ``sigmas`` to give the
stock scheduler, so that ``StableDiffusion3Pipeline.from_pretrained(teacher, transformer=
SD3Transformer2DModel.from_pretrained(out))`` samples the trained 4-step schedule (see the README).
Only the transformer config of the teacher is read, not its encoder or VAE weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from .errors import ConfigError, SenseFlowError
from .inference import build_inference, load_generator
from .parallel import DTYPE
from .sampling import inference_levels, scheduler_sigmas
from .schedules import FlowMatchingSchedule

logger = logging.getLogger("senseflow.export")


def export_generator(
    config: str | Path, teacher: str | Path, checkpoint: str | Path, out: str | Path, dtype: torch.dtype
) -> Path:
    """Write the generator of ``checkpoint`` to the diffusers folder ``out`` (which must not exist or be
    empty); the folder appears complete or not at all. Returns ``out``."""
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out: {out} exists and is not an empty folder; choose a new one")
    cfg, adapter = build_inference(config, teacher, "cpu", dtype, load_components=False)
    generator = load_generator(adapter, checkpoint, dtype)
    levels = inference_levels(cfg, adapter.schedule, len(cfg.distill.anchors))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        generator.save_pretrained(tmp, safe_serialization=True)
        _record_diffusers_class(tmp / "config.json", type(generator))
        info = {
            "recipe": cfg.recipe,
            "checkpoint": str(checkpoint),
            "dtype": str(dtype).removeprefix("torch."),
            "levels": [round(float(v), 6) for v in levels],
            **_scheduler_hint(levels, adapter.schedule),
            "guidance_scale": 0.0,
            "max_sequence_length": cfg.model.t5_max_length,
        }
        (tmp / "senseflow.json").write_text(json.dumps(info, indent=2) + "\n")
        for f in tmp.iterdir():
            os.chmod(f, 0o644)  # save_pretrained may leave private temporary-file modes
        os.chmod(tmp, 0o755)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("exported the generator of %s to %s (%s)", checkpoint, out, info["dtype"])
    return out


def _scheduler_hint(levels: torch.Tensor, schedule) -> dict:
    """How to make a stock scheduler sample the trained levels: flow matching takes ``sigmas`` (undoing
    its shift), DDPM families (SDXL) take the trained ``timesteps`` themselves."""
    if isinstance(schedule, FlowMatchingSchedule):
        return {"scheduler_sigmas": scheduler_sigmas(levels, schedule)}
    return {"scheduler_timesteps": [int(v) for v in levels]}


def _record_diffusers_class(config_json: Path, cls: type) -> None:
    """Name the nearest diffusers class in ``_class_name`` when an adapter subclasses one (the SDXL
    adapter's UNet adds a method), so the stock ``from_pretrained`` of that class accepts the folder."""
    base = next((c for c in cls.__mro__ if c.__module__.startswith("diffusers.")), cls)
    config = json.loads(config_json.read_text())
    if config.get("_class_name") != base.__name__:
        config["_class_name"] = base.__name__
        config_json.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; user mistakes end with one logged line and exit code 2."""
    from .metrics import setup_logging

    p = argparse.ArgumentParser(prog="python -m senseflow.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="the recipe config the generator was trained with")
    p.add_argument("--teacher", required=True, help="teacher folder in diffusers layout")
    p.add_argument("--checkpoint", required=True, help="generator checkpoint (any supported format)")
    p.add_argument("--out", required=True, help="new folder for config.json + safetensors")
    p.add_argument("--dtype", choices=tuple(DTYPE), default="bf16", help="weight dtype (default bf16)")
    args = p.parse_args(argv)
    setup_logging(0)
    try:
        export_generator(args.config, args.teacher, args.checkpoint, args.out, DTYPE[args.dtype])
    except SenseFlowError as err:
        logger.error("%s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
