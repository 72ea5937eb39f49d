"""The toy benchmark (issue 9): the ``ci`` preset end to end through the CLI, stage caching, the stages that
need only the data in a child process, the evaluation networks against shuffled labels, the Frechet
distance, and the teacher's compiled blocks."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from senseflow.config import load_config
from senseflow.errors import SenseFlowError
from senseflow.toy.__main__ import build_preset, parse_args
from senseflow.toy.data import make_split
from senseflow.toy.distill import VARIANTS, variant_overrides
from senseflow.toy.evalnets import (
    classifier_accuracy,
    feature_net_accuracy,
    frechet_bootstrap_se,
    frechet_distance,
    frechet_parts,
    train_cell_classifier,
    train_feature_net,
)
from senseflow.toy.evaluate import guidance_scales, load_images
from senseflow.toy.pipeline import (
    SHARED_STAGES,
    SIDE_STAGES,
    methods,
    reuse_stages,
    run,
    stage_backbones,
    stage_classifiers,
    stage_featnet,
)
from senseflow.toy.presets import BACKBONE_FIELDS, DISTILL_FIELDS, PRESETS, RESOLUTION
from senseflow.toy.report import busy_seconds
from senseflow.toy.stages import ATTEMPTS, Stages, check_preset, read_done, write_json_atomic
from senseflow.toy.teacher import BASE_CONFIG

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
    # its parts: a shift goes to the mean term, a narrower set to the covariance term and the variance ratio
    moved = frechet_parts(a + 1.0, a)
    assert moved["mean_term"] == pytest.approx(16.0) and moved["cov_term"] == pytest.approx(0.0, abs=1e-6)
    assert moved["variance_ratio"] == pytest.approx(1.0)
    narrow = frechet_parts(0.5 * a, a)
    assert narrow["mean_term"] < 0.01 * narrow["cov_term"] and narrow["variance_ratio"] == pytest.approx(0.25)
    assert narrow["fd"] == pytest.approx(narrow["mean_term"] + narrow["cov_term"])
    assert narrow["fd"] == pytest.approx(frechet_distance(0.5 * a, a))


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
    assert set(report["goal"]) >= {
        "fd_ratio_to_teacher_many",
        "attribute_gap_points",
        "beats_teacher_4",
        "fd_ratio_to_teacher_many_dm",
    }
    assert "Against the teacher at the DM loss's guidance" in md
    assert "FD in parts" in md and set(report["methods"]["senseflow"]["metrics"]) >= {
        "fd_mean_term",
        "fd_cov_term",
        "feature_variance_ratio",
    }
    # the DM-guidance teacher: same noise as the CFG-5 one, other scales, so other images
    fixed, ranged = (
        load_images(out / "eval" / m / "images.npz") for m in ("teacher_many", "teacher_many_dm")
    )
    assert fixed.shape == ranged.shape and not np.array_equal(fixed, ranged)
    assert "| Method |" in r.stdout  # the CLI prints the table
    assert "in 2 parallel processes" in r.stderr  # the variants were trained side by side
    assert "[senseflow] senseflow.engine" in r.stderr
    assert "[senseflow] senseflow.engine" in (out / "toy.log").read_text()  # the variants log there too

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

    # a learning-rate sweep point of the full recipe alone reuses the finished stages before distillation
    # and distils again
    swept = tmp_path / "toy_lr"
    sweep = [*cmd[:6], str(swept), *cmd[7:], "--reuse", str(out), "--distill-lr", "1e-4"]
    r6 = run_cmd([*sweep, "--variants", "senseflow"], tiny_cache, timeout=120)
    assert r6.returncode == 0, r6.stderr[-4000:]
    assert "reused from" in r6.stderr
    for stage in ("data", "vae", "teacher", "featnet", "classifiers", "eval/teacher_4"):
        assert f"stage {stage}: skipped" in r6.stderr, stage
    assert "stage eval/senseflow: running" in r6.stderr
    assert json.loads((swept / "preset.json").read_text())["distill_lr"] == 1e-4
    assert (swept / "distill" / "senseflow" / f"ckpt_model_{CI.distill_iters}.pth").is_file()
    assert sorted(p.name for p in (swept / "distill").iterdir()) == ["senseflow"]
    swept_report = json.loads((swept / "report" / "report.json").read_text())
    assert len(swept_report["table"]["rows"]) == len(table) - 3
    assert (
        list(swept_report["curves"]) == ["senseflow"] and swept_report["goal"]["fd_ratio_to_teacher_many"] > 0
    )
    assert "Vanilla DMD" not in (swept / "report" / "report.md").read_text()
    r6b = run_cmd([*sweep, "--variants", "dmd"], tiny_cache, timeout=60)
    assert r6b.returncode == 2 and "--variants: must include senseflow" in r6b.stderr
    # a run that differs before distillation cannot be reused
    r7 = run_cmd(
        [*cmd[:4], "cpu", "--out", str(tmp_path / "x"), *cmd[7:], "--reuse", str(out)], tiny_cache, timeout=60
    )
    assert r7.returncode == 2 and "--reuse:" in r7.stderr and "only distill_iters" in r7.stderr

    # SIGTERM to the CLI's process group, as ``timeout`` sends it: the CLI passes it on to the variants in
    # flight (in groups of their own), which checkpoint and stop; the queued ones do not start; the CLI
    # exits with 128 + 15
    stopped = tmp_path / "toy_stop"
    env = {**os.environ, "SENSEFLOW_CACHE": str(tiny_cache)}
    stop_cmd = [*cmd[:6], str(stopped), *cmd[7:], "--reuse", str(out), "--distill-iters", "400"]
    log = (tmp_path / "stop.log").open("w")
    proc = subprocess.Popen(
        stop_cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    running = [stopped / "distill" / v / "metrics.jsonl" for v in ("dmd", "dmd_ida")]
    deadline = time.time() + 120
    while not all(p.is_file() for p in running):
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "stop.log").read_text()[-3000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, (tmp_path / "stop.log").read_text()[-3000:]
    log.close()
    text = (tmp_path / "stop.log").read_text()
    assert "run the same command again to resume" in text, text[-3000:]
    for v in ("dmd", "dmd_ida"):
        step = int((stopped / "distill" / v / "checkpoints" / "latest").read_text().rsplit("_", 1)[1])
        assert 10 <= step < 400, (v, step)
        assert not (stopped / "distill" / v / ".done.json").exists()
        # the interrupted attempt's interval is kept for the run that finishes the stage
        [(start, end)] = json.loads((stopped / "distill" / v / ATTEMPTS).read_text())
        assert 0 < end - start < 240, (start, end)
    assert not (stopped / "distill" / "senseflow" / "metrics.jsonl").exists()  # queued, never started


@contextlib.contextmanager
def log_to(path):
    """INFO lines of this process appended to ``path`` (as the CLI's ``toy.log``; a child process of the run
    appends its own there)."""
    root = logging.getLogger()
    handler, level = logging.FileHandler(path), root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()


@pytest.fixture(scope="module")
def parallel_run(tiny_cache, tmp_path_factory):
    """The ci preset through ``run`` with the stages that need only the data in a child process (forced on
    the CPU); returns the output folder and the report."""
    out = tmp_path_factory.mktemp("toy_parallel")
    with log_to(out / "toy.log"):
        report = run(out, CI, torch.device("cpu"), "test", parallel_stages=True)
    return out, report


def _flat(record: dict, prefix: str = "") -> dict:
    """A nested record as one level of ``a.b`` keys."""
    out = {}
    for k, v in record.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _without_timing(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("stage", "spans", "seconds", "finished")}


def test_parallel_stages_match_the_sequential_ones_and_rerun(parallel_run, tmp_path):
    out, report = parallel_run
    log = (out / "toy.log").read_text()
    for name in SIDE_STAGES:  # in the child, its lines tagged
        assert f"[side] senseflow.toy.stages: stage {name}: done" in log, name
    assert "[side] senseflow.toy.stages: stage vae" not in log
    assert "[side] senseflow.toy.stages: stage teacher" not in log
    # the child's records reach the report as if run here, and equal what this process computes
    cpu = torch.device("cpu")
    for name, fn in (
        ("featnet", stage_featnet),
        ("classifiers", stage_classifiers),
        ("backbones", stage_backbones),
    ):
        record = report["setup"][name]
        assert record["stage"] == name and record["seconds"] > 0, record
        (tmp_path / name).mkdir()
        here = fn(tmp_path / name, out, CI, cpu)
        if name == "backbones":  # the CLIP path names the folder; the losses differ in rounding (threads)
            record, here = _flat(record["dino"]), _flat(here["dino"])
            assert record == pytest.approx(here, rel=1e-4), name
        else:
            assert _without_timing(record) == here, name
    # one table row per stage, in the sequential order; stages side by side count once in the wall time
    md = (out / "report" / "report.md").read_text()
    table = [
        line for line in md.split("## Stage times")[1].split("\n\n#")[0].splitlines() if line.startswith("|")
    ]
    rows = [line.split("|")[1].strip() for line in table[2:]]  # after the header and its rule
    assert rows[:8] == [*SHARED_STAGES, "distill", "eval"], rows
    assert set(report["stage_seconds"]) == {*SHARED_STAGES, "distill", "eval"}
    assert report["total_stage_seconds"] - report["wall_stage_seconds"] > 2, report
    assert report["wall_stage_seconds"] <= report["seconds_this_invocation"] + 2, report
    assert f"{report['wall_stage_seconds'] / 60:.1f} min of wall-clock time" in md

    # a rerun skips every stage, and starts no child
    size = (out / "toy.log").stat().st_size
    with log_to(out / "toy.log"):
        again = run(out, CI, cpu, "test", parallel_stages=True)
    rerun = (out / "toy.log").read_text()[size:]
    for stage in STAGES:
        assert f"stage {stage}: skipped" in rerun, stage
    assert ": running" not in rerun and "[side]" not in rerun, rerun
    assert again["table"] == report["table"]


def test_sweep_tool_runs_points_of_the_full_recipe_from_a_finished_run(parallel_run, tiny_cache, tmp_path):
    out, report = parallel_run
    sweep = tmp_path / "sweep"
    points = ["--distill-lr 1e-4", "--set distill.gan.weight=0.3"]
    cmd = [sys.executable, "tools/toy_sweep.py", str(out), *points, "--out", str(sweep), "--device", "cpu"]
    r = run_cmd([*cmd, "--parallel", "2"], tiny_cache, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.loads((sweep / "sweep.json").read_text())["rows"]
    assert [row["point"] for row in rows] == ["base run", "distill-lr_1e-4", "set_distill.gan.weight_0.3"]
    teacher = report["methods"]["teacher_many"]["metrics"]
    assert rows[0]["fd"] == report["methods"]["senseflow"]["metrics"]["fd"]
    for row in rows:
        assert row["fd_ratio"] == pytest.approx(row["fd"] / teacher["fd"]) and _finite(row["fd_ratio"])
    for name, field, value in (
        ("distill-lr_1e-4", "distill_lr", 1e-4),
        ("set_distill.gan.weight_0.3", "distill_overrides", ["distill.gan.weight=0.3"]),
    ):
        assert json.loads((sweep / name / "preset.json").read_text())[field] == value
        assert sorted(p.name for p in (sweep / name / "distill").iterdir()) == ["senseflow"]
    # --set reaches the engine's config of the full recipe
    gan = (sweep / "set_distill.gan.weight_0.3" / "distill" / "senseflow" / "config.yaml").read_text()
    assert (
        "weight: 0.3" in gan
        and "weight: 0.3" not in (out / "distill" / "senseflow" / "config.yaml").read_text()
    )
    assert rows[1]["fd"] != rows[2]["fd"]  # two different trainings
    assert "| set_distill.gan.weight_0.3 |" in (sweep / "sweep.md").read_text() and "| Point |" in r.stdout
    # a point that does not start (a bad option) is reported, and the others still make the table
    bad = run_cmd(
        [*cmd[:3], "--distill-lr -1", "--out", str(sweep), "--device", "cpu"], tiny_cache, timeout=120
    )
    assert bad.returncode == 1 and "distill-lr_-1: exit code 2" in bad.stdout


def test_parallel_stage_failure_names_the_stage(parallel_run, tmp_path):
    src, _ = parallel_run
    out = tmp_path / "toy"
    keep = {"preset.json", "data", "backbones", "vae", "teacher"}
    shutil.copytree(src, out, ignore=lambda d, names: [n for n in names if d == str(src) and n not in keep])
    (out / "featnet").write_text("a file where the stage's folder goes")
    with log_to(out / "toy.log"):
        with pytest.raises(RuntimeError, match=r"stage featnet failed in the child process") as err:
            run(out, CI, torch.device("cpu"), "test", parallel_stages=True)
    assert f"tagged [side] in {out / 'toy.log'}" in str(err.value)
    assert "FileExistsError" in str(err.value)
    log = (out / "toy.log").read_text()
    assert "[side] senseflow.toy.pipeline: stage featnet failed" in log and "FileExistsError" in log
    assert read_done(out / "classifiers") is None and not (out / "distill").exists()


def test_guidance_scales_per_prompt():
    """A guidance range gives each prompt its own seeded scale, the same whatever the batching."""
    whole = guidance_scales((2.0, 8.0), 0, 64)
    assert torch.equal(
        torch.cat([guidance_scales((2.0, 8.0), 0, 40), guidance_scales((2.0, 8.0), 40, 24)]), whole
    )
    assert whole.min() >= 2.0 and whole.max() <= 8.0 and whole.std() > 1.0  # U(2, 8): std 1.73
    assert torch.equal(guidance_scales(5.0, 3, 4), torch.full((4,), 5.0))
    assert methods(CI)["teacher_many_dm"]["label"].startswith(
        f"Teacher, {CI.teacher_many_steps} Euler steps, CFG 2 "
    )
    ranged = dataclasses.replace(CI, dm_guidance=(2.0, 8.0))
    assert methods(ranged)["teacher_many_dm"]["label"].startswith(
        f"Teacher, {CI.teacher_many_steps} Euler steps, CFG ~ U(2, 8) per prompt"
    )


def test_dm_guidance_option_sets_the_recipe_range_and_reevaluates_its_teacher(tmp_path):
    """The toy's DM guidance (2 by default, ``--dm-guidance``) reaches every variant's engine config; runs
    from before the field (which used the recipe's U(2, 8)) no longer match; ``--reuse`` of a run at another
    guidance copies every stage but the teacher evaluated at that guidance."""
    cpu = torch.device("cpu")
    assert all(p.dm_guidance == (2.0, 2.0) for p in PRESETS.values()) and "dm_guidance" in DISTILL_FIELDS
    for n in VARIANTS:
        assert load_config(BASE_CONFIG, variant_overrides(n, CI, tmp_path, cpu)).distill.dm.guidance == [
            2.0,
            2.0,
        ]
    ranged = build_preset(parse_args(["--dm-guidance", "2", "8"]), "ci")
    assert ranged.dm_guidance == (2.0, 8.0)
    cfg = load_config(BASE_CONFIG, variant_overrides("senseflow", ranged, tmp_path, cpu))
    assert cfg.distill.dm.guidance == [2.0, 8.0]
    assert build_preset(parse_args(["--dm-guidance", "3"]), "ci").dm_guidance == (3.0, 3.0)
    for bad, message in ((["8", "2"], "need 0 <= LO <= HI"), (["1", "2", "3"], "one scale or LO HI")):
        with pytest.raises(SenseFlowError, match=f"--dm-guidance: {message}"):
            build_preset(parse_args(["--dm-guidance", *bad]), "ci")
    with pytest.raises(SenseFlowError, match=re.escape("use its options (") + ".*--dm-guidance"):
        build_preset(parse_args(["--set", "distill.dm.guidance=[1.0,1.0]"]), "ci")
    # a run folder written before the field existed ran U(2, 8): it matches that, not today's default
    check_older_run_folder(tmp_path, "dm_guidance", matches=ranged, differs=CI)
    # --reuse of that run: every finished stage but the teacher at its (other) guidance
    baselines = [f"eval/{m}" for m in methods(CI) if m not in VARIANTS]
    for name in (*SHARED_STAGES, *baselines):
        write_json_atomic(tmp_path / name / ".done.json", {"seconds": 1.0})
    copied = reuse_stages(tmp_path, tmp_path / "at_2", CI)
    assert copied == [*SHARED_STAGES, *(b for b in baselines if b != "eval/teacher_many_dm")]
    assert reuse_stages(tmp_path, tmp_path / "at_2_8", ranged) == [*SHARED_STAGES, *baselines]


def test_stage_time_counts_interrupted_attempts(tmp_path):
    """A stage stopped half-way and finished by a rerun reports the time of both attempts (the report's
    seconds per iteration of a resumed distillation run), and its two intervals in the wall-clock union."""

    class Stop(BaseException):  # like StopNow / KeyboardInterrupt: not an Exception
        pass

    def first(d):
        (d / "partial").write_text("x")
        time.sleep(0.3)
        raise Stop

    def second(d):
        assert (d / "partial").is_file() and (d / ATTEMPTS).is_file()
        time.sleep(0.2)
        return {"value": 1}

    with pytest.raises(Stop):
        Stages(tmp_path).run("s", first)
    assert read_done(tmp_path / "s") is None
    time.sleep(0.5)  # between the attempts: not stage time
    record = Stages(tmp_path).run("s", second)
    assert record["value"] == 1 and len(record["spans"]) == 2
    assert 0.5 <= record["seconds"] < 1.0, record
    assert record["seconds"] == pytest.approx(sum(e - s for s, e in record["spans"]))
    assert not (tmp_path / "s" / ATTEMPTS).exists() and read_done(tmp_path / "s") == record
    assert busy_seconds([record]) == pytest.approx(record["seconds"])
    # a stage that ran beside the second attempt counts once in the union
    (a, b) = record["spans"][1]
    assert busy_seconds([record, {"spans": [[a, b]]}]) == pytest.approx(record["seconds"])


def test_distill_batch_option(tmp_path):
    args = parse_args(["--preset", "ci", "--distill-batch", "6"])
    preset = build_preset(args, "ci")
    assert preset.distill_batch == 6 and preset.distill_iters == CI.distill_iters
    assert build_preset(parse_args([]), "ci").distill_batch == CI.distill_batch
    for bad in ("0", "-2"):
        with pytest.raises(SenseFlowError, match="--distill-batch: must be >= 1"):
            build_preset(parse_args(["--distill-batch", bad]), "ci")
    with pytest.raises(SystemExit):  # not an integer
        parse_args(["--distill-batch", "1.5"])
    assert build_preset(parse_args(["--distill-warmup", "0"]), "ci").distill_warmup == 0
    with pytest.raises(SenseFlowError, match="--distill-warmup: must be >= 0"):
        build_preset(parse_args(["--distill-warmup", "-1"]), "ci")
    # a batch sweep reuses every stage before distillation
    src = tmp_path / "src"
    src.mkdir()
    (src / "preset.json").write_text(json.dumps(CI.to_dict()))
    for name in SHARED_STAGES:
        write_json_atomic(src / name / ".done.json", {"seconds": 1.0})
    assert reuse_stages(src, tmp_path / "batch", preset) == list(SHARED_STAGES)


def check_older_run_folder(folder, field: str, matches, differs) -> None:
    """A ``preset.json`` of the ``ci`` preset written before ``field`` existed, in ``folder``: ``check_preset``
    accepts the preset ``matches`` and refuses ``differs``."""
    old = CI.to_dict()
    del old[field]
    (folder / "preset.json").write_text(json.dumps(old))
    check_preset(folder, matches.to_dict())
    with pytest.raises(SenseFlowError, match="other settings"):
        check_preset(folder, differs.to_dict())


def test_set_option_overrides_the_recipe_for_every_variant(tmp_path):
    sets = ["--set", "distill.gan.weight=1", "--set", "distill.generator_period=5"]
    preset = build_preset(parse_args(["--preset", "ci", *sets]), "ci")
    assert preset.distill_overrides == ("distill.gan.weight=1", "distill.generator_period=5")
    assert "distill_overrides" in DISTILL_FIELDS and CI.distill_overrides == ()
    cpu = torch.device("cpu")
    gan = {n: load_config(BASE_CONFIG, variant_overrides(n, preset, tmp_path, cpu)).distill for n in VARIANTS}
    assert all(d.generator_period == 5 for d in gan.values())
    # the ablation switches win: only the full recipe (and none of the GAN-free variants) gets the weight
    assert gan["senseflow"].gan.weight == 1 and {gan[n].gan.weight for n in VARIANTS if n != "senseflow"} == {
        0
    }
    for bad, message in (
        ("distill.gan.wieght=1", "unknown key 'distill.gan.wieght'"),
        ("distill.generator_period=0", "distill.generator_period: must be >= 1"),
        ("train.iter_num=5", "the toy sets train.iter_num itself"),
        ("lr_scheduler.lr_max=1", "the toy sets lr_scheduler.lr_max itself"),
        ("distill.gan.weight", "must look like KEY=VALUE"),
    ):
        with pytest.raises(SenseFlowError, match=re.escape(message)):
            build_preset(parse_args(["--set", bad]), "ci")
    # a run folder from before the field existed still matches the same preset (the default fills in)
    check_older_run_folder(tmp_path, "distill_overrides", matches=CI, differs=preset)


def test_teacher_compiles_the_trained_blocks_not_the_ema():
    from diffusers import SD3Transformer2DModel

    from senseflow.toy.teacher import trainee_and_ema, transformer_config

    assert PRESETS["gpu"].teacher_compile and not CI.teacher_compile
    assert "teacher_compile" not in (*DISTILL_FIELDS, *BACKBONE_FIELDS)  # it changes the teacher
    torch.manual_seed(0)
    net = SD3Transformer2DModel(**transformer_config(CI))
    keys = list(net.state_dict())
    net, ema = trainee_and_ema(net, lambda n: list(n.transformer_blocks))  # compiled lazily: no cost here
    assert all(b._compiled_call_impl is not None for b in net.transformer_blocks)
    assert all(b._compiled_call_impl is None for b in ema.modules())
    assert list(ema.state_dict()) == keys == list(net.state_dict())
    assert not ema.training and not any(p.requires_grad for p in ema.parameters())
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), ema.state_dict().values()))
    eager, eager_ema = trainee_and_ema(SD3Transformer2DModel(**transformer_config(CI)))
    assert all(m._compiled_call_impl is None for m in (*eager.modules(), *eager_ema.modules()))


def test_spawned_jobs_end_with_their_parent():
    from senseflow.stop import TrainingStopped
    from senseflow.toy.children import SpawnedJobs

    t0 = time.time()
    with pytest.raises(ZeroDivisionError), SpawnedJobs(1) as jobs:  # a failure here stops the children
        jobs.submit("sleep", time.sleep, 60)
        _ = 1 / 0
    with SpawnedJobs(1) as jobs:
        jobs.submit("fail", math.sqrt, -1.0)
        outcome = jobs.wait()
    assert isinstance(outcome["fail"], ValueError), outcome
    # a stop signal is passed on and, with ``interrupt``, stops this process at once
    with (
        pytest.raises(TrainingStopped, match="stop here"),
        SpawnedJobs(1, interrupt=lambda signum: TrainingStopped("stop here", signum)) as jobs,
    ):
        jobs.submit("sleep", time.sleep, 60)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)
    assert jobs.stop.signum == signal.SIGTERM
    assert time.time() - t0 < 40


def test_spawned_jobs_run_in_their_own_process_group_and_die_with_a_killed_parent():
    """A signal to the parent's group (``timeout``, Ctrl-C) must not reach a child's own children
    (torch.compile's workers), and a child must not outlive a parent killed with SIGKILL."""
    code = (
        "import os, time\n"
        "from senseflow.toy.children import SpawnedJobs\n"
        "with SpawnedJobs(1) as jobs:\n"
        "    jobs.submit('pid', os.getpid)\n"
        "    jobs.submit('pgrp', os.getpgrp)\n"
        "    jobs.submit('sleep', time.sleep, 120)\n"
        "    ids = [jobs._futures[k].result() for k in ('pid', 'pgrp')]\n"
        "    print(*ids, os.getpgrp(), flush=True)\n"
        "    time.sleep(120)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        child, child_group, parent_group = map(int, proc.stdout.readline().split())
        assert child_group == child != parent_group
        proc.kill()
        proc.wait(timeout=30)
        deadline = time.time() + 30
        while _alive(child):
            assert time.time() < deadline, "the child outlived its killed parent"
            time.sleep(0.2)
    finally:
        proc.kill()


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (Linux)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_gpu_estimate_counts_the_parallel_stages_once():
    from senseflow.toy.estimate import estimate_seconds

    est = estimate_seconds(PRESETS["gpu"])
    stages = {k: v for k, v in est.items() if k not in ("total", "wall")}
    assert est["total"] == pytest.approx(sum(stages.values()))
    side = est["backbones"] + est["featnet"] + est["classifiers"]
    assert est["wall"] == pytest.approx(est["total"] - min(side, est["vae"] + est["teacher"]))
    assert 0 < est["wall"] < est["total"]
