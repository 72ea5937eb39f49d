"""The stages of the toy benchmark and their order (see the package docstring)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..stop import TrainingStopped
from .data import images_to_tensor, load_split, make_split, save_split, write_engine_dataset
from .distill import VARIANTS, checkpoints, run_variant
from .presets import RESOLUTION, Preset, scale_label
from .stages import DONE, Stages, check_preset, read_done

logger = logging.getLogger(__name__)

MAX_EVALNET_IMAGES = 10000
"""The evaluation networks train on at most this many training scenes (they converge long before)."""


def _seeds(preset: Preset) -> dict[str, int]:
    base = 1000 * preset.seed
    return {"train": base + 1, "eval": base + 2, "floor": base + 3, "weights": base + 4}


# --- stages ---------------------------------------------------------------------------------------------


def stage_data(d: Path, preset: Preset) -> dict:
    """Training split, evaluation prompts (+ their real images), the independent real set, engine data."""
    seeds = _seeds(preset)
    train = make_split(preset.num_train, RESOLUTION, seeds["train"])
    save_split(train, d / "train")
    evals = make_split(preset.num_eval, RESOLUTION, seeds["eval"])
    save_split(evals, d / "eval")
    save_split(make_split(preset.num_eval, RESOLUTION, seeds["floor"]), d / "real_floor")
    write_engine_dataset(train.subset(preset.num_distill_images), d / "engine")
    (d / "eval_prompts.txt").write_text("\n".join(evals.captions) + "\n")
    counts = [len(o) for o in evals.objects]
    return {
        "num_train": len(train),
        "num_eval": len(evals),
        "num_engine_images": preset.num_distill_images,
        "eval_objects": int(sum(counts)),
        "eval_objects_per_scene": {str(k): counts.count(k) for k in (1, 2, 3)},
        "example_captions": evals.captions[:4],
    }


def stage_backbones(d: Path, out: Path, preset: Preset, device: torch.device) -> dict:
    """The discriminator's DINOv2, pre-trained here on the training images (:mod:`senseflow.toy.vfm`), and
    its tiny random open_clip CLIP (transformers / open_clip layouts)."""
    from ..discriminator.tiny import build_tiny_clip
    from .vfm import build_backbone

    train = load_split(out / "data" / "train")
    heldout = load_split(out / "data" / "eval").images
    stats = build_backbone(d / "dino", train.images, heldout, preset, _seeds(preset)["weights"], device)
    build_tiny_clip(d / "clip" / "open_clip_model.safetensors", seed=0)
    return {"dino": stats, "clip": str(d / "clip" / "open_clip_model.safetensors")}


def stage_vae(d: Path, out: Path, preset: Preset, device: torch.device) -> dict:
    """Train the VAE, calibrate its latent scale and shift, encode the training split once."""
    from .evaluate import save_images
    from .teacher import calibrate_vae, count_parameters, encode_posterior, psnr, reconstruct, train_vae

    train = load_split(out / "data" / "train")
    t0 = time.time()
    vae = train_vae(train.images, preset, device, _seeds(preset)["weights"])
    train_seconds = time.time() - t0
    means, stds = encode_posterior(vae, train.images, device)
    scale, shift = calibrate_vae(vae, means)
    vae.to("cpu").save_pretrained(d / "vae", safe_serialization=True)
    torch.save({"means": means, "stds": stds}, d / "latents.pt")
    evals = load_split(out / "data" / "eval")
    rec = reconstruct(vae, evals.images, "cpu")
    save_images(rec, d / "recon.npz")
    return {
        "parameters": count_parameters(vae),
        "channels": list(preset.vae_channels),
        "steps": preset.vae_steps,
        "batch": preset.vae_batch,
        "train_seconds": train_seconds,
        "scaling_factor": scale,
        "shift_factor": shift,
        "posterior_std_mean": float(stds.mean()),
        "eval_psnr_db": psnr(rec, images_to_tensor(evals.images)),
    }


def stage_teacher(d: Path, out: Path, preset: Preset, device: torch.device) -> dict:
    """Write the teacher folder and train its transformer (a leftover half-built folder is replaced)."""
    from diffusers import AutoencoderKL

    from .teacher import build_teacher_folder, train_teacher

    for child in d.iterdir():
        if not child.name.startswith("."):  # the stage's bookkeeping (DONE, ATTEMPTS) stays
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    vae = AutoencoderKL.from_pretrained(out / "vae" / "vae")
    build_teacher_folder(d, vae, preset, _seeds(preset)["weights"])
    latents = torch.load(out / "vae" / "latents.pt", weights_only=True)
    captions = load_split(out / "data" / "train").captions
    stats = train_teacher(
        d, latents["means"], latents["stds"], captions, preset, device, _seeds(preset)["weights"]
    )
    return {**stats, "size": preset.params_label}


def stage_featnet(d: Path, out: Path, preset: Preset, device: torch.device) -> dict:
    """Train the feature net of the Frechet distance on real images."""
    from .evalnets import feature_net_accuracy, train_feature_net

    train = load_split(out / "data" / "train")
    train = train.subset(min(len(train), MAX_EVALNET_IMAGES))
    net = train_feature_net(train, preset.featnet_steps, lr=preset.nets_lr, seed=preset.seed, device=device)
    torch.save(net.to("cpu").state_dict(), d / "featnet.pt")
    return {
        "steps": preset.featnet_steps,
        "heldout_accuracy": feature_net_accuracy(net, load_split(out / "data" / "eval")),
    }


def stage_classifiers(d: Path, out: Path, preset: Preset, device: torch.device) -> dict:
    """Train the per-cell attribute classifier on real images."""
    from .evalnets import classifier_accuracy, train_cell_classifier

    train = load_split(out / "data" / "train")
    train = train.subset(min(len(train), MAX_EVALNET_IMAGES))
    net = train_cell_classifier(
        train, preset.classifier_steps, lr=preset.nets_lr, seed=preset.seed, device=device
    )
    torch.save(net.to("cpu").state_dict(), d / "classifier.pt")
    acc = classifier_accuracy(net, load_split(out / "data" / "eval"))
    return {"steps": preset.classifier_steps, "heldout_accuracy_occupied_cells": acc}


EVAL_FIELDS = {"teacher_many_dm": ("dm_guidance",)}
"""Teacher baselines -> the distillation settings (``DISTILL_FIELDS``) their evaluation depends on."""


def methods(preset: Preset, variants: Sequence[str] = tuple(VARIANTS)) -> dict[str, dict]:
    """The evaluated methods (the teacher baselines and the distillation ``variants``): name -> label,
    steps, network evaluations per image."""
    n, s = preset.teacher_many_steps, f"{preset.cfg_scale:g}"
    lo, hi = preset.dm_guidance
    label = scale_label(preset.dm_guidance)
    dm = f"CFG {label}" if lo == hi else f"CFG ~ {label} per prompt"
    table = {
        "real": {
            "label": "Real images (independent set; classifier on ground truth)",
            "steps": None,
            "nfe": None,
        },
        "vae": {"label": "VAE reconstructions of the evaluation images", "steps": None, "nfe": None},
        "teacher_many": {"label": f"Teacher, {n} Euler steps, CFG {s}", "steps": n, "nfe": 2 * n},
        "teacher_many_dm": {
            "label": f"Teacher, {n} Euler steps, {dm} (the DM loss's guidance)",
            "steps": n,
            "nfe": 2 * n,
        },
        "teacher_4": {"label": f"Teacher, 4 Euler steps, CFG {s} (undistilled)", "steps": 4, "nfe": 8},
        "teacher_4_x0": {
            "label": "Teacher, 4 x0 steps, no CFG (= every student at iteration 0)",
            "steps": 4,
            "nfe": 4,
        },
    }
    for name in variants:
        table[name] = {"label": f"{VARIANTS[name][0]}, 4 steps", "steps": 4, "nfe": 4}
    return table


def stage_eval(d: Path, method: str, out: Path, preset: Preset, get_ctx) -> dict:
    """Sample one method on the evaluation prompts (students: at every checkpoint) and score it."""
    from .evalnets import attribute_scores, extract_features, fd_metrics, predict_cells
    from .evaluate import (
        grid,
        load_images,
        load_net,
        sample_generator,
        sample_guided,
        save_images,
        score,
        teacher_levels,
    )

    info = methods(preset)[method]
    record: dict = {"method": method, **info}
    t0 = time.time()
    if method == "real":
        ctx = get_ctx()
        floor = load_split(out / "data" / "real_floor")
        feats = extract_features(ctx.featnet, images_to_tensor(floor.images))
        real = images_to_tensor(ctx.split.images)
        metrics = {
            **fd_metrics(feats, ctx.real_features),
            **attribute_scores(predict_cells(ctx.classifier, real), ctx.split.objects),
        }
        images = real
    elif method == "vae":
        ctx = get_ctx()
        images = (
            torch.from_numpy(load_images(out / "vae" / "recon.npz")).permute(0, 3, 1, 2).float() / 127.5 - 1
        )
        metrics = score(ctx, images)
    elif method.startswith("teacher"):
        ctx = get_ctx()
        net = load_net(ctx, out / "teacher" / "transformer")
        shift = ctx.adapter.schedule.shift
        guided = {  # method -> Euler steps, CFG scale (or range)
            "teacher_many": (preset.teacher_many_steps, preset.cfg_scale),
            "teacher_many_dm": (preset.teacher_many_steps, preset.dm_guidance),
            "teacher_4": (4, preset.cfg_scale),
        }
        if method in guided:
            steps, scale = guided[method]
            images = sample_guided(ctx, net, teacher_levels(steps, shift), scale)
        else:
            images = sample_generator(ctx, net)
        metrics = score(ctx, images)
    else:
        run_dir = out / "distill" / method
        ckpts = checkpoints(run_dir, preset)
        if not ckpts:
            raise RuntimeError(f"{run_dir} holds no ckpt_model_*.pth")
        curve, images = [], None
        for k, path in ckpts.items():
            cached = d / f"iter_{k:06d}.json"
            if cached.is_file() and k != max(ckpts):
                curve.append(json.loads(cached.read_text()))
                continue
            ctx = get_ctx()
            imgs = sample_generator(ctx, load_net(ctx, path))
            m = {"iter": k, **score(ctx, imgs)}
            cached.write_text(json.dumps(m))
            logger.info("eval %s @ %d: FD %.3f, attributes %.3f", method, k, m["fd"], m["attributes"])
            curve.append(m)
            images = imgs
        record["curve"] = curve
        record["iteration"] = max(ckpts)
        metrics = {k: v for k, v in curve[-1].items() if k != "iter"}
    record["metrics"] = metrics
    record["eval_seconds"] = time.time() - t0
    save_images(images, d / "images.npz")
    grid(load_images(d / "images.npz")[: preset.grid_prompts]).save(d / "grid.png")
    logger.info("eval %s: %s", method, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    return record


def _distill_job(
    out: Path, preset: Preset, name: str, device: str, files: list[str], compile_threads: int
) -> None:
    """One variant in a child process (spawned: CUDA cannot be forked); its log lines, tagged with its
    name, also go to ``files`` (the parent's ``toy.log``); ``compile_threads``: its compile workers."""
    from ..distributed import cleanup, init_distributed
    from ..stop import StopRequest
    from .children import child_setup

    child_setup(name, files, compile_threads)
    info = init_distributed(device)
    try:
        with StopRequest():  # a signal while the models are built stops the training loop before it starts
            Stages(out).run(
                f"distill/{name}", lambda d: run_variant(name, preset, out, torch.device(device), info)
            )
    finally:
        cleanup()


def default_compile_threads(workers: int) -> int:
    """``torch.compile`` workers per variant when ``workers`` variants train at once: the host's cores split."""
    return max((os.cpu_count() or 1) // workers, 1)


def run_variants_parallel(
    names: list[str],
    out: Path,
    preset: Preset,
    device: torch.device,
    jobs: int,
    compile_threads: int | None = None,
) -> None:
    """Train ``names`` in up to ``jobs`` spawned processes; a failure names the variant and its log.
    ``compile_threads``: each variant's ``torch.compile`` workers (default: the host's cores split
    between the processes).

    A stop signal (SIGTERM, SIGUSR1) is passed on to the variants, which checkpoint and stop; this then
    raises :class:`~senseflow.stop.TrainingStopped` once they have (a rerun resumes them)."""
    from ..stop import ignore_stop_signals
    from .children import SpawnedJobs, log_files

    workers = min(jobs, len(names))
    if compile_threads is None:
        compile_threads = default_compile_threads(workers)
    logger.info("distilling %s in %d parallel processes", ", ".join(names), workers)
    # idle workers ignore stop signals (a dead worker breaks the pool under the variants still running)
    with SpawnedJobs(workers, initializer=ignore_stop_signals) as pool:
        for name in names:
            pool.submit(name, _distill_job, out, preset, name, device.type, log_files(), compile_threads)
        outcome = pool.wait()
    failed, stopped = [], []
    for name, err in outcome.items():
        if isinstance(err, TrainingStopped):
            logger.warning("distill/%s: %s", name, err)
            stopped.append(err.signum)
        elif err is not None:
            logger.error("distill/%s failed: %s", name, err)
            failed.append(name)
    if pool.stop.requested or stopped:
        signum = pool.stop.signum or stopped[0]
        raise TrainingStopped(
            f"distillation stopped by signal {signum}: run the same command again to resume every unfinished "
            "variant from its last checkpoint",
            signum,
        )
    if failed:
        logs = ", ".join(str(out / "distill" / n / "train.log") for n in failed)
        raise RuntimeError(f"distillation failed for {', '.join(failed)} (see {logs})")


SHARED_STAGES = ("data", "backbones", "vae", "teacher", "featnet", "classifiers")
"""The stages before distillation, in their sequential order (shared by the runs of one ``--reuse`` sweep)."""
SIDE_STAGES = ("backbones", "featnet", "classifiers")
"""The stages before distillation that need only the ``data`` stage (not the VAE or the teacher)."""
SIDE_TAG = "side"
"""The tag of the log lines of the child process that runs :data:`SIDE_STAGES` (``parallel``)."""


def setup_stage_fns(out: Path, preset: Preset, device: torch.device) -> dict[str, Callable[[Path], dict]]:
    """The stages before distillation (``SHARED_STAGES``, in their sequential order): name -> ``fn(d)``."""
    return {
        "data": lambda d: stage_data(d, preset),
        "backbones": lambda d: stage_backbones(d, out, preset, device),
        "vae": lambda d: stage_vae(d, out, preset, device),
        "teacher": lambda d: stage_teacher(d, out, preset, device),
        "featnet": lambda d: stage_featnet(d, out, preset, device),
        "classifiers": lambda d: stage_classifiers(d, out, preset, device),
    }


def _side_job(
    out: Path, preset: Preset, names: list[str], device: str, files: list[str], threads: int
) -> None:
    """``names`` (of :data:`SIDE_STAGES`) in a child process, beside the parent's VAE and teacher;
    ``threads``: torch's intra-op threads (0: its default)."""
    from ..stop import StopNow, StopRequest
    from .children import child_setup

    child_setup(SIDE_TAG, files)
    if threads:
        torch.set_num_threads(threads)
    fns = setup_stage_fns(out, preset, torch.device(device))
    stages = Stages(out)
    # a stage cut short leaves no .done.json: the next run runs it again
    with StopRequest(immediate=True, immediate_action="stopping the stage in flight"):
        for name in names:
            try:
                stages.run(name, fns[name])
            except StopNow as now:
                logger.warning("stage %s: stopped (a rerun runs it again)", name)
                raise TrainingStopped(f"stopped by signal {now.signum}", now.signum) from None
            except Exception:
                logger.exception("stage %s failed", name)
                raise


def _stopped_before_distillation(signum: int) -> TrainingStopped:
    return TrainingStopped(
        f"stopped by signal {signum} before distillation: run the same command again to finish the "
        "unfinished stages",
        signum,
    )


def run_setup_stages(stages: Stages, out: Path, preset: Preset, device: torch.device, parallel: bool) -> None:
    """Run (or skip) the stages before distillation (``SHARED_STAGES``) into ``stages``.

    ``parallel``: after ``data``, :data:`SIDE_STAGES` run in one spawned child process while this one
    trains the VAE and the teacher (on a GPU both sides are bound by the host, not by the GPU, so they
    overlap almost for free); their records are then read from their ``.done.json`` into ``stages``, in
    the sequential order. Their log lines are tagged ``[side]`` (stderr and this process's log files). A
    failure there raises ``RuntimeError`` naming the stage. A stop signal (SIGTERM, SIGUSR1) stops both
    processes at once with :class:`~senseflow.stop.TrainingStopped` (finished stages stay finished)."""
    from .children import SpawnedJobs, log_files

    fns = setup_stage_fns(out, preset, device)
    stages.run("data", fns["data"])
    side = [name for name in SIDE_STAGES if read_done(out / name) is None] if parallel else []
    if not side:
        for name in SHARED_STAGES[1:]:
            stages.run(name, fns[name])
        return
    for name in SIDE_STAGES:
        if name not in side:
            stages.run(name, fns[name])  # finished: skipped
    files = log_files()
    logger.info("running %s in a child process (log lines tagged [%s])", ", ".join(side), SIDE_TAG)
    # on a CPU the two processes split its cores (each with all of them: both ran ~10x slower in the tests)
    threads = torch.get_num_threads()
    child_threads = max(threads // 2, 1) if device.type == "cpu" else 0
    try:
        torch.set_num_threads(max(threads - child_threads, 1))
        with SpawnedJobs(1, interrupt=_stopped_before_distillation) as child:
            child.submit(SIDE_TAG, _side_job, out, preset, side, device.type, files, child_threads)
            for name in ("vae", "teacher"):
                stages.run(name, fns[name])
            err = child.wait()[SIDE_TAG]
    finally:
        torch.set_num_threads(threads)
    if isinstance(err, TrainingStopped):  # a signal to the child alone
        raise _stopped_before_distillation(err.signum)
    if err is not None:
        failed = next((name for name in side if read_done(out / name) is None), None)
        raise RuntimeError(
            f"{f'stage {failed}' if failed else 'the child process'} failed in the child process of "
            f"{', '.join(side)}: {type(err).__name__}: {err} (see the lines tagged [{SIDE_TAG}] in "
            f"{', '.join(files) or 'stderr'})"
        ) from err
    for name in side:
        stages.adopt(name)
    # the sequential order (the report's stage table)
    stages.records = {**{name: stages.records[name] for name in SHARED_STAGES}, **stages.records}


# --- the whole run --------------------------------------------------------------------------------------


def reuse_stages(src: Path, out: Path, preset: Preset) -> list[str]:
    """Copy the finished stages that do not depend on distillation (data, teacher, evaluation networks,
    the teacher baselines' evaluations) from the run in ``src`` into ``out``; returns their names.

    ``src`` must have run a preset equal to ``preset`` in every field before distillation (it may differ
    in ``DISTILL_FIELDS``: iterations, batch, learning rate, ...) except the discriminator backbone's
    (``BACKBONE_FIELDS``), which only cost the ``backbones`` stage: when they differ it runs again, and
    those a baseline's evaluation reads (``EVAL_FIELDS``: the teacher at the DM guidance), which is then
    evaluated again. Stages already in ``out`` stay.
    """
    from ..errors import ConfigError
    from .presets import BACKBONE_FIELDS, DISTILL_FIELDS, with_defaults

    src = src.resolve()
    path = src / "preset.json"
    if not path.is_file():
        raise ConfigError(f"--reuse: {src} holds no toy run (no preset.json)")

    theirs = with_defaults(json.loads(path.read_text()))
    ours = json.loads(json.dumps(preset.to_dict()))  # tuples as JSON lists

    def differing(keys) -> list[str]:
        """The fields among ``keys`` whose values differ between the two presets."""
        return sorted(k for k in keys if ours.get(k) != theirs.get(k))

    shared = [k for k in ours.keys() | theirs.keys() if k not in DISTILL_FIELDS and k not in BACKBONE_FIELDS]
    differ = differing(shared)
    if differ:
        raise ConfigError(
            f"--reuse: {src} ran other settings before distillation ({', '.join(differ)}); only "
            f"{', '.join((*DISTILL_FIELDS, *BACKBONE_FIELDS))} may differ"
        )
    same_backbone = not differing(BACKBONE_FIELDS)
    stages = [s for s in SHARED_STAGES if same_backbone or s != "backbones"]
    baselines = [m for m in methods(preset) if m not in VARIANTS and not differing(EVAL_FIELDS.get(m, ()))]
    names = [*stages, *(f"eval/{m}" for m in baselines)]
    copied = []
    for name in names:
        if read_done(src / name) is not None and read_done(out / name) is None:
            shutil.rmtree(out / name, ignore_errors=True)  # an unfinished attempt
            shutil.copytree(src / name, out / name)
            copied.append(name)
    logger.info("reused from %s: %s", src, ", ".join(copied) or "nothing (already here)")
    return copied


def run(
    out: Path,
    preset: Preset,
    device: torch.device,
    command: str = "",
    jobs: int = 1,
    reuse: Path | None = None,
    parallel_stages: bool | None = None,
    variants: Sequence[str] = tuple(VARIANTS),
) -> dict:
    """Run (or skip) every stage into ``out`` and return the report; ``jobs`` > 1 trains that many
    distillation variants at once in separate processes (on one GPU: these models are far too small to
    fill it, so the variants run side by side in about the time of one). ``reuse``: a finished run whose
    stages before distillation are copied (:func:`reuse_stages`). ``parallel_stages``: run the stages that
    need only the data beside the VAE and the teacher, in a child process (:func:`run_setup_stages`;
    default: on CUDA, where they overlap almost for free; on a CPU the processes would share its cores).
    ``variants``: the distillation variants to train and report (in :data:`VARIANTS` order; the full
    recipe, ``senseflow``, is always among them: the report's goal is about it)."""
    from .report import write_report

    variants = [name for name in VARIANTS if name in variants]

    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    check_preset(out, preset.to_dict())
    if reuse is not None:
        reuse_stages(reuse, out, preset)
    stages = Stages(out)
    t_start = time.time()
    if parallel_stages is None:
        parallel_stages = device.type == "cuda"
    run_setup_stages(stages, out, preset, device, parallel_stages)

    dist_info = []

    def get_info():
        if not dist_info:
            from ..distributed import init_distributed

            dist_info.append(init_distributed(device.type))
        return dist_info[0]

    pending = [name for name in variants if read_done(out / "distill" / name) is None]
    if jobs > 1 and len(pending) > 1:
        run_variants_parallel(pending, out, preset, device, jobs)
        stages.ran.extend(f"distill/{name}" for name in pending)
    for name in variants:
        stages.run(f"distill/{name}", lambda d, name=name: run_variant(name, preset, out, device, get_info()))

    ctx_cache = []

    def get_ctx():
        if not ctx_cache:
            from .evaluate import build_context

            ctx_cache.append(build_context(out, preset, device))
        return ctx_cache[0]

    for method in methods(preset, variants):
        stages.run(f"eval/{method}", lambda d, method=method: stage_eval(d, method, out, preset, get_ctx))

    reported = read_done(out / "report")
    if stages.ran or (reported is not None and reported.get("variants", list(VARIANTS)) != variants):
        (out / "report" / DONE).unlink(missing_ok=True)  # anything recomputed, or other variants: rebuild
    elapsed = time.time() - t_start
    stages.run(
        "report", lambda d: write_report(d, out, preset, device, stages.records, command, elapsed, variants)
    )
    if dist_info:
        from ..distributed import cleanup

        cleanup()
    return json.loads((out / "report" / "report.json").read_text())


def summary_rows(report: dict) -> list[list[str]]:
    """The results table as rows of strings (for the CLI's summary)."""
    return [list(map(str, row)) for row in report["table"]["rows"]]


def as_float(x) -> float:
    """A metric value as float (NaN for missing)."""
    return float("nan") if x is None else float(x)


def finite(values) -> bool:
    """Whether every value is a finite number."""
    return all(np.isfinite(as_float(v)) for v in values)
