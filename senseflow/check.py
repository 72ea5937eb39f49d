"""Check a config end to end before a long job.

Usage::

    python -m senseflow.check CONFIG [key=value ...] [--nproc N] [--nnodes M] [--save-dir DIR]

Prints one line per check: ``OK`` for what passed, ``FAIL`` for each problem (in plain words, naming the
config key or path to fix), ``WARN`` for what does not stop a run; exits 0 when nothing failed, 2
otherwise. Every problem is reported, not only the first (a config that does not load stops early).

Checks: the config loads (unknown keys, wrong values); the teacher folder is complete for the recipe
and holds the weights of every component (unless ``model.random_init``); the discriminator backbones
(``paths.dino``, ``paths.clip``) when the GAN term is on, the precomputed prompt embeddings
(``paths.text_embeddings``: settings, every dataset prompt present), and any further ``paths.*`` entry
that is set; the dataset index is readable, its image paths exist and a sample batch of ``train.batch_size``
images loads with the right shape; the GPUs against the processes (``--nproc``) the job will start; the
save directory (``--save-dir``) is writable.

``senseflow.train``'s preflight (the launchers' first step) runs the cheap part of these checks (teacher
folder, dataset index and paths, backbones) through :func:`preflight_checks`, stopping at the first.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import struct
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data import build_dataset
from .errors import ConfigError, DataError, SenseFlowError
from .output import emit

logger = logging.getLogger("senseflow.check")

# single weight files diffusers / transformers load (no variant), in the order they prefer them
WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)


@dataclass
class CheckResult:
    """Outcome of one check: an ``OK`` message, problems (errors to raise or print) and warnings."""

    name: str
    ok: str = ""
    problems: list[SenseFlowError] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    value: Any = None

    def raise_first(self) -> None:
        """Raise the first problem (preflight: one line, exit code 2)."""
        if self.problems:
            raise self.problems[0]

    def lines(self) -> list[str]:
        out = [f"FAIL {p}" for p in self.problems]
        out += [f"WARN {w}" for w in self.warnings]
        if not self.problems and self.ok:
            out.insert(0, f"OK   {self.ok}")
        return out


# ---------------------------------------------------------------------------------------------------
# Weight files


def safetensors_problem(path: Path) -> str | None:
    """A truncated or damaged ``.safetensors`` file (header and size are checked, no tensor is read)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path.name} is truncated ({size} bytes)"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 * 2**20:
                return f"{path.name} is truncated or not a safetensors file"
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as err:
        return f"{path.name} cannot be read ({type(err).__name__})"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        return f"{path.name} is truncated ({size} of {expected} bytes)"
    return None


def weight_problems(folder: str | os.PathLike) -> list[str]:
    """What is wrong with the weights of one model folder (diffusers/transformers layout); [] if complete.

    Accepts a single weight file (``diffusion_pytorch_model.safetensors``, ``model.safetensors``, ``.bin``)
    or a sharded ``*.index.json`` whose shards all exist; safetensors files are checked for truncation.
    """
    folder = Path(folder)
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            problem = safetensors_problem(folder / name) if name.endswith(".safetensors") else None
            return [f"{folder.name}/{problem}"] if problem else []
    for name in WEIGHT_NAMES:
        index = folder / f"{name}.index.json"
        if not index.is_file():
            continue
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return [f"{folder.name}/{index.name} is not a valid weight index"]
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            return [
                f"{folder.name}: {len(missing)} of {len(shards)} weight shards listed in {index.name} "
                f"are missing (first: {missing[0]})"
            ]
        problems = [safetensors_problem(folder / s) for s in shards if s.endswith(".safetensors")]
        return [f"{folder.name}/{p}" for p in problems if p]
    return [f"{folder.name}: no weights ({WEIGHT_NAMES[0]}, {WEIGHT_NAMES[1]} or a sharded *.index.json)"]


def model_folders(root: Path) -> list[Path]:
    """The component folders of a diffusers teacher that hold a model (a ``config.json``)."""
    index = root / "model_index.json"
    names: list[str] = []
    if index.is_file():
        try:
            data = json.loads(index.read_text())
            names = [k for k, v in data.items() if not k.startswith("_") and isinstance(v, list) and v[0]]
        except (OSError, ValueError, IndexError):
            names = []
    if not names:
        names = sorted(p.name for p in root.iterdir() if p.is_dir())
    return [root / n for n in names if (root / n / "config.json").is_file()]


# ---------------------------------------------------------------------------------------------------
# The checks (each returns a CheckResult and never raises a SenseFlowError)


def check_teacher(cfg) -> CheckResult:
    """The teacher folder has every file the family needs, and weights for each model component."""
    from .adapters import check_teacher_dir

    result = CheckResult("teacher")
    try:
        root = check_teacher_dir(cfg)
    except SenseFlowError as err:
        result.problems.append(err)
        return result
    result.value = root
    folders = model_folders(root)
    if cfg.model.random_init:
        result.ok = f"paths.pretrained_model: {root} (configs only, model.random_init=true)"
        return result
    for folder in folders:
        for problem in weight_problems(folder):
            result.problems.append(
                ConfigError(f"paths.pretrained_model: {root}: {problem}; complete the download (rerun it)")
            )
    result.ok = (
        f"paths.pretrained_model: {root} ({cfg.model.family} teacher; weights of "
        f"{', '.join(f.name for f in folders)})"
    )
    return result


def check_dataset(cfg, check_paths: bool = True) -> CheckResult:
    """The dataset index loads (equal lists of strings) and, with ``check_paths``, every image exists.

    With ``data.format=lmdb`` the DMD2 latent LMDB opens and its last record is readable.
    """
    result = CheckResult("dataset")
    try:
        data = build_dataset(cfg, check_paths=check_paths)
        if cfg.data.format == "lmdb":
            result.value = data
            result.ok = f"paths.dataset: {data.path} (LMDB of {len(data)} latents of shape {tuple(data.latent_shape)})"
            return result
    except SenseFlowError as err:
        result.problems.append(err)
        return result
    result.value = data
    empty = sum(1 for p in data.prompts if not p.strip())
    if empty:
        result.warnings.append(f"paths.dataset: {empty} of {len(data)} prompts are empty")
    exist = ", every image path exists" if check_paths else " (image paths not checked)"
    result.ok = f"paths.dataset: {data.path} ({len(data)} entries{exist})"
    return result


def check_sample_batch(cfg, data, world_size: int = 1) -> CheckResult:
    """``train.batch_size`` entries spread over the dataset load: images as (B, 3, R, R) in [-1, 1]
    (LMDB latents as (B, *latent shape))."""
    import torch
    from torch.utils.data import default_collate

    result = CheckResult("sample batch")
    b, n, res = cfg.train.batch_size, len(data), cfg.train.resolution
    per_rank = math.ceil(n / world_size)
    if per_rank < b:
        result.problems.append(
            DataError(
                f"paths.dataset: {n} entries over {world_size} process(es) leave {per_rank} per process, "
                f"fewer than train.batch_size={b}"
            )
        )
    k = min(b, n)
    items = []
    for i in sorted({j * n // k for j in range(k)}):
        try:
            item = data[i]
        except SenseFlowError as err:
            result.problems.append(err)
            continue
        if item.get("skipped"):
            result.warnings.append(
                f"paths.dataset: {item['skipped']} unreadable image(s) from entry {i} on "
                f"(data.on_error=skip: training skips them)"
            )
        items.append(item)
    if not items:
        return result
    batch = default_collate(items)
    name = "image" if "image" in batch else "latent"
    tensor = batch[name]
    if name == "image":
        expected = (len(items), 3, res, res)
    else:
        expected = (len(items), *getattr(data, "latent_shape", tuple(tensor.shape[1:])))
    if tuple(tensor.shape) != expected or tensor.dtype != torch.float32:
        result.problems.append(
            DataError(
                f"paths.dataset: a sample batch of {name}s has shape {tuple(tensor.shape)} {tensor.dtype}, "
                f"expected {expected} float32"
            )
        )
    elif name == "image" and (tensor.min() < -1.0 or tensor.max() > 1.0):
        result.problems.append(DataError("paths.dataset: sample images are not in [-1, 1]"))
    elif not torch.isfinite(tensor).all():
        result.problems.append(DataError(f"paths.dataset: sample {name}s hold NaN or infinite values"))
    result.ok = (
        f"sample batch: {len(items)} {name}(s) load as {tuple(tensor.shape)} float32 "
        f"in [{tensor.min():.2f}, {tensor.max():.2f}]"
    )
    return result


def check_backbones(cfg) -> CheckResult:
    """DINOv2 folder (config + weights) and CLIP weights when the GAN term is on."""
    result = CheckResult("backbones")
    if cfg.distill.gan.weight <= 0:
        result.ok = "paths.dino, paths.clip: not needed (distill.gan.weight=0)"
        return result
    from .discriminator.text import resolve_clip_files

    dino = Path(cfg.paths.dino)
    desc = ""
    if not (dino / "config.json").is_file():
        result.problems.append(
            ConfigError(
                f"paths.dino: {dino} is not a DINOv2 folder in the transformers layout (no config.json); "
                "point it to a local copy of facebook/dinov2-large"
            )
        )
    else:
        try:
            dcfg = json.loads((dino / "config.json").read_text())
        except (OSError, ValueError) as err:
            dcfg = {}
            result.problems.append(ConfigError(f"paths.dino: {dino}/config.json cannot be read ({err})"))
        kind = dcfg.get("model_type", "dinov2")
        if kind != "dinov2":
            result.problems.append(
                ConfigError(f"paths.dino: {dino}/config.json describes a {kind!r} model, not DINOv2")
            )
        if not cfg.model.random_init:
            for problem in weight_problems(dino):
                result.problems.append(ConfigError(f"paths.dino: {dino.parent}/{problem}"))
        desc = f" (width {dcfg.get('hidden_size', '?')}, {dcfg.get('num_hidden_layers', '?')} blocks)"
    clip = ""
    try:
        weights, config = resolve_clip_files(cfg.paths.clip, cfg.model.random_init)
    except SenseFlowError as err:
        result.problems.append(err)
    else:
        problem = safetensors_problem(weights) if weights and weights.suffix == ".safetensors" else None
        if problem:
            result.problems.append(ConfigError(f"paths.clip: {weights.parent}/{problem}"))
        clip = str(weights or config)
    result.ok = f"paths.dino: {dino}{desc}; paths.clip: {clip}"
    return result


def check_other_paths(cfg) -> CheckResult:
    """Every further ``paths.*`` entry that is set (e.g. ``paths.flux_wo_guidance_embed``) exists."""
    import dataclasses

    result = CheckResult("other paths")
    named = []
    for f in dataclasses.fields(cfg.paths):
        value = getattr(cfg.paths, f.name)
        if f.name in ("pretrained_model", "dataset", "dino", "clip", "text_embeddings") or not value:
            continue
        named.append(f"paths.{f.name}")
        if not Path(value).expanduser().exists():
            result.problems.append(ConfigError(f"paths.{f.name}: {value} does not exist"))
    result.ok = f"{', '.join(named)}: present" if named else ""
    return result


def check_text_embeddings(cfg, dataset) -> CheckResult:
    """``paths.text_embeddings``, when set: built for this config's settings and holding every prompt of
    the dataset (skipped when the dataset did not load)."""
    from .data.text_cache import TextEmbeddingCache

    result = CheckResult("text embeddings")
    if not cfg.paths.text_embeddings:
        return result
    try:
        cache = TextEmbeddingCache(cfg.paths.text_embeddings, cfg)
        if dataset is not None:
            cache.require(dataset.all_prompts())
    except SenseFlowError as err:
        result.problems.append(err)
        return result
    covered = "every prompt of paths.dataset" if dataset is not None else "not checked against the dataset"
    result.ok = f"paths.text_embeddings: {cache.meta['count']} prompt embeddings ({covered})"
    return result


def check_devices(cfg, nproc: int | None) -> CheckResult:
    """GPUs visible here against the processes per node the job will start."""
    import torch

    result = CheckResult("devices")
    procs = nproc or 1
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = cfg.train.device
    if device == "cpu" or (device == "auto" and gpus == 0):
        why = "train.device=cpu" if device == "cpu" else "no GPU visible"
        result.ok = f"devices: {why}; {procs} process(es) per node will run on the CPU with gloo"
    elif gpus == 0:
        result.problems.append(ConfigError("train.device: cuda, but no GPU is visible on this machine"))
    elif procs > gpus:
        result.problems.append(
            ConfigError(
                f"--nproc {procs}: only {gpus} GPU(s) visible, fewer than the processes per node; "
                f"start at most {gpus} or set train.device=cpu"
            )
        )
    else:
        name = torch.cuda.get_device_name(0)
        result.ok = f"devices: {gpus} GPU(s) ({name}); {procs} process(es) per node with NCCL"
        if procs < gpus and nproc is not None:
            result.warnings.append(f"--nproc {procs} uses {procs} of the {gpus} visible GPUs")
    return result


def check_save_dir(path: str | os.PathLike) -> CheckResult:
    """The run directory (or the nearest existing parent that will hold it) is writable."""
    result = CheckResult("save dir")
    target = Path(path).expanduser().resolve()
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        result.problems.append(ConfigError(f"save dir: {probe} is a file, not a directory"))
        return result
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".senseflow-check-"):
            pass
    except OSError as err:
        result.problems.append(ConfigError(f"save dir: {probe} is not writable ({err.strerror or err})"))
        return result
    free = shutil.disk_usage(probe).free / 2**30
    state = "exists" if target.exists() else f"will be created under {probe}"
    latest = target / "checkpoints" / "latest"
    if latest.is_file():
        state += f", resumes from {latest.read_text().strip()}"
    result.ok = f"save dir: {target} is writable ({state}; {free:.1f} GiB free)"
    return result


# ---------------------------------------------------------------------------------------------------
# Entry points


def preflight_checks(cfg, check_paths: bool | None = None) -> tuple[Path, Any]:
    """The cheap checks (teacher folder and weights, dataset index and paths, backbones), raising the first
    problem as a ConfigError/DataError. Returns (teacher folder, dataset)."""
    teacher = check_teacher(cfg)
    teacher.raise_first()
    data = check_dataset(cfg, cfg.data.check_paths if check_paths is None else check_paths)
    data.raise_first()
    check_backbones(cfg).raise_first()
    check_other_paths(cfg).raise_first()
    check_text_embeddings(cfg, data.value).raise_first()
    return teacher.value, data.value


def run_checks(
    config: str,
    overrides: list[str] | tuple[str, ...] = (),
    nproc: int | None = None,
    nnodes: int = 1,
    save_dir: str | None = None,
) -> list[str]:
    """All checks of a config; returns the report lines (``OK``/``FAIL``/``WARN``/``SKIP`` prefixes)."""
    from .config import load_config, resolve_paths

    try:
        cfg = load_config(config, list(overrides))
        resolve_paths(cfg)
    except SenseFlowError as err:
        return [f"FAIL {err}"]
    lines = [f"OK   config: {Path(config).resolve()} loads (recipe {cfg.recipe}, family {cfg.model.family})"]
    lines += check_teacher(cfg).lines()
    data = check_dataset(cfg, check_paths=True)
    lines += data.lines()
    world = (nproc or 1) * nnodes
    if data.value is not None:
        lines += check_sample_batch(cfg, data.value, world).lines()
    else:
        lines.append("SKIP sample batch: the dataset index did not load")
    lines += check_backbones(cfg).lines()
    lines += check_other_paths(cfg).lines()
    lines += check_text_embeddings(cfg, data.value).lines()
    lines += check_devices(cfg, nproc).lines()
    if save_dir is not None:
        lines += check_save_dir(save_dir).lines()
    return lines


def main(argv: list[str] | None = None) -> int:
    """Print the check lines; exit 0 when nothing failed, 2 otherwise."""
    p = argparse.ArgumentParser(prog="python -m senseflow.check", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="YAML config")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.batch_size=2")
    p.add_argument("--nproc", type=int, default=None, help="processes (GPUs) per node the job will start")
    p.add_argument("--nnodes", type=int, default=1, help="nodes the job will run on")
    p.add_argument("--save-dir", default=None, help="run directory to check for write access")
    p.add_argument("-v", "--verbose", action="store_true", help="also show the libraries' INFO logs")
    args = p.parse_intermixed_args(argv)
    if args.nproc is not None and args.nproc < 1:
        p.error("--nproc must be >= 1")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    lines = run_checks(args.config, args.overrides, args.nproc, args.nnodes, args.save_dir)
    emit(*lines)
    failed = sum(line.startswith("FAIL") for line in lines)
    emit(f"{failed} problem(s) found" if failed else "all checks passed")
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
