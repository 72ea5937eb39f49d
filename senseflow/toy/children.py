"""Child processes of the toy benchmark: the distillation variants side by side, and the stages that need
only the data beside the VAE and teacher (:func:`senseflow.toy.pipeline.run_setup_stages`).

Children are spawned, not forked (CUDA cannot be forked). A stop signal to the parent is passed on to
them (:class:`SpawnedJobs`), and every stage they run is atomic (``.done.json``), so a rerun of the same
command finishes what a stop or a failure left.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor

from ..stop import StopNow, StopRequest

PR_SET_PDEATHSIG = 1
"""``prctl`` option: the signal this process gets when its parent dies (``linux/prctl.h``)."""
LOG_FORMAT = "%(asctime)s %(levelname)s [{tag}] %(name)s: %(message)s"
"""The format of a child's log lines: the parent's (``senseflow.metrics.setup_logging``) tagged with the job."""


def log_files() -> list[str]:
    """The files the root logger of this process writes to (``toy.log``): a child writes there too."""
    handlers = logging.getLogger().handlers
    paths = [h.baseFilename for h in handlers if isinstance(h, logging.FileHandler)]
    return [path for path in paths if path != os.devnull]  # (pytest's logging plugin writes to /dev/null)


def child_setup(tag: str, files: Sequence[str] = (), compile_threads: int = 1) -> None:
    """Logging and compilation settings at the start of a child's job: INFO lines tagged ``[tag]`` to
    stderr (the parent's) and appended to ``files`` (the parent's :func:`log_files`); ``compile_threads``:
    the processes that compile this child's ``torch.compile`` kernels (1: in this process)."""
    fmt = LOG_FORMAT.format(tag=tag)
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    handlers += [logging.FileHandler(path) for path in files]  # O_APPEND: whole lines beside the parent's
    logging.basicConfig(level=logging.INFO, format=fmt, handlers=handlers, force=True)
    # The compile workers are children of this process, in its own process group (isolate): a signal to
    # the parent's group (``timeout``, Ctrl-C) cannot kill them under a compilation in flight.
    import torch._inductor.config

    torch._inductor.config.compile_threads = max(compile_threads, 1)


def isolate(parent: int) -> None:
    """Put this child process in a process group of its own, and have it killed with its parent (Linux).

    A signal to the parent's process group (``timeout``, Ctrl-C) then reaches the parent alone, which
    passes stop signals on (:class:`SpawnedJobs`) to the child, not to the processes the child started
    (``torch.compile``'s workers: killed under a compilation in flight, it would never end). The death
    signal keeps a child from outliving a parent killed with SIGKILL (e.g. ``timeout -k``)."""
    os.setpgrp()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: a child may then outlive a killed parent
        pass
    if os.getppid() != parent:  # the parent died before the death signal was set
        os._exit(1)


def _start_child(parent: int, initializer: Callable[[], None] | None) -> None:
    isolate(parent)
    if initializer is not None:
        initializer()


class SpawnedJobs:
    """Named jobs in up to ``workers`` spawned processes (a context manager).

    While it is open, a stop signal (SIGTERM, SIGUSR1) to this process cancels the queued jobs and is
    passed on to the running ones; :attr:`stop` records it. Each child runs in a process group of its
    own and dies with this process (:func:`isolate`). With ``interrupt``, this process then also
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
        self._pool = ProcessPoolExecutor(
            self.workers, mp_context=ctx, initializer=_start_child, initargs=(os.getpid(), self.initializer)
        )
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
