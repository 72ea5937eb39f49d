"""Shared fixtures: one tiny-asset cache per test session, and a runner for the real launchers."""

from __future__ import annotations

import contextlib
import datetime
import json
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


@pytest.fixture(autouse=True)
def _restore_tf32():
    """The engine sets torch's process-wide TF32 switches (``precision.tf32``); each test starts from the
    values the session started with, so GPU tests that compare fp32 results do not see another's."""
    import torch

    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


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


@contextlib.contextmanager
def gloo_group(rank: int, store_path: str, world: int, timeout_s: int = 180):
    """Inside a :func:`spawn_gloo` worker: one CPU thread, a gloo process group over a file store for the
    ``with`` block, destroyed when it ends (also on an error)."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s)
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def spawn_engine_runs(
    worker, tmp: Path, world: int, runs: list[str]
) -> tuple[list[dict], dict[str, list[dict]]]:
    """Build the tiny SD3.5 recipe's assets once (not raced by the ranks), run ``worker(rank, store, tmp)``
    on ``world`` gloo ranks, and return what each rank saved as ``tmp/rank<r>.pt`` and the metrics records
    of each named run (``tmp/<run>/metrics.jsonl``)."""
    import torch

    from senseflow.data.tiny import resolve_path

    for asset in ("sd3", "shapes", "dino", "clip"):
        resolve_path(f"tiny:{asset}")
    spawn_gloo(worker, (str(tmp / "store"), str(tmp)), world)
    results = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]
    metrics = {
        name: [json.loads(line) for line in (tmp / name / "metrics.jsonl").read_text().splitlines()]
        for name in runs
    }
    return results, metrics


def loss_metrics(record: dict) -> dict[str, float]:
    """The losses, gradient norms and discriminator metrics of one metrics record (no timings)."""
    return {k: v for k, v in record.items() if k.startswith(("loss/", "grad_norm/", "disc/"))}


def max_abs_diff(a: dict, b: dict) -> float:
    """The largest absolute difference between same-named tensors of two state dicts with the same keys."""
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)
