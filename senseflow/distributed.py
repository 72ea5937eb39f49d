"""Process-group set-up that degrades to a single process (no torchrun, CPU, pytest).

Under torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set) the default group uses NCCL on GPUs and
gloo on CPUs. Without torchrun a one-process group is created on an in-memory store, so FSDP2 and
every collective run through the same code in both cases.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, world size, rank on its node, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on global rank 0 (the process that writes logs, images and exported files)."""
        return self.rank == 0


def resolve_device(pref: str, local_rank: int) -> torch.device:
    """``auto`` picks CUDA when a GPU is visible, else CPU."""
    if pref == "cpu" or (pref == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible")
    return torch.device("cuda", local_rank)


def init_distributed(device_pref: str = "auto", timeout_min: int = 30) -> DistInfo:
    """Initialise (or reuse) the default process group and pick this rank's device."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    else:
        rank, world, local_rank = 0, 1, 0
    device = resolve_device(device_pref, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"timeout": timedelta(minutes=timeout_min)}
        if device.type == "cuda":
            kwargs["device_id"] = device
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, rank=rank, world_size=world, **kwargs)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)
    info = DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)
    logger.debug("process group ready: %s", info)
    return info


def barrier() -> None:
    """Synchronise all ranks (no-op without a process group)."""
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """Send a picklable object from ``src`` to every rank and return it."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Average a tensor over ranks (in place) and return it."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def all_reduce_max_int(value: int, device: torch.device) -> int:
    """The largest of the ranks' ``value`` (one small all-reduce; ``value`` itself without a group)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def broadcast_tensors_(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` on every rank with rank ``src``'s values (replicated modules)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        for t in tensors:
            dist.broadcast(t.data, src=src)


def all_reduce_grads_(params: list[torch.Tensor], bucket_bytes: int = 64 << 20) -> None:
    """Average the gradients of a replicated module over ranks, in buckets (what DDP does)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    world = dist.get_world_size()
    grads = [p.grad for p in params if p.grad is not None]
    bucket, size = [], 0
    for g in [*grads, None]:
        if g is not None:
            bucket.append(g)
            size += g.numel() * g.element_size()
        if bucket and (g is None or size >= bucket_bytes):
            flat = _flatten_dense_tensors(bucket)
            dist.all_reduce(flat)
            flat /= world
            for g_old, g_new in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                g_old.copy_(g_new)
            bucket, size = [], 0


def cleanup() -> None:
    """Destroy the default process group if this process created one."""
    if dist.is_initialized():
        dist.destroy_process_group()
