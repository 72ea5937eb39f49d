"""Time the toy benchmark's distillation iterations at a preset's sizes without training anything first.

    python tools/toy_probe.py --preset gpu --out runs/toy_probe [--iters 20] [--warmup 11] [--jobs 1 4]
        [--settings eager compiled] [--threads 0]

Builds the stages before distillation with one training step each (data, VAE and teacher of the preset's
architecture, untrained: the timing of a step does not depend on the weights), then runs
``python -m senseflow.bench`` on each variant's engine overrides, alone (``--jobs 1``: the senseflow
variant) or all four variants at once (``--jobs 4``: as ``python -m senseflow.toy`` trains them), and
prints seconds per iteration per variant and setting. ``--threads N`` sets ``OMP_NUM_THREADS`` of every
process (0: leave it unset).

    python tools/toy_probe.py --preset gpu --out runs/toy_probe --toy-distill 20 --compile-threads 1 0

times the toy's own distillation stage instead (``run_variants_parallel``: the four variants side by side,
compiled as the preset says, ``--toy-distill`` iterations each), once per ``--compile-threads`` value (each
variant's ``torch.compile`` workers; 0: the toy's default, the host's cores split between the variants),
each with empty compilation caches: the seconds per variant include the cold compilation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from senseflow.toy.distill import VARIANTS, variant_overrides
from senseflow.toy.pipeline import stage_backbones, stage_data, stage_teacher, stage_vae
from senseflow.toy.presets import get_preset
from senseflow.toy.stages import Stages

SETTINGS = {
    "eager": ["model.compile_blocks=false", "discriminator.compile_heads=false"],
    "compiled": ["model.compile_blocks=true", "discriminator.compile_heads=true"],
    "compiled_heads": ["discriminator.compile_heads=true"],
}


def build(out: Path, preset_name: str, device: torch.device):
    preset = dataclasses.replace(
        get_preset(preset_name),
        num_train=2048,
        num_distill_images=2048,
        num_eval=64,
        vae_steps=1,
        teacher_steps=1,
        teacher_warmup=1,
        teacher_compile=False,
        vfm_steps=1,
    )
    stages = Stages(out)
    stages.run("data", lambda d: stage_data(d, preset))
    stages.run("backbones", lambda d: stage_backbones(d, out, preset, device))
    stages.run("vae", lambda d: stage_vae(d, out, preset, device))
    stages.run("teacher", lambda d: stage_teacher(d, out, preset, device))
    return preset


def bench_cmd(name, preset, out, device, setting, iters, warmup, result):
    overrides = [
        o
        for o in variant_overrides(name, preset, out, device)
        if not o.startswith(("train.iter_num=", "train.save_interval=", "train.image_interval="))
    ]
    return [
        sys.executable,
        "-m",
        "senseflow.bench",
        "--tiny",
        "--recipe",
        "sd35_medium",
        "--iters",
        str(iters),
        "--warmup",
        str(warmup),
        "--no-flops",
        "--batch-size",
        str(preset.distill_batch),
        "--resolution",
        "64",
        "--out",
        str(result),
        *overrides,
        *SETTINGS[setting],
        "checkpoint.enabled=false",
    ]


def toy_distill(out: Path, preset, device: torch.device, iters: int, compile_threads: list[int]) -> None:
    """Time ``run_variants_parallel`` (all variants, cold compilation caches) per compile-thread count."""
    import shutil

    from senseflow.toy.pipeline import default_compile_threads, run_variants_parallel

    preset = dataclasses.replace(preset, distill_iters=iters, save_interval=iters)
    rows = []
    for threads in compile_threads:
        shutil.rmtree(out / "distill", ignore_errors=True)
        for var, name in (("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TRITON_CACHE_DIR", "triton")):
            os.environ[var] = str(out / "caches" / f"threads{threads}" / name)  # inherited by the variants
        t0 = time.time()
        run_variants_parallel(list(VARIANTS), out, preset, device, 4, compile_threads=threads or None)
        wall = time.time() - t0
        seconds = {
            n: json.loads((out / "distill" / n / ".done.json").read_text())["seconds"] for n in VARIANTS
        }
        rows.append((threads, wall, seconds))
        print(f"compile threads {threads or 'default'}: {wall:.0f}s wall", flush=True)
    print("| compile threads per variant | wall s | " + " | ".join(f"{n} s" for n in VARIANTS) + " |")
    print("| --- | --- |" + " --- |" * len(VARIANTS))
    for threads, wall, seconds in rows:
        cells = " | ".join(f"{seconds[n]:.0f}" for n in VARIANTS)
        print(f"| {threads or f'default ({default_compile_threads(4)})'} | {wall:.0f} | {cells} |")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="gpu")
    p.add_argument("--out", default="runs/toy_probe")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=11)
    p.add_argument("--jobs", type=int, nargs="+", default=[1, 4])
    p.add_argument("--settings", nargs="+", default=["eager", "compiled"], choices=list(SETTINGS))
    p.add_argument("--threads", type=int, nargs="+", default=[0])
    p.add_argument("--results", default=None, help="folder for the bench JSONs (default: OUT/results)")
    p.add_argument("--toy-distill", type=int, default=0, help="time the toy's distillation stage instead")
    p.add_argument("--compile-threads", type=int, nargs="+", default=[1, 0])
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out).resolve()
    t0 = time.time()
    preset = build(out, args.preset, device)
    print(f"built in {time.time() - t0:.1f}s", flush=True)
    if args.toy_distill:
        toy_distill(out, preset, device, args.toy_distill, args.compile_threads)
        return 0
    results = Path(args.results or out / "results")
    results.mkdir(parents=True, exist_ok=True)
    rows = []
    for threads in args.threads:
        env = dict(os.environ)
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        for setting in args.settings:
            for jobs in args.jobs:
                names = ["senseflow"] if jobs == 1 else list(VARIANTS)[:jobs]
                t0 = time.time()
                procs = {}
                for name in names:
                    tag = f"{setting}_j{jobs}_t{threads}_{name}"
                    cmd = bench_cmd(
                        name, preset, out, device, setting, args.iters, args.warmup, results / f"{tag}.json"
                    )
                    log = open(results / f"{tag}.log", "w")  # noqa: SIM115 - closed below
                    procs[name] = (
                        subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env),
                        log,
                        tag,
                    )
                for name, (proc, log, tag) in procs.items():
                    rc = proc.wait()
                    log.close()
                    if rc != 0:
                        print(f"{tag}: FAILED rc {rc}; tail of its log:", flush=True)
                        print("".join(open(results / f"{tag}.log").readlines()[-20:]), flush=True)
                        continue
                    r = json.loads((results / f"{tag}.json").read_text())
                    sec = r["sec_per_iter"]
                    row = (
                        setting,
                        jobs,
                        threads,
                        name,
                        sec["ttur_mean_of_medians"],
                        sec["median_generator"],
                        sec["median_other"],
                    )
                    rows.append(row)
                print(f"{setting} jobs={jobs} threads={threads}: {time.time() - t0:.0f}s wall", flush=True)
    print(
        "| setting | jobs | OMP threads | variant | s/it (TTUR mean of medians) | generator it | other it |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for setting, jobs, threads, name, mean, gen, other in rows:
        fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
        print(
            f"| {setting} | {jobs} | {threads or 'unset'} | {name} | {fmt(mean)} | {fmt(gen)} | {fmt(other)} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
