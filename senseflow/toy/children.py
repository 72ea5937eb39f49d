"""Child processes of the toy benchmark: the distillation variants side by side, and the stages that need
only the data beside the VAE and teacher (:func:`senseflow.toy.pipeline.run_setup_stages`).

Children are spawned, not forked (CUDA cannot be forked). A stop signal to the parent is passed on to
them (:class:`SpawnedJobs`), and every stage they run is atomic (``.done.json``), so a rerun of the same
command finishes what a stop or a failure left.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor

from ..stop import StopNow, StopRequest

LOG_FORMAT = "%(asctime)s %(levelname)s [{tag}] %(name)s: %(message)s"
"""The format of a child's log lines: the parent's (``senseflow.metrics.setup_logging``) tagged with the job."""


def log_files() -> list[str]:
    """The files the root logger of this process writes to (``toy.log``): a child writes there too."""
    handlers = logging.getLogger().handlers
    paths = [h.baseFilename for h in handlers if isinstance(h, logging.FileHandler)]
    return [path for path in paths if path != os.devnull]  # (pytest's logging plugin writes to /dev/null)


def child_setup(tag: str, files: Sequence[str] = ()) -> None:
    """Logging and compilation settings at the start of a child's job: INFO lines tagged ``[tag]`` to
    stderr (the parent's) and appended to ``files`` (the parent's :func:`log_files`)."""
    fmt = LOG_FORMAT.format(tag=tag)
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    handlers += [logging.FileHandler(path) for path in files]  # O_APPEND: whole lines beside the parent's
    logging.basicConfig(level=logging.INFO, format=fmt, handlers=handlers, force=True)
    # Inductor's compile workers are processes of this process group: a SIGTERM to the group (``timeout``)
    # would kill them under a compilation in flight, which then never ends. Compile in this process.
    import torch._inductor.config

    torch._inductor.config.compile_threads = 1


class SpawnedJobs:
    """Named jobs in up to ``workers`` spawned processes (a context manager).

    While it is open, a stop signal (SIGTERM, SIGUSR1) to this process cancels the queued jobs and is
    passed on to the running ones; :attr:`stop` records it. With ``interrupt``, this process then also
    stops at once, wherever it is (:class:`~senseflow.stop.StopNow`), and leaves the block, once its jobs
    have ended, with ``interrupt(signum)`` (a :class:`~senseflow.stop.TrainingStopped`): for a parent
    that keeps working while its jobs run. Leaving the block with an exception passes
    SIGTERM on to the running jobs and waits for them, so no child outlives its parent's failure.
    ``initializer`` runs in each worker before its first job.
    """

    def __init__(
        self,
        workers: int,
        initializer: Callable[[], None] | None = None,
        interrupt: Callable[[int], BaseException] | None = None,
    ) -> None:
        self.workers = workers
        self.initializer = initializer
        self.interrupt = interrupt
        action = "passing it on to the child processes"
        self.stop = StopRequest(
            on_signal=self._forward,
            action=action,
            immediate=interrupt is not None,
            immediate_action=f"{action}, stopping",
        )
        self._futures: dict[str, Future] = {}
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> SpawnedJobs:
        ctx = multiprocessing.get_context("spawn")
        self._pool = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=self.initializer)
        self.stop.__enter__()
        return self

    def submit(self, name: str, fn: Callable, *args) -> None:
        """Queue ``fn(*args)`` (picklable: a module-level function) as job ``name``."""
        self._futures[name] = self._pool.submit(fn, *args)

    def wait(self) -> dict[str, BaseException | None]:
        """Wait for the jobs; returns name -> the exception it raised (None: it finished). Jobs cancelled
        by a stop signal before they started are left out."""
        return {name: fut.exception() for name, fut in self._futures.items() if not fut.cancelled()}

    def _forward(self, signum: int) -> None:
        for fut in self._futures.values():
            fut.cancel()  # queued jobs do not start
        for pid in list(getattr(self._pool, "_processes", None) or {}):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc is not None and not self.stop.requested:
                self._forward(signal.SIGTERM)
            self._pool.shutdown(wait=True, cancel_futures=True)
        finally:  # a second signal while the children end is logged, not fatal
            self.stop.__exit__(exc_type, exc, tb)
        if isinstance(exc, StopNow) and self.interrupt is not None:
            raise self.interrupt(exc.signum) from None
