"""``python -m senseflow.bench`` on the tiny teachers (CPU): real engine iterations, every column and
phase printed with measured values, FLOPs from the counter, and the GPU-count plan on shipped results."""

from __future__ import annotations

import gzip
import json
import re
import sys

import pytest
import torch

from senseflow.bench import (
    FLOPS_CONVENTION,
    PHASE_COLUMNS,
    PROFILE_COLUMNS,
    RECIPES,
    TABLE_COLUMNS,
    UNATTRIBUTED,
    RecomputeTracker,
    bench_overrides,
    config_path,
    fit_memory,
)
from senseflow.config import load_config

from .conftest import REPO, run_cmd

NUM = r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?"
# one thread: the tiny models are latency-bound, and two threads on a busy CI machine spin (up to 10x slower)
ENV = {"OMP_NUM_THREADS": "1"}


def bench(cache, tmp_path, recipe: str, *extra: str):
    out = tmp_path / f"{recipe}.json"
    args = [sys.executable, "-m", "senseflow.bench", "--recipe", recipe, "--tiny"]
    args += ["--iters", "2", "--warmup", "1", "--out", str(out), *extra]
    r = run_cmd(args, cache, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout, json.loads(out.read_text()), r.stderr


def table_rows(stdout: str, header: tuple[str, ...]) -> list[list[str]]:
    """Cells of the Markdown table whose header row is ``header``."""
    lines = stdout.splitlines()
    start = next(
        i for i, line in enumerate(lines) if [c.strip() for c in line.strip("|").split("|")] == list(header)
    )
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def check_run(stdout: str, result: dict, phases: set[str], period: int) -> None:
    (row,) = table_rows(stdout, TABLE_COLUMNS)
    cells = dict(zip(TABLE_COLUMNS, row))
    assert cells["GPUs"] == "1" and cells["batch/GPU"] == "1" and cells["resolution"] == "128"
    for col in ("s/it mean", "s/it gen", "s/it other", "images/s", "TFLOP/it"):
        assert re.fullmatch(NUM, cells[col]) and float(cells[col]) > 0, (col, cells[col])
    assert cells["MFU"] == "n/a"  # no GPU
    assert re.search(rf"host RSS {NUM}", cells["peak GiB/GPU"])

    # every phase that ran has measured times; the generator-only phases are zero in other iterations
    rows = {r[0]: r for r in table_rows(stdout, PHASE_COLUMNS)}
    assert phases <= set(rows), set(rows)
    for name in phases:
        assert all(re.fullmatch(NUM, c) for c in rows[name][1:3]), rows[name]
        assert re.fullmatch(rf"{NUM}%", rows[name][3])
    assert float(rows["gen_backward_step"][1]) > 0 and float(rows["gen_backward_step"][2]) == 0
    assert float(rows["fake_step"][1]) > 0 and float(rows["fake_step"][2]) > 0

    # the JSON: --iters 2 rounded up to one TTUR period (one generator iteration), phase times add up
    sec = result["sec_per_iter"]
    assert (
        result["generator_period"] == period and result["iters"] == period and result["iters_generator"] == 1
    )
    assert [r["generator"] for r in sec["per_iteration"]].count(True) == 1
    assert sec["mean"] > 0 and sec["median_generator"] > 0 and sec["median_other"] > 0
    ttur = (sec["median_generator"] + (period - 1) * sec["median_other"]) / period
    assert sec["ttur_mean_of_medians"] == pytest.approx(ttur)
    named = {k: v for k, v in result["phases"].items() if k != UNATTRIBUTED}
    for kind in ("generator", "other"):
        total = sum(v[f"ms_{kind}_iter"] or 0 for v in named.values()) / 1000
        assert total == pytest.approx(sec[f"mean_{kind}"], rel=0.3), kind
    assert sum(v["share"] for v in named.values()) == pytest.approx(1.0, rel=0.3)
    assert result["images_per_sec"] == pytest.approx(1 / sec["mean"])

    # FLOPs from the counter on the replayed period: a generator iteration costs more than another
    f = result["flops"]
    assert f["convention"] == FLOPS_CONVENTION and f["counted_iterations"] == period
    assert f["model_per_generator_iter"] > f["model_per_other_iter"] > 0
    assert f["executed_per_iter"] >= f["model_per_iter"] > 0
    assert f["model_per_iter"] == pytest.approx(
        (f["model_per_generator_iter"] + (period - 1) * f["model_per_other_iter"]) / period
    )
    assert float(cells["TFLOP/it"]) == pytest.approx(f["model_per_iter"] / 1e12, rel=0.01)
    assert result["mfu"] is None and result["torch"] and result["date"]


def test_bench_sd35_tiny(tiny_cache, tmp_path):
    stdout, result, log = bench(tiny_cache, tmp_path, "sd35_medium", "train.seed=3")
    phases = {"text_encode", "vae_encode", "backward_simulation", "disc_conditioning", "gen_forward", "isg"}
    phases |= {"dm", "gan_generator", "gen_backward_step", "ida", "fake_step", "disc_step"}
    check_run(stdout, result, phases, period=10)
    assert result["overrides"][-1] == "train.seed=3"  # extra overrides come last
    # the first warm-up iteration logs each phase as it ends (a slow first iteration shows where it is)
    traced = re.findall(r"phase (\w+) done in", log)
    assert set(traced) == phases and traced.count("fake_step") == 1, traced
    assert re.search(rf"warm-up iteration 10 done in {NUM}s", log)
    f = result["flops"]
    # the checkpointed trained transformer and VAE decoder are recomputed in the generator's backward
    assert f["recompute_per_iter"] > 0
    gen_phases = f["phases"]
    assert (
        gen_phases["isg"]["model_per_generator_iter"] > 0 and gen_phases["isg"]["model_per_other_iter"] == 0
    )


def test_bench_sdxl_dmd2_tiny(tiny_cache, tmp_path):
    prof = tmp_path / "profile"
    stdout, result, _ = bench(tiny_cache, tmp_path, "sdxl_dmd2", "--profile", str(prof))
    phases = {"text_encode", "gen_forward", "dm", "classifier", "gen_backward_step", "fake_step"}
    check_run(stdout, result, phases, period=5)
    # --profile: one other and one generator iteration after the window, each phase a named range
    p = result["profile"]
    assert p["iterations"] == [11, 15]  # the window ends with the generator iteration 10
    assert {"other/fake_step", "generator/gen_backward_step", "generator/classifier"} <= set(p["phases"])
    assert "other/gen_backward_step" not in p["phases"]
    for v in p["phases"].values():
        assert v["wall_ms"] > 0 and v["gpu_busy_ms"] is None and v["gpu_busy_share"] is None  # no GPU
    # from the trace: the host's time in the range (at most its wall time plus the profiler's own work)
    # and the ATen operators dispatched in it
    fake = p["phases"]["other/fake_step"]
    assert 0 < fake["host_ms"] < 2 * fake["wall_ms"] and fake["aten_ops"] > 100
    assert dict(fake["top_ops"]).get("aten::addmm", 0) > 0 or fake["top_ops"][0][1] > 10
    rows = {r[0]: r for r in table_rows(stdout, PROFILE_COLUMNS)}
    assert set(rows) == set(p["phases"]) and re.fullmatch(NUM, rows["other/fake_step"][1])
    with gzip.open(prof / "trace_rank0.json.gz", "rt") as f:
        names = {e.get("name") for e in json.load(f)["traceEvents"]}
    assert {"other/fake_step", "generator/dm", "aten::addmm"} <= names
    ops = (prof / "ops_rank0.txt").read_text()
    assert "| self CPU ms |" in ops and "aten::addmm" in ops
    assert "generator/fake_step" not in ops  # phases are in the phase table, not among the operators
    assert "busy/wall" in (prof / "phases_rank0.txt").read_text()
    assert "disc_step" not in result["phases"] and "isg" not in result["phases"]  # no discriminator, no ISG
    assert result["flops"]["phases"]["classifier"]["model_per_generator_iter"] > 0


def test_plan_shipped_results(tiny_cache):
    r = run_cmd([sys.executable, "-m", "senseflow.bench", "--plan", "--memory-gib", "80", "141"], tiny_cache)
    assert r.returncode == 0, r.stderr[-3000:]
    shipped = {json.loads(p.read_text())["recipe"] for p in (REPO / "benchmarks" / "results").glob("*.json")}
    assert {"sd35_medium", "sd35_large", "sdxl", "sdxl_dmd2"} <= shipped
    rows = {row[0]: row for row in table_rows(r.stdout, tuple(_plan_header(r.stdout)))}
    assert {name.split(" [")[0] for name in rows} == shipped
    # runs with memory-changing overrides get rows of their own, out of the default's fit
    lean = "sd35_medium [model.shard_text_encoders=true, optimizer.name=adamw8bit]"
    assert rows[lean][1] == "2: 42.3" and "42.3" not in rows["sd35_medium"][1]
    for row in rows.values():
        for cell in row[-2:]:  # 80 GiB and 141 GiB
            assert re.fullmatch(rf"\d+ \({NUM}\)", cell), row
    # SD3.5 Medium measured 91.4 GiB on 1 GPU and 64.2 GiB/GPU on 2: two GPUs of 80 GiB, one of 141 GiB
    assert rows["sd35_medium"][-2].startswith("2 (") and rows["sd35_medium"][-1].startswith("1 (")
    assert "R + S/N" in r.stdout and "headroom" in r.stdout


def _plan_header(stdout: str) -> list[str]:
    line = next(line for line in stdout.splitlines() if line.startswith("| recipe"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_fit_memory():
    r, s, basis = fit_memory([(1, 91.4), (2, 64.2)], 0.5)
    assert (r, s) == pytest.approx((37.0, 54.4)) and "fit" in basis
    r, s, basis = fit_memory([(2, 60.0)], 0.5)  # one point: T/2 + T/4 = 60
    assert (r, s) == pytest.approx((40.0, 40.0)) and "assumed" in basis


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_configs_load(recipe):
    """Every recipe's full-size benchmark config and its tiny config validate (nothing is built)."""
    cfg = load_config(config_path(recipe, False), bench_overrides(recipe, False, None, None))
    assert cfg.model.random_init and cfg.paths.pretrained_model == RECIPES[recipe].arch
    assert cfg.data.format == "json" and cfg.train.resolution == 1024 and not cfg.checkpoint.enabled
    assert cfg.train.image_interval == 0
    tiny = load_config(config_path(recipe, True), bench_overrides(recipe, True, None, 2))
    assert tiny.paths.pretrained_model.startswith("tiny:") and tiny.train.batch_size == 2
    assert (REPO / RECIPES[recipe].launcher).is_file()


@pytest.mark.parametrize("checkpointed", [False, True])
def test_recompute_tracker(checkpointed):
    """Activation-checkpoint recomputation is counted apart: model FLOPs are the same either way."""
    from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop
    from torch.utils.flop_counter import FlopCounterMode

    block = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    x = torch.randn(4, 8, requires_grad=True)
    counter = FlopCounterMode(display=False)
    with counter, RecomputeTracker(counter) as rec, set_checkpoint_early_stop(False):
        y = checkpoint(block, x, use_reentrant=False) if checkpointed else block(x)
        y.square().sum().backward()
    forward = 2 * 4 * (8 * 16 + 16 * 8)  # two matmuls
    assert rec.recompute == (forward if checkpointed else 0)
    assert counter.get_total_flops() - rec.recompute == 3 * forward  # forward + backward (2x)


@pytest.mark.parametrize("recipe,teacher", [("sd35_medium", "tiny:sd3"), ("flux", "tiny:flux")])
def test_bench_inference_tiny(tiny_cache, tmp_path, recipe, teacher):
    """Ours and the stock diffusers pipeline on the same tiny networks: every row measured and printed."""
    out = tmp_path / "latency.json"
    args = [sys.executable, "-m", "senseflow.bench_inference", "--recipe", recipe, "--teacher", teacher]
    args += ["--batch-sizes", "1", "2", "--warmup", "0", "--repeats", "2", "--resolution", "64"]
    r = run_cmd([*args, "--device", "cpu", "--out", str(out)], tiny_cache, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["resolution"] == 64 and result["num_steps"] == 4 and len(result["levels"]) == 4
    rows = {(row["impl"], row["batch"]): row for row in result["rows"]}
    assert set(rows) == {(i, b) for i in ("ours", "diffusers") for b in (1, 2)}
    for (impl, batch), row in rows.items():
        assert len(row["times_s"]) == 2 and all(t > 0 for t in row["times_s"])
        assert row["median_s"] == pytest.approx(sorted(row["times_s"])[0] / 2 + sorted(row["times_s"])[1] / 2)
        assert row["images_per_s"] == pytest.approx(batch / row["median_s"])
        assert re.search(rf"\| {impl} \| {batch} \| {NUM} \| {NUM} \|", r.stdout), r.stdout
