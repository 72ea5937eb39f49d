"""Host-resident optimiser states between the steps of a rarely stepping optimiser.

The generator steps once every ``distill.generator_period`` iterations (10 for SD3.5 Medium); between
its steps its AdamW states (two fp32 tensors per parameter: 8 bytes per parameter, 16.7 GiB for the
2.24 B parameters of SD3.5 Medium, divided by the number of GPUs under FSDP2) sit unused on the device.
:class:`StateOffload` (``optimizer.offload_generator_state``) copies them to pinned host memory after
each step and frees their device storage, and copies them back just before the next step, a part of the
parameters at a time (``optimizer.offload_step_chunks``), so that the gradients and all the states are
never on the device together.

The state tensors stay the same objects: their storage is resized to zero bytes and back, the way FSDP2
frees unsharded parameters, so the optimiser (fused kernel included), DTensor wrappers and checkpointing
see no difference. Both copies are queued on the current stream without a host synchronisation: the
stream orders them against the step, and a freed block is only reused by later work on that stream.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable

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
    """Moves an optimiser's state tensors to host memory (:meth:`offload`) and back (:meth:`load`), and
    steps the optimiser a part of its parameters at a time (:meth:`step`).

    Args:
        opt: the optimiser; its states may be created or replaced at any time (first step, resume).
        pin: page-locked host buffers, for asynchronous copies (CUDA).
        label: names the optimiser in the log line of the first offload.
        when: says in that line when the states are away.
        chunks: parts of the parameters :meth:`step` updates one after the other.
    """

    def __init__(
        self,
        opt: torch.optim.Optimizer,
        pin: bool,
        label: str = "",
        chunks: int = 1,
        when: str = "between steps",
    ) -> None:
        self.opt = opt
        self.pin = pin
        self.label = label
        self.when = when
        self.chunks = chunks
        self._announced = False
        self._host: dict[tuple[int, str], torch.Tensor] = {}  # (parameter index, state key) -> buffer
        self._away: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}  # -> (device tensor, host)

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.opt.param_groups for p in group["params"]]

    def _indices(self, params: list[torch.Tensor] | None) -> set[int] | None:
        """Positions of ``params`` among the optimiser's parameters (None: all)."""
        if params is None:
            return None
        wanted = {id(p) for p in params}
        return {i for i, p in enumerate(self._params()) if id(p) in wanted}

    def _state_tensors(self, indices: set[int] | None):
        for i, p in enumerate(self._params()):
            if indices is not None and i not in indices:
                continue
            for key, value in self.opt.state.get(p, {}).items():
                local = local_tensor(value) if isinstance(value, torch.Tensor) else None
                if local is not None and _offloadable(local):
                    yield (i, key), local

    @property
    def offloaded_bytes(self) -> int:
        """Device bytes currently held on the host."""
        return sum(t.numel() * t.element_size() for t, _ in self._away.values())

    @torch.no_grad()
    def offload(self, params: list[torch.Tensor] | None = None) -> None:
        """Copy the state tensors (of ``params``, default all) to their host buffers and free their device
        storage; states already away stay as they are."""
        for key, t in self._state_tensors(self._indices(params)):
            away = self._away.get(key)
            if away is not None and away[0] is t:
                continue
            host = self._host.get(key)
            if host is None or host.shape != t.shape or host.dtype != t.dtype:
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=self.pin)
                self._host[key] = host
            host.copy_(t, non_blocking=self.pin)
            t.untyped_storage().resize_(0)
            self._away[key] = (t, host)
        if params is None:
            self._announce()

    def _announce(self) -> None:
        """Log, once, how much is held on the host (after the first offload of all states)."""
        if self._away and not self._announced:
            self._announced = True
            logger.info(
                "%s optimiser states: %.2f GiB on this device moved to host memory %s%s",
                self.label,
                self.offloaded_bytes / 2**30,
                self.when,
                f" (stepped in {self.chunks} parts)" if self.chunks > 1 else "",
            )

    @torch.no_grad()
    def load(self, params: list[torch.Tensor] | None = None) -> None:
        """Give the offloaded tensors (of ``params``, default all) their device storage back and copy
        their values in."""
        indices = self._indices(params)
        for key in [k for k in self._away if indices is None or k[0] in indices]:
            t, host = self._away.pop(key)
            t.untyped_storage().resize_(t.numel() * t.element_size())
            t.copy_(host, non_blocking=self.pin)

    def step(self, step_fn: Callable[[], None]) -> None:
        """Update the parameters with gradients in ``chunks`` consecutive parts, each with only its own
        states on the device: its states are loaded, ``step_fn`` (the optimiser's step) runs while the
        other parts' gradients are set aside (optimisers skip parameters without gradient), its states
        go back to the host. The states on the device at once shrink ``chunks`` times; the updates are
        those of one step over all parameters (AdamW updates each parameter from its own state). The
        gradients are restored afterwards. A first step creates each part's states in its turn."""
        params = [p for p in self._params() if p.grad is not None]
        grads = [p.grad for p in params]
        size = math.ceil(len(params) / max(1, self.chunks)) or 1
        try:
            for p in params:
                p.grad = None
            for start in range(0, len(params), size):
                part = params[start : start + size]
                for p, g in zip(part, grads[start : start + size]):
                    p.grad = g
                self.load(part)
                step_fn()
                self.offload(part)
                for p in part:
                    p.grad = None
        finally:
            for p, g in zip(params, grads):
                p.grad = g
        self._announce()


class _SideStreamCopies:
    """Copies queued on an optional side CUDA ``stream`` (after the current stream's queued work), and
    :meth:`ready` to make the current stream wait for the last of them; without a stream, the copies are
    queued on the current stream and :meth:`ready` is a no-op."""

    stream = None
    _copied = None

    def _side(self):
        """Context of the copies: the side stream, once it waits for the current stream, or nothing."""
        if self.stream is None:
            return contextlib.nullcontext()
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        return torch.cuda.stream(self.stream)

    def _record(self) -> None:
        """Remember the side stream's copies queued so far (for :meth:`ready`)."""
        if self.stream is not None:
            self._copied = self.stream.record_event()

    def ready(self) -> None:
        """Make the current stream wait for the side stream's copies so far (no-op without one)."""
        if self._copied is not None:
            torch.cuda.current_stream(self.stream.device).wait_event(self._copied)
            self._copied = None


class ModuleParking(_SideStreamCopies):
    """A frozen module's parameters in pinned host memory while it is not needed (``model.offload_teacher``).

    The parameters keep their identity: the storages under their (local) tensors are freed with
    ``resize_(0)`` by :meth:`park` and given back by :meth:`unpark`, which copies the values in from a
    host copy taken at the first park (the module is frozen, so it never has to be copied out again).
    With a side ``stream`` the copy back overlaps the work queued after :meth:`unpark`; :meth:`ready`
    (also called by :meth:`ensure`) makes the current stream wait for it. Storages are freed only after
    the work queued before :meth:`park` in the current stream's order, as for the optimiser states.
    """

    def __init__(self, module: torch.nn.Module, pin: bool, label: str = "", stream=None) -> None:
        storages = {}
        for p in module.parameters():
            s = local_tensor(p.detach()).untyped_storage()
            storages.setdefault(s.data_ptr(), s)
        self.storages = list(storages.values())
        self.nbytes = [s.nbytes() for s in self.storages]
        self.pin = pin
        self.label = label
        self.stream = stream
        self._host: list[torch.UntypedStorage] | None = None
        self.parked = False

    @torch.no_grad()
    def park(self) -> None:
        """Free the device storage (the first call keeps a host copy)."""
        if self.parked:
            return
        self.ready()
        if self._host is None:
            self._host = []
            for s in self.storages:
                host = torch.empty(s.nbytes(), dtype=torch.uint8, pin_memory=self.pin).untyped_storage()
                host.copy_(s)
                self._host.append(host)
            logger.info(
                "%s: %.2f GiB of parameters on this device kept in host memory while not needed",
                self.label,
                sum(self.nbytes) / 2**30,
            )
        for s in self.storages:
            s.resize_(0)
        self.parked = True

    @torch.no_grad()
    def unpark(self) -> None:
        """Give the storage back and queue the copy of the values (on the side stream, if any)."""
        if not self.parked:
            return
        for s, n in zip(self.storages, self.nbytes):
            s.resize_(n)
        with self._side():
            for s, host in zip(self.storages, self._host):
                s.copy_(host, non_blocking=self.pin)
        self._record()
        self.parked = False

    def ensure(self) -> None:
        """The parameters are (or, in the current stream's order, will be) on the device."""
        self.unpark()
        self.ready()


class FlatStateParking(_SideStreamCopies):
    """All optimiser states of one dtype moved to host memory and back as one buffer
    (``optimizer.offload_fake_state=generator_step``).

    The first :meth:`offload` copies each state tensor into its slice of one pinned host buffer and frees
    it; :meth:`load` then allocates one device buffer, makes every state tensor a view of its slice
    (``Tensor.set_``: the same tensor objects, so the optimiser and DTensor wrappers see no difference) and
    copies the host buffer in with one copy. Later round trips are one copy each way, as long as the
    optimiser still holds those views (after a resume it may hold new tensors: they are gathered again).
    One large copy per direction issues no per-tensor work on the host, so with a side ``stream`` it can
    overlap compute: :meth:`offload` keeps the device buffer until :meth:`release` (the current stream
    waits for the copy, then frees it) and :meth:`ready` makes the current stream wait for :meth:`load`'s
    copy. Without a stream both copies are queued on the current stream and :meth:`offload` frees at once.
    """

    def __init__(self, opt: torch.optim.Optimizer, pin: bool, label: str = "", stream=None) -> None:
        self.opt = opt
        self.pin = pin
        self.label = label
        self.stream = stream
        self._layout: list[tuple[torch.Tensor, int]] = []  # (state tensor, offset in elements)
        self._host: torch.Tensor | None = None
        self._flat: torch.Tensor | None = None  # the device buffer the states view (storage freed when away)
        self._pending = False  # copied (or being copied) to the host, not yet freed
        self._announced = False
        self.away = False

    def _states(self) -> list[torch.Tensor]:
        out = []
        for group in self.opt.param_groups:
            for p in group["params"]:
                for value in self.opt.state.get(p, {}).values():
                    local = local_tensor(value) if isinstance(value, torch.Tensor) else None
                    if local is not None and type(local) is torch.Tensor and local.numel() > 1:
                        out.append(local)
        return out

    def _viewing_flat(self, states: list[torch.Tensor]) -> bool:
        if self._flat is None or len(states) != len(self._layout):
            return False
        ptr = self._flat.untyped_storage().data_ptr()
        return all(
            a is b and a.untyped_storage().data_ptr() == ptr for a, (b, _) in zip(states, self._layout)
        )

    @property
    def offloaded_bytes(self) -> int:
        """Device bytes currently held on the host."""
        return self._host.numel() * self._host.element_size() if self.away and self._host is not None else 0

    @torch.no_grad()
    def offload(self) -> None:
        """Copy every state to the host buffer; free the device memory (with a side stream: at :meth:`release`)."""
        if self.away:
            return
        states = self._states()
        if not states:
            return
        if {t.dtype for t in states} != {states[0].dtype} or not all(t.is_contiguous() for t in states):
            raise ValueError(f"{self.label}: optimiser states of one dtype and contiguous expected")
        flat = self._viewing_flat(states)
        if not flat:  # first time, or the optimiser holds new tensors: gather them slice by slice
            total = sum(t.numel() for t in states)
            if self._host is None or self._host.numel() != total or self._host.dtype != states[0].dtype:
                self._host = torch.empty(total, dtype=states[0].dtype, pin_memory=self.pin)
            self._layout, offset = [], 0
            for t in states:
                self._layout.append((t, offset))
                offset += t.numel()
            self._flat = None
        with self._side():
            if flat:
                self._host.copy_(self._flat, non_blocking=self.pin)
            else:
                for t, offset in self._layout:
                    self._host[offset : offset + t.numel()].copy_(t.view(-1), non_blocking=self.pin)
        self._record()
        self._pending, self.away = True, True
        if self.stream is None:
            self.release()
        if not self._announced:
            self._announced = True
            logger.info(
                "%s optimiser states: %.2f GiB on this device moved to host memory during generator steps%s",
                self.label,
                self.offloaded_bytes / 2**30,
                " (copies overlapped with compute)" if self.stream is not None else "",
            )

    def release(self) -> None:
        """Free the device memory of the states copied to the host, after the copy in stream order."""
        if not self._pending:
            return
        self.ready()
        if self._flat is not None:
            self._flat.untyped_storage().resize_(0)
        else:
            for t, _ in self._layout:
                t.untyped_storage().resize_(0)
        self._pending = False

    @torch.no_grad()
    def load(self) -> None:
        """Give the states device memory (one buffer they view) and queue the copy of their values back."""
        if not self.away:
            return
        self.release()
        if self._flat is not None:
            self._flat.untyped_storage().resize_(self._host.numel() * self._host.element_size())
        else:
            device = self._layout[0][0].device
            self._flat = torch.empty(self._host.numel(), dtype=self._host.dtype, device=device)
            storage = self._flat.untyped_storage()
            for t, offset in self._layout:
                t.set_(storage, offset, t.shape, t.stride())
        with self._side():
            self._flat.copy_(self._host, non_blocking=self.pin)
        self._record()
        self.away = False
