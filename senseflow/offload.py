"""Host-resident optimiser states between the steps of a rarely stepping optimiser.

The generator steps once every ``distill.generator_period`` iterations (10 for SD3.5 Medium); between
its steps its AdamW states (two fp32 tensors per parameter: 8 bytes per parameter, 16.7 GiB for the
2.24 B parameters of SD3.5 Medium, divided by the number of GPUs under FSDP2) sit unused on the device.
:class:`StateOffload` (``optimizer.offload_generator_state``) copies them to pinned host memory after
each step and frees their device storage, and copies them back just before the next step.

The state tensors stay the same objects: their storage is resized to zero bytes and back, the way FSDP2
frees unsharded parameters, so the optimiser (fused kernel included), DTensor wrappers and checkpointing
see no difference. Both copies are queued on the current stream without a host synchronisation: the
stream orders them against the step, and a freed block is only reused by later work on that stream.
"""

from __future__ import annotations

import logging

import torch

from .parallel import local_tensor

logger = logging.getLogger(__name__)


def _offloadable(t: torch.Tensor) -> bool:
    """A plain, dense tensor that owns all of its storage (not a step counter, not a quantised subclass)."""
    return (
        type(t) is torch.Tensor
        and t.numel() > 1
        and t.is_contiguous()
        and t.storage_offset() == 0
        and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    )


class StateOffload:
    """Moves an optimiser's state tensors to host memory (:meth:`offload`) and back (:meth:`load`).

    Args:
        opt: the optimiser; its states may be created or replaced at any time (first step, resume).
        pin: page-locked host buffers, for asynchronous copies (CUDA).
        label: names the optimiser in the log line of the first offload.
    """

    def __init__(self, opt: torch.optim.Optimizer, pin: bool, label: str = "") -> None:
        self.opt = opt
        self.pin = pin
        self.label = label
        self._announced = False
        self._host: dict[tuple[int, str], torch.Tensor] = {}  # (parameter index, state key) -> buffer
        self._away: list[tuple[torch.Tensor, torch.Tensor]] = []  # (device tensor, its host copy)

    def _state_tensors(self):
        params = (p for group in self.opt.param_groups for p in group["params"])
        for i, p in enumerate(params):
            for key, value in self.opt.state.get(p, {}).items():
                local = local_tensor(value) if isinstance(value, torch.Tensor) else None
                if local is not None and _offloadable(local):
                    yield (i, key), local

    @property
    def offloaded_bytes(self) -> int:
        """Device bytes currently held on the host."""
        return sum(t.numel() * t.element_size() for t, _ in self._away)

    @torch.no_grad()
    def offload(self) -> None:
        """Copy every state tensor to its host buffer and free its device storage."""
        if self._away:
            return
        for key, t in self._state_tensors():
            host = self._host.get(key)
            if host is None or host.shape != t.shape or host.dtype != t.dtype:
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=self.pin)
                self._host[key] = host
            host.copy_(t, non_blocking=self.pin)
            t.untyped_storage().resize_(0)
            self._away.append((t, host))
        if self._away and not self._announced:
            self._announced = True
            logger.info(
                "%s optimiser states: %.2f GiB on this device moved to host memory between steps",
                self.label,
                self.offloaded_bytes / 2**30,
            )

    @torch.no_grad()
    def load(self) -> None:
        """Give the offloaded tensors their device storage back and copy their values in."""
        for t, host in self._away:
            t.untyped_storage().resize_(t.numel() * t.element_size())
            t.copy_(host, non_blocking=self.pin)
        self._away.clear()
