"""Per-phase timing of the training iteration (used by ``python -m senseflow.bench``).

Disabled by default: ``phase()`` is then a no-op context manager, so the hot loop pays nothing and
never synchronises with the device. Enabled, CUDA phases are timed with events (one synchronisation
when the totals are read), CPU phases with ``perf_counter``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict

import torch

logger = logging.getLogger(__name__)


class PhaseTimer:
    """Accumulates wall time per named phase; phases must not nest.

    With ``trace`` set, each phase also synchronises and logs its wall time as it ends, so a slow first
    iteration (compilation, one-time allocations) shows where it spends its time before it finishes.
    """

    def __init__(self, device: torch.device, enabled: bool = False):
        self.device = device
        self.enabled = enabled
        self.trace = False
        self._events: list[tuple[str, object, object]] = []

    @contextlib.contextmanager
    def phase(self, name: str):
        """Time the enclosed block as ``name`` (no-op when disabled)."""
        if not self.enabled:
            yield
            return
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
