"""The toy benchmark (issue 9): the ``ci`` preset end to end through the CLI, stage caching, the evaluation
networks against shuffled labels, and the Frechet distance."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from senseflow.toy.data import make_split
from senseflow.toy.evalnets import (
    classifier_accuracy,
    feature_net_accuracy,
    frechet_bootstrap_se,
    frechet_distance,
    train_cell_classifier,
    train_feature_net,
)
from senseflow.toy.pipeline import methods
from senseflow.toy.presets import PRESETS, RESOLUTION

from .conftest import REPO, run_cmd

CI = PRESETS["ci"]
STAGES = [
    "data",
    "backbones",
    "vae",
    "teacher",
    "featnet",
    "classifiers",
    *[f"distill/{v}" for v in ("dmd", "dmd_ida", "dmd_ida_isg", "senseflow")],
    *[f"eval/{m}" for m in methods(CI)],
    "report",
]


def test_frechet_distance():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 16))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shifted = [frechet_distance(a, a + s) for s in (0.1, 0.5, 1.0)]
    assert shifted[0] > 0
    assert shifted[0] < shifted[1] < shifted[2]
    # a pure mean shift adds exactly |shift|^2 per dimension
    assert shifted[2] == pytest.approx(16 * 1.0**2, rel=1e-6)
    b = rng.normal(size=(400, 16)) * 2.0  # different covariance, same mean
    assert frechet_distance(a, b) > frechet_distance(a, rng.normal(size=(400, 16)))


def test_frechet_bootstrap_se():
    rng = np.random.default_rng(1)
    small = [
        frechet_bootstrap_se(rng.normal(size=(200, 8)), rng.normal(size=(200, 8)) + 0.5) for _ in range(3)
    ]
    large = [
        frechet_bootstrap_se(rng.normal(size=(3200, 8)), rng.normal(size=(3200, 8)) + 0.5) for _ in range(3)
    ]
    assert min(small) > 0
    # 16x the prompts: the standard error falls by about 4x (the estimator's sampling noise)
    assert 2.5 < np.mean(small) / np.mean(large) < 6.5, (small, large)
    a = rng.normal(size=(100, 4))
    assert frechet_bootstrap_se(a, a) < 1e-6  # identical sets stay identical under paired resampling
    with pytest.raises(ValueError, match="differ in length"):
        frechet_bootstrap_se(a, a[:50])


@pytest.fixture(scope="module")
def ci_data():
    """Real scenes at the ci preset's size: a training split and a held-out split."""
    return make_split(CI.num_train, RESOLUTION, 11), make_split(128, RESOLUTION, 12)


def test_cell_classifier_real_vs_shuffled(ci_data):
    train, held = ci_data
    real = classifier_accuracy(train_cell_classifier(train, CI.classifier_steps, seed=0), held)
    shuffled = classifier_accuracy(
        train_cell_classifier(train, CI.classifier_steps, seed=0, shuffle_labels=True), held
    )
    # occupied cells: chance is 1/8 for colours, 1/3 for shapes, 1/2 for sizes
    assert real["color"] > 0.7 and shuffled["color"] < 0.3, (real, shuffled)
    assert real["occupancy"] > 0.95 and shuffled["occupancy"] < 0.85, (real, shuffled)
    assert real["size"] > 0.8 and real["shape"] > shuffled["shape"] + 0.1, (real, shuffled)


def test_feature_net_real_vs_shuffled(ci_data):
    train, held = ci_data
    real = feature_net_accuracy(train_feature_net(train, CI.featnet_steps, seed=0), held)
    shuffled = feature_net_accuracy(
        train_feature_net(train, CI.featnet_steps, seed=0, shuffle_labels=True), held
    )
    # 5 background colours (chance 0.2), plain or gradient (0.5)
    assert real["background"] > 0.6 and shuffled["background"] < 0.4, (real, shuffled)


def _finite(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def test_cli_ci_preset_and_rerun(tiny_cache, tmp_path):
    out = tmp_path / "toy"
    cmd = [
        sys.executable,
        "-m",
        "senseflow.toy",
        "--preset",
        "ci",
        "--out",
        str(out),
        "--device",
        "cpu",
        "--jobs",
        "2",
    ]
    t0 = time.time()
    r = run_cmd(cmd, tiny_cache, timeout=120)
    first = time.time() - t0
    assert r.returncode == 0, r.stderr[-4000:]
    report_dir = out / "report"
    for name in ("report.md", "report.json", "metrics_plot.png", "grids/comparison.png"):
        assert (report_dir / name).is_file(), name
    report = json.loads((report_dir / "report.json").read_text())
    table = methods(CI)
    assert len(report["table"]["rows"]) == len(table)
    for name in table:
        assert (report_dir / "grids" / f"{name}.png").is_file(), name
        metrics = report["methods"][name]["metrics"]
        assert set(metrics) >= {"fd", "fd_se", "color", "shape", "position", "attributes", "scene"}
        assert all(_finite(v) for v in metrics.values()), (name, metrics)
    for name in ("dmd", "dmd_ida", "dmd_ida_isg", "senseflow"):
        curve = report["curves"][name]
        assert [p["iter"] for p in curve] == [0, CI.save_interval, CI.distill_iters]
        assert (out / "distill" / name / f"ckpt_model_{CI.distill_iters}.pth").is_file()
    md = (report_dir / "report.md").read_text()
    for label in (table[m]["label"] for m in table):
        assert label in md
    assert set(report["goal"]) >= {"fd_ratio_to_teacher_many", "attribute_gap_points", "beats_teacher_4"}
    assert "| Method |" in r.stdout  # the CLI prints the table
    assert "in 2 parallel processes" in r.stderr  # the variants were trained side by side
    assert "[senseflow] senseflow.engine" in r.stderr

    # a second run finds every stage finished
    t0 = time.time()
    r2 = run_cmd(cmd, tiny_cache, timeout=120)
    second = time.time() - t0
    assert r2.returncode == 0, r2.stderr[-4000:]
    for stage in STAGES:
        assert f"stage {stage}: skipped" in r2.stderr, stage
    assert ": running" not in r2.stderr
    assert second < min(30.0, first / 2), (first, second)

    # another preset into the same folder is refused, so is a changed distillation length
    r3 = run_cmd([*cmd[:4], "cpu", *cmd[5:]], tiny_cache, timeout=60)
    assert r3.returncode == 2 and "another --out" in r3.stderr
    r4 = run_cmd([*cmd, "--distill-iters", "20"], tiny_cache, timeout=60)
    assert r4.returncode == 2 and "another --out" in r4.stderr
    r5 = run_cmd([*cmd, "--distill-iters", "2"], tiny_cache, timeout=60)
    assert r5.returncode == 2 and "--distill-iters: must be at least 4" in r5.stderr

    # a learning-rate sweep point reuses the finished stages before distillation and distils again
    swept = tmp_path / "toy_lr"
    sweep = [*cmd[:6], str(swept), *cmd[7:], "--reuse", str(out), "--distill-lr", "1e-4"]
    r6 = run_cmd(sweep, tiny_cache, timeout=120)
    assert r6.returncode == 0, r6.stderr[-4000:]
    assert "reused from" in r6.stderr
    for stage in ("data", "vae", "teacher", "featnet", "classifiers", "eval/teacher_4"):
        assert f"stage {stage}: skipped" in r6.stderr, stage
    assert "stage eval/senseflow: running" in r6.stderr
    assert json.loads((swept / "preset.json").read_text())["distill_lr"] == 1e-4
    assert (swept / "distill" / "senseflow" / f"ckpt_model_{CI.distill_iters}.pth").is_file()
    swept_report = json.loads((swept / "report" / "report.json").read_text())
    assert len(swept_report["table"]["rows"]) == len(table)
    # a run that differs before distillation cannot be reused
    r7 = run_cmd(
        [*cmd[:4], "cpu", "--out", str(tmp_path / "x"), *cmd[7:], "--reuse", str(out)], tiny_cache, timeout=60
    )
    assert r7.returncode == 2 and "--reuse:" in r7.stderr and "only distill_iters" in r7.stderr

    # SIGTERM to the CLI alone: it passes the signal on to the variants in flight, which checkpoint and
    # stop; the queued ones do not start; the CLI exits with 128 + 15
    stopped = tmp_path / "toy_stop"
    env = {**os.environ, "SENSEFLOW_CACHE": str(tiny_cache)}
    stop_cmd = [*cmd[:6], str(stopped), *cmd[7:], "--reuse", str(out), "--distill-iters", "400"]
    log = (tmp_path / "stop.log").open("w")
    proc = subprocess.Popen(stop_cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    running = [stopped / "distill" / v / "metrics.jsonl" for v in ("dmd", "dmd_ida")]
    deadline = time.time() + 120
    while not all(p.is_file() for p in running):
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "stop.log").read_text()[-3000:]
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, (tmp_path / "stop.log").read_text()[-3000:]
    log.close()
    text = (tmp_path / "stop.log").read_text()
    assert "run the same command again to resume" in text, text[-3000:]
    for v in ("dmd", "dmd_ida"):
        step = int((stopped / "distill" / v / "checkpoints" / "latest").read_text().rsplit("_", 1)[1])
        assert 10 <= step < 400, (v, step)
        assert not (stopped / "distill" / v / ".done.json").exists()
    assert not (stopped / "distill" / "senseflow" / "metrics.jsonl").exists()  # queued, never started
