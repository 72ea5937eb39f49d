"""Cached stages: each finished stage leaves ``<dir>/.done.json``, written atomically, and is skipped later.

A stage stopped half-way (a signal, an error) leaves the interval it ran in ``<dir>/.attempts.json``; the
run that finishes it counts those intervals too, so a resumed stage reports its whole time (a process
killed outright, e.g. by SIGKILL, cannot record its interval)."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import ConfigError
from .presets import with_defaults

logger = logging.getLogger(__name__)

DONE = ".done.json"
ATTEMPTS = ".attempts.json"


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON to a temporary sibling, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def read_done(stage_dir: Path) -> dict | None:
    """The record of a finished stage, or None."""
    path = stage_dir / DONE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


class Stages:
    """Runs named stages under ``out`` at most once (per output folder)."""

    def __init__(self, out: Path):
        self.out = out
        self.records: dict[str, dict] = {}
        self.ran: list[str] = []
        self.skipped: list[str] = []

    def run(self, name: str, fn: Callable[[Path], dict]) -> dict:
        """Run ``fn(stage_dir)`` unless ``<out>/<name>/.done.json`` exists; returns the stage record.

        The record is ``fn``'s dict plus ``stage``, ``spans`` (the ``[start, end]`` times of every attempt,
        interrupted ones included), ``seconds`` (their total) and ``finished``; it is written last, so a
        stage interrupted half-way runs again (its function must tolerate leftovers and keep the
        hidden bookkeeping files)."""
        stage_dir = self.out / name
        done = read_done(stage_dir)
        if done is not None:
            logger.info(
                "stage %s: skipped (done, %.1fs when it ran)", name, done.get("seconds", float("nan"))
            )
            self.records[name] = done
            self.skipped.append(name)
            return done
        logger.info("stage %s: running", name)
        stage_dir.mkdir(parents=True, exist_ok=True)
        attempts = stage_dir / ATTEMPTS
        spans = json.loads(attempts.read_text()) if attempts.is_file() else []
        t0 = time.time()
        try:
            record = dict(fn(stage_dir) or {})
        except BaseException:  # a stop (StopNow, TrainingStopped, KeyboardInterrupt) or an error
            write_json_atomic(attempts, [*spans, [t0, time.time()]])
            raise
        spans.append([t0, time.time()])
        seconds = sum(end - start for start, end in spans)
        finished = time.strftime("%Y-%m-%d %H:%M:%S")
        record.update(stage=name, spans=spans, seconds=seconds, finished=finished)
        write_json_atomic(stage_dir / DONE, record)
        attempts.unlink(missing_ok=True)
        earlier = f" ({len(spans) - 1} earlier attempts included)" if len(spans) > 1 else ""
        logger.info("stage %s: done in %.1fs%s", name, seconds, earlier)
        self.records[name] = record
        self.ran.append(name)
        return record

    def adopt(self, name: str) -> dict:
        """Record stage ``name``, which another process has just run, as run here (from its ``.done.json``)."""
        record = read_done(self.out / name)
        assert record is not None, f"stage {name} has not finished"
        self.records[name] = record
        self.ran.append(name)
        return record


def check_preset(out: Path, preset: dict) -> None:
    """Bind the output folder to one preset: a rerun with other sizes would mix incompatible stages."""
    path = out / "preset.json"
    if path.is_file():
        old = with_defaults(json.loads(path.read_text()))
        if old != json.loads(json.dumps(preset)):
            raise ConfigError(
                f"--out: {out} holds a run of preset {old.get('name')!r} with other settings; "
                "use another --out (or delete the folder)"
            )
        return
    write_json_atomic(path, preset)
