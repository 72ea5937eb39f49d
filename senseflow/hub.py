"""Download teachers, discriminator backbones and data sets from the Hugging Face hub.

Usage::

    python -m senseflow.hub download MODEL --out DIR [--token TOKEN] [--revision R]
    python -m senseflow.hub download --dataset laion_aesthetics_1024 --out DIR [--min-size 1024]

``MODEL`` is one of ``sd35_medium``, ``sd35_large``, ``flux_dev``, ``sdxl_base``, ``dinov2_large``,
``clip_vit_l14``. Only the files the recipes read are fetched (a diffusers teacher's component folders
in safetensors, not the duplicate single-file checkpoints at the top of the repos, nor ONNX/Flax/fp16
copies). ``huggingface_hub.snapshot_download`` writes them straight into ``DIR`` and resumes: rerunning
the command after an interruption skips finished files. At the end the ``paths:`` lines to paste into
the config (and the equivalent ``key=value`` overrides) are printed.

SD3.5 and FLUX.1-dev are gated: accept the licence on the model page with your hub account, then pass
``--token`` or log in once (``huggingface-cli login`` / ``hf auth login``, or set ``HF_TOKEN``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import snapshot_download

from .errors import ConfigError, SenseFlowError
from .output import emit

logger = logging.getLogger("senseflow.hub")

HUB_URL = "https://huggingface.co"

_TOKENIZER_FILES = ("*.json", "*.txt", "*.model")
# variants and formats the loaders never read (diffusers/transformers load the plain safetensors)
_IGNORE = (
    "*.fp16.safetensors",
    "*.bf16.safetensors",
    "*.fp8*.safetensors",
    "*.onnx",
    "*.onnx_data",
    "*.msgpack",
    "*.h5",
    "*.ckpt",
    "*.bin",
    "*openvino*",
)


def _diffusers_patterns(models: tuple[str, ...], tokenizers: tuple[str, ...]) -> tuple[str, ...]:
    """allow_patterns of a diffusers folder: the index, the scheduler, model folders and tokenizers."""
    patterns = ["model_index.json", "scheduler/*.json"]
    for folder in models:
        patterns += [f"{folder}/*.json", f"{folder}/*.safetensors"]
    for folder in tokenizers:
        patterns += [f"{folder}/{p}" for p in _TOKENIZER_FILES]
    return tuple(patterns)


def _diffusers_required(models: tuple[str, ...], tokenizers: tuple[str, ...]) -> tuple[str, ...]:
    """Globs that must match after the download (one config and weights per model folder)."""
    required = ["model_index.json", "scheduler/scheduler_config.json"]
    for folder in models:
        required += [f"{folder}/config.json", f"{folder}/*.safetensors"]
    required += [f"{folder}/tokenizer_config.json" for folder in tokenizers]
    return tuple(required)


@dataclass(frozen=True)
class ModelSpec:
    """What to fetch from one hub repo, and where the result goes in the config."""

    repo_id: str
    config_key: str
    """``paths.<key>`` that points to the download."""
    allow: tuple[str, ...]
    """``allow_patterns`` of the download."""
    required: tuple[str, ...] = ()
    """Globs (relative to the folder) each of which must match a file after the download."""
    ignore: tuple[str, ...] = _IGNORE
    """``ignore_patterns`` of the download."""
    fallback: tuple[str, ...] = ()
    """Fetched in a second call only when none of ``weights`` exists after the first (e.g. a .bin)."""
    weights: tuple[str, ...] = ()
    """Weight file names the config path points into (any one suffices)."""
    gated: bool = False
    """Needs an accepted licence and a token."""
    folder: str = ""
    """Default folder name under the wrappers' DIR."""
    note: str = ""

    @property
    def url(self) -> str:
        return f"{HUB_URL}/{self.repo_id}"


_SD3_MODELS = ("text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae")
_SD3_TOKENIZERS = ("tokenizer", "tokenizer_2", "tokenizer_3")
_FLUX_MODELS = ("text_encoder", "text_encoder_2", "transformer", "vae")
_FLUX_TOKENIZERS = ("tokenizer", "tokenizer_2")
# SDXL's VAE overflows in fp16; vae/ holds the fp32 weights (the fp16 variant is ignored)
_SDXL_MODELS = ("text_encoder", "text_encoder_2", "unet", "vae")
_SDXL_TOKENIZERS = ("tokenizer", "tokenizer_2")

MODELS: dict[str, ModelSpec] = {
    "sd35_medium": ModelSpec(
        "stabilityai/stable-diffusion-3.5-medium",
        "pretrained_model",
        _diffusers_patterns(_SD3_MODELS, _SD3_TOKENIZERS),
        _diffusers_required(_SD3_MODELS, _SD3_TOKENIZERS),
        gated=True,
        folder="stable-diffusion-3.5-medium",
    ),
    "sd35_large": ModelSpec(
        "stabilityai/stable-diffusion-3.5-large",
        "pretrained_model",
        _diffusers_patterns(_SD3_MODELS, _SD3_TOKENIZERS),
        _diffusers_required(_SD3_MODELS, _SD3_TOKENIZERS),
        gated=True,
        folder="stable-diffusion-3.5-large",
    ),
    "flux_dev": ModelSpec(
        "black-forest-labs/FLUX.1-dev",
        "pretrained_model",
        _diffusers_patterns(_FLUX_MODELS, _FLUX_TOKENIZERS),
        _diffusers_required(_FLUX_MODELS, _FLUX_TOKENIZERS),
        gated=True,
        folder="FLUX.1-dev",
    ),
    "sdxl_base": ModelSpec(
        "stabilityai/stable-diffusion-xl-base-1.0",
        "pretrained_model",
        _diffusers_patterns(_SDXL_MODELS, _SDXL_TOKENIZERS),
        _diffusers_required(_SDXL_MODELS, _SDXL_TOKENIZERS),
        folder="stable-diffusion-xl-base-1.0",
        note="vae/ holds SDXL's fp32 VAE weights (it overflows in fp16)",
    ),
    "dinov2_large": ModelSpec(
        "facebook/dinov2-large",
        "dino",
        ("config.json", "preprocessor_config.json", "model.safetensors"),
        ("config.json",),
        ignore=(),
        fallback=("pytorch_model.bin",),
        weights=("model.safetensors", "pytorch_model.bin"),
        folder="dinov2-large",
    ),
    "clip_vit_l14": ModelSpec(
        "timm/vit_large_patch14_clip_224.openai",
        "clip",
        ("open_clip_config.json", "open_clip_model.safetensors"),
        ("open_clip_config.json",),
        ignore=(),
        fallback=("open_clip_pytorch_model.bin",),
        weights=("open_clip_model.safetensors", "open_clip_pytorch_model.bin"),
        folder="clip-vit-l-14",
    ),
}


@dataclass(frozen=True)
class DatasetSpec:
    """A data set of parquet shards on the hub, turned into the JSON dataset by the builder."""

    repo_id: str
    allow: tuple[str, ...] = ("*.parquet",)
    build: dict = field(default_factory=dict)
    """Extra keyword arguments of :func:`senseflow.data.build.build_dataset`."""

    @property
    def url(self) -> str:
        return f"{HUB_URL}/datasets/{self.repo_id}"


DATASETS: dict[str, DatasetSpec] = {
    "laion_aesthetics_1024": DatasetSpec("limingcv/LAION_Aesthetics_1024"),
}


# ---------------------------------------------------------------------------------------------------
# Errors


class HubOfflineError(ConfigError):
    """The hub cannot be reached (no network, ``HF_HUB_OFFLINE=1``)."""


def _status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def _is_connection_error(err: BaseException) -> bool:
    """Connection problems of requests/httpx/urllib3 (class names), or the builtin ones."""
    if isinstance(err, ConnectionError | TimeoutError):
        return True
    for cls in type(err).__mro__:
        module = cls.__module__.split(".")[0]
        if module in ("requests", "httpx", "httpx2", "httpcore", "urllib3") and any(
            word in cls.__name__ for word in ("Connect", "Timeout", "Network", "Proxy")
        ):
            return True
    return False


def _offline_message(what: str, out: Path) -> str:
    why = "HF_HUB_OFFLINE=1 is set" if _truthy(os.environ.get("HF_HUB_OFFLINE")) else "no network"
    return (
        f"{what}: cannot reach the Hugging Face hub (offline: {why}) and {out} holds no complete copy; "
        "connect to the internet (unset HF_HUB_OFFLINE) and rerun, finished files are kept"
    )


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def explain_error(
    err: BaseException, repo_id: str, url: str, gated: bool, out: Path
) -> SenseFlowError | None:
    """A one-line :class:`ConfigError` for a hub error a user can fix, or None for anything else."""
    try:
        from huggingface_hub import errors as hub_errors
    except ImportError:  # huggingface_hub < 0.24 kept them in utils
        from huggingface_hub import utils as hub_errors

    login = "pass --token hf_... or run `huggingface-cli login` (or set HF_TOKEN)"
    access = f"{repo_id} is gated: accept its licence on {url} with your hub account, then {login}"
    if isinstance(err, hub_errors.GatedRepoError):
        return ConfigError(f"{access} (the hub answered: access restricted)")
    if isinstance(err, hub_errors.RevisionNotFoundError):
        return ConfigError(f"{repo_id}: revision not found on {url}; check --revision")
    if isinstance(err, hub_errors.RepositoryNotFoundError):
        if gated:
            return ConfigError(f"{access} (the hub answered: repository not found or not accessible)")
        return ConfigError(
            f"{repo_id}: repository not found or not accessible on {url}; check the name, or {login}"
        )
    if isinstance(err, hub_errors.LocalEntryNotFoundError) or _is_connection_error(err):
        return HubOfflineError(_offline_message(repo_id, out))
    if isinstance(err, hub_errors.HfHubHTTPError):
        status = _status(err)
        if status in (401, 403):
            if gated:
                return ConfigError(f"{access} (the hub answered HTTP {status})")
            return ConfigError(f"{repo_id}: the hub refused access (HTTP {status}); {login}")
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return ConfigError(
            f"{repo_id}: download failed (HTTP {status or '?'}: {first}); rerun to resume, finished files are kept"
        )
    return None


def _fetch(
    repo_id: str,
    out: Path,
    allow: tuple[str, ...],
    ignore: tuple[str, ...],
    *,
    revision: str | None,
    token: str | None,
    url: str,
    gated: bool,
    repo_type: str | None = None,
) -> None:
    """``snapshot_download`` into ``out``; hub errors a user can fix become one-line ConfigErrors."""
    kwargs = {
        "local_dir": str(out),
        "allow_patterns": list(allow),
        "revision": revision,
        "token": token,
    }
    if ignore:
        kwargs["ignore_patterns"] = list(ignore)
    if repo_type is not None:
        kwargs["repo_type"] = repo_type
    logger.info("fetching %s into %s", repo_id, out)
    logger.debug("allow_patterns %s, ignore_patterns %s", allow, ignore)
    try:
        snapshot_download(repo_id, **kwargs)
    except Exception as err:
        explained = explain_error(err, repo_id, url, gated, out)
        if explained is None:
            raise
        raise explained from None


# ---------------------------------------------------------------------------------------------------
# Downloads


def _matches(root: Path, pattern: str) -> list[Path]:
    return sorted(p for p in root.glob(pattern) if p.is_file())


@dataclass
class Download:
    """Result of :func:`download`: the folder, the config key and the value to put there."""

    name: str
    folder: Path
    config_key: str
    value: Path
    files: list[Path]

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)


def incomplete(name: str, out: Path) -> str | None:
    """What is missing from a download of model ``name`` in ``out`` (None when it is complete)."""
    from .check import weight_problems

    spec = MODELS[name]
    missing = [pattern for pattern in spec.required if not _matches(out, pattern)]
    if spec.weights and not any((out / w).is_file() for w in spec.weights):
        missing.append(" or ".join(spec.weights))
    if missing:
        return f"missing {', '.join(missing[:4])}"
    if spec.config_key == "pretrained_model":
        folders = [p.parent for p in out.glob("*/config.json")]
    else:
        folders = [out] if spec.config_key == "dino" else []
    problems = [msg for folder in sorted(folders) for msg in weight_problems(folder)]
    return problems[0] if problems else None


def download(
    name: str, out: str | os.PathLike, *, token: str | None = None, revision: str | None = None
) -> Download:
    """Fetch model ``name`` (a key of :data:`MODELS`) into ``out`` and check the result is complete.

    Offline, a folder that already holds a complete copy is accepted (with a warning).
    """
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    spec = MODELS[name]
    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    common = {"revision": revision, "token": token, "url": spec.url, "gated": spec.gated}
    try:
        _fetch(spec.repo_id, out, spec.allow, spec.ignore, **common)
        if spec.fallback and not any((out / w).is_file() for w in spec.weights):
            logger.info(
                "%s has no %s; fetching %s", spec.repo_id, " / ".join(spec.allow), ", ".join(spec.fallback)
            )
            _fetch(spec.repo_id, out, spec.fallback, (), **common)
    except HubOfflineError:
        if incomplete(name, out) is not None:
            raise
        logger.warning("the hub cannot be reached; %s already holds a complete copy of %s", out, spec.repo_id)
    problem = incomplete(name, out)
    if problem:
        raise ConfigError(
            f"{spec.repo_id}: the download into {out} is incomplete: {problem}; rerun the command "
            "(check --revision)"
        )
    value = out
    if spec.config_key == "clip":
        value = next(out / w for w in spec.weights if (out / w).is_file())
    files = [p for p in out.rglob("*") if p.is_file() and ".cache" not in p.relative_to(out).parts]
    return Download(name, out, spec.config_key, value, sorted(files))


def download_dataset(
    name: str,
    out: str | os.PathLike,
    *,
    token: str | None = None,
    revision: str | None = None,
    min_size: int = 1024,
    workers: int | None = None,
):
    """Fetch the parquet shards of data set ``name`` into ``out/parquet`` and build ``out/dataset.json``."""
    if name not in DATASETS:
        raise ConfigError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    from .data.build import build_dataset

    spec = DATASETS[name]
    out = Path(out).expanduser().resolve()
    shards = out / "parquet"
    shards.mkdir(parents=True, exist_ok=True)
    _fetch(
        spec.repo_id,
        shards,
        spec.allow,
        (),
        revision=revision,
        token=token,
        url=spec.url,
        gated=False,
        repo_type="dataset",
    )
    return build_dataset(out, parquet=shards, min_size=min_size, workers=workers, **spec.build)


def paths_lines(entries: list[tuple[str, Path]]) -> list[str]:
    """The ``paths:`` block to paste into a config and the equivalent overrides."""
    lines = ["paste into the config:", "paths:"]
    lines += [f"  {key}: {value}" for key, value in entries]
    lines += ["or override on the command line:"]
    lines += ["  " + " ".join(f"paths.{key}={value}" for key, value in entries)]
    return lines


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def main(argv: list[str] | None = None) -> int:
    """``download MODEL --out DIR`` or ``download --dataset NAME --out DIR``; prints the config lines."""
    p = argparse.ArgumentParser(prog="python -m senseflow.hub", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("download", help="fetch a model (or --dataset) into --out")
    d.add_argument("model", nargs="?", choices=sorted(MODELS), help="model to fetch")
    d.add_argument("--dataset", choices=sorted(DATASETS), help="fetch a data set and build dataset.json")
    d.add_argument("--out", required=True, help="target folder (created; a rerun resumes)")
    d.add_argument("--token", default=None, help="hub token (default: HF_TOKEN or the saved login)")
    d.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    d.add_argument("--min-size", type=int, default=1024, help="--dataset: smallest short side kept")
    d.add_argument("--workers", type=int, default=None, help="--dataset: image decoding threads")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if (args.model is None) == (args.dataset is None):
        p.error("download: name exactly one MODEL or --dataset NAME")
    try:
        if args.dataset:
            report = download_dataset(
                args.dataset,
                args.out,
                token=args.token,
                revision=args.revision,
                min_size=args.min_size,
                workers=args.workers,
            )
            emit(*report.summary_lines(), *paths_lines([("dataset", report.dataset)]))
            return 0
        result = download(args.model, args.out, token=args.token, revision=args.revision)
    except SenseFlowError as err:
        logger.error("%s", err)
        return 2
    spec = MODELS[args.model]
    emit(
        f"{spec.repo_id}: {len(result.files)} files, {_gib(result.size_bytes)} in {result.folder}"
        + (f" ({spec.note})" if spec.note else "")
    )
    emit(*paths_lines([(result.config_key, result.value)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
