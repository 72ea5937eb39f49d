"""The single training entry point behind every launcher.

Usage (one process, or under torchrun)::

    python -m senseflow.train CONFIG SAVE_DIR [key=value ...]

Rerunning the same command resumes from the newest complete checkpoint in ``SAVE_DIR``. Mistakes a
user can fix (config keys, paths, dataset entries) end the run with one line naming the problem and
exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .config import load_config, resolve_paths, save_config
from .distributed import barrier, cleanup, init_distributed
from .errors import SenseFlowError
from .metrics import setup_logging
from .stop import TrainingStopped

logger = logging.getLogger("senseflow.train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """``CONFIG SAVE_DIR [key=value ...]``."""
    p = argparse.ArgumentParser(prog="python -m senseflow.train", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="YAML config (e.g. configs/SD35/sd35_senseflow.yaml)")
    p.add_argument("save_dir", help="run directory: checkpoints, logs, images; rerun to resume")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.iter_num=10")
    p.add_argument(
        "--preflight",
        action="store_true",
        help="only check the config, the teacher folder and the dataset index (the launchers run this first)",
    )
    return p.parse_args(argv)


def preflight(cfg) -> None:
    """Cheap checks of everything a run reads, before any process group or model exists.

    The cheap part of ``python -m senseflow.check`` (teacher folder and weights, dataset index and image
    paths, discriminator backbones); the first problem is raised as a ConfigError/DataError.
    """
    from .check import preflight_checks

    root, data = preflight_checks(cfg)
    logger.info("preflight ok: teacher %s, %d training images", root, len(data))


def main(argv: list[str] | None = None) -> int:
    """Load the config, set up the process group and train; returns the exit code."""
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    save_dir = Path(args.save_dir)
    setup_logging(rank)
    try:
        cfg = load_config(args.config, args.overrides)
        resolve_paths(cfg)
        if args.preflight:
            preflight(cfg)
            return 0
        info = init_distributed(cfg.train.device)
        if info.is_main:
            save_dir.mkdir(parents=True, exist_ok=True)
        barrier()
        setup_logging(info.rank, save_dir / "train.log")
        if info.is_main:
            save_config(cfg, save_dir / "config.yaml")
        logger.info("recipe %s on %d process(es), device %s", cfg.recipe, info.world_size, info.device)
        from .engine import Engine

        Engine(cfg, info, save_dir).train()
    except TrainingStopped as err:
        if rank == 0:
            logger.warning("%s", err)
        return err.exit_code
    except SenseFlowError as err:
        if rank == 0:
            logger.error("%s", err)
        else:
            logger.debug("%s", err)
        return 2
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
