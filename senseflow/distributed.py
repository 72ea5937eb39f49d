"""Process-group set-up that degrades to a single process (no torchrun, CPU, pytest).

Under torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set) the default group uses NCCL on GPUs and
gloo on CPUs. Without torchrun a one-process group is created on an in-memory store, so FSDP2 and
every collective run through the same code in both cases.
"""

from __future__ import annotations

import itertools
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
    last layers' gradients first), one dtype per bucket. During a step (:meth:`begin` before its first
    backward, :meth:`finish` after its last) the gradients are views into one flat buffer per bucket
    (DDP's ``gradient_as_bucket_view``): the buffer is made when the bucket's first gradient arrives (so
    gradients take memory as the backward produces them, not earlier), that gradient is copied in, and the
    bucket's other parameters accumulate into their views in place. In the step's last backward
    (:meth:`arm`) a hook after each gradient's accumulation counts the bucket's gradients, and a complete
    bucket's buffer is all-reduced at once, asynchronously and in place, in bucket order (so every rank
    issues the same collectives in the same order): no flattening or copying back per parameter, and the
    collectives run while the host still issues the backward's kernels. fp32 buffers are reduced as they
    are; others through an fp32 copy (at most ``in_flight`` alive), as FSDP2's ``reduce_dtype``.

    A bucket is complete when the parameters that received a gradient in the previous step's last backward
    have received theirs (all parameters before the first), so parameters without gradients do not hold
    their bucket back after the first step. Those others keep gradients of their own and are reduced by
    :meth:`finish`, with everything else that remains. Every rank must produce gradients for the same
    parameters, each at most once per backward: a parameter accumulated after its gradient was already
    sent (twice in one backward, e.g. shared between reentrant checkpoints) is an error, not a silently
    wrong average."""

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
        self.layout: list[list[tuple]] = []  # per bucket: each parameter's (shape, strides, offset) in it
        for bucket in self.buckets:
            offsets = itertools.accumulate((p.numel() for p in bucket), initial=0)
            strides = [torch.empty(p.shape, device="meta").stride() for p in bucket]  # contiguous ones
            self.layout.append(list(zip((p.shape for p in bucket), strides, offsets)))
        self.expected = {id(p) for p in self.params}
        self.active = self.armed = False
        self.launched_in_backward = 0  # buckets started before :meth:`finish` in the last step
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._accumulated)

    def begin(self) -> None:
        """Before the step's first backward (no-op if already begun): its gradients go into the buckets."""
        if self.active:
            return
        self.active = True
        self.flats: list[torch.Tensor | None] = [None] * len(self.buckets)
        self.got: set[int] = set()  # parameters with a gradient in this step
        self.armed_seen: set[int] = set()  # ... in its last backward

    def arm(self) -> None:
        """Before the step's last backward: its gradients are final, average them as they come."""
        self.begin()
        self.armed = True
        self.remaining = [sum(id(p) in self.expected for p in b) for b in self.buckets]
        self.next = 0
        self.works: list[tuple] = []
        self._advance()

    def _materialize(self, k: int) -> None:
        """Bucket ``k``'s buffer; its expected parameters' gradients become views into it."""
        bucket = self.buckets[k]
        flat = torch.zeros(sum(p.numel() for p in bucket), dtype=bucket[0].dtype, device=bucket[0].device)
        for p, (shape, strides, offset) in zip(bucket, self.layout[k]):
            if id(p) in self.expected:
                view = flat.as_strided(shape, strides, offset)  # one operator per parameter
                if p.grad is not None:
                    view.copy_(p.grad)
                p.grad = view
        self.flats[k] = flat

    def _accumulated(self, p: torch.Tensor) -> None:
        if not self.active:
            return
        self.got.add(id(p))
        k = self.bucket_of[id(p)]
        expected = id(p) in self.expected
        if expected and self.flats[k] is None:
            self._materialize(k)
        if not self.armed:
            return
        if expected and (k < self.next or id(p) in self.armed_seen):
            raise RuntimeError(
                f"gradient of a {tuple(p.shape)} parameter accumulated after it was sent to be averaged "
                "(twice in one backward?): replicated modules need each parameter once per backward"
            )
        self.armed_seen.add(id(p))
        if expected:  # others have gradients of their own, reduced by finish()
            self.remaining[k] -= 1
            self._advance()

    def _advance(self) -> None:
        while self.next < len(self.buckets) and self.remaining[self.next] == 0:
            self._send(self.flats[self.next])
            self.next += 1

    def _send(self, flat: torch.Tensor | None, grads: list[torch.Tensor] | None = None) -> None:
        """Start the all-reduce of ``flat`` (nothing if the bucket got no gradient: on no rank, by the
        contract above); ``grads``: the tensors ``flat`` was flattened from, to copy the mean back into."""
        if flat is None:
            return
        wide = flat if flat.dtype == torch.float32 else flat.float()
        self.works.append((dist.all_reduce(wide, async_op=True), wide, flat, grads))
        if wide is not flat and sum(w[1] is not w[2] for w in self.works) > self.in_flight:
            entry = next(w for w in self.works if w[1] is not w[2])
            self.works.remove(entry)
            self._complete(entry)

    def _complete(self, entry: tuple) -> None:
        from torch._utils import _unflatten_dense_tensors

        work, wide, flat, grads = entry
        work.wait()
        wide /= self.world
        if wide is not flat:
            flat.copy_(wide)
        if grads is not None:
            torch._foreach_copy_(grads, _unflatten_dense_tensors(flat, grads))

    def finish(self) -> None:
        """After the step's last backward: reduce what remains and wait until every gradient is averaged;
        parameters without a gradient in this step have none (``grad`` None) afterwards."""
        from torch._utils import _flatten_dense_tensors

        self.launched_in_backward = self.next
        while self.next < len(self.buckets):
            self._send(self.flats[self.next])
            self.next += 1
        own = [p for p in self.params if id(p) in self.got and id(p) not in self.expected]
        for dtype in sorted({p.dtype for p in own}, key=str):  # the same order on every rank
            grads = [p.grad for p in own if p.dtype == dtype]
            self._send(_flatten_dense_tensors(grads), grads)
        for entry in self.works:
            self._complete(entry)
        for p in self.params:
            if id(p) not in self.got:
                p.grad = None
        self.expected = self.armed_seen
        self.works, self.flats = [], []
        self.active = self.armed = False


def cleanup() -> None:
    """Destroy the default process group if this process created one."""
    if dist.is_initialized():
        dist.destroy_process_group()
