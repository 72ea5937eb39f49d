"""Shared fixtures: one tiny-asset cache per test session, and a runner for the real launchers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """A SENSEFLOW_CACHE shared by the session (tiny teachers are built once)."""
    path = Path(os.environ.get("SENSEFLOW_TEST_CACHE", tmp_path_factory.mktemp("senseflow_cache")))
    os.environ["SENSEFLOW_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny random DINOv2 directory and tiny CLIP weights for the VFM discriminator."""
    from senseflow.discriminator.tiny import build_tiny_clip, build_tiny_dino

    root = tmp_path_factory.mktemp("tiny_disc")
    dino = build_tiny_dino(root / "dino", seed=0)
    clip = build_tiny_clip(root / "clip" / "open_clip_model.safetensors", seed=0)
    return dino, clip


def free_port() -> int:
    """A TCP port that is free right now on localhost."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cmd(args: list[str], cache: Path, env: dict | None = None, timeout: int = 600):
    """Run a command from the repo root with the tiny cache; returns the CompletedProcess."""
    full_env = {**os.environ, "SENSEFLOW_CACHE": str(cache), "PYTHON": sys.executable}
    for key in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        full_env.pop(key, None)
    full_env.update(env or {})
    return subprocess.run(args, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def launch(
    launcher: str,
    nnodes: int,
    nproc: int,
    config: str,
    save_dir: Path,
    *overrides: str,
    cache: Path,
    env=None,
):
    """Run ``sh <launcher> NNODES NPROC CONFIG SAVE_DIR overrides...``."""
    return run_cmd(["sh", launcher, str(nnodes), str(nproc), config, str(save_dir), *overrides], cache, env)


def spawn_gloo(worker, args: tuple, nprocs: int) -> None:
    """Run ``worker(rank, *args)`` in ``nprocs`` spawned processes for a gloo test (skipped where
    torch.distributed has no gloo), with MASTER_ADDR/MASTER_PORT on a free local port for the call and
    restored afterwards. Raises, with the child's traceback, if any rank fails."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")}
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(free_port())
    try:
        mp.spawn(worker, args=args, nprocs=nprocs, join=True)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
