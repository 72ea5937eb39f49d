"""Results of the command-line entry points (tables, paths, JSON) go to standard output through the
``senseflow.results`` logger, so the package writes only through :mod:`logging`.

The logger writes bare messages to whatever ``sys.stdout`` is when a record is emitted (a redirection or a
test's capture replaces it) and does not propagate: diagnostics stay on stderr and in log files, results on
stdout. ``logging.getLogger("senseflow.results").setLevel(logging.WARNING)`` silences them.
"""

from __future__ import annotations

import logging
import sys

RESULTS = "senseflow.results"


class _CurrentStdout(logging.StreamHandler):
    """A stream handler bound to the current ``sys.stdout`` rather than the one at construction."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value) -> None:  # StreamHandler.__init__ assigns it
        pass


def results_logger() -> logging.Logger:
    """The ``senseflow.results`` logger, given its stdout handler on first use."""
    log = logging.getLogger(RESULTS)
    if not any(isinstance(h, _CurrentStdout) for h in log.handlers):
        handler = _CurrentStdout()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log


def emit(*lines: str) -> None:
    """Write result lines to standard output (one record per call; lines joined by newlines)."""
    results_logger().info("%s", "\n".join(lines))
