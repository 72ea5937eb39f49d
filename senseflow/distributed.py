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


class GradReducer:
    """Averages a replicated module's gradients over the ranks while its backward runs, as DDP does.

    The parameters are put in buckets of about ``bucket_bytes`` in reverse order (a backward produces the
    last layers' gradients first), one dtype per bucket. Between :meth:`arm` and :meth:`finish` (one
    backward), a hook after each gradient's accumulation counts the bucket's gradients; a complete bucket
    is flattened into one fp32 buffer whose all-reduce is started at once, asynchronously, in bucket order
    (so every rank issues the same collectives in the same order), with at most ``in_flight`` buffers alive
    (the oldest is waited for, averaged and copied back into its gradients first). The collectives thus
    run while the host still issues the backward's kernels.

    A bucket is complete when the parameters that received a gradient in the previous backward have
    received theirs (all parameters before the first), so parameters without gradients do not hold their
    bucket back after the first step; one that receives its first gradient after its bucket left is
    reduced by :meth:`finish`, with everything else that remains. Every rank must produce gradients for the
    same parameters, each at most once per backward: a parameter accumulated after its gradient was
    already sent (twice in one backward, e.g. shared between reentrant checkpoints) is an error, not a
    silently wrong average."""

    def __init__(self, params: list[torch.Tensor], bucket_bytes: int = 64 << 20, in_flight: int = 2):
        self.world = dist.get_world_size()
        self.in_flight = in_flight
        self.params = [p for p in params if p.requires_grad]
        self.buckets: list[list[torch.Tensor]] = []
        size, dtype = 0, None
        for p in reversed(self.params):
            if not self.buckets or size >= bucket_bytes or p.dtype != dtype:
                self.buckets.append([])
                size, dtype = 0, p.dtype
            self.buckets[-1].append(p)
            size += p.numel() * p.element_size()
        self.bucket_of = {id(p): k for k, bucket in enumerate(self.buckets) for p in bucket}
        self.expected = {id(p) for p in self.params}
        self.armed = False
        self.launched_in_backward = 0  # buckets started before :meth:`finish` in the last backward
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._accumulated)

    def arm(self) -> None:
        """Start counting: the next backward's gradients are the ones to average."""
        self.armed = True
        self.remaining = [sum(id(p) in self.expected for p in b) for b in self.buckets]
        self.seen: set[int] = set()
        self.sent: set[int] = set()
        self.late: list[torch.Tensor] = []
        self.next = 0
        self.works: list[tuple] = []
        self._advance()

    def _accumulated(self, p: torch.Tensor) -> None:
        if not self.armed:
            return
        if id(p) in self.sent:
            raise RuntimeError(
                f"gradient of a {tuple(p.shape)} parameter accumulated after it was sent to be averaged "
                "(twice in one backward?): replicated modules need each parameter once per backward"
            )
        self.seen.add(id(p))
        k = self.bucket_of[id(p)]
        if k < self.next:  # no gradient when its bucket left: sent by finish()
            self.late.append(p)
            return
        if id(p) in self.expected:
            self.remaining[k] -= 1
            self._advance()

    def _advance(self) -> None:
        while self.next < len(self.buckets) and self.remaining[self.next] == 0:
            self._send(self.buckets[self.next])
            self.next += 1

    def _send(self, params: list[torch.Tensor]) -> None:
        from torch._utils import _flatten_dense_tensors

        grads = [p.grad for p in params if p.grad is not None]
        self.sent.update(id(p) for p in params if p.grad is not None)
        if not grads:
            return
        flat = _flatten_dense_tensors(grads).float()
        self.works.append((dist.all_reduce(flat, async_op=True), flat, grads))
        if len(self.works) > self.in_flight:
            self._complete(self.works.pop(0))

    def _complete(self, entry: tuple) -> None:
        from torch._utils import _unflatten_dense_tensors

        work, flat, grads = entry
        work.wait()
        flat /= self.world
        torch._foreach_copy_(grads, _unflatten_dense_tensors(flat, grads))

    def finish(self) -> None:
        """After the backward: reduce what remains and wait until every gradient is averaged."""
        self.launched_in_backward = self.next
        while self.next < len(self.buckets):
            self._send(self.buckets[self.next])
            self.next += 1
        for dtype in sorted({p.dtype for p in self.late}, key=str):  # the same order on every rank
            self._send([p for p in self.late if p.dtype == dtype])
        for entry in self.works:
            self._complete(entry)
        self.works = []
        self.armed = False
        self.expected = self.seen


def cleanup() -> None:
    """Destroy the default process group if this process created one."""
    if dist.is_initialized():
        dist.destroy_process_group()
