"""The package writes through logging only (results through ``senseflow.output``), never ``print()``."""

from __future__ import annotations

import ast
import logging

from senseflow.output import RESULTS, emit

from .conftest import REPO


def test_no_print_calls_in_the_package():
    calls = []
    for path in sorted((REPO / "senseflow").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                calls.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not calls, calls


def test_emit_writes_to_the_current_stdout_only(capsys):
    emit("first line", "second line")
    emit("third")
    out, err = capsys.readouterr()
    assert out == "first line\nsecond line\nthird\n" and err == ""
    log = logging.getLogger(RESULTS)
    log.setLevel(logging.WARNING)  # results can be silenced like any logger
    try:
        emit("hidden")
        assert capsys.readouterr().out == ""
    finally:
        log.setLevel(logging.INFO)
