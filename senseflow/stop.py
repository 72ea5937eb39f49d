"""Graceful stop: on SIGTERM or SIGUSR1 the training loop ends its iteration, writes a checkpoint and exits.

Schedulers announce preemption with a signal before they kill (Slurm: SIGTERM, or SIGUSR1 with
``--signal=USR1@120``), and ``timeout`` sends SIGTERM. :class:`StopRequest` turns such a signal into a
flag that :meth:`senseflow.engine.Engine.train` reads between iterations; the engine then saves and
raises :class:`TrainingStopped`, and running the same command again resumes from that checkpoint, so a
preemption costs no iterations. A second signal changes nothing (the save is under way); SIGKILL still
kills at once, losing at most one save interval as before.

Under ``torchrun`` the ranks agree on the stop at the next iteration divisible by ``train.log_interval``
(one all-reduce of a flag, where the metrics synchronise anyway); a single process stops after the
iteration in flight. DataLoader workers ignore these signals (:func:`ignore_stop_signals`): they end with
their parent instead of dying under it.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable

from .errors import SenseFlowError

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class TrainingStopped(SenseFlowError):
    """Training ended early on a stop signal, after writing a checkpoint (rerun the command to resume)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum

    def __reduce__(self):  # picklable with its signal (raised in child processes of the toy benchmark)
        return type(self), (str(self), self.signum)

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number."""
        return 128 + self.signum


class StopRequest:
    """While installed (a context manager), :data:`STOP_SIGNALS` set :attr:`signum` instead of killing.

    ``on_signal(signum)`` runs on the first signal (e.g. to pass it on to child processes). A request
    entered inside another one starts with the signal the outer one already caught (a signal during
    model building stops the training loop after its first iteration). Installing outside the main
    thread is a no-op (Python delivers signals to the main thread only): the flag then stays unset.
    ``action`` says in the log what the signal now does.
    """

    def __init__(
        self,
        on_signal: Callable[[int], None] | None = None,
        action: str = "stopping after the iteration in flight, with a checkpoint",
    ) -> None:
        self.signum: int | None = None
        self.on_signal = on_signal
        self.action = action
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame) -> None:  # noqa: ARG002 - signal handler signature
        if self.signum is not None:
            logger.warning("%s again: already stopping", signal.Signals(signum).name)
            return
        self.signum = signum
        logger.warning("%s received: %s", signal.Signals(signum).name, self.action)
        if self.on_signal is not None:
            self.on_signal(signum)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
                outer = getattr(self._previous[sig], "__self__", None)
                if isinstance(outer, StopRequest) and outer.signum is not None and self.signum is None:
                    self.signum = outer.signum  # a signal the enclosing request already caught
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """``worker_init_fn`` of data loaders: the stop signals are the training process's to handle."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
