"""Graceful stop: on SIGTERM or SIGUSR1 the training loop ends its iteration, writes a checkpoint and exits.

Schedulers announce preemption with a signal before they kill (Slurm: SIGTERM, or SIGUSR1 with
``--signal=USR1@120``), and ``timeout`` sends SIGTERM. :class:`StopRequest` turns such a signal into a
flag that :meth:`senseflow.engine.Engine.train` reads between iterations; the engine then saves and
raises :class:`TrainingStopped`, and running the same command again resumes from that checkpoint, so a
preemption costs no iterations. A second signal changes nothing (the save is under way); SIGKILL still
kills at once, losing at most one save interval as before. While the state in memory is the one on disk
(before the first iteration after a start, a resume or a checkpoint), the engine sets
:attr:`StopRequest.immediate`: a signal then raises :class:`StopNow` at once, wherever the process is
(e.g. in a ``torch.compile`` of the first iteration that takes minutes), since finishing the iteration
would add nothing that a checkpoint keeps.

The handler does not log itself: a signal that lands while this process writes a log line (two signals
at once, e.g. ``timeout``'s to the process group and a parent's passed on) would make the logging module
re-enter the stream's write. A short-lived thread logs instead.

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


class StopNow(BaseException):
    """Raised by the signal handler of a :class:`StopRequest` with ``immediate`` set, wherever the main
    thread is. A ``BaseException`` (like ``KeyboardInterrupt``), so that libraries' ``except Exception``
    (``torch.compile`` re-wraps those) let it through; the owner of the request turns it into its
    :class:`TrainingStopped`."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class StopRequest:
    """While installed (a context manager), :data:`STOP_SIGNALS` set :attr:`signum` instead of killing.

    ``on_signal(signum)`` runs on the first signal (e.g. to pass it on to child processes). A request
    entered inside another one starts with the signal the outer one already caught (a signal during
    model building stops the training loop before its first iteration). Installing outside the main
    thread is a no-op (Python delivers signals to the main thread only): the flag then stays unset.
    ``action`` says in the log what the signal now does. While :attr:`immediate` is true (it may change
    at any time), the first signal raises :class:`StopNow` from the handler after ``on_signal``, i.e. in
    the main thread wherever it is, and the log says ``immediate_action`` instead.
    """

    def __init__(
        self,
        on_signal: Callable[[int], None] | None = None,
        action: str = "stopping after the iteration in flight, with a checkpoint",
        immediate: bool = False,
        immediate_action: str = "stopping now: nothing new to save since the start or the last checkpoint",
    ) -> None:
        self.signum: int | None = None
        self.on_signal = on_signal
        self.action = action
        self.immediate = immediate
        self.immediate_action = immediate_action
        self._previous: dict[int, object] = {}
        self._loggers: list[threading.Thread] = []

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _log(self, message: str, *args) -> None:
        """``logger.warning`` from another thread (safe in a signal handler; see the module docstring)."""
        thread = threading.Thread(target=logger.warning, args=(message, *args), daemon=True)
        thread.start()
        self._loggers.append(thread)

    def _handle(self, signum: int, frame) -> None:  # noqa: ARG002 - signal handler signature
        name = signal.Signals(signum).name
        if self.signum is not None:
            self._log("%s again: already stopping", name)
            return
        self.signum = signum
        immediate = self.immediate
        self._log("%s received: %s", name, self.immediate_action if immediate else self.action)
        if self.on_signal is not None:
            self.on_signal(signum)
        if immediate:
            raise StopNow(signum)

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
        for thread in self._loggers:  # the signals' log lines are written before the process moves on
            thread.join(timeout=5)
        self._loggers.clear()


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """``worker_init_fn`` of data loaders: the stop signals are the training process's to handle."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
