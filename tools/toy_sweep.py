"""Sweep points of the toy benchmark's full recipe, side by side, from one finished run.

    python tools/toy_sweep.py runs/toy_gpu "--distill-lr 2e-5" "--distill-warmup 200" "--distill-batch 64"

Each point is ``python -m senseflow.toy --reuse RUN --variants senseflow --jobs 1 --out SWEEP/<slug>
<its options>``: the stages before distillation are copied from RUN, and the full recipe alone trains in
one process. The points start at once (``--parallel``; default: all of them on CUDA, one at a time on
a CPU). Then one table compares RUN's full recipe with each point's: FD ± its standard error, the ratio
to RUN's many-step teacher (issue 9's goal: at most 1.25), attribute accuracy and its gap to that
teacher. It goes to stdout and to ``SWEEP/sweep.md`` and ``sweep.json`` (``SWEEP``: ``RUN_sweep`` by
default). A point that finished before is only read (the toy skips finished stages), so after a stop
(SIGTERM to this process's group, as ``timeout`` sends it, reaches every point, which checkpoints) the
same command finishes the sweep.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

FD_RATIO_GOAL = 1.25


def slug(options: str) -> str:
    """A folder name for a point's options, e.g. ``--distill-lr 2e-5`` -> ``distill-lr_2e-5``."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", options.replace("--", " ").strip()).strip("_") or "base"


def point_command(run: Path, out: Path, options: str, device: str | None) -> list[str]:
    """The toy command of one sweep point."""
    preset = json.loads((run / "preset.json").read_text())["name"]
    cmd = [sys.executable, "-m", "senseflow.toy", "--preset", preset, "--reuse", str(run)]
    cmd += ["--variants", "senseflow", "--jobs", "1", "--out", str(out), *shlex.split(options)]
    return cmd + (["--device", device] if device else [])


def row(name: str, report: dict, teacher: dict) -> dict:
    """One line of the table: the full recipe of ``report`` against ``teacher`` (the many-step metrics)."""
    m = report["methods"]["senseflow"]["metrics"]
    seconds = report["setup"]["variants"]["senseflow"]["seconds"]
    return {
        "point": name,
        "fd": m["fd"],
        "fd_se": m.get("fd_se"),
        "fd_ratio": m["fd"] / teacher["fd"],
        "attributes": m["attributes"],
        "attribute_gap_points": 100 * (teacher["attributes"] - m["attributes"]),
        "distill_seconds": seconds,
    }


def markdown(rows: list[dict], teacher: dict, run: Path) -> str:
    se = lambda r: "" if r["fd_se"] is None else f" ± {r['fd_se']:.2g}"  # noqa: E731
    lines = [
        f"Full recipe (SenseFlow, 4 steps) of `{run}` and its sweep points; many-step teacher: FD "
        f"{teacher['fd']:.3g}, attributes {100 * teacher['attributes']:.1f} %.",
        "",
        "| Point | FD | FD / teacher (goal ≤ 1.25) | Attributes % | Gap to teacher, points | Distillation s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['point']} | {r['fd']:.3g}{se(r)} | {r['fd_ratio']:.2f} | {100 * r['attributes']:.1f} | "
            f"{r['attribute_gap_points']:+.1f} | {r['distill_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a finished run of python -m senseflow.toy (its --out)")
    p.add_argument(
        "points", nargs="+", help='one quoted string of toy options per point, e.g. "--distill-lr 2e-5"'
    )
    p.add_argument("--out", default=None, help="folder of the points (default: RUN_sweep)")
    p.add_argument("--parallel", type=int, default=None, help="points at once (default: all on CUDA, else 1)")
    p.add_argument(
        "--device", default=None, help="passed on to the toy (default: its own, cuda if available)"
    )
    args = p.parse_args(argv)
    run = Path(args.run).resolve()
    base = run / "report" / "report.json"
    if not base.is_file():
        p.error(f"run: {run} has no report/report.json (run python -m senseflow.toy --out {run} first)")
    sweep = Path(args.out or f"{run}_sweep").resolve()
    sweep.mkdir(parents=True, exist_ok=True)
    parallel = args.parallel
    if parallel is None:
        import torch

        parallel = (
            len(args.points)
            if (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) != "cpu"
            else 1
        )
    names = [slug(o) for o in args.points]
    if len(set(names)) != len(names):
        p.error("points: two points have the same options")
    failed = []
    for start in range(0, len(names), max(parallel, 1)):
        procs = []
        for name, options in list(zip(names, args.points))[start : start + max(parallel, 1)]:
            log = (sweep / f"{name}.log").open("w")
            cmd = point_command(run, sweep / name, options, args.device)
            print(f"{name}: {shlex.join(cmd)}", flush=True)
            procs.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
        for name, proc, log in procs:
            rc = proc.wait()
            log.close()
            if rc != 0:
                failed.append(name)
                print(f"{name}: exit code {rc}; see {sweep / f'{name}.log'}", flush=True)
    report = json.loads(base.read_text())
    teacher = report["methods"]["teacher_many"]["metrics"]
    rows = [row("base run", report, teacher)]
    for name in names:
        path = sweep / name / "report" / "report.json"
        if path.is_file() and name not in failed:
            rows.append(row(name, json.loads(path.read_text()), teacher))
    md = markdown(rows, teacher, run)
    (sweep / "sweep.md").write_text(md)
    (sweep / "sweep.json").write_text(
        json.dumps({"run": str(run), "teacher_many": teacher, "rows": rows}, indent=1)
    )
    print(md, end="")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
