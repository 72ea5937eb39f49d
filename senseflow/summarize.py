"""Summarise a run's ``metrics.jsonl``: iteration time of generator and other iterations, peak memory.

    python -m senseflow.summarize RUN_DIR [--skip 3]

Times are medians over records written with ``train.log_interval=1`` (one record per iteration); the
first ``--skip`` iterations (warm-up) are left out. With longer log intervals the records average over
mixed iterations and only the overall mean is meaningful.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from .output import emit


def summarize(run_dir: Path, skip: int = 3) -> dict[str, float]:
    """Medians of ``sec_per_iter`` split by whether the record contains a generator step (``loss/dm``)."""
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if r["iter"] > skip]
    gen = [r["sec_per_iter"] for r in timed if "loss/dm" in r]
    other = [r["sec_per_iter"] for r in timed if "loss/dm" not in r]
    out = {"records": len(records), "mean_sec_per_iter": statistics.fmean(r["sec_per_iter"] for r in timed)}
    if gen:
        out["median_sec_generator_iter"] = statistics.median(gen)
    if other:
        out["median_sec_other_iter"] = statistics.median(other)
    for key in ("mem/peak_alloc_gib", "mem/peak_reserved_gib"):
        if key in records[-1]:
            out[key] = max(r.get(key, 0.0) for r in records)
    return out


def main(argv: list[str] | None = None) -> int:
    """Print the summary as JSON."""
    p = argparse.ArgumentParser(prog="python -m senseflow.summarize", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--skip", type=int, default=3, help="warm-up iterations to leave out")
    args = p.parse_args(argv)
    emit(json.dumps(summarize(Path(args.run_dir), args.skip), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
