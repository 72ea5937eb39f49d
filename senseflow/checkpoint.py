"""Atomic, sharded, rotating training checkpoints and the exported generator file.

Layout of a run directory::

    checkpoints/step_00003000/   torch.distributed.checkpoint shards of every trained net and optimiser,
                                 common.pt (loader, LR schedules, counters), rank{r}.pt (random
                                 streams of rank r), meta.json (written last)
    checkpoints/latest           name of the newest complete state
    ckpt_model_3000.pth          {"model": generator state dict}: the inference artifact of the original

A state is written into ``step_X.tmp``, renamed to ``step_X`` only after every rank finished, and only
then recorded in ``latest``: a crash at any moment leaves the previous state intact and loadable.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from .distributed import DistInfo, barrier, broadcast_object

logger = logging.getLogger(__name__)

_STEP = re.compile(r"^step_(\d{8})$")
_EXPORT = re.compile(r"^ckpt_model_(\d+)\.pth$")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary name, then rename."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class CheckpointManager:
    """Writes, finds, loads and rotates training states in ``save_dir/checkpoints``."""

    def __init__(self, save_dir: Path, info: DistInfo, keep_last: int = 2, keep_last_exports: int = 0):
        self.save_dir = Path(save_dir)
        self.root = self.save_dir / "checkpoints"
        self.info = info
        self.keep_last = keep_last
        self.keep_last_exports = keep_last_exports

    def _complete_steps(self) -> list[int]:
        if not self.root.is_dir():
            return []
        steps = []
        for p in self.root.iterdir():
            m = _STEP.match(p.name)
            if m and (p / "meta.json").is_file():
                steps.append(int(m.group(1)))
        return sorted(steps)

    def latest(self) -> Path | None:
        """The newest complete state (agreed by all ranks), or None for a fresh run."""
        found = None
        if self.info.is_main:
            pointer = self.root / "latest"
            if pointer.is_file() and (self.root / pointer.read_text().strip() / "meta.json").is_file():
                found = str(self.root / pointer.read_text().strip())
            elif steps := self._complete_steps():
                found = str(self.root / f"step_{steps[-1]:08d}")
        found = broadcast_object(found)
        return Path(found) if found else None

    def save(
        self,
        step: int,
        state: dict[str, Any],
        common: dict[str, Any],
        per_rank: dict[str, Any],
        meta: dict[str, Any],
        export: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        """Write one training state (collective: every rank calls it with its own ``extra``).

        Args:
            state: DCP state dict (sharded model/optimiser state dicts; plain tensors are replicated).
            common: small state identical on all ranks (loader, schedulers, counters), ``common.pt``.
            per_rank: this rank's small state (random streams), ``rank{r}.pt``.
            meta: JSON-able description written by rank 0 last (marks the state complete).
            export: the full generator state dict (rank 0) to write as ``ckpt_model_{step}.pth``.
        """
        t0 = time.time()
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f"step_{step:08d}.tmp"
        if self.info.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
        barrier()
        dcp.save(state, checkpoint_id=str(tmp))
        torch.save(per_rank, tmp / f"rank{self.info.rank}.pt")
        if self.info.is_main:
            torch.save(common, tmp / "common.pt")
        barrier()
        if self.info.is_main:
            (tmp / "meta.json").write_text(
                json.dumps({**meta, "step": step, "world_size": self.info.world_size})
            )
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _atomic_write_text(self.root / "latest", final.name)
            if export is not None:
                atomic_torch_save({"model": export}, self.save_dir / f"ckpt_model_{step}.pth")
            self._rotate()
        barrier()
        logger.info("saved checkpoint %s in %.1fs", final, time.time() - t0)
        return final

    def _rotate(self) -> None:
        steps = self._complete_steps()
        for s in steps[: max(0, len(steps) - self.keep_last)]:
            shutil.rmtree(self.root / f"step_{s:08d}", ignore_errors=True)
        if self.keep_last_exports > 0:
            exports = sorted(
                (int(m.group(1)), p) for p in self.save_dir.iterdir() if (m := _EXPORT.match(p.name))
            )
            for _, p in exports[: max(0, len(exports) - self.keep_last_exports)]:
                p.unlink(missing_ok=True)

    def load(self, path: Path, state: dict[str, Any]) -> tuple[dict, dict | None, dict]:
        """Load ``state`` in place from ``path``; return ``(common, per_rank or None, meta)``.

        ``per_rank`` is None when the state was written with a different world size.
        """
        meta = json.loads((path / "meta.json").read_text())
        dcp.load(state, checkpoint_id=str(path))
        common = torch.load(path / "common.pt", map_location="cpu", weights_only=True)
        per_rank = None
        if meta.get("world_size") == self.info.world_size:
            per_rank = torch.load(path / f"rank{self.info.rank}.pt", map_location="cpu", weights_only=True)
        else:
            logger.warning(
                "resuming a %s-rank checkpoint on %s ranks: model and optimiser states are resharded, "
                "but per-rank random streams and the data position restart, so the run will not "
                "reproduce an uninterrupted one exactly",
                meta.get("world_size"),
                self.info.world_size,
            )
        return common, per_rank, meta
