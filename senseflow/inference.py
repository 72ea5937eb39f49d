"""Inference with a distilled generator: checkpoint reading, generation, and the scripts' shared runner.

* :func:`load_checkpoint_state` reads a generator state dict from every format a run produces or a
  user may hold (spec §15.2, loading tensors only, never unrestricted unpickling): ``ckpt_model_*.pth``
  (``{"model": …}``, ``{"ema_model": …}`` or a bare state dict), ``.safetensors``, a training state
  ``checkpoints/step_*`` or a whole run directory (its newest complete state), and a diffusers model
  folder (``config.json`` + ``diffusion_pytorch_model*.safetensors``, e.g. :mod:`senseflow.export`'s
  output or the released SenseFlow transformers).
* :func:`build_inference` builds the adapter of a recipe for one process; :func:`load_generator` loads
  the generator strictly through it; :func:`generate` samples images with :mod:`senseflow.sampling`.
* :func:`run_script` is the body of ``scripts_*/test_senseflow_*.py``: the scripts only name their
  defaults (config, output folder, the teacher flag).

Noise of prompt ``i`` comes from ``torch.Generator(device).manual_seed(seed·1_000_003 + i)`` (the
initial latent first, then the x0 sampler's re-noising), so an image depends only on the seed, its
prompt index and the device type: not on the batch size or on the other prompts of its batch.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from .adapters import build_adapter
from .adapters.base import TeacherAdapter
from .config import Config, load_config, validate
from .distributed import DistInfo
from .errors import ConfigError
from .metrics import to_uint8
from .parallel import DTYPE, read_diffusers_weights
from .sampling import SAMPLERS, inference_levels, per_sample_noise, run_sampler

logger = logging.getLogger(__name__)

SEED_STRIDE = 1_000_003
"""Noise of prompt ``i`` is seeded with ``seed·SEED_STRIDE + i`` (distinct streams for seeds and indices)."""

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"


# --- checkpoints -----------------------------------------------------------------------------------------


def _first_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return (text or type(err).__name__)[:300]


def _check_tensors(state: object, path: Path, flag: str) -> dict[str, torch.Tensor]:
    if not isinstance(state, dict) or not state:
        raise ConfigError(f"{flag}: {path} holds no state dict (expected named tensors)")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ConfigError(
            f"{flag}: {path} is not a generator state dict: entries that are not named tensors, "
            f"e.g. {', '.join(map(str, bad[:3]))}"
        )
    return state


def _read_torch_file(path: Path, flag: str) -> dict[str, torch.Tensor]:
    """A ``.pth``/``.pt``/``.bin`` file with ``model``, ``ema_model`` or a bare state dict (tensors only)."""
    try:
        try:  # memory-mapped: a multi-GB fp32 state is paged in while it is moved to the device
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as err:  # weights_only refuses arbitrary objects; corrupt files raise many types
        raise ConfigError(
            f"{flag}: cannot read {path} as a tensors-only PyTorch checkpoint ({_first_line(err)})"
        ) from None
    if isinstance(obj, dict):
        for key in ("model", "ema_model"):
            if key in obj:
                logger.info("reading the %r entry of %s", key, path)
                return _check_tensors(obj[key], path, flag)
    return _check_tensors(obj, path, flag)


def _read_safetensors(path: Path, flag: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except Exception as err:  # OSError, or safetensors' own SafetensorError for a malformed file
        raise ConfigError(f"{flag}: cannot read {path} as safetensors ({_first_line(err)})") from None
    return _check_tensors(state, path, flag)


def _latest_in_run(run_or_checkpoints: Path, flag: str) -> Path:
    """The newest complete ``checkpoints/step_*`` of a run directory (or of its ``checkpoints/``), else
    its newest ``ckpt_model_{iter}.pth`` (runs with ``checkpoint.export_generator`` only)."""
    from .checkpoint import _EXPORT, CheckpointManager

    run = run_or_checkpoints.parent if run_or_checkpoints.name == "checkpoints" else run_or_checkpoints
    step = CheckpointManager(run, DistInfo(0, 1, 0, torch.device("cpu"))).latest()
    if step is not None:
        return step
    exports = sorted((int(m.group(1)), p) for p in run.iterdir() if (m := _EXPORT.match(p.name)))
    if not exports:
        raise ConfigError(f"{flag}: {run_or_checkpoints} holds no complete training checkpoint")
    return exports[-1][1]


def _read_training_state(step_dir: Path, flag: str, prefix: str = "generator") -> dict[str, torch.Tensor]:
    """The generator of a torch.distributed.checkpoint training state, read without a process group.

    :meth:`Engine._dcp_state` saves ``{"generator": model_state_dict, ...}``; DCP flattens nested dicts
    to ``"generator.<key>"``. A template of those tensors is built from the checkpoint's metadata and
    filled with ``dcp.load(no_dist=True)``; the other nets and the optimiser states are not read.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if not (step_dir / "meta.json").is_file():
        raise ConfigError(f"{flag}: {step_dir} is an incomplete training checkpoint (no meta.json)")
    reader = dcp.FileSystemReader(str(step_dir))
    try:
        metadata = reader.read_metadata()
    except Exception as err:
        raise ConfigError(
            f"{flag}: cannot read the checkpoint metadata of {step_dir} ({_first_line(err)})"
        ) from None
    head = prefix + "."
    template = {
        key[len(head) :]: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith(head) and isinstance(meta, TensorStorageMetadata)
    }
    if not template:
        raise ConfigError(f"{flag}: {step_dir} holds no '{prefix}' state")
    state = {prefix: template}
    with warnings.catch_warnings():  # "torch.distributed is disabled ...": single-process reading is meant
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, storage_reader=reader, no_dist=True)
    return state[prefix]


def _norm(value):
    return [_norm(v) for v in value] if isinstance(value, list | tuple) else value


def config_differences(found: dict, expected: dict, cls: type | None = None) -> list[str]:
    """Architecture fields in which two diffusers model configs differ, as ``"key: found != expected"``.

    Private entries (``_class_name``, ``_diffusers_version``, ...) are ignored; a field missing from one
    config takes ``cls.__init__``'s default (configs written by other diffusers versions omit some).
    """
    defaults = {}
    if cls is not None:
        defaults = {
            name: p.default
            for name, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty
        }
    missing = object()
    diffs = []
    for key in sorted(k for k in set(found) | set(expected) if not k.startswith("_")):
        a = _norm(found.get(key, defaults.get(key, missing)))
        b = _norm(expected.get(key, defaults.get(key, missing)))
        if a != b:
            show = ["(absent)" if v is missing else repr(v) for v in (a, b)]
            diffs.append(f"{key}: {show[0]} != {show[1]}")
    return diffs


def check_model_config(found_path: Path, expected: dict, cls: type | None, flag: str, what: str) -> None:
    """Raise naming ``flag`` when the config.json at ``found_path`` is not ``expected``'s architecture."""
    try:
        found = json.loads(found_path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{flag}: cannot read {found_path} ({_first_line(err)})") from None
    name = found.get("_class_name")
    if cls is not None and name is not None and name not in {c.__name__ for c in cls.__mro__}:
        raise ConfigError(f"{flag}: {found_path} describes a {name}, but {what} is a {cls.__name__}")
    diffs = config_differences(found, expected, cls)
    if diffs:
        more = f" and {len(diffs) - 3} more" if len(diffs) > 3 else ""
        raise ConfigError(f"{flag}: {found_path} does not match {what}: {'; '.join(diffs[:3])}{more}")


def _diffusers_folder(path: Path) -> Path | None:
    """``path`` or its ``transformer/`` / ``unet/`` subfolder when it is a diffusers model folder."""
    for folder in (path, path / "transformer", path / "unet"):
        if (folder / "config.json").is_file() and any(folder.glob(f"{DIFFUSERS_WEIGHTS}*")):
            return folder
    return None


def load_checkpoint_state(
    path: str | Path,
    expected_config: dict | None = None,
    model_cls: type | None = None,
    flag: str = "--checkpoint",
) -> dict[str, torch.Tensor]:
    """Read a generator state dict (CPU tensors) from any supported format (see the module docstring).

    Args:
        path: a ``.pth``/``.pt``/``.bin`` or ``.safetensors`` file, a training state ``step_*``, a run
            directory or its ``checkpoints/`` (newest complete state), or a diffusers model folder.
        expected_config: the generator's config; a diffusers folder whose ``config.json`` differs in an
            architecture field is refused (with ``model_cls`` to fill defaults and check the class).
        flag: the option or key named in error messages.

    Raises:
        ConfigError: one line naming ``flag`` for a missing, unreadable or unknown checkpoint.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"{flag}: {path} does not exist")
    if path.is_file():
        if path.suffix == ".safetensors":
            state = _read_safetensors(path, flag)
            fmt = "safetensors"
        else:
            state = _read_torch_file(path, flag)
            fmt = "torch file"
    elif (path / ".metadata").is_file():
        state, fmt = _read_training_state(path, flag), "training checkpoint"
    elif (path / "checkpoints").is_dir() or path.name == "checkpoints" or any(path.glob("ckpt_model_*.pth")):
        latest = _latest_in_run(path, flag)
        if latest.is_file():
            state, fmt = _read_torch_file(latest, flag), latest.name
        else:
            state, fmt = _read_training_state(latest, flag), f"training checkpoint {latest.name}"
    elif (folder := _diffusers_folder(path)) is not None:
        if expected_config is not None:
            check_model_config(folder / "config.json", expected_config, model_cls, flag, "the generator")
        try:
            state = _check_tensors(read_diffusers_weights(folder, DIFFUSERS_WEIGHTS), folder, flag)
        except FileNotFoundError as err:
            raise ConfigError(f"{flag}: {_first_line(err)}") from None
        fmt = "diffusers folder"
    else:
        raise ConfigError(
            f"{flag}: {path} is no known checkpoint (expected a .pth/.safetensors file, a run or "
            "checkpoints/step_* directory, or a diffusers folder with config.json and weights)"
        )
    logger.info("read %d generator tensors from %s (%s)", len(state), path, fmt)
    return state


# --- building --------------------------------------------------------------------------------------------


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bf16"`` (the config's spelling)."""
    return {v: k for k, v in DTYPE.items()}[dtype]


def build_inference(
    config_path: str | Path,
    teacher_dir: str | Path,
    device: str | torch.device,
    dtype: torch.dtype,
    overrides: Sequence[str] = (),
    load_components: bool = True,
) -> tuple[Config, TeacherAdapter]:
    """The recipe config and its teacher adapter for single-process inference.

    ``paths.pretrained_model`` is ``teacher_dir`` (``tiny:``/``arch:`` names are built as in training);
    the dataset and discriminator paths, which inference never reads, get placeholders, and
    ``paths.text_embeddings`` is cleared (prompts are always encoded). The text
    encoders run in ``dtype``, the VAE in the recipe's ``precision.vae`` (eager, with the default attention,
    unless ``overrides`` set ``model.compile_vae`` or ``model.vae_math_attention``), T5 with the recipe's
    ``model.t5_max_length`` (77, as in training: fixes B14).

    With ``load_components=False`` the text encoders and the VAE are built on the meta device without
    reading weights (:mod:`senseflow.export` needs only the transformer config); the adapter's device,
    used by :meth:`~TeacherAdapter.load_generator`, is still ``device``.
    """
    from .data.tiny import resolve_path

    device = torch.device(device)
    placeholders = [f"paths.{k}=unused-at-inference" for k in ("pretrained_model", "dataset", "dino", "clip")]
    extra = [f"precision.text_encoders={dtype_name(dtype)}"]
    if not load_components:
        extra.append("model.random_init=true")
    # training-speed switches of the VAE, which overrides may turn back on: compiling costs a minute before
    # the first image, and the math attention materialises a 1 GiB attention matrix per 1024-px image
    eager_vae = ["model.compile_vae=false", "model.vae_math_attention=false"]
    cfg = load_config(config_path, [*eager_vae, *overrides, *placeholders, *extra])
    cfg.paths.pretrained_model = str(resolve_path(str(teacher_dir)))
    cfg.paths.text_embeddings = ""  # inference prompts are encoded, whatever a training config set
    validate(cfg, f"{config_path} (teacher {teacher_dir})")
    info = DistInfo(0, 1, 0, device if load_components else torch.device("meta"))
    adapter = build_adapter(cfg, info)
    if not load_components:
        adapter.info = DistInfo(0, 1, 0, device)
        adapter.device = device
    return cfg, adapter


def load_generator(adapter: TeacherAdapter, checkpoint: str | Path, dtype: torch.dtype) -> nn.Module:
    """Read ``checkpoint`` (any format of :func:`load_checkpoint_state`) and load it strictly into the
    adapter's generator architecture, in ``dtype`` on the adapter's device, in eval mode."""
    state = load_checkpoint_state(checkpoint, adapter.generator_config(), adapter.transformer_cls)
    try:
        return adapter.load_generator(state, dtype)
    except ConfigError as err:
        raise ConfigError(f"--checkpoint: {checkpoint}: {err}") from None


def default_resolution(adapter: TeacherAdapter) -> int:
    """The teacher's native image size: ``transformer.config.sample_size`` × the VAE's scale factor
    (1024 for SD3.5, 128 for the tiny teacher); the recipe's ``train.resolution`` if it has none."""
    sample_size = adapter.generator_config().get("sample_size")
    if isinstance(sample_size, int):
        return sample_size * adapter.vae_scale
    return adapter.cfg.train.resolution


def latent_shape(adapter: TeacherAdapter, height: int, width: int) -> tuple[int, ...]:
    """Shape of one latent of a ``height`` × ``width`` image (without the batch dimension).

    Uses the adapter's ``latent_shape_hw(height, width)`` if it has one, else its square
    ``latent_shape`` (non-square sizes combine the two sides of a (C, H, W) latent).
    """
    hook = getattr(adapter, "latent_shape_hw", None)
    try:
        if callable(hook):
            return tuple(hook(height, width))
        if height == width:
            return tuple(adapter.latent_shape(height))
        by_h, by_w = adapter.latent_shape(height), adapter.latent_shape(width)
    except ConfigError as err:
        reason = str(err).split(": ", 1)[-1]
        raise ConfigError(f"--height/--width: {height}x{width}: {reason}") from None
    if len(by_h) != 3:
        raise ConfigError(
            f"--height/--width: {height}x{width}: the {adapter.family} adapter needs square images"
        )
    return (by_h[0], by_h[1], by_w[2])


@torch.no_grad()
def generate(
    adapter: TeacherAdapter,
    generator: nn.Module,
    prompts: Sequence[str],
    indices: Sequence[int],
    seed: int,
    levels: torch.Tensor,
    sampler: str,
    height: int,
    width: int,
) -> torch.Tensor:
    """Images (B, 3, H, W) float32 in [-1, 1] for ``prompts`` with the distilled ``generator``.

    ``indices[b]`` (the prompt's global index) seeds its noise (see the module docstring). One
    conditional pass per step (guidance scale 0: the generator is distilled with guidance baked in).

    Args:
        levels: (K,) sampling levels, noisiest first (:func:`~senseflow.sampling.inference_levels`).
        sampler: ``"x0"`` or ``"euler"`` (:mod:`senseflow.sampling`).
    """
    if len(prompts) != len(indices):
        raise ValueError(f"{len(prompts)} prompts but {len(indices)} indices")
    device = adapter.device
    model_dtype = next(generator.parameters()).dtype
    gens = [torch.Generator(device).manual_seed(seed * SEED_STRIDE + int(i)) for i in indices]
    noise_fn = per_sample_noise(gens)
    noise = noise_fn((len(prompts), *latent_shape(adapter, height, width)))
    cond = {
        k: v.to(model_dtype) if v.is_floating_point() else v
        for k, v in adapter.encode_prompts(list(prompts)).items()
    }

    def pred_fn(x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        return adapter.forward(generator, x.to(model_dtype), level, cond)

    x0 = run_sampler(sampler, pred_fn, noise, levels.to(device), adapter.schedule, noise_fn)
    return adapter.decode_latents(x0).float().clamp(-1, 1)


# --- the scripts -----------------------------------------------------------------------------------------


def resolve_file(spec: str | Path, repo_root: Path) -> Path:
    """An absolute path as given; a relative one from the working directory if it exists there, else
    from the repository root (so the shipped defaults are found from any working directory)."""
    path = Path(spec).expanduser()
    if path.is_absolute() or path.exists():
        return path
    return repo_root / path


def read_prompts(path: Path, start: int, num: int) -> list[str]:
    """Prompts ``[start, start + num)`` of a file with one prompt per line (stripped; blank lines skipped)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--prompts_file: cannot read {path} ({_first_line(err)})") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ConfigError(f"--prompts_file: {path} holds no prompts (one prompt per line)")
    if start < 0 or num < 1 or start + num > len(prompts):
        raise ConfigError(
            f"--start_idx/--num_prompts: prompts {start}..{start + num - 1} requested but {path} holds "
            f"{len(prompts)} (indices 0..{len(prompts) - 1})"
        )
    return prompts[start : start + num]


def contact_sheet(images: Sequence, labels: Sequence[str], max_side: int = 256):
    """A PIL grid of uint8 (H, W, 3) ``images``, near-square, each scaled to at most ``max_side``."""
    from PIL import ImageDraw

    thumbs = []
    for arr in images:
        im = Image.fromarray(arr)
        im.thumbnail((max_side, max_side))
        thumbs.append(im)
    cols = math.ceil(math.sqrt(len(thumbs)))
    rows = math.ceil(len(thumbs) / cols)
    w = max(t.width for t in thumbs)
    h = max(t.height for t in thumbs)
    pad, label_h = 2, 12
    sheet = Image.new("RGB", (pad + cols * (w + pad), pad + rows * (h + label_h + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for n, (im, label) in enumerate(zip(thumbs, labels)):
        x = pad + (n % cols) * (w + pad)
        y = pad + (n // cols) * (h + label_h + pad)
        draw.text((x + 2, y), label, fill=(0, 0, 0))
        sheet.paste(im, (x, y + label_h))
    return sheet


def script_parser(
    prog: str,
    description: str,
    teacher_flag: str,
    default_config: str,
    default_folder: str,
    sd35_legacy_flag: bool = False,
    net_config_flag: str = "--transformer_config",
    net_config_default: str | None = None,
) -> argparse.ArgumentParser:
    """The arguments shared by every ``scripts_*/test_*.py`` (defaults of spec §15.1).

    ``net_config_flag`` names the generator-config option (``--transformer_config``, ``--dit_config``,
    ``--unet_config``); ``sd35_legacy_flag`` adds ``--sd35_legacy_sigmas`` (the SD3.5 scripts)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument(
        teacher_flag, dest="teacher", required=True, metavar="DIR", help="teacher folder in diffusers layout"
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="generator: ckpt_model_*.pth, .safetensors, a run dir or checkpoints/step_*, or a diffusers folder",
    )
    p.add_argument(
        net_config_flag,
        dest="net_config",
        default=net_config_default,
        help="generator config.json, checked against the generator built from the teacher (default: "
        + (net_config_default or "the teacher's own")
        + ")",
    )
    p.add_argument("--config", default=default_config, help=f"recipe config (default {default_config})")
    p.add_argument("--prompts_file", default="senseflow_test_prompts.txt", help="one prompt per line")
    p.add_argument("--start_idx", type=int, default=0, help="first prompt index")
    p.add_argument("--num_prompts", type=int, default=23, help="number of prompts from --start_idx")
    p.add_argument("--batch_size", type=int, default=1, help="prompts per forward pass")
    p.add_argument("--output_dir", default="./outputs", help=f"images go to OUTPUT_DIR/{default_folder}/")
    p.add_argument("--sampler", choices=SAMPLERS, default="x0", help="x0 (re-noise, as trained) or euler")
    p.add_argument("--num_steps", type=int, default=4, help="sampling steps (at most the trained anchors)")
    p.add_argument("--seed", type=int, default=42, help="noise of prompt i is seeded with seed*1000003+i")
    p.add_argument("--height", type=int, default=None, help="default: the teacher's native size")
    p.add_argument("--width", type=int, default=None, help="default: the teacher's native size")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=tuple(DTYPE), default=None, help="default: bf16 on cuda, fp32 on cpu")
    if sd35_legacy_flag:
        p.add_argument(
            "--sd35_legacy_sigmas",
            action="store_true",
            help="KNOWN WRONG (B5): the original scripts' double-shifted levels 1.0, 0.964, 0.9, 0.75",
        )
    return p


def _device_and_dtype(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device: cuda requested but no CUDA device is visible")
    return dev, DTYPE[dtype or ("bf16" if dev.type == "cuda" else "fp32")]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_script(
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str,
    teacher_flag: str,
    default_config: str,
    folder: str,
    repo_root: Path,
    sd35_legacy_flag: bool = False,
    net_config_flag: str = "--transformer_config",
    net_config_default: str | None = None,
    report: Callable[[str], None] = logger.info,
) -> Path:
    """Generate the prompts of a prompt file with a distilled generator (the test scripts' body).

    Writes ``<output_dir>/<folder>/<index:04d>.png`` (``index`` = global prompt index) and a contact
    sheet ``grid.png``; ``report`` receives one line per batch and a summary. Returns the image folder.
    Raises :class:`~senseflow.errors.SenseFlowError` for user mistakes (each naming the option).
    """
    from .metrics import setup_logging

    parser = script_parser(
        prog,
        description,
        teacher_flag,
        default_config,
        folder,
        sd35_legacy_flag,
        net_config_flag,
        net_config_default,
    )
    args = parser.parse_args(argv)
    legacy = getattr(args, "sd35_legacy_sigmas", False)
    setup_logging(0)
    t_start = time.perf_counter()
    if args.batch_size < 1:
        raise ConfigError(f"--batch_size: must be >= 1, got {args.batch_size}")
    prompts_file = resolve_file(args.prompts_file, repo_root)
    prompts = read_prompts(prompts_file, args.start_idx, args.num_prompts)
    indices = list(range(args.start_idx, args.start_idx + len(prompts)))
    device, dtype = _device_and_dtype(args.device, args.dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    cfg, adapter = build_inference(resolve_file(args.config, repo_root), args.teacher, device, dtype)
    if args.net_config is not None:
        check_model_config(
            resolve_file(args.net_config, repo_root),
            adapter.generator_config(),
            adapter.transformer_cls,
            net_config_flag,
            f"the generator built from the teacher ({cfg.paths.pretrained_model})",
        )
    levels = inference_levels(cfg, adapter.schedule, args.num_steps, legacy)
    height = args.height or default_resolution(adapter)
    width = args.width or default_resolution(adapter)
    latent_shape(adapter, height, width)  # size errors before the checkpoint is read
    generator = load_generator(adapter, args.checkpoint, dtype)
    out = Path(args.output_dir) / folder
    out.mkdir(parents=True, exist_ok=True)
    report(
        f"{len(prompts)} prompts ({indices[0]}..{indices[-1]}) of {prompts_file}: {height}x{width}, "
        f"{args.sampler} sampler, {len(levels)} steps at levels {[round(float(v), 6) for v in levels]}, "
        f"{dtype_name(dtype)} on {device}, seed {args.seed}"
        + (" [legacy double-shifted SD3.5 sigmas, B5]" if legacy else "")
    )
    t_load = time.perf_counter() - t_start

    arrays, batch_times = [], []
    num_batches = math.ceil(len(prompts) / args.batch_size)
    for b in range(num_batches):
        sl = slice(b * args.batch_size, (b + 1) * args.batch_size)
        _sync(device)
        t0 = time.perf_counter()
        images = generate(
            adapter, generator, prompts[sl], indices[sl], args.seed, levels, args.sampler, height, width
        )
        _sync(device)
        dt = time.perf_counter() - t0
        batch_times.append(dt)
        for idx, arr in zip(indices[sl], to_uint8(images)):
            Image.fromarray(arr).save(out / f"{idx:04d}.png")
            arrays.append(arr)
        report(f"batch {b + 1}/{num_batches} (prompts {indices[sl][0]}..{indices[sl][-1]}): {dt:.2f}s")

    contact_sheet(arrays, [f"{i:04d}" for i in indices]).save(out / "grid.png")
    gen_time = sum(batch_times)
    summary = (
        f"done: {len(prompts)} images in {gen_time:.2f}s of generation "
        f"({len(prompts) / gen_time:.3f} images/s"
    )
    if num_batches > 1:  # the first batch includes warm-up (kernel selection, allocations)
        rest_images = len(prompts) - args.batch_size
        summary += f"; {rest_images / sum(batch_times[1:]):.3f} after the first batch"
    summary += f"), {time.perf_counter() - t_start:.1f}s in total ({t_load:.1f}s loading)"
    if device.type == "cuda":
        summary += f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    report(summary)
    report(f"images and grid.png in {out}")
    return out
