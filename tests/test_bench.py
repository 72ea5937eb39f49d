"""``python -m senseflow.bench`` on the tiny teachers (CPU): real engine iterations, every column and
phase printed with measured values, FLOPs from the counter, and the GPU-count plan on shipped results."""

from __future__ import annotations

import copy
import gzip
import json
import re
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from senseflow.bench import (
    FLOPS_CONVENTION,
    GIB,
    PHASE_COLUMNS,
    PROFILE_COLUMNS,
    RECIPES,
    RESULTS_DIR,
    TABLE_COLUMNS,
    UNATTRIBUTED,
    RecomputeTracker,
    add_rates,
    bench_overrides,
    config_path,
    fit_memory,
    format_result,
    load_results,
    phase_peaks,
    run_benchmark,
    summarize,
    warmup_iterations,
)
from senseflow.config import load_config
from senseflow.profiling import OUTSIDE_PHASES, PeakTracker, PhaseTimer

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
    # no GPU: no peak memory per phase, in the table or the JSON
    assert {r[4] for r in rows.values()} == {"n/a"}, rows
    assert all(p["peak_gib_generator_iter"] is None for p in result["phases"].values())
    assert "phase_peak_gib_per_gpu" not in result["memory"] and "peak_phase" not in result["memory"]
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

    # the collector's pauses in the window: per iteration in the JSON, summed in the printed line
    gc_ms = result["host_gc"]
    per_it = [r["gc_seconds"] for r in sec["per_iteration"]]
    assert all(x >= 0 for x in per_it) and len(per_it) == period
    assert 1000 * sum(per_it) == pytest.approx(gc_ms["ms_total"], abs=1e-6)
    assert gc_ms["ms_per_iteration"] == pytest.approx(gc_ms["ms_total"] / period)
    assert gc_ms["collections"] == sum(g["collections"] for g in gc_ms["per_generation"].values())
    line = re.search(rf"host GC .*: (\d+) collections, ({NUM}) ms", stdout)
    assert line and int(line[1]) == gc_ms["collections"], stdout


def test_bench_sd35_tiny(tiny_cache, tmp_path):
    stdout, result, log = bench(tiny_cache, tmp_path, "sd35_medium", "train.seed=3")
    phases = {"text_encode", "vae_encode", "backward_simulation", "disc_conditioning", "gen_forward", "isg"}
    phases |= {"dm", "gan_generator", "gen_backward_step", "ida", "fake_step", "disc_step"}
    check_run(stdout, result, phases, period=10)
    assert result["text_embeddings"] == "encoded"
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
    stdout, result, log = bench(
        tiny_cache, tmp_path, "sdxl_dmd2", "--profile", str(prof), "--text-embeddings"
    )
    phases = {"text_encode", "gen_forward", "dm", "classifier", "gen_backward_step", "fake_step"}
    check_run(stdout, result, phases, period=5)
    # --text-embeddings: the prompts were encoded before the engine, which loaded no text encoder
    assert result["text_embeddings"] == "precomputed"
    assert re.search(r"paths.text_embeddings: \d+ precomputed prompt embeddings .* not loaded", log)
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
    assert {name.split(" [")[0].split(" ")[0] for name in rows} == shipped
    # runs at another batch size per GPU get rows of their own
    assert "sd35_medium 1024px x2" in {name.split(" [")[0] for name in rows}
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


# --------------------------------------------------------------------------------------------------
# Peak device memory per phase (no GPU here: the caching allocator's counters are faked)


class FakeAllocator:
    """The caching allocator's peak counters as :class:`PeakTracker` reads them, driven by hand (bytes):
    a reset sets the peaks to what is held now; freed memory stays reserved (cached) until emptied."""

    def __init__(self, held: int = 0):
        self.allocated = self.peak = self.reserved = self.peak_reserved = held
        self.devices: list[torch.device] = []

    def malloc(self, n: int) -> None:
        self.allocated += n
        self.peak = max(self.peak, self.allocated)
        self.reserved = max(self.reserved, self.allocated)
        self.peak_reserved = max(self.peak_reserved, self.reserved)

    def free(self, n: int) -> None:
        self.allocated -= n

    def spike(self, n: int) -> None:
        self.malloc(n)
        self.free(n)

    def empty_cache(self) -> None:
        self.reserved = self.allocated

    def max_allocated(self, device) -> int:
        self.devices.append(device)
        return self.peak

    def max_reserved(self, device) -> int:
        self.devices.append(device)
        return self.peak_reserved

    def reset(self, device) -> None:
        self.devices.append(device)
        self.peak, self.peak_reserved = self.allocated, self.reserved

    def tracker(self) -> PeakTracker:
        return PeakTracker(torch.device("cuda", 0), self.max_allocated, self.max_reserved, self.reset)


def test_peak_tracker_phases():
    alloc = FakeAllocator(held=100)
    t = alloc.tracker()
    t.enter()
    alloc.spike(20)
    t.exit("a")
    t.enter()
    alloc.spike(5)
    t.exit("b")
    for n in (30, 10):  # "a" again: its largest peak is kept, a lower one does not replace it
        t.enter()
        alloc.spike(n)
        t.exit("a")
    alloc.malloc(7)  # held across the next phase: part of its peak
    t.enter()
    t.exit("c")
    alloc.free(7)
    assert t.collect() == {"a": 130, "b": 105, "c": 107, OUTSIDE_PHASES: 107}
    # collect starts afresh: nothing ran since, the outside stretch holds the base only
    assert t.collect() == {OUTSIDE_PHASES: 100}
    assert set(alloc.devices) == {torch.device("cuda", 0)}


@pytest.mark.parametrize("where", ["before", "between", "after"])
def test_peak_tracker_outside_phases(where):
    """The stretches before the first phase, between two and after the last count as outside phases."""
    alloc = FakeAllocator(held=100)
    t = alloc.tracker()
    if where == "before":
        alloc.spike(50)
    t.enter()
    alloc.spike(10)
    t.exit("a")
    if where == "between":
        alloc.spike(50)
    t.enter()
    alloc.spike(20)
    t.exit("b")
    if where == "after":
        alloc.spike(50)
    assert t.collect() == {"a": 110, "b": 120, OUTSIDE_PHASES: 150}


def test_peak_tracker_reserved_and_clear():
    alloc = FakeAllocator(held=100)
    t = alloc.tracker()
    t.enter()
    alloc.spike(60)  # reserves 160
    t.exit("a")
    alloc.empty_cache()  # back to 100 reserved: the device's counter forgets 160 at the next reset
    t.enter()
    alloc.spike(10)
    t.exit("b")
    assert t.collect() == {"a": 160, "b": 110, OUTSIDE_PHASES: 100}
    assert t.reserved == 160 and alloc.peak_reserved == 110  # the largest over all readings
    t.collect()
    assert t.reserved == 160  # collect keeps the reserved peak
    t.enter()
    alloc.spike(5)
    t.exit("x")
    alloc.spike(70)  # outside phases, never read
    alloc.empty_cache()
    t.clear()
    assert t.reserved == 0 and t.peaks == {} and t.outside == 0
    # the device's counters were reset too: the 70 above is not read as outside the phases
    assert t.collect() == {OUTSIDE_PHASES: 100} and t.reserved == 100


def _patch_cuda_counters(monkeypatch, alloc: FakeAllocator) -> None:
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", alloc.max_allocated)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", alloc.max_reserved)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", alloc.reset)


def test_peak_tracker_defaults_read_torch_cuda(monkeypatch):
    """Without injected counters the tracker and a CUDA PhaseTimer read torch.cuda's, at each call."""
    alloc = FakeAllocator(held=100)
    t = PeakTracker(torch.device("cuda", 1))  # built before the patch: the functions are looked up late
    timer = PhaseTimer(torch.device("cuda", 1))
    _patch_cuda_counters(monkeypatch, alloc)
    t.enter()
    alloc.spike(40)
    t.exit("a")
    assert t.collect() == {"a": 140, OUTSIDE_PHASES: 100}
    assert set(alloc.devices) == {torch.device("cuda", 1)}

    assert timer.collect_memory() == {}  # memory not set
    timer.memory = True
    alloc.spike(500)
    timer.reset_memory()  # forgets the spike before it
    alloc.spike(3)
    assert timer.collect_memory() == {OUTSIDE_PHASES: 103} and timer.peak_reserved == 600


def test_phase_timer_memory_on_cpu(monkeypatch):
    """On a CPU, ``memory`` records nothing and never calls into torch.cuda; phases are still timed."""

    def no_cuda(*args, **kwargs):
        raise AssertionError("torch.cuda called on a CPU timer")

    for name in ("max_memory_allocated", "max_memory_reserved", "reset_peak_memory_stats", "synchronize"):
        monkeypatch.setattr(torch.cuda, name, no_cuda)
    timer = PhaseTimer(torch.device("cpu"), enabled=True)
    timer.memory = True
    timer.reset_memory()
    for name in ("a", "b", "a"):
        with timer.phase(name):
            torch.ones(64).sum()
    assert timer.collect_memory() == {} and timer.peak_reserved == 0
    times = timer.collect()
    assert set(times) == {"a", "b"} and all(v >= 0 for v in times.values())


def test_phase_peaks():
    records = [
        {"generator": False, "peak_bytes": {"fake_step": 3 * GIB, OUTSIDE_PHASES: GIB}},
        {"generator": True, "peak_bytes": {"fake_step": 2 * GIB, "gen_backward_step": 5 * GIB}},
        {"generator": False, "peak_bytes": {"fake_step": 4 * GIB, OUTSIDE_PHASES: GIB // 2}},
        {"generator": False, "peak_bytes": {}},  # a CPU run
        {"generator": True},  # a record from before peak_bytes
    ]
    assert phase_peaks(records) == {
        "generator": {"fake_step": 2.0, "gen_backward_step": 5.0},
        "other": {"fake_step": 4.0, OUTSIDE_PHASES: 1.0},
    }
    assert phase_peaks(records[3:]) == {"generator": {}, "other": {}}


class _FakeEvent:
    """torch.cuda.Event on the host clock."""

    def __init__(self, enable_timing: bool = False):
        self.t = None

    def record(self, stream=None) -> None:
        self.t = time.perf_counter()

    def elapsed_time(self, end: _FakeEvent) -> float:
        return 1000 * (end.t - self.t)


class _FakeGpuEngine:
    """What run_benchmark drives, on a 'GPU' whose allocator is a FakeAllocator (GiB): 2 held; each
    iteration 1 more in text_encode, 0.5 between phases, 5 in fake_step (3 in a generator iteration) and 8
    in gen_backward_step; the warm-up iteration also spikes 50 GiB (outside the measured window)."""

    def __init__(self, alloc: FakeAllocator, period: int = 2):
        self.alloc = alloc
        self.device = torch.device("cuda", 0)
        self.d = SimpleNamespace(generator_period=period)
        self.timer = PhaseTimer(self.device)
        self.loader = [{"prompt": ["a"]}] * 10
        self.rng = SimpleNamespace(state_dict=lambda: {})
        net = torch.nn.Linear(1, 1)
        self.G = self.F = SimpleNamespace(net=net, opt=SimpleNamespace(state={}))
        self._teacher = net
        self.warmup_ks: list[int] = []

    def run_iteration(self, k: int, batch: dict) -> dict:
        a, phase, gen = self.alloc, self.timer.phase, k % self.d.generator_period == 0
        if not self.timer.memory:  # the warm-up
            self.warmup_ks.append(k)
            a.spike(50 * GIB)
        with phase("text_encode"):
            a.spike(GIB)
        a.spike(GIB // 2)
        with phase("fake_step"):
            a.spike((3 if gen else 5) * GIB)
        if gen:
            with phase("gen_backward_step"):
                a.spike(8 * GIB)
        return {}


@pytest.mark.parametrize(
    "period,warmup,generator_runs,expected",
    [
        (10, 4, 1, [7, 8, 9, 10]),  # ends with the generator iteration k = P
        (10, 15, 1, list(range(6, 21))),  # longer than a period: still ends with one
        (10, 4, 2, list(range(10, 21))),  # CUDA graphs: two generator iterations, P and 2P
        (10, 0, 1, []),
        (1, 3, 2, [1, 2, 3]),
    ],
)
def test_warmup_iterations(period, warmup, generator_runs, expected):
    ks = warmup_iterations(period, warmup, generator_runs)
    assert ks == expected
    if ks:
        assert ks[-1] % period == 0 and sum(k % period == 0 for k in ks) >= generator_runs


def test_run_benchmark_warms_up_cuda_graphs(monkeypatch):
    """An engine that replays CUDA graphs gets a warm-up through its second generator iteration."""
    alloc = FakeAllocator(held=2 * GIB)
    _patch_cuda_counters(monkeypatch, alloc)
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    engine = _FakeGpuEngine(alloc, period=2)
    engine.loader = [{"prompt": ["a"]}] * 20
    engine.compile_modes = True
    raw = run_benchmark(engine, warmup=1, iters=2, flops=False)
    assert engine.warmup_ks == raw["warmup_ks"] == [2, 3, 4]
    assert [r["k"] for r in raw["records"]] == [5, 6]


@pytest.fixture
def fake_gpu_raw(monkeypatch):
    """run_benchmark's raw output of a 'GPU' run (1 warm-up iteration, one TTUR period of 2)."""
    alloc = FakeAllocator(held=2 * GIB)
    _patch_cuda_counters(monkeypatch, alloc)
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    engine = _FakeGpuEngine(alloc)
    raw = run_benchmark(engine, warmup=1, iters=2, flops=False)
    assert engine.warmup_ks == [2] and not engine.timer.memory  # memory tracked in the window only
    return raw


def test_run_benchmark_phase_peaks(fake_gpu_raw):
    raw = fake_gpu_raw
    other, gen = raw["records"]
    assert (other["k"], other["generator"], gen["k"], gen["generator"]) == (3, False, 4, True)
    half = GIB // 2
    assert other["peak_bytes"] == {
        "text_encode": 3 * GIB,
        "fake_step": 7 * GIB,
        OUTSIDE_PHASES: 2 * GIB + half,
    }
    assert gen["peak_bytes"] == {
        "text_encode": 3 * GIB,
        "fake_step": 5 * GIB,
        "gen_backward_step": 10 * GIB,
        OUTSIDE_PHASES: 2 * GIB + half,
    }
    assert set(gen["phases"]) == {"text_encode", "fake_step", "gen_backward_step"}
    mem = raw["memory"]
    # the window's peak is the largest phase peak; the warm-up's 50 GiB spike is out of it, but the
    # memory it left cached stays reserved
    assert mem["peak_allocated_gib_per_gpu"] == [10.0] and mem["peak_reserved_gib_per_gpu"] == [52.0]
    assert mem["phase_peak_gib_per_gpu"] == [
        {
            "generator": {
                "text_encode": 3.0,
                "fake_step": 5.0,
                "gen_backward_step": 10.0,
                OUTSIDE_PHASES: 2.5,
            },
            "other": {"text_encode": 3.0, "fake_step": 7.0, OUTSIDE_PHASES: 2.5},
        }
    ]


def _two_rank_result(raw: dict, rank1: dict) -> dict:
    """``raw`` as if a second GPU had measured ``rank1`` (phase peaks, GiB), summarised with metadata."""
    raw = copy.deepcopy(raw)
    mem = raw["memory"]
    mem["phase_peak_gib_per_gpu"].append(rank1)
    mem["peak_allocated_gib_per_gpu"].append(max(v for p in rank1.values() for v in p.values()))
    mem["peak_reserved_gib_per_gpu"].append(40.0)
    for key in ("sharded_state_gib_per_gpu", "host_max_rss_gib_per_process"):
        mem[key].append(mem[key][0])
    result = {
        "recipe": "sd35_medium",
        "tiny": False,
        "world_size": 2,
        "device_name": "NVIDIA H200",
        "resolution": 1024,
        "batch_size_per_gpu": 1,
        **summarize(raw),
    }
    add_rates(result, 989.0)
    return result


def test_summarize_and_format_phase_peaks(fake_gpu_raw):
    rank1 = {
        "generator": {"text_encode": 3.5, "fake_step": 4.0, "gen_backward_step": 9.0, OUTSIDE_PHASES: 2.0},
        "other": {"text_encode": 3.5, "fake_step": 8.0, OUTSIDE_PHASES: 2.0},
    }
    r = _two_rank_result(fake_gpu_raw, rank1)
    # per phase and kind of iteration the largest over the two GPUs; None where a phase does not run
    peaks = {
        name: (p["peak_gib_generator_iter"], p["peak_gib_other_iter"]) for name, p in r["phases"].items()
    }
    assert peaks == {
        "text_encode": (3.5, 3.5),
        "fake_step": (5.0, 8.0),
        "gen_backward_step": (10.0, None),
        UNATTRIBUTED: (2.5, 2.5),
    }
    mem = r["memory"]
    assert mem["peak_phase"] == {"phase": "gen_backward_step", "iterations": "generator", "gib": 10.0}
    assert mem["peak_allocated_gib"] == 10.0 and mem["peak_reserved_gib"] == 52.0

    text = format_result(r)
    rows = {row[0]: row for row in table_rows(text, PHASE_COLUMNS)}
    cells = {name: row[PHASE_COLUMNS.index("peak GiB gen / other")] for name, row in rows.items()}
    assert cells == {
        "text_encode": "3.5 / 3.5",
        "fake_step": "5.0 / 8.0",
        "gen_backward_step": "10.0 / -",
        UNATTRIBUTED: "2.5 / 2.5",
    }
    assert "; peak 10.0 GiB in gen_backward_step (generator iterations)." in text
    assert "peak GiB: torch.cuda.max_memory_allocated within the phase" in text
    (row,) = table_rows(text, TABLE_COLUMNS)
    assert row[TABLE_COLUMNS.index("peak GiB/GPU")] == "10.0 (52.0 rsv)"
    # as written by --out and read back by --show
    assert format_result(json.loads(json.dumps(r))) == text


def test_peak_phase_ties_and_outside(fake_gpu_raw):
    """A tie goes to the named phase; a peak between phases is reported as outside them."""
    rank1 = {"generator": {OUTSIDE_PHASES: 1.0}, "other": {OUTSIDE_PHASES: 10.0}}
    r = _two_rank_result(fake_gpu_raw, rank1)
    assert r["memory"]["peak_phase"] == {"phase": "gen_backward_step", "iterations": "generator", "gib": 10.0}
    rank1["other"][OUTSIDE_PHASES] = 10.5
    r = _two_rank_result(fake_gpu_raw, rank1)
    assert r["memory"]["peak_phase"] == {"phase": UNATTRIBUTED, "iterations": "other", "gib": 10.5}
    assert r["memory"]["peak_allocated_gib"] == 10.5
    text = format_result(r)
    assert "; peak 10.5 GiB outside phases (other iterations)." in text


SHIPPED_RESULTS = sorted(RESULTS_DIR.glob("*.json"))


def test_shipped_bench_results_exist():
    assert len([p for p in SHIPPED_RESULTS if p.name.startswith("bench_")]) >= 10


@pytest.mark.parametrize("path", SHIPPED_RESULTS, ids=[p.name for p in SHIPPED_RESULTS])
def test_shipped_results_format(path):
    """Results stored before the per-phase peaks read back (as ``--show`` does) and format, ``n/a`` in
    the peak column; results with them show ``gen / other`` GiB."""
    (r,) = load_results([str(path)])
    text = format_result(r)
    if not r["phases"]:  # transcribed results (not bench_*.json) carry no phase breakdown
        assert not path.name.startswith("bench_") and "| phase |" not in text
        return
    rows = table_rows(text, PHASE_COLUMNS)
    assert [row[0] for row in rows] == list(r["phases"])
    column = [row[PHASE_COLUMNS.index("peak GiB gen / other")] for row in rows]
    if "phase_peak_gib_per_gpu" not in r["memory"]:
        assert set(column) == {"n/a"}, column
        assert "within the phase" not in text and "peak_phase" not in r["memory"]
    else:
        assert all(re.fullmatch(r"(\d+\.\d|-) / (\d+\.\d|-)", c) for c in column), column


def test_plan_replicated_runs_do_not_shrink_with_gpus():
    """``model.fsdp=never`` replicates the nets: the plan counts the whole peak as replicated memory."""
    from senseflow.bench import plan

    runs = [
        {
            "recipe": "sd35_medium",
            "resolution": 1024,
            "batch_size_per_gpu": 1,
            "world_size": n,
            "overrides": ["model.fsdp=never"],
            "memory": {"peak_allocated_gib": m, "sharded_state_gib_per_gpu": [30.0] * n},
        }
        for n, m in [(1, 56.0), (2, 57.0)]
    ]
    rows, _, _ = plan(runs, [80.0, 48.0], 0.1, None)
    (row,) = rows
    assert row["sharded_gib"] == 0 and row["replicated_gib"] == 57.0 and "model.fsdp=never" in row["basis"]
    assert row["fits"][80.0]["gpus"] == 1 and row["fits"][48.0]["gpus"] is None


def test_flop_count_out_of_memory_keeps_the_timed_results(tiny_cache, tmp_path, monkeypatch, capsys):
    """The FLOP count replays a period eagerly after the window; a replay that runs out of GPU memory
    (as on an 80 GB H100 at full size) must not lose the measured iterations: the JSON is written before
    the count, and the single-process run ends with the timings and no MFU."""
    from senseflow import bench as bench_mod

    out = tmp_path / "result.json"
    seen = {}

    def out_of_memory(*args, **kwargs):
        seen["partial"] = json.loads(out.read_text())
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 48.00 MiB.")

    monkeypatch.setattr(bench_mod, "count_flops", out_of_memory)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = ["--recipe", "sdxl_dmd2", "--tiny", "--iters", "2", "--warmup", "1", "--out", str(out)]
        assert bench_mod.main(args) == 0
    finally:
        torch.set_num_threads(threads)
    partial, result = seen["partial"], json.loads(out.read_text())
    assert partial["flops_error"].startswith("pending") and "flops" not in partial
    assert partial["sec_per_iter"]["mean"] > 0 and partial["iters"] == 5
    assert result["sec_per_iter"] == partial["sec_per_iter"] and result["phases"] == partial["phases"]
    assert "flops" not in result and result["mfu"] is None
    assert result["flops_error"].startswith("out of GPU memory in the eager replay (CUDA out of memory.")
    stdout = capsys.readouterr().out
    assert "TFLOP/it and MFU: n/a, no FLOP count (out of GPU memory" in stdout
    (row,) = table_rows(stdout, TABLE_COLUMNS)
    cells = dict(zip(TABLE_COLUMNS, row))
    assert cells["TFLOP/it"] == "n/a" and float(cells["s/it mean"]) > 0


def test_options_may_follow_overrides():
    """``--no-flops`` after a config override (as ``tools/gpu_check.sh``'s BENCH_EXTRA may put it) is an
    option, not an unrecognised argument."""
    from senseflow.bench import parse_args

    args = parse_args(["--recipe", "sd35_medium", "model.compile_blocks=true", "--no-flops", "train.seed=3"])
    assert args.no_flops and args.overrides == ["model.compile_blocks=true", "train.seed=3"]
    args = parse_args(["--recipe", "sd35_medium", "train.seed=3", "--memory-cap", "58"])
    assert args.memory_cap == 58.0 and args.overrides == ["train.seed=3"]


def test_gc_pauses_records_collections():
    """:class:`GcPauses` times each collection while open (here forced ones, generation 2) and no longer
    after; :meth:`take` returns the seconds since its last call."""
    import gc

    from senseflow.profiling import GcPauses

    with GcPauses() as pauses:
        junk = [[] for _ in range(1000)]
        for item in junk:
            item.append(item)  # cycles for the collector to find
        del junk, item
        gc.collect()
        first = pauses.take()
        gc.collect()
    gc.collect()  # after the context: not recorded
    summary = pauses.summary()
    assert summary["collections"] >= 2 and summary["per_generation"]["2"]["collections"] >= 2
    assert first > 0 and pauses.take() > 0 and pauses.take() == 0
    assert summary["ms_total"] >= summary["ms_longest"] > 0


def test_cuda_graph_results_are_marked_and_left_out_of_the_plan():
    """A run with CUDA graphs understates its allocated peak (replays allocate nothing): the table marks
    its peak, and ``--plan`` does not fit memory to it. Older results say so only in their overrides."""
    from senseflow.bench import uses_cuda_graphs

    old = {
        "overrides": ["model.compile_blocks=true", "discriminator.compile_mode=reduce-overhead"],
        "memory": {},
    }
    new = {"overrides": [], "memory": {"cuda_graphs": True}}
    eager = {"overrides": ["model.compile_mode=null"], "memory": {"cuda_graphs": False}}
    assert uses_cuda_graphs(old) and uses_cuda_graphs(new) and not uses_cuda_graphs(eager)
    assert not uses_cuda_graphs({"overrides": []})
    from senseflow.bench import plan

    def run(n, gib, graphs):
        memory = {"peak_allocated_gib": gib, "sharded_state_gib_per_gpu": [30.0] * n, "cuda_graphs": graphs}
        return {
            "recipe": "sd35_medium",
            "resolution": 1024,
            "batch_size_per_gpu": 1,
            "world_size": n,
            "overrides": [],
            "memory": memory,
        }

    measured = [run(1, 56.0, False), run(2, 41.0, False)]
    rows, _, _ = plan(measured + [run(1, 30.0, True)], [80.0], 0.1, None)
    assert rows == plan(measured, [80.0], 0.1, None)[0]  # the understated CUDA-graph peak changes nothing


def test_private_pool_bytes_counts_the_graph_pools_only():
    """The bench's ``graph_pools_gib``: segments of private pools (CUDA graphs) summed, the default pool's not."""
    from senseflow.profiling import private_pool_bytes

    segments = [
        {"total_size": 2 << 20, "segment_pool_id": (0, 0)},
        {"total_size": 3 << 20, "segment_pool_id": (0, 1)},
        {"total_size": 5 << 20, "segment_pool_id": [1, 0]},
    ]
    assert private_pool_bytes(segments) == 8 << 20
    assert private_pool_bytes([]) == 0
