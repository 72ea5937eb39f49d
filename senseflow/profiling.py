"""Per-phase timing and peak device memory of the training iteration (``python -m senseflow.bench``).

Disabled by default: ``phase()`` is then a no-op context manager, so the hot loop pays nothing and
never synchronises with the device. Enabled, CUDA phases are timed with events (one synchronisation
when the totals are read), CPU phases with ``perf_counter``. With ``memory`` also set on a CUDA device,
each phase records the peak of allocated device memory inside it (:class:`PeakTracker`; allocator
bookkeeping on the host, no synchronisation).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections import defaultdict
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)

# key of the stretches between phases (before the first, between two, after the last) in the peaks
OUTSIDE_PHASES = "(outside phases)"


class PeakTracker:
    """Peak allocated device memory per phase, from the caching allocator's peak counters.

    :meth:`enter` (at a phase's start) reads the peak since the previous reading, which is the peak of
    the stretch outside phases, and resets the counters; :meth:`exit` reads the phase's own peak and resets
    them again. Repeated phases of one name keep their largest peak. The largest peak of reserved memory
    is tracked over all readings. The counter functions are injectable (tests); by default
    ``torch.cuda.max_memory_allocated``, ``max_memory_reserved`` and ``reset_peak_memory_stats``, looked
    up at each call.
    """

    def __init__(
        self,
        device: torch.device,
        max_allocated: Callable[[torch.device], int] | None = None,
        max_reserved: Callable[[torch.device], int] | None = None,
        reset: Callable[[torch.device], None] | None = None,
    ):
        self.device = device
        self._max_allocated = max_allocated or (lambda d: torch.cuda.max_memory_allocated(d))
        self._max_reserved = max_reserved or (lambda d: torch.cuda.max_memory_reserved(d))
        self._reset = reset or (lambda d: torch.cuda.reset_peak_memory_stats(d))
        self.peaks: dict[str, int] = {}
        self.outside = 0
        self.reserved = 0

    def _read(self) -> int:
        """Peak allocated bytes since the last reading (folding in the reserved peak), then reset."""
        allocated = int(self._max_allocated(self.device))
        self.reserved = max(self.reserved, int(self._max_reserved(self.device)))
        self._reset(self.device)
        return allocated

    def enter(self) -> None:
        """A phase starts: the stretch since the last reading was outside phases."""
        self.outside = max(self.outside, self._read())

    def exit(self, name: str) -> None:
        """Phase ``name`` ends: its peak."""
        self.peaks[name] = max(self.peaks.get(name, 0), self._read())

    def collect(self) -> dict[str, int]:
        """Peak bytes per phase and :data:`OUTSIDE_PHASES` since the last call (the stretch since the last
        phase read now), then reset (the reserved peak is kept)."""
        self.outside = max(self.outside, self._read())
        out = {**self.peaks, OUTSIDE_PHASES: self.outside}
        self.peaks, self.outside = {}, 0
        return out

    def clear(self) -> None:
        """Forget all peaks (the reserved one too) and reset the device's counters."""
        self._reset(self.device)
        self.peaks, self.outside, self.reserved = {}, 0, 0


class PhaseTimer:
    """Accumulates wall time per named phase; phases must not nest.

    With ``trace`` set, each phase also synchronises and logs its wall time as it ends, so a slow first
    iteration (compilation, one-time allocations) shows where it spends its time before it finishes.
    With ``memory`` set (and ``enabled``) on a CUDA device, each phase also records its peak of allocated
    memory (:meth:`collect_memory`); this resets the device's peak counters at every phase boundary.
    """

    def __init__(self, device: torch.device, enabled: bool = False):
        self.device = device
        self.enabled = enabled
        self.trace = False
        self.memory = False
        self._events: list[tuple[str, object, object]] = []
        self._peaks = PeakTracker(device)

    def _tracks_memory(self) -> bool:
        return self.memory and self.device.type == "cuda"

    @contextlib.contextmanager
    def phase(self, name: str):
        """Time the enclosed block as ``name`` (no-op when disabled)."""
        if not self.enabled:
            yield
            return
        memory = self._tracks_memory()
        if memory:
            self._peaks.enter()
        if self.trace:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            begin = time.perf_counter()
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
        else:
            start = time.perf_counter()
            yield
            end = time.perf_counter()
        if memory:
            self._peaks.exit(name)
        self._events.append((name, start, end))
        if self.trace:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            logger.info("phase %s done in %.1fs", name, time.perf_counter() - begin)

    def collect(self) -> dict[str, float]:
        """Seconds per phase since the last call (synchronises once on CUDA), then reset."""
        totals: dict[str, float] = defaultdict(float)
        if self._events and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        for name, start, end in self._events:
            totals[name] += start.elapsed_time(end) / 1000 if self.device.type == "cuda" else end - start
        self._events.clear()
        return dict(totals)

    def collect_memory(self) -> dict[str, int]:
        """Peak allocated bytes per phase and :data:`OUTSIDE_PHASES` since the last call (or
        :meth:`reset_memory`), then reset; empty unless ``memory`` is set on a CUDA device."""
        return self._peaks.collect() if self._tracks_memory() else {}

    @property
    def peak_reserved(self) -> int:
        """Largest reserved bytes seen by the memory readings since :meth:`reset_memory` (0 if none)."""
        return self._peaks.reserved

    def reset_memory(self) -> None:
        """Start a memory window: forget the peaks and reset the device's peak counters (CUDA)."""
        if self.device.type == "cuda":
            self._peaks.clear()


class GcPauses:
    """Pauses of Python's cyclic garbage collector while the context is open (``gc.callbacks``): the host
    stands still during a collection, and in a loop the host sets the pace of, so does the GPU. The context
    may be opened again (e.g. around each timed iteration); the pauses add up.

    :meth:`take` returns the pauses since its last call; :meth:`summary` all of them, per generation.
    """

    def __init__(self) -> None:
        self.pauses: list[tuple[int, float]] = []  # (generation, seconds)
        self._taken = 0
        self._start: float | None = None

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        elif self._start is not None:
            self.pauses.append((int(info["generation"]), time.perf_counter() - self._start))
            self._start = None

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._callback)

    def take(self) -> float:
        """Seconds of collection since the last call."""
        new, self._taken = self.pauses[self._taken :], len(self.pauses)
        return sum(sec for _, sec in new)

    def summary(self) -> dict[str, object]:
        """Collections and milliseconds per generation, the total and the longest pause."""
        per_gen = {}
        for gen in sorted({g for g, _ in self.pauses}):
            secs = [s for g, s in self.pauses if g == gen]
            per_gen[str(gen)] = {"collections": len(secs), "ms": 1000 * sum(secs)}
        return {
            "collections": len(self.pauses),
            "ms_total": 1000 * sum(s for _, s in self.pauses),
            "ms_longest": 1000 * max((s for _, s in self.pauses), default=0.0),
            "per_generation": per_gen,
        }


def costliest_kernels(fn: Callable[[], object], n: int) -> tuple[float, list[str]]:
    """Run ``fn`` once under torch's CUDA profiler (synchronised at the end); returns the GPU time of all its
    kernels in ms and one line for each of the ``n`` costliest (self time, calls, name), for the probes in
    ``tools/``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    total = sum(e.self_device_time_total for e in events) / 1000
    rows = [f"{e.self_device_time_total / 1000:7.2f} ms {e.count:5d}x {e.key[:100]}" for e in events[:n]]
    return total, rows


def private_pool_bytes(segments: list[dict] | None = None) -> int:
    """Bytes the CUDA caching allocator holds in private memory pools (those of CUDA graphs), from
    ``torch.cuda.memory_snapshot()`` (or the given segments): the segments whose pool id is not the default
    ``(0, 0)``. A graph's replay allocates nothing, so ``max_memory_allocated`` leaves these out."""
    if segments is None:
        segments = torch.cuda.memory_snapshot()
    return sum(s["total_size"] for s in segments if tuple(s.get("segment_pool_id", (0, 0))) != (0, 0))
