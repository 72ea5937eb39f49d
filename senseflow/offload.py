"""Host-resident optimiser states between the steps of a rarely stepping optimiser.

The generator steps once every ``distill.generator_period`` iterations (10 for SD3.5 Medium); between
its steps its AdamW states (two fp32 tensors per parameter: 8 bytes per parameter, 16.7 GiB for the
2.24 B parameters of SD3.5 Medium, divided by the number of GPUs under FSDP2) sit unused on the device.
:class:`StateOffload` (``optimizer.offload_generator_state``) copies them to pinned host memory after
each step and frees their device storage, and copies them back just before the next step, a part of the
parameters at a time (``optimizer.offload_step_chunks``), so that the gradients and all the states are
never on the device together.

The state tensors stay the same objects: their storage is resized to zero bytes and back (FSDP2 frees
unsharded parameters the same way), and after the first round trip each part's states are views of one
buffer (:class:`FlatStateParking`), so the optimiser (fused kernel included), DTensor wrappers and
checkpointing see no difference, and each part moves with one copy per direction. On a GPU the copies
run on two side streams, one per direction, ordered against the step by events, with no host
synchronisation: the next part comes in while the current one steps and the previous one goes out.
A device block is freed only once the copy reading it is done, in the current stream's order.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import torch

from .parallel import local_tensor

logger = logging.getLogger(__name__)


def _opt_params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimiser's parameters, in group order."""
    return [p for group in opt.param_groups for p in group["params"]]


def _split_by_size(params: list[torch.Tensor], parts: int) -> list[list[torch.Tensor]]:
    """``params`` grouped by dtype (a part's states share one buffer), each group cut into consecutive runs
    of about equal element counts: ``parts`` runs in all, give or take one per dtype, none empty."""
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        groups.setdefault(p.dtype, []).append(p)
    total = sum(p.numel() for p in params) or 1
    out = []
    for group in groups.values():
        size = sum(p.numel() for p in group)
        n = min(len(group), max(1, round(parts * size / total)))
        runs: list[list[torch.Tensor]] = [[]]
        done = 0
        for i, p in enumerate(group):
            runs[-1].append(p)
            done += p.numel()
            # cut where the runs so far reach their share, keeping a parameter for each run still to come
            left, needed = len(group) - i - 1, n - len(runs)
            if 0 < needed <= left and (done * n >= size * len(runs) or left == needed):
                runs.append([])
        out.extend(r for r in runs if r)
    return out


class StateOffload:
    """Moves an optimiser's state tensors to host memory (:meth:`offload`) and back (:meth:`load`), and
    steps the optimiser a part of its parameters at a time (:meth:`step`).

    The parameters are cut into ``chunks`` parts of about equal size; each part's states move as one
    buffer (:class:`FlatStateParking`: one copy per direction, views keep the tensors' identity). With
    CUDA streams (``pin``) loads run on one side stream and offloads on another, so that :meth:`step`
    copies the next part in while the current part steps and the previous one is copied out (PCIe moves
    both directions at once).

    Args:
        opt: the optimiser; its states may be created or replaced at any time (first step, resume).
        pin: page-locked host buffers and side streams, for asynchronous copies (CUDA).
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
        self._streams = (None, None)
        self._parts: list[FlatStateParking] = []
        self._key: tuple[int, ...] = ()

    def parts(self) -> list[FlatStateParking]:
        """One parking per part of the optimiser's parameters (made again if those changed)."""
        params = _opt_params(self.opt)
        key = tuple(id(p) for p in params)
        if key != self._key:
            if self.pin and self._streams[0] is None:
                device = next((p.device for p in params if p.device.type == "cuda"), None)
                if device is not None:
                    self._streams = (torch.cuda.Stream(device), torch.cuda.Stream(device))
            load, offload = self._streams
            self._parts = [
                FlatStateParking(self.opt, self.pin, stream=load, offload_stream=offload, params=part)
                for part in _split_by_size(params, self.chunks)
            ]
            self._key = key
        return self._parts

    @property
    def offloaded_bytes(self) -> int:
        """Device bytes currently held on the host."""
        return sum(part.offloaded_bytes for part in self._parts)

    def offload(self) -> None:
        """Copy every state to the host and free its device memory; states already away stay as they are."""
        parts = self.parts()
        for part in parts:
            part.offload()
        for part in parts:
            part.release()
        self._announce()

    def load(self) -> None:
        """Give the offloaded states their device memory back and their values (waited for)."""
        parts = self.parts()
        for part in parts:
            part.load()
        for part in parts:
            part.ready()

    def _announce(self) -> None:
        """Log, once, how much is held on the host (after the first offload of all states)."""
        if self.offloaded_bytes and not self._announced:
            self._announced = True
            logger.info(
                "%s optimiser states: %.2f GiB on this device moved to host memory %s%s",
                self.label,
                self.offloaded_bytes / 2**30,
                self.when,
                f" (stepped in {len(self._parts)} parts)" if len(self._parts) > 1 else "",
            )

    def step(self, step_fn: Callable[[], None]) -> None:
        """Update the parameters with gradients part by part: a part's states are loaded, ``step_fn`` (the
        optimiser's step) runs while the other parts' gradients are set aside (optimisers skip parameters
        without gradient), its states go back to the host. The next part is loaded before the current one
        steps, so at most two parts' states are on the device at once; the updates are those of one step
        over all parameters (AdamW updates each parameter from its own state). The gradients are restored
        afterwards. A first step creates each part's states in its turn."""
        parts = self.parts()
        params = _opt_params(self.opt)
        grads = [p.grad for p in params]
        grad_of = {id(p): g for p, g in zip(params, grads)}
        try:
            for p in params:
                p.grad = None
            parts[0].load()
            for i, part in enumerate(parts):
                if i > 0:
                    parts[i - 1].release()  # its copy out ran beside this part's copy in
                if i + 1 < len(parts):
                    parts[i + 1].load()  # beside this part's step and copy out
                part.ready()
                for p in part.params:
                    p.grad = grad_of[id(p)]
                step_fn()
                part.offload()
                for p in part.params:
                    p.grad = None
            parts[-1].release()
        finally:
            for p, g in zip(params, grads):
                p.grad = g
        self._announce()


class _SideStreamCopies:
    """Copies queued on an optional side CUDA ``stream`` (after the current stream's queued work), and
    :meth:`ready` to make the current stream wait for the last of them; without a stream, the copies are
    queued on the current stream and :meth:`ready` is a no-op."""

    stream = None
    _copied = None  # (device, event) of the last queued copy

    def _side(self, stream=None):
        """Context of the copies: the side stream (``stream``, default :attr:`stream`), once it waits for
        the current stream, or nothing."""
        stream = stream if stream is not None else self.stream
        if stream is None:
            return contextlib.nullcontext()
        stream.wait_stream(torch.cuda.current_stream(stream.device))
        return torch.cuda.stream(stream)

    def _record(self, stream=None) -> None:
        """Remember the copies queued so far on the side stream (for :meth:`ready`)."""
        stream = stream if stream is not None else self.stream
        if stream is not None:
            self._copied = (stream.device, stream.record_event())

    def ready(self) -> None:
        """Make the current stream wait for the last side-stream copy (no-op without one)."""
        if self._copied is not None:
            device, event = self._copied
            torch.cuda.current_stream(device).wait_event(event)
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
    """All optimiser states of one dtype (of ``params``, default all) moved to host memory and back as
    one buffer (``optimizer.offload_fake_state=generator_step``; each part of :class:`StateOffload`).

    The first :meth:`offload` copies each state tensor into its slice of one pinned host buffer and frees
    it; :meth:`load` then allocates one device buffer, makes every state tensor a view of its slice
    (``Tensor.set_``: the same tensor objects, so the optimiser and DTensor wrappers see no difference) and
    copies the host buffer in with one copy. Later round trips are one copy each way, as long as the
    optimiser still holds those views (after a resume it may hold new tensors: they are gathered again).
    One large copy per direction issues no per-tensor work on the host, so with a side ``stream`` it can
    overlap compute: :meth:`offload` keeps the device buffer until :meth:`release` (the current stream
    waits for the copy, then frees it) and :meth:`ready` makes the current stream wait for :meth:`load`'s
    copy. Without a stream both copies are queued on the current stream and :meth:`offload` frees at once.
    ``offload_stream`` takes the copies to the host instead of ``stream``, so that a load and an offload
    (of two parkings) run at once. An empty ``label`` logs nothing.
    """

    def __init__(
        self,
        opt: torch.optim.Optimizer,
        pin: bool,
        label: str = "",
        stream=None,
        offload_stream=None,
        params: list[torch.Tensor] | None = None,
    ) -> None:
        self.opt = opt
        self.pin = pin
        self.label = label
        self.stream = stream
        self.offload_stream = offload_stream if offload_stream is not None else stream
        self.params = params
        self._layout: list[tuple[torch.Tensor, int]] = []  # (state tensor, offset in elements)
        self._host: torch.Tensor | None = None
        self._flat: torch.Tensor | None = None  # the device buffer the states view (storage freed when away)
        self._pending = False  # copied (or being copied) to the host, not yet freed
        self._announced = False
        self.away = False

    def _states(self) -> list[torch.Tensor]:
        out = []
        for p in self.params if self.params is not None else _opt_params(self.opt):
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
        with self._side(self.offload_stream):
            if flat:
                self._host.copy_(self._flat, non_blocking=self.pin)
            else:
                for t, offset in self._layout:
                    self._host[offset : offset + t.numel()].copy_(t.view(-1), non_blocking=self.pin)
        self._record(self.offload_stream)
        self._pending, self.away = True, True
        if self.offload_stream is None:
            self.release()
        if self.label and not self._announced:
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
