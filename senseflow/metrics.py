"""Logging set-up, the metrics sink (JSONL always, TensorBoard on request) and image strips."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)


def setup_logging(rank: int, log_file: Path | None = None, level: int = logging.INFO) -> None:
    """Rank 0 logs INFO to stderr (and ``log_file``); other ranks only warnings, tagged with their rank."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    fmt = (
        "%(asctime)s %(levelname)s %(name)s: %(message)s"
        if rank == 0
        else f"[rank{rank}] %(levelname)s %(name)s: %(message)s"
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt, "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level if rank == 0 else logging.WARNING)
    if log_file is not None and rank == 0:
        fh = logging.FileHandler(log_file)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(fh)
    for noisy in ("httpx", "urllib3", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:  # per-component "Loading weights" bars of the libraries
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        tlog.disable_progress_bar()
        dlog.disable_progress_bar()
    except ImportError:
        pass


class MetricsSink:
    """Averages per-iteration metrics and writes them every ``log_interval`` iterations (rank 0).

    Values are kept as device tensors until written, so the hot loop does not synchronise with the
    host; the mean over ranks is taken at write time.
    """

    def __init__(
        self,
        save_dir: Path,
        is_main: bool,
        device: torch.device,
        tensorboard: bool = False,
        wandb=None,
        config: dict | None = None,
    ):
        self.is_main = is_main
        self.device = device
        self.path = save_dir / "metrics.jsonl"
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self._tb = None
        self._wandb = None
        if tensorboard and is_main:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(save_dir / "tensorboard"))
        if wandb is not None and wandb.enabled and is_main:
            try:
                import wandb as wandb_lib
            except ImportError:
                from .errors import ConfigError

                raise ConfigError("log.wandb.enabled: needs the wandb package (pip install wandb)") from None
            self._wandb = wandb_lib.init(
                project=wandb.project,
                entity=wandb.entity or None,
                name=wandb.name or save_dir.name,
                mode=wandb.mode,
                dir=str(save_dir),
                config=config,
                resume="allow",
            )

    def image(self, name: str, path: Path, step: int) -> None:
        """Send a written image file to W&B (the PNG on disk is the primary record)."""
        if self._wandb is not None:
            import wandb as wandb_lib

            self._wandb.log({name: wandb_lib.Image(str(path))}, step=step)

    def add(self, metrics: dict[str, torch.Tensor | float]) -> None:
        """Accumulate one iteration's scalars."""
        for k, v in metrics.items():
            v = v.detach().float() if isinstance(v, torch.Tensor) else torch.tensor(float(v))
            self._sums[k] = self._sums[k] + v if k in self._sums else v.clone()
            self._counts[k] = self._counts.get(k, 0) + 1

    def flush(self, step: int, extra: dict[str, float] | None = None) -> dict[str, float]:
        """Average over the interval and over ranks, write a JSONL record, reset; returns the record."""
        from .distributed import all_reduce_mean

        keys = sorted(self._sums)
        record: dict[str, float] = {"iter": step, "time": time.time()}
        if keys:
            vec = torch.stack([self._sums[k].to(self.device) / self._counts[k] for k in keys])
            vec = all_reduce_mean(vec).tolist()
            record.update({k: (v if math.isfinite(v) else str(v)) for k, v in zip(keys, vec)})
        record.update(extra or {})
        if self.device.type == "cuda":
            record["mem/peak_alloc_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            record["mem/peak_reserved_gib"] = torch.cuda.max_memory_reserved(self.device) / 2**30
        self._sums.clear()
        self._counts.clear()
        if self.is_main:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            scalars = {
                k: v for k, v in record.items() if isinstance(v, float | int) and k not in ("time", "iter")
            }
            if self._tb is not None:
                for k, v in scalars.items():
                    self._tb.add_scalar(k, v, step)
            if self._wandb is not None:
                self._wandb.log(scalars, step=step)
        return record

    def close(self) -> None:
        """Flush TensorBoard and W&B."""
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def image_grid(rows: list[torch.Tensor], labels: list[str] | None = None) -> Image.Image:
    """A grid with one row per tensor (B, 3, H, W) in [-1, 1], an optional label left of each row."""
    arrays = [to_uint8(r) for r in rows]
    b, h, w, _ = arrays[0].shape
    pad = 2
    label_w = 90 if labels else 0
    grid = Image.new("RGB", (label_w + b * (w + pad) + pad, len(rows) * (h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, arr in enumerate(arrays):
        y = pad + r * (h + pad)
        if labels:
            draw.text((4, y + h // 2 - 5), labels[r], fill=(0, 0, 0))
        for i in range(arr.shape[0]):
            grid.paste(Image.fromarray(arr[i]), (label_w + pad + i * (w + pad), y))
    return grid
