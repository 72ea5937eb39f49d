"""Benchmark a recipe: real training iterations of the engine, timed per phase, with FLOPs and memory.

    python -m senseflow.bench --recipe sd35_medium [--iters 10] [--warmup 3] [--out result.json]
    torchrun --standalone --nproc_per_node 2 -m senseflow.bench --recipe sd35_large --out large_2gpu.json
    python -m senseflow.bench --recipe sd35_medium --tiny --iters 2 --warmup 1      # CPU / CI
    python -m senseflow.bench --plan --memory-gib 80 141 [--results a.json b.json ...]
    python -m senseflow.bench --show benchmarks/results/*.json

A benchmark run builds the recipe at full architecture size with random weights (``arch:`` teachers and
discriminator backbones, no download; ``--tiny``: the recipe's tiny config as it is), then drives
:meth:`Engine.run_iteration` itself: ``--warmup`` iterations, then ``--iters`` rounded up to a multiple of
the TTUR period ``P = distill.generator_period``, so the measured window holds generator and other
iterations in the training proportion 1 : P − 1. The warm-up ends with a generator iteration (its
one-time costs, e.g. the generator's optimiser states, stay out of the window). Each iteration is timed
by wall clock (``torch.cuda.synchronize`` before and after; the batch is fetched before the clock
starts), its phases by :class:`~senseflow.profiling.PhaseTimer`, which on a GPU also records the peak
of allocated memory in each phase and between phases (the device's peak counters are reset at every phase
boundary in the window; the window's peak is the largest of them).

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on a replay of the window's first
period (P iterations, one of them a generator iteration) with the random streams reset to the window's
start, so the counted iterations take the same branches (backward simulation, its length) as the timed
ones. See :data:`FLOPS_CONVENTION` for what is counted; MFU uses the model FLOPs, which exclude
activation-checkpoint recomputation.

``--plan`` predicts, from measured results, how many GPUs of a given memory each recipe needs (see
:func:`plan`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import glob
import gzip
import json
import logging
import math
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import textwrap
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .errors import ConfigError, SenseFlowError
from .output import emit
from .parallel import local_tensor
from .profiling import OUTSIDE_PHASES, GcPauses, private_pool_bytes

logger = logging.getLogger("senseflow.bench")

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
SCHEMA = "senseflow.bench/1"
GIB = 2**30


@dataclass(frozen=True)
class Recipe:
    """A benchmarkable recipe: its config, full-size teacher architecture, launcher and tiny config."""

    config: str
    arch: str
    launcher: str
    tiny_config: str


RECIPES: dict[str, Recipe] = {
    "sd35_medium": Recipe(
        "configs/SD35/sd35_senseflow.yaml",
        "arch:sd35_medium",
        "exp_sd35/train_SD35_senseflow.sh",
        "configs/tiny/sd35_senseflow_tiny.yaml",
    ),
    "sd35_large": Recipe(
        "configs/SD35/sd35_large_senseflow.yaml",
        "arch:sd35_large",
        "exp_sd35/train_SD35_large_senseflow.sh",
        "configs/tiny/sd35_large_senseflow_tiny.yaml",
    ),
    "flux": Recipe(
        "configs/FLUX/flux_senseflow.yaml",
        "arch:flux_dev",
        "exp_flux/train_flux_senseflow.sh",
        "configs/tiny/flux_senseflow_tiny.yaml",
    ),
    "sdxl": Recipe(
        "configs/sdxl/sdxl_senseflow.yaml",
        "arch:sdxl_base",
        "exp_sdxl/train_sdxl_senseflow.sh",
        "configs/tiny/sdxl_senseflow_tiny.yaml",
    ),
    "sdxl_dmd2": Recipe(
        "configs/sdxl/sdxl_dmd2.yaml",
        "arch:sdxl_base",
        "exp_sdxl/train_sdxl_dmd2.sh",
        "configs/tiny/sdxl_dmd2_tiny.yaml",
    ),
    "decoupled": Recipe(
        "configs/SD35/sd35_senseflow_decoupled.yaml",
        "arch:sd35_medium",
        "exp_sd35/train_SD35_senseflow_decoupled.sh",
        "configs/tiny/sd35_senseflow_decoupled_tiny.yaml",
    ),
}

# throw-away run: no checkpoints, no image strips, no progress bar
BENCH_OVERRIDES = ("checkpoint.enabled=false", "train.image_interval=0", "log.progress_bar=false")
# full architecture size with random weights, no download (the teacher is added per recipe)
FULL_OVERRIDES = (
    "model.random_init=true",
    "paths.dataset=tiny:shapes",
    "data.format=json",
    "paths.dino=arch:dinov2_large",
    "paths.clip=arch:clip_vit_l14",
)

# dense bf16 tensor-core peak (TFLOP/s, no sparsity) by GPU name; the first matching entry wins
GPU_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0))

# phases of Engine.run_iteration, in execution order
PHASES = (
    "text_encode",
    "vae_encode",
    "backward_simulation",
    "disc_conditioning",
    "gen_forward",
    "isg",
    "dm",
    "classifier",
    "gan_generator",
    "gen_backward_step",
    "ida",
    "fake_state_offload",
    "fake_step",
    "vae_decode",
    "disc_step",
)
UNATTRIBUTED = OUTSIDE_PHASES
ITER_KINDS = ("generator", "other")

FLOPS_CONVENTION = (
    "FLOPs counted by torch.utils.flop_counter.FlopCounterMode on a replay of one TTUR period of the "
    "measured window (same random branches): matrix multiplications, convolutions and attention "
    "(scaled_dot_product_attention kernels) of every forward and backward pass that ran, 2 FLOPs per "
    "multiply-add; element-wise ops, normalisations, softmax outside fused attention and optimiser "
    "updates are not counted. 'Model FLOPs' exclude activation-checkpoint recomputation (ops run inside "
    "a module forward called during backward, counted with checkpoint early-stop off); 'executed FLOPs' "
    "include it. TFLOP/it and MFU are per iteration of all GPUs together: MFU = model FLOPs per "
    "iteration / (mean s/it x peak bf16 FLOP/s x GPUs)."
)

TABLE_COLUMNS = (
    "recipe",
    "GPUs",
    "GPU name",
    "resolution",
    "batch/GPU",
    "s/it mean",
    "s/it gen",
    "s/it other",
    "images/s",
    "peak GiB/GPU",
    "TFLOP/it",
    "MFU",
)
PHASE_COLUMNS = ("phase", "ms/gen iter", "ms/other iter", "share", "peak GiB gen / other")
PROFILE_COLUMNS = ("iteration/phase", "wall ms", "host ms", "GPU busy ms", "busy/wall", "GPU ops", "ATen ops")


# --------------------------------------------------------------------------------------------------
# Building the run


def bench_overrides(recipe: str, tiny: bool, resolution: int | None, batch_size: int | None) -> list[str]:
    """Config overrides of a benchmark run (before the user's own ``key=value`` overrides)."""
    out = list(BENCH_OVERRIDES)
    if not tiny:
        out += [*FULL_OVERRIDES, f"paths.pretrained_model={RECIPES[recipe].arch}"]
        out.append(f"train.resolution={resolution or 1024}")
    elif resolution:
        out.append(f"train.resolution={resolution}")
    if batch_size:
        out.append(f"train.batch_size={batch_size}")
    return out


def config_path(recipe: str, tiny: bool) -> Path:
    """The recipe's YAML (tiny or full), relative to the repository."""
    r = RECIPES[recipe]
    return REPO / (r.tiny_config if tiny else r.config)


def gpu_peak_tflops(name: str, flag: float | None) -> float:
    """Dense bf16 peak of the GPU ``name``: ``--gpu-tflops`` if given, else from the known table."""
    if flag:
        return float(flag)
    for key, tflops in GPU_BF16_TFLOPS:
        if key in name:
            return tflops
    raise ConfigError(
        f"--gpu-tflops: unknown bf16 peak for GPU {name!r}; pass its dense bf16 TFLOP/s (e.g. --gpu-tflops 989)"
    )


# --------------------------------------------------------------------------------------------------
# Measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gather(obj: Any) -> list[Any]:
    """``obj`` of every rank (a one-element list without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _tensor_bytes(t: torch.Tensor) -> int:
    """Bytes this rank stores for ``t`` on its device (the local shard of a DTensor; inner tensors of a
    subclass; nothing for a tensor whose storage is freed)."""
    t = local_tensor(t)
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    if t.untyped_storage().nbytes() == 0:  # freed on the device (offloaded optimiser state)
        return 0
    return t.numel() * t.element_size()


def sharded_state_bytes(engine) -> int:
    """Bytes on this rank of the persistent state FSDP2 shards over the ranks: the local shards of the
    generator's, fake score's and teacher's parameters and the generator's and fake score's optimiser
    states (all of them in a single process, sharded there or not: ``model.fsdp``)."""
    total = 0
    for net in (engine.G.net, engine.F.net, engine._teacher):  # parked or not (no unpark)
        total += sum(_tensor_bytes(p) for p in net.parameters())
    for opt in (engine.G.opt, engine.F.opt):
        for state in opt.state.values():
            total += sum(_tensor_bytes(v) for v in state.values() if isinstance(v, torch.Tensor))
    return total


class RecomputeTracker:
    """Splits a :class:`FlopCounterMode` count into model FLOPs and activation-checkpoint recomputation.

    A module forward that starts while the autograd engine runs a backward is a recomputation
    (``torch.utils.checkpoint``); the counter's total grows by the recomputed FLOPs until that outermost
    forward returns. Requires checkpoint early stop off (else the recomputed forward never returns).
    """

    def __init__(self, counter):
        self.counter = counter
        self.depth = 0
        self.recompute = 0
        self._start = 0
        self._handles: list = []

    def _pre(self, module, args) -> None:
        if self.depth or torch._C._current_graph_task_id() != -1:
            if self.depth == 0:
                self._start = self.counter.get_total_flops()
            self.depth += 1

    def _post(self, module, args, output) -> None:
        if self.depth:
            self.depth -= 1
            if self.depth == 0:
                self.recompute += self.counter.get_total_flops() - self._start

    def __enter__(self):
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        self._handles = [
            register_module_forward_pre_hook(self._pre),
            register_module_forward_hook(self._post),
        ]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()


def count_flops(engine, ks: list[int], batches: list[dict], rng_state: dict) -> list[dict[str, Any]]:
    """Replay iterations ``ks`` on ``batches`` from ``rng_state`` under FlopCounterMode; per iteration the
    executed and recomputed FLOPs, in total and per phase (this rank)."""
    from torch.utils.checkpoint import set_checkpoint_early_stop
    from torch.utils.flop_counter import FlopCounterMode

    logging.getLogger("torch.utils.module_tracker").setLevel(logging.WARNING)
    engine.rng.load_state_dict(rng_state)
    timer = engine.timer
    out = []
    for k, batch in zip(ks, batches):
        counter = FlopCounterMode(display=False)
        phases: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        with counter, RecomputeTracker(counter) as rec, set_checkpoint_early_stop(False):
            original = timer.phase

            @contextlib.contextmanager
            def phase(name, original=original, counter=counter, rec=rec, phases=phases):
                f0, r0 = counter.get_total_flops(), rec.recompute
                with original(name):
                    yield
                phases[name][0] += counter.get_total_flops() - f0
                phases[name][1] += rec.recompute - r0

            timer.phase = phase  # instance attribute shadows the method for this iteration
            try:
                engine.run_iteration(k, batch)
            finally:
                del timer.phase
        timer.collect()  # drop the replay's phase times
        out.append(
            {
                "k": k,
                "generator": k % engine.d.generator_period == 0,
                "executed": counter.get_total_flops(),
                "recompute": rec.recompute,
                "phases": {name: {"executed": e, "recompute": r} for name, (e, r) in phases.items()},
            }
        )
    return out


GPU_ACTIVITY = ("kernel", "gpu_memcpy", "gpu_memset")


def _union_ms(intervals: list[tuple[float, float]], lo: float, hi: float) -> float:
    """Milliseconds of ``[lo, hi]`` covered by the union of ``intervals`` (µs, sorted by start)."""
    busy, end = 0.0, lo
    for a, b in intervals:
        if b <= end:
            continue
        if a >= hi:
            break
        a, b = max(a, end), min(b, hi)
        if b > a:
            busy += b - a
            end = b
    return busy / 1000


def trace_phase_stats(events: list[dict], keys: list[str], top: int = 6) -> dict[str, dict[str, Any]]:
    """Per phase range ``key`` of a Chrome trace from ``torch.profiler``: host time (the range on the CPU
    side), GPU busy time (union of kernels, copies and memsets inside the range's GPU-side extent) and its
    number of device activities, the number of ATen operators the host dispatched and the most frequent
    of them. GPU fields are None without device activity (a CPU run)."""
    import bisect

    host: dict[str, tuple[float, float]] = {}
    gpu: dict[str, list[float]] = {}
    for e in events:
        name, cat = e.get("name"), e.get("cat")
        if name not in keys or "dur" not in e:
            continue
        if cat == "user_annotation":
            host[name] = (e["ts"], e["ts"] + e["dur"])
        elif cat == "gpu_user_annotation":  # one per stream the range used: take their extent
            lo, hi = gpu.get(name, [math.inf, -math.inf])
            gpu[name] = [min(lo, e["ts"]), max(hi, e["ts"] + e["dur"])]
    device = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in GPU_ACTIVITY)
    ops = sorted((e["ts"], e["name"]) for e in events if e.get("cat") == "cpu_op")
    op_ts = [t for t, _ in ops]
    stats = {}
    for key in keys:
        lo, hi = host.get(key, (0.0, 0.0))
        names = [n for _, n in ops[bisect.bisect_left(op_ts, lo) : bisect.bisect_right(op_ts, hi)]]
        aten = [n for n in names if n.startswith("aten::")]
        common = defaultdict(int)
        for n in aten:
            common[n] += 1
        entry: dict[str, Any] = {
            "host_ms": (hi - lo) / 1000,
            "aten_ops": len(aten),
            "top_ops": sorted(common.items(), key=lambda kv: -kv[1])[:top],
            "gpu_busy_ms": None,
            "gpu_activities": None,
        }
        if key in gpu and device:
            g_lo, g_hi = gpu[key]
            entry["gpu_busy_ms"] = _union_ms(device, g_lo, g_hi)
            entry["gpu_activities"] = sum(1 for a, b in device if a >= g_lo and b <= g_hi)
        stats[key] = entry
    return stats


def profile_iterations(engine, ks: list[int], batches: list[dict], out_dir: Path) -> dict[str, Any]:
    """Run iterations ``ks`` under ``torch.profiler`` (collective) and write this rank's results to ``out_dir``.

    Files: ``trace_rank<r>.json.gz`` (Chrome / Perfetto trace; every phase is a range named
    ``<generator|other>/<phase>``), ``ops_rank<r>.txt`` (operators by self device time, by CPU time on a
    CPU run) and ``phases_rank<r>.txt``. Returns per iteration kind and phase its wall time (CUDA events,
    inflated by the profiler's own host overhead), the host time spent issuing it, the GPU busy time
    (:func:`trace_phase_stats`) and busy / wall: a phase whose GPU is busy for a small part of its wall
    time waits on the host (launches, Python, synchronisation), not on the GPU.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    device, timer, period = engine.device, engine.timer, engine.d.generator_period
    cuda = device.type == "cuda"
    kinds = ["generator" if k % period == 0 else "other" for k in ks]
    original = timer.phase
    current = {"kind": kinds[0]}

    @contextlib.contextmanager
    def phase(name):
        with record_function(f"{current['kind']}/{name}"), original(name):
            yield

    timer.collect()
    walls: dict[str, float] = {}
    timer.phase = phase  # instance attribute shadows the method while profiling
    try:
        with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
            for k, kind, batch in zip(ks, kinds, batches):
                current["kind"] = kind
                engine.run_iteration(k, batch)
                _sync(device)
                walls.update({f"{kind}/{name}": sec for name, sec in timer.collect().items()})
    finally:
        del timer.phase
    rank = dist.get_rank() if dist.is_initialized() else 0
    out_dir.mkdir(parents=True, exist_ok=True)
    trace = out_dir / f"trace_rank{rank}.json"
    prof.export_chrome_trace(str(trace))
    raw = trace.read_bytes()  # read once: parsed here, kept compressed
    trace.unlink()
    stats = trace_phase_stats(json.loads(raw)["traceEvents"], list(walls))
    with gzip.open(f"{trace}.gz", "wb") as dst:
        dst.write(raw)
    events = [e for e in prof.key_averages() if e.key not in walls]  # operators and kernels, not phases
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    events.sort(key=lambda e: -getattr(e, attr, 0))
    op_rows = [
        [
            e.key[:100],
            str(e.count),
            _fmt(getattr(e, attr, 0) / 1000, ".1f"),
            _fmt(e.cpu_time_total / 1000, ".1f"),
        ]
        for e in events[:80]
    ]
    op_head = ("operator / kernel", "calls", f"self {'device' if cuda else 'CPU'} ms", "CPU total ms")
    (out_dir / f"ops_rank{rank}.txt").write_text(_table(op_head, op_rows) + "\n")
    phases = {}
    for key, wall in walls.items():
        st = stats[key]
        busy = st["gpu_busy_ms"]
        phases[key] = {
            "wall_ms": 1000 * wall,
            "host_ms": st["host_ms"],
            "gpu_busy_ms": busy,
            "gpu_busy_share": busy / (1000 * wall) if busy is not None and wall else None,
            "gpu_activities": st["gpu_activities"],
            "aten_ops": st["aten_ops"],
            "top_ops": st["top_ops"],
        }
    head = f"iterations {ks} ({', '.join(kinds)}), rank {rank}"
    detail = "\n".join(
        f"{key}: " + ", ".join(f"{n} x{c}" for n, c in p["top_ops"]) for key, p in phases.items()
    )
    text = _table(PROFILE_COLUMNS, profile_rows(phases))
    (out_dir / f"phases_rank{rank}.txt").write_text(
        f"{head}\n\n{text}\n\nmost frequent operators\n{detail}\n"
    )
    logger.info("profile of %s written to %s", head, out_dir)
    return {"iterations": ks, "dir": str(out_dir), "phases": phases}


def profile_rows(phases: dict[str, dict[str, Any]]) -> list[list[str]]:
    """Rows of :data:`PROFILE_COLUMNS` (``n/a`` for fields a result stored before them lacks: profiles
    from before the trace-based table have only ``wall_ms``, ``kernel_ms`` and ``kernel_share``)."""
    return [
        [
            key,
            _fmt(p["wall_ms"], ".1f"),
            _fmt(p.get("host_ms"), ".1f"),
            _fmt(p.get("gpu_busy_ms"), ".1f"),
            _fmt(p.get("gpu_busy_share"), ".0%"),
            _fmt(p.get("gpu_activities")),
            _fmt(p.get("aten_ops")),
        ]
        for key, p in phases.items()
    ]


def phase_peaks(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per iteration kind (:data:`ITER_KINDS`), the largest peak of allocated memory (GiB) of each phase and
    of the stretches outside phases (:data:`UNATTRIBUTED`) over ``records`` (their ``peak_bytes``)."""
    out: dict[str, dict[str, float]] = {kind: {} for kind in ITER_KINDS}
    for r in records:
        peaks = out["generator" if r["generator"] else "other"]
        for name, nbytes in r.get("peak_bytes", {}).items():
            peaks[name] = max(peaks.get(name, 0.0), nbytes / GIB)
    return out


def warmup_iterations(period: int, warmup: int, generator_runs: int = 1) -> list[int]:
    """The warm-up's iteration numbers: at least ``warmup`` of them and ``generator_runs`` generator
    iterations (``k % period == 0``), ending with one, so that its one-time costs (the generator's optimiser
    states, compilation, CUDA-graph recording) stay out of the window. ``[]`` for ``warmup`` 0 and one run."""
    if warmup <= 0 and generator_runs <= 1:
        return []
    count = max(warmup, (generator_runs - 1) * period + 1)
    end = period * max(generator_runs, math.ceil(count / period))
    return list(range(max(1, end - count + 1), end + 1))


def run_benchmark(
    engine,
    warmup: int,
    iters: int,
    flops: bool = True,
    profile_dir: Path | None = None,
    on_window: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Warm-up, the timed window, the optional profile of one other and one generator iteration after it,
    and the FLOP count (collective: every rank calls it); rank-local results plus the gathered per-rank
    memory and FLOPs.

    ``on_window`` receives the results without FLOPs before the count starts (the count replays a TTUR
    period eagerly and can fail where the timed window fit, e.g. out of GPU memory). In a single process
    a count that runs out of memory is logged and skipped (``flops_error``); with several ranks it
    raises, since the other ranks wait in a collective."""
    device, period = engine.device, engine.d.generator_period
    measured = math.ceil(iters / period) * period
    # CUDA graphs (model.compile_mode, discriminator.compile_mode) are recorded at the second run of each
    # path through the compiled code: the warm-up then holds two generator iterations
    warm_ks = warmup_iterations(
        period, warmup, generator_runs=2 if getattr(engine, "compile_modes", False) else 1
    )
    if len(warm_ks) > warmup:
        logger.info(
            "warm-up of %d iterations (not %d): CUDA graphs are recorded at the second generator iteration",
            len(warm_ks),
            warmup,
        )
    first = warm_ks[-1] + 1 if warm_ks else 1
    window_ks = list(range(first, first + measured))
    engine.timer.enabled = True
    loader = iter(engine.loader)
    t0 = time.perf_counter()
    for i, k in enumerate(warm_ks):
        engine.timer.trace = i == 0  # the first iteration logs each phase: compilation shows where it is
        start = time.perf_counter()
        engine.run_iteration(k, next(loader))
        _sync(device)
        logger.info("warm-up iteration %d done in %.1fs", k, time.perf_counter() - start)
    engine.timer.trace = False
    engine.timer.collect()
    logger.info("warm-up: %d iterations in %.1fs", len(warm_ks), time.perf_counter() - t0)
    engine.timer.reset_memory()  # the device's peak counters (CUDA) and the timer's phase peaks
    engine.timer.memory = True  # peak memory per phase, in the timed window only
    rng_state = engine.rng.state_dict()
    records, replay_batches = [], []
    gc_pauses = GcPauses()  # open during the timed iterations only
    for k in window_ks:
        batch = next(loader)
        if len(replay_batches) < period:
            replay_batches.append(batch)
        _sync(device)
        start = time.perf_counter()
        with gc_pauses:
            engine.run_iteration(k, batch)
        _sync(device)
        seconds = time.perf_counter() - start
        records.append(
            {
                "k": k,
                "generator": k % period == 0,
                "seconds": seconds,
                "gc_seconds": gc_pauses.take(),
                "phases": engine.timer.collect(),
                "peak_bytes": engine.timer.collect_memory(),  # per phase, this rank; empty on a CPU
            }
        )
        logger.info("iteration %d (%s): %.3fs", k, "generator" if k % period == 0 else "other", seconds)
    engine.timer.memory = False

    memory: dict[str, Any] = {"sharded_state_gib_per_gpu": _gather(sharded_state_bytes(engine) / GIB)}
    if device.type == "cuda":
        # the timer reset the peak counters at each phase boundary: the window's peak is the largest of
        # its phases' and in-between stretches' peaks
        peaks = phase_peaks(records)
        memory["peak_allocated_gib_per_gpu"] = _gather(max(v for p in peaks.values() for v in p.values()))
        memory["peak_reserved_gib_per_gpu"] = _gather(engine.timer.peak_reserved / GIB)
        memory["phase_peak_gib_per_gpu"] = _gather(peaks)
        memory["cuda_graphs"] = bool(getattr(engine, "compile_modes", False))
        try:  # at the window's end; other allocator backends (cudaMallocAsync) have no snapshot
            pools = private_pool_bytes() / GIB
        except RuntimeError:
            pools = -1.0
        pools = _gather(pools)  # a collective: every rank takes part
        if min(pools) >= 0:
            memory["graph_pools_gib_per_gpu"] = pools
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    memory["host_max_rss_gib_per_process"] = _gather(rss / (GIB if sys.platform == "darwin" else 2**20))

    profiled = None
    if profile_dir is not None:  # after the window, outside its memory peak and timings
        ks = [window_ks[-1] + 1, window_ks[-1] + period]
        profiled = profile_iterations(engine, ks, [next(loader) for _ in ks], profile_dir)

    raw = {
        "period": period,
        "warmup_ks": warm_ks,
        "records": records,
        "memory": memory,
        "flops": None,
        "profile": profiled,
        "host_gc": gc_pauses.summary(),
    }
    if not flops:
        return raw
    if on_window is not None:
        on_window({**raw, "flops_error": "pending: the FLOP count had not finished"})
    t0 = time.perf_counter()
    try:
        raw["flops"] = _gather(count_flops(engine, window_ks[:period], replay_batches, rng_state))
    except torch.OutOfMemoryError as err:
        if dist.is_initialized() and dist.get_world_size() > 1:
            raise
        first = str(err).strip().splitlines()[0][:200]
        raw["flops_error"] = f"out of GPU memory in the eager replay ({first})"
        logger.error(
            "FLOP count failed: %s; the timed results stand, without MFU (--no-flops skips the count; "
            "a GPU with more memory can count it)",
            raw["flops_error"],
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return raw
    logger.info("FLOP count of %d replayed iterations in %.1fs", period, time.perf_counter() - t0)
    return raw


# --------------------------------------------------------------------------------------------------
# Summaries


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def summarize_flops(per_rank: list[list[dict]]) -> dict[str, Any]:
    """Sum the ranks' counts per replayed iteration; means per iteration kind and over the period."""
    n_iters = len(per_rank[0])
    iters = []
    for i in range(n_iters):
        recs = [rank[i] for rank in per_rank]
        phases: dict[str, dict[str, int]] = defaultdict(lambda: {"executed": 0, "recompute": 0})
        for r in recs:
            for name, v in r["phases"].items():
                phases[name]["executed"] += v["executed"]
                phases[name]["recompute"] += v["recompute"]
        iters.append(
            {
                "k": recs[0]["k"],
                "generator": recs[0]["generator"],
                "executed": sum(r["executed"] for r in recs),
                "recompute": sum(r["recompute"] for r in recs),
                "phases": dict(phases),
            }
        )

    def model(it):
        return it["executed"] - it["recompute"]

    gen = [it for it in iters if it["generator"]]
    other = [it for it in iters if not it["generator"]]
    phase_names = sorted({n for it in iters for n in it["phases"]}, key=_phase_order)

    def phase_mean(its, name, key):
        vals = [it["phases"].get(name, {}).get(key, 0) for it in its]
        return _mean(vals)

    return {
        "convention": FLOPS_CONVENTION,
        "counted_iterations": len(iters),
        "model_per_iter": _mean([model(it) for it in iters]),
        "executed_per_iter": _mean([it["executed"] for it in iters]),
        "recompute_per_iter": _mean([it["recompute"] for it in iters]),
        "model_per_generator_iter": _mean([model(it) for it in gen]),
        "model_per_other_iter": _mean([model(it) for it in other]),
        "phases": {
            name: {
                "model_per_generator_iter": (phase_mean(gen, name, "executed") or 0)
                - (phase_mean(gen, name, "recompute") or 0),
                "model_per_other_iter": (phase_mean(other, name, "executed") or 0)
                - (phase_mean(other, name, "recompute") or 0),
            }
            for name in phase_names
        },
        "per_iteration": iters,
    }


def _phase_order(name: str) -> tuple[int, str]:
    return (PHASES.index(name) if name in PHASES else len(PHASES), name)


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """Times, phase breakdown, memory and FLOPs of :func:`run_benchmark`'s output (no metadata)."""
    period, records = raw["period"], raw["records"]
    gen = [r["seconds"] for r in records if r["generator"]]
    other = [r["seconds"] for r in records if not r["generator"]]
    med_gen, med_other = _median(gen), _median(other)
    if med_gen is not None and med_other is not None:
        ttur = (med_gen + (period - 1) * med_other) / period
    else:  # P = 1: every iteration is a generator iteration
        ttur = med_gen if med_gen is not None else med_other
    sec = {
        "mean": statistics.fmean(r["seconds"] for r in records),
        "ttur_mean_of_medians": ttur,
        "median_generator": med_gen,
        "median_other": med_other,
        "mean_generator": _mean(gen),
        "mean_other": _mean(other),
        "per_iteration": [
            {
                "k": r["k"],
                "generator": r["generator"],
                "seconds": r["seconds"],
                "gc_seconds": r.get("gc_seconds"),
            }
            for r in records
        ],
    }
    total_time = sum(r["seconds"] for r in records)
    names = sorted({n for r in records for n in r["phases"]}, key=_phase_order)
    # peak GiB per phase and iteration kind, the largest over GPUs (None: not measured, or not run)
    per_rank = raw["memory"].get("phase_peak_gib_per_gpu") or []

    def peak(name: str, kind: str) -> float | None:
        vals = [rank[kind][name] for rank in per_rank if name in rank.get(kind, {})]
        return max(vals) if vals else None

    phases = {}
    for name in names:
        g = [r["phases"].get(name, 0.0) for r in records if r["generator"]]
        o = [r["phases"].get(name, 0.0) for r in records if not r["generator"]]
        phases[name] = {
            "ms_generator_iter": 1000 * _mean(g) if g else None,
            "ms_other_iter": 1000 * _mean(o) if o else None,
            "share": sum(g + o) / total_time,
        }
    outside = [r["seconds"] - sum(r["phases"].values()) for r in records]
    g = [x for x, r in zip(outside, records) if r["generator"]]
    o = [x for x, r in zip(outside, records) if not r["generator"]]
    phases[UNATTRIBUTED] = {
        "ms_generator_iter": 1000 * _mean(g) if g else None,
        "ms_other_iter": 1000 * _mean(o) if o else None,
        "share": sum(outside) / total_time,
    }
    for name, p in phases.items():
        p["peak_gib_generator_iter"] = peak(name, "generator")
        p["peak_gib_other_iter"] = peak(name, "other")
    memory = dict(raw["memory"])
    if "peak_allocated_gib_per_gpu" in memory:
        memory["peak_allocated_gib"] = max(memory["peak_allocated_gib_per_gpu"])
        memory["peak_reserved_gib"] = max(memory["peak_reserved_gib_per_gpu"])
    if memory.get("graph_pools_gib_per_gpu"):
        memory["graph_pools_gib"] = max(memory["graph_pools_gib_per_gpu"])
    # where the window's peak is reached (ties: a named phase before the stretches between phases)
    candidates = [
        (p[f"peak_gib_{kind}_iter"], name == UNATTRIBUTED, _phase_order(name), name, kind)
        for name, p in phases.items()
        for kind in ITER_KINDS
        if p[f"peak_gib_{kind}_iter"] is not None
    ]
    if candidates:
        gib, _, _, name, kind = min(candidates, key=lambda c: (-c[0], c[1], c[2]))
        memory["peak_phase"] = {"phase": name, "iterations": kind, "gib": gib}
    out = {
        "generator_period": period,
        "warmup_iterations": raw["warmup_ks"],
        "iters": len(records),
        "iters_generator": len(gen),
        "sec_per_iter": sec,
        "phases": phases,
        "memory": memory,
    }
    if raw.get("host_gc") is not None:
        out["host_gc"] = {**raw["host_gc"], "ms_per_iteration": raw["host_gc"]["ms_total"] / len(records)}
    if raw.get("profile"):
        out["profile"] = raw["profile"]
    if raw["flops"] is not None:
        out["flops"] = summarize_flops(raw["flops"])
    elif raw.get("flops_error"):
        out["flops_error"] = raw["flops_error"]
    return out


def add_rates(result: dict[str, Any], peak_tflops: float | None) -> None:
    """Images/s and MFU (in place)."""
    mean = result["sec_per_iter"]["mean"]
    result["images_per_sec"] = result["world_size"] * result["batch_size_per_gpu"] / mean
    flops = result.get("flops")
    result["gpu_bf16_peak_tflops"] = peak_tflops
    if flops and peak_tflops:
        denom = mean * peak_tflops * 1e12 * result["world_size"]
        result["mfu"] = flops["model_per_iter"] / denom
        result["hfu"] = flops["executed_per_iter"] / denom  # recomputation included
    else:
        result["mfu"] = result["hfu"] = None


# --------------------------------------------------------------------------------------------------
# Printing


def _fmt(x: Any, spec: str = ".3g") -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return format(x, spec)
    return str(x)


def _table(header: tuple[str, ...] | list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def uses_cuda_graphs(r: dict[str, Any]) -> bool:
    """Whether a result's run replayed CUDA graphs (``model.compile_mode`` / ``discriminator.compile_mode``;
    older results say so only in their overrides). Its allocated peak then leaves out the tensors that the
    graphs' replays create in their private memory pools (no allocator call), so it understates the
    footprint: the SD3.5 Medium 1-GPU command with CUDA graphs reported 54.8 GiB allocated and 70.8
    reserved, and ran out of memory under ``--memory-cap 58`` with 9.4 GiB in the graphs' pools."""
    if r.get("memory", {}).get("cuda_graphs") is not None:
        return bool(r["memory"]["cuda_graphs"])
    return any(o.replace(" ", "").endswith("compile_mode=reduce-overhead") for o in r.get("overrides", []))


def result_row(r: dict[str, Any]) -> list[str]:
    """One row of the main table for a result JSON."""
    sec, mem = r["sec_per_iter"], r.get("memory", {})
    if mem.get("peak_allocated_gib") is not None:
        peak = f"{mem['peak_allocated_gib']:.1f}" + ("*" if uses_cuda_graphs(r) else "")
        if mem.get("peak_reserved_gib") is not None:
            peak += f" ({mem['peak_reserved_gib']:.1f} rsv)"
    elif mem.get("host_max_rss_gib_per_process"):
        peak = f"n/a (host RSS {max(mem['host_max_rss_gib_per_process']):.2f})"
    else:
        peak = "n/a"
    flops = r.get("flops") or {}
    model = flops.get("model_per_iter")
    return [
        r["recipe"] + (" (tiny)" if r.get("tiny") else ""),
        str(r["world_size"]),
        r.get("device_name", "n/a"),
        str(r["resolution"]),
        str(r["batch_size_per_gpu"]),
        _fmt(sec["mean"]),
        _fmt(sec.get("median_generator")),
        _fmt(sec.get("median_other")),
        _fmt(r.get("images_per_sec")),
        peak,
        _fmt(model / 1e12 if model is not None else None),
        f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a",
    ]


def _peak_cell(p: dict[str, Any]) -> str:
    """``gen / other`` peak GiB of a phase row; ``-`` for a kind of iteration it does not run in."""
    cells = [p.get(f"peak_gib_{kind}_iter") for kind in ITER_KINDS]
    return " / ".join("-" if x is None else f"{x:.1f}" for x in cells)


def format_result(r: dict[str, Any]) -> str:
    """The main table, the phase table and the notes of one result."""
    sec = r["sec_per_iter"]
    lines = [_table(TABLE_COLUMNS, [result_row(r)]), ""]
    if r.get("iters"):
        window = f"{r['iters']} iterations ({r['iters_generator']} generator, TTUR period P = {r['generator_period']})"
    else:
        window = f"the timed iterations (TTUR period P = {r['generator_period']})"
    lines.append(
        f"s/it mean: plain mean of {window}; TTUR-weighted mean of the medians (gen + (P-1) other)/P = "
        f"{_fmt(sec.get('ttur_mean_of_medians'))}; s/it gen and other are medians; "
        f"images/s = GPUs x batch / s/it mean."
    )
    mem = r.get("memory", {})
    if mem.get("note"):
        lines.append(f"peak GiB/GPU: {mem['note']}.")
    elif mem.get("peak_allocated_gib") is None:
        lines.append(
            "peak GiB/GPU: no GPU; host RSS is the process's maximum resident memory over its lifetime."
        )
    else:
        where = ""
        if mem.get("peak_phase"):
            at = mem["peak_phase"]
            place = "outside phases" if at["phase"] == UNATTRIBUTED else f"in {at['phase']}"
            where = f"; peak {at['gib']:.1f} GiB {place} ({at['iterations']} iterations)"
        lines.append(
            "peak GiB/GPU: torch.cuda.max_memory_allocated after warm-up, max over GPUs (reserved in brackets)"
            f"{where}."
        )
        if uses_cuda_graphs(r):
            lines.append(
                "*: CUDA graphs: the allocated peak leaves out what their replays hold in the graphs' private "
                "pools; the reserved peak bounds the footprint, and --memory-cap proves a fit."
                + (
                    f" The pools held {mem['graph_pools_gib']:.1f} GiB at the window's end."
                    if mem.get("graph_pools_gib") is not None
                    else ""
                )
            )
        if r.get("memory_cap_gib"):
            lines.append(f"run under --memory-cap {r['memory_cap_gib']:g} GiB per GPU.")
    if r.get("host_gc"):
        g = r["host_gc"]
        lines.append(
            f"host GC (Python's cyclic collector, rank 0, timed window): {g['collections']} collections, "
            f"{g['ms_total']:.1f} ms ({g['ms_per_iteration']:.1f} ms per iteration), longest {g['ms_longest']:.1f} ms."
        )
    if r.get("flops"):
        f = r["flops"]
        if r.get("mfu") is not None:
            rate = (
                f"MFU against {r['gpu_bf16_peak_tflops']:g} bf16 TFLOP/s per GPU; HFU {100 * r['hfu']:.1f}%."
            )
        else:
            rate = "MFU n/a without a GPU."
        lines.append(
            f"TFLOP/it: model FLOPs per iteration of all GPUs ({_fmt(f['executed_per_iter'] / 1e12)} executed "
            f"incl. recomputation; generator iteration {_fmt((f['model_per_generator_iter'] or 0) / 1e12)}, "
            f"other {_fmt((f['model_per_other_iter'] or 0) / 1e12)}). {rate}"
        )
    elif r.get("flops_error"):
        lines.append(f"TFLOP/it and MFU: n/a, no FLOP count ({r['flops_error']}).")
    if r.get("phases"):
        # per-phase peaks are known when any phase has one (not on a CPU, nor in results from before them)
        known = any(
            p.get(f"peak_gib_{kind}_iter") is not None for p in r["phases"].values() for kind in ITER_KINDS
        )
        rows = []
        for name, p in r["phases"].items():
            rows.append(
                [
                    name,
                    _fmt(p["ms_generator_iter"], ".1f"),
                    _fmt(p["ms_other_iter"], ".1f"),
                    f"{100 * p['share']:.1f}%",
                    _peak_cell(p) if known else "n/a",
                ]
            )
        lines += ["", _table(PHASE_COLUMNS, rows)]
        lines.append("ms: mean per iteration of each kind (rank 0); share: of the measured window's time.")
        if known:
            lines.append(
                "peak GiB: torch.cuda.max_memory_allocated within the phase (outside phases: between them), "
                "largest over the window's iterations of each kind and over GPUs; - where it does not run."
            )
    if r.get("profile"):
        prof = r["profile"]
        rows = profile_rows(prof["phases"])
        lines += ["", _table(PROFILE_COLUMNS, rows)]
        lines.append(
            f"profile (rank 0, iterations {prof['iterations']} after the window, under torch.profiler, whose "
            "host overhead inflates wall and host times): wall by CUDA events; host = time the CPU spent "
            "issuing the phase; GPU busy = union of its kernels, copies and memsets; GPU ops = their "
            f"number; ATen ops = operators dispatched. Traces and operator tables in {prof['dir']}."
        )
    if r.get("source"):
        lines.append(f"source: {r['source']}")
    if r.get("note"):
        lines.append(f"note: {r['note']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Planning


def load_results(paths: list[str]) -> list[dict[str, Any]]:
    """Read result JSONs (files or glob patterns); the default is the shipped ``benchmarks/results``."""
    files: list[str] = []
    for p in paths or [str(RESULTS_DIR / "*.json")]:
        matched = sorted(glob.glob(p))
        if not matched and not Path(p).is_file():
            raise ConfigError(f"--results: no result file matches {p}")
        files += matched or [p]
    out = []
    for f in files:
        r = json.loads(Path(f).read_text())
        if r.get("schema") != SCHEMA:
            raise ConfigError(f"--results: {f} is not a senseflow.bench result (schema {r.get('schema')!r})")
        r["_file"] = f
        out.append(r)
    return out


# overrides that do not change what a run holds in memory (bookkeeping, data and weight sources; the
# resolution and batch size are part of the plan key on their own)
MEMORY_NEUTRAL = (
    "checkpoint.",
    "log.",
    "paths.",
    "data.format",
    "model.random_init",
    "train.image_interval",
    "train.log_interval",
    "train.iter_num",
    "train.seed",
    "train.resolution",
    "train.batch_size",
    # speed switches; measured on H200 with the same peaks (SD3.5 Medium: 91.4 GiB compiled or not on 1 GPU,
    # 64.3 on 2; 46.4 with the memory options, compiled or not)
    "model.compile_blocks",
    "discriminator.compile_heads",
    "model.cudnn_benchmark",
)


def plan_key(r: dict[str, Any]) -> str:
    """Results of one setup (recipe, tiny or not, resolution, batch per GPU, and any override that may
    change memory, e.g. ``optimizer.name=adamw8bit``) are fitted together."""
    key = r["recipe"] + (" (tiny)" if r.get("tiny") else "")
    if r["resolution"] != 1024 or r["batch_size_per_gpu"] != 1:
        key += f" {r['resolution']}px x{r['batch_size_per_gpu']}"
    settings = sorted(o for o in r.get("overrides", []) if not o.startswith(MEMORY_NEUTRAL))
    if settings:
        key += f" [{', '.join(settings)}]"
    return key


def fit_memory(points: list[tuple[int, float]], share: float) -> tuple[float, float, str]:
    """``(R, S, basis)`` of the model peak(N) = R + S/N (GiB per GPU at N GPUs).

    Two or more GPU counts: least squares in 1/N (exact for two). One count N0 with peak M0: the
    sharded part is ``share`` of the 1-GPU peak T, so M0 = T·(1 − share) + T·share/N0.
    """
    ns = sorted({n for n, _ in points})
    if len(ns) >= 2:
        peak = {n: max(m for k, m in points if k == n) for n in ns}
        xs, ys = [1 / n for n in ns], [peak[n] for n in ns]
        xm, ym = statistics.fmean(xs), statistics.fmean(ys)
        s = sum((x - xm) * (y - ym) for x, y in zip(xs, ys)) / sum((x - xm) ** 2 for x in xs)
        s = max(s, 0.0)
        r = max(ym - s * xm, 0.0)
        return r, s, "fit: " + ", ".join(f"{n} GPU{'s' if n > 1 else ''}" for n in ns)
    n0, m0 = ns[0], max(m for _, m in points)
    total = m0 / ((1 - share) + share / n0)
    return total * (1 - share), total * share, f"assumed sharded share {100 * share:.0f}% (1 point)"


def plan(results: list[dict[str, Any]], memories: list[float], headroom: float, share: float | None):
    """Per recipe: replicated and sharded memory and the smallest GPU count that fits each memory size.

    Memory model: peak allocated per GPU at N GPUs = R + S/N, R the replicated part (text encoders, VAE,
    discriminator, activations, unsharded blocks in flight), S the FSDP2-sharded part (trained weights,
    optimiser states, gradients, teacher). A recipe fits when R + S/N <= (1 - headroom) x memory.
    """
    by_recipe: dict[str, list[dict]] = defaultdict(list)
    for r in results:  # CUDA-graph runs understate their allocated peak (uses_cuda_graphs)
        if r.get("memory", {}).get("peak_allocated_gib") is not None and not uses_cuda_graphs(r):
            by_recipe[plan_key(r)].append(r)

    def replicated(rs: list[dict]) -> bool:  # nothing sharded: the peak does not fall with more GPUs
        return "model.fsdp=never" in [o.replace(" ", "") for o in rs[0].get("overrides", [])]

    fitted = {}
    for name, rs in by_recipe.items():
        if replicated(rs):
            continue
        points = [(r["world_size"], r["memory"]["peak_allocated_gib"]) for r in rs]
        if len({n for n, _ in points}) >= 2:
            fitted[name] = fit_memory(points, 0.5)
    if share is None:
        shares = [s / (r + s) for r, s, _ in fitted.values() if r + s > 0]
        share = statistics.fmean(shares) if shares else 0.5
        share_source = (
            f"as fitted for {', '.join(sorted(fitted))}"
            if shares
            else "a default: no recipe measured at two GPU counts"
        )
    else:
        share_source = "--sharded-share"
    rows = []
    for name in sorted(by_recipe):
        rs = by_recipe[name]
        points = [(r["world_size"], r["memory"]["peak_allocated_gib"]) for r in rs]
        if replicated(rs):
            rep, sh, basis = max(m for _, m in points), 0.0, "replicated on every GPU (model.fsdp=never)"
        elif name in fitted:
            rep, sh, basis = fitted[name]
        else:
            measured = [r for r in rs if r["memory"].get("sharded_state_gib_per_gpu")]
            if measured:  # measured sharded state of a bench run (gradients counted as replicated)
                r0 = max(measured, key=lambda r: r["memory"]["peak_allocated_gib"])
                n0 = r0["world_size"]
                sh = sum(r0["memory"]["sharded_state_gib_per_gpu"])
                rep = max(r0["memory"]["peak_allocated_gib"] - sh / n0, 0.0)
                basis = "measured sharded states (1 point)"
            else:
                rep, sh, basis = fit_memory(points, share)
        fits = {}
        for mem in memories:
            usable = mem * (1 - headroom)
            n = next((n for n in range(1, 257) if rep + sh / n <= usable), None)
            fits[mem] = {"gpus": n, "predicted_gib_per_gpu": rep + sh / n if n else None}
        rows.append(
            {
                "recipe": name,
                "measured": sorted(points),
                "replicated_gib": rep,
                "sharded_gib": sh,
                "basis": basis,
                "fits": fits,
            }
        )
    return rows, share, share_source


def format_plan(rows, memories: list[float], headroom: float, share: float, share_source: str) -> str:
    """The plan table and the assumptions it rests on."""
    header = ["recipe", "measured GiB/GPU (GPUs: GiB)", "replicated R", "sharded S", "basis"]
    header += [f"{m:g} GiB: GPUs (GiB/GPU)" for m in memories]
    table = []
    for row in rows:
        cells = [
            row["recipe"],
            ", ".join(f"{n}: {m:.1f}" for n, m in row["measured"]),
            f"{row['replicated_gib']:.1f}",
            f"{row['sharded_gib']:.1f}",
            row["basis"],
        ]
        for m in memories:
            f = row["fits"][m]
            cells.append(
                f"{f['gpus']} ({f['predicted_gib_per_gpu']:.1f})"
                if f["gpus"]
                else f"does not fit (R {row['replicated_gib']:.1f} > {m * (1 - headroom):.1f})"
            )
        table.append(cells)
    notes = (
        "Assumes peak allocated memory per GPU at N GPUs = R + S/N: the FSDP2-sharded part S (trained "
        "weights, optimiser states, gradients, teacher) scales as 1/N, the replicated part R (text encoders, "
        "VAE, discriminator, activations, all-gathered blocks) is constant; batch per GPU and resolution as "
        "measured. R and S are fitted to measurements at two or more GPU counts; a recipe measured at one "
        "count uses the measured sharded states of its bench run when present, else a sharded share of "
        f"{100 * share:.0f}% of its 1-GPU peak ({share_source}); recipes that keep less sharded state "
        "(8-bit AdamW: sd35_large, flux; bf16 master weights: flux) then need more GPUs than shown. A recipe "
        f"fits when R + S/N <= {100 * (1 - headroom):.0f}% of the GPU memory ({100 * headroom:.0f}% headroom "
        "for the CUDA context, NCCL buffers and allocator fragmentation); the smallest such N is shown with "
        "its predicted peak."
    )
    return _table(header, table) + "\n\n" + textwrap.fill(notes, 110)


# --------------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m senseflow.bench",
        description="Benchmark a recipe's training iterations (time per phase, memory, FLOPs), or plan GPU counts.",
    )
    p.add_argument("--recipe", choices=sorted(RECIPES), help="recipe to benchmark")
    p.add_argument(
        "--iters", type=int, default=10, help="measured iterations (rounded up to a multiple of P)"
    )
    p.add_argument("--warmup", type=int, default=3, help="warm-up iterations (not measured)")
    p.add_argument(
        "--resolution", type=int, help="image resolution (default 1024 at full size, the tiny config's)"
    )
    p.add_argument("--batch-size", type=int, help="images per GPU (default: the config's)")
    p.add_argument(
        "--tiny", action="store_true", help="the recipe's tiny config (configs/tiny/) as it is (CPU/CI)"
    )
    p.add_argument("--out", help="write the result JSON here")
    p.add_argument(
        "--gpu-tflops", type=float, help="dense bf16 peak TFLOP/s of one GPU for MFU (H100/H200: 989)"
    )
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count (and MFU)")
    p.add_argument(
        "--memory-cap",
        type=float,
        metavar="GIB",
        help="limit each process to GIB of GPU memory (torch.cuda.set_per_process_memory_fraction), so a "
        "run that completes proves the recipe fits, CUDA graphs' private pools included (the allocated "
        "peak does not count tensors that a graph replay creates in its pool)",
    )
    p.add_argument(
        "--text-embeddings",
        action="store_true",
        help="train from precomputed prompt embeddings (paths.text_embeddings), built first with the "
        "recipe's text encoders into a temporary folder (python -m senseflow.data.text_cache)",
    )
    p.add_argument(
        "--profile",
        metavar="DIR",
        help="after the window, profile one other and one generator iteration with torch.profiler: "
        "traces, operator tables and GPU busy time per phase into DIR",
    )
    p.add_argument("--plan", action="store_true", help="predict GPU counts per recipe from measured results")
    p.add_argument(
        "--memory-gib", type=float, nargs="+", default=[80.0, 141.0], help="GPU memory sizes to plan for"
    )
    p.add_argument(
        "--results", nargs="+", help="result JSONs for --plan/--show (default benchmarks/results/*.json)"
    )
    p.add_argument("--headroom", type=float, default=0.1, help="fraction of GPU memory kept free in --plan")
    p.add_argument(
        "--sharded-share", type=float, help="--plan: sharded share of the 1-GPU peak for one-point recipes"
    )
    p.add_argument("--show", nargs="*", help="print the tables of result JSONs (default: the shipped ones)")
    p.add_argument("overrides", nargs="*", help="extra config overrides key=value (applied last)")
    args = p.parse_intermixed_args(argv)  # options may follow overrides (BENCH_EXTRA)
    if not args.plan and args.show is None and not args.recipe:
        p.error("--recipe is required (or --plan / --show)")
    if args.iters < 1 or args.warmup < 0:
        p.error("--iters must be >= 1 and --warmup >= 0")
    return args


def precompute_text_embeddings(cfg, info, save_dir: Path) -> str:
    """Rank 0 encodes the dataset's prompts into a folder every rank reads (rank 0's ``save_dir``), with
    the recipe's text encoders, which are freed again before the engine is built; returns the folder."""
    from .data.text_cache import build_text_cache
    from .distributed import barrier, broadcast_object

    out = save_dir / "text_embeddings"
    if info.is_main:
        build_text_cache(cfg, out, info, batch_size=16, progress=False)
    out = broadcast_object(str(out))
    barrier()
    gc.collect()
    if info.device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def benchmark(args: argparse.Namespace) -> dict[str, Any] | None:
    """Build the recipe, measure it and return the result (rank 0; None on other ranks)."""
    from .config import load_config, resolve_paths
    from .distributed import init_distributed

    overrides = bench_overrides(args.recipe, args.tiny, args.resolution, args.batch_size) + list(
        args.overrides
    )
    cfg_file = config_path(args.recipe, args.tiny)
    cfg = load_config(cfg_file, overrides)
    resolve_paths(cfg)  # before the process group (assets are built by every process)
    info = init_distributed(cfg.train.device)
    peak = None
    if info.device.type == "cuda":
        name = torch.cuda.get_device_name(info.device)
        peak = gpu_peak_tflops(name, args.gpu_tflops)
        if args.memory_cap:
            total = torch.cuda.get_device_properties(info.device).total_memory / 2**30
            if args.memory_cap > total:
                raise ConfigError(f"--memory-cap {args.memory_cap:g} GiB: the GPU has {total:.1f} GiB")
            torch.cuda.set_per_process_memory_fraction(args.memory_cap / total, info.device)
            logger.info("GPU memory capped at %g of %.1f GiB (--memory-cap)", args.memory_cap, total)
    else:
        name = f"cpu ({platform.processor() or platform.machine()}, no GPU)"
    logger.info(
        "benchmark %s on %d process(es), %s; overrides %s", cfg.recipe, info.world_size, name, overrides
    )
    profile_dir = Path(args.profile) if args.profile else None
    if profile_dir is not None and profile_dir.exists() and not profile_dir.is_dir():
        raise ConfigError(f"--profile: {profile_dir} exists and is not a directory")
    save_dir = Path(tempfile.mkdtemp(prefix="senseflow_bench_"))
    try:
        from .engine import Engine

        if args.text_embeddings:
            cfg.paths.text_embeddings = precompute_text_embeddings(cfg, info, save_dir)
        t0 = time.perf_counter()
        engine = Engine(cfg, info, save_dir)
        build_s = time.perf_counter() - t0

        def make_result(raw: dict[str, Any]) -> dict[str, Any]:
            """Metadata, :func:`summarize` of ``raw`` and the rates."""
            r = RECIPES[args.recipe]
            result: dict[str, Any] = {
                "schema": SCHEMA,
                "source": "python -m senseflow.bench",
                "recipe": args.recipe,
                "config_recipe": cfg.recipe,
                "tiny": args.tiny,
                "config": str(cfg_file.relative_to(REPO)),
                "arch": None if args.tiny else r.arch,
                "launcher": r.launcher,
                "overrides": overrides,
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "torch": torch.__version__,
                "device_type": info.device.type,
                "device_name": name,
                "world_size": info.world_size,
                "resolution": cfg.train.resolution,
                "batch_size_per_gpu": cfg.train.batch_size,
                "precision": {"compute": cfg.precision.compute, "master": cfg.precision.master},
                "warmup": len(raw["warmup_ks"]),
                "iters_requested": args.iters,
                "text_embeddings": "precomputed" if args.text_embeddings else "encoded",
                "memory_cap_gib": args.memory_cap if info.device.type == "cuda" else None,
                "build_seconds": build_s,
                **summarize(raw),
            }
            add_rates(result, peak)
            return result

        def write_partial(raw: dict[str, Any]) -> None:
            if info.is_main and args.out:
                write_result(args.out, make_result(raw))
                logger.info("wrote the timed results to %s; the FLOP count follows", args.out)

        raw = run_benchmark(
            engine,
            args.warmup,
            args.iters,
            flops=not args.no_flops,
            profile_dir=profile_dir,
            on_window=write_partial,
        )
    finally:
        shutil.rmtree(save_dir, ignore_errors=True)
    return make_result(raw) if info.is_main else None


def write_result(path: str | os.PathLike, result: dict[str, Any]) -> None:
    """The result JSON at ``path`` (parents created)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    from .distributed import cleanup
    from .metrics import setup_logging

    args = parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    setup_logging(rank)
    try:
        if args.plan:
            results = load_results(args.results)
            rows, share, source = plan(results, args.memory_gib, args.headroom, args.sharded_share)
            emit(format_plan(rows, args.memory_gib, args.headroom, share, source))
            return 0
        if args.show is not None:
            for r in load_results(args.show or args.results):
                emit(f"## {r['_file']}\n\n{format_result(r)}\n")
            return 0
        result = benchmark(args)
        if result is not None:
            if args.out:
                write_result(args.out, result)
            emit(format_result(result))
            if result.get("flops"):
                emit("\n" + textwrap.fill(f"FLOPs: {FLOPS_CONVENTION}", 110))
            if args.out:
                emit(f"wrote {args.out}")
    except SenseFlowError as err:
        if rank == 0:
            logger.error("%s", err)
        return 2
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
