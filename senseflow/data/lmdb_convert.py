"""Convert a JSON image-text dataset into DMD2's LMDB latent format (spec §13.2) with the SDXL VAE.

Usage::

    python -m senseflow.data.lmdb_convert --dataset data.json --vae SDXL_DIR --out LMDB_DIR \
        [--resolution 1024] [--batch-size 8] [--device auto] [--seed 0] [--skip-bad] [--limit N]

Images are loaded by :class:`~senseflow.data.json_dataset.JsonImageDataset` (short side resized to the
resolution, centre crop, [-1, 1]) and encoded with the fp32 VAE of ``SDXL_DIR/vae``; the posterior is
**sampled** and multiplied by the VAE's ``scaling_factor`` (minus its ``shift_factor`` first, if any; SDXL
has none), as DMD2 produced its latents, and stored as float16.  The posterior noise of JSON entry ``i``
comes from its own generator seeded by ``(seed, i)``, so a latent does not depend on the batch it was
encoded in, on resuming or on the device of the noise.

Records written (``j`` is the dense LMDB index)::

    latents_{j}_data, prompts_{j}_data    the DMD2 records (see senseflow.data.lmdb_dataset)
    keys_{j}_data                         the original JSON key of sample j (UTF-8)
    latents_shape, prompts_shape          "N C H W" / "N", written only once every entry is converted
    senseflow_convert_progress            JSON: settings, next JSON index, count, skipped indices, complete

Each batch is committed in one transaction together with the progress record, so an interrupted run
loses at most the batch in flight; rerunning with the same arguments continues after the last committed
entry (a different seed, resolution, VAE latent layout or dataset content is refused).  Without
``--skip-bad`` an unreadable image raises (the LMDB index must equal the JSON index); with ``--skip-bad``
such entries are left out, indices stay dense and ``keys_{j}_data`` tells which JSON entry each sample is.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from senseflow.data.json_dataset import JsonImageDataset
from senseflow.data.lmdb_dataset import (
    LATENT_DTYPE,
    PROGRESS_KEY,
    PROMPTS_SHAPE_KEY,
    SHAPE_KEY,
    latent_key,
    orig_key_key,
    prompt_key,
)
from senseflow.errors import ConfigError, DataError, SenseFlowError

from ..output import emit

logger = logging.getLogger(__name__)

PROGRESS_FORMAT = 1
_MIN_MAP_SIZE = 64 << 20
_PAGE = 4096


@dataclass
class ConvertResult:
    """What :func:`convert_json_to_lmdb` did: ``count`` samples in ``path``, ``complete`` once all converted."""

    path: Path
    count: int
    complete: bool
    next_source: int
    num_source: int
    latent_shape: tuple[int, int, int]
    skipped: list[int] = field(default_factory=list)


def sample_seed(seed: int, index: int) -> int:
    """The seed of the posterior noise of JSON entry ``index`` (a 63-bit integer derived from both)."""
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def posterior_noise(seed: int, index: int, shape: Sequence[int]) -> torch.Tensor:
    """Standard normal noise (fp32, CPU) used to sample the posterior of JSON entry ``index``."""
    generator = torch.Generator().manual_seed(sample_seed(seed, index))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, indices: Sequence[int], seed: int) -> torch.Tensor:
    """Encode images in [-1, 1] (B, 3, H, W) into scaled latents, sampling the posterior; returns fp32 (B, C, h, w).

    ``z = (mean + std * noise(seed, index) - shift_factor) * scaling_factor`` on the VAE's device.
    """
    param = next(vae.parameters())
    dist = vae.encode(images.to(param.device, param.dtype)).latent_dist
    noise = torch.stack([posterior_noise(seed, i, dist.mean.shape[1:]) for i in indices])
    sample = dist.mean + dist.std * noise.to(dist.mean.device, dist.mean.dtype)
    shift = vae.config.get("shift_factor", None) or 0.0
    return (sample - shift) * vae.config.scaling_factor


def _fingerprint(ds: JsonImageDataset) -> str:
    """sha256 of the keys and prompts (the content that must not change between resumed runs)."""
    h = hashlib.sha256()
    h.update(json.dumps([ds.keys, ds.prompts], ensure_ascii=False).encode("utf-8"))
    return h.hexdigest()


class _Loadable(Dataset):
    """Loads JSON entries by index, returning errors instead of raising (handled in the main process)."""

    def __init__(self, ds: JsonImageDataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return i, self.ds[i]["image"], None
        except DataError as e:
            return i, None, str(e)


def _aligned_batches(start: int, stop: int, batch_size: int) -> list[list[int]]:
    """Batches of JSON indices in [start, stop), aligned to multiples of ``batch_size`` (resume-invariant)."""
    batches = []
    i = start
    while i < stop:
        end = min(stop, (i // batch_size + 1) * batch_size)
        batches.append(list(range(i, end)))
        i = end
    return batches


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"--device: {device!r} is not a torch device ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device: {device!r} requested but CUDA is not available")
    return dev


def load_vae(spec: str | os.PathLike, device: torch.device | str = "cpu"):
    """Load the fp32 ``AutoencoderKL`` of an SDXL folder (``DIR/vae``), a VAE folder, or ``tiny:``/``arch:``."""
    from diffusers import AutoencoderKL

    from senseflow.data.tiny import resolve_path

    root = resolve_path(os.fspath(spec))
    if (root / "vae" / "config.json").is_file():
        kwargs = {"subfolder": "vae"}
    elif (root / "config.json").is_file():
        kwargs = {}
    else:
        raise ConfigError(
            f"--vae: {root} is neither an SDXL diffusers folder (no vae/config.json) nor a VAE folder"
        )
    vae = AutoencoderKL.from_pretrained(root, torch_dtype=torch.float32, **kwargs)
    return vae.to(device).eval().requires_grad_(False)


def _latent_shape(vae, resolution: int) -> tuple[int, int, int]:
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if resolution % factor:
        raise ConfigError(
            f"--resolution: {resolution} is not a multiple of the VAE's downsampling factor {factor}"
        )
    return int(vae.config.latent_channels), resolution // factor, resolution // factor


def open_lmdb_writer(out: Path, map_size: int, key: str = "--out"):
    """Open (creating if needed) the output environment for writing; refuse folders that are not ours
    (errors name ``key``, the option or config key that gave ``out``)."""
    import lmdb

    if out.exists() and not out.is_dir():
        raise ConfigError(f"{key}: {out} exists and is not a folder")
    if out.is_dir():
        extra = sorted(p.name for p in out.iterdir() if p.name not in ("data.mdb", "lock.mdb"))
        if extra and not (out / "data.mdb").exists():
            raise ConfigError(
                f"{key}: {out} is a non-empty folder that is not an LMDB environment (holds {extra[0]!r})"
            )
    out.mkdir(parents=True, exist_ok=True)
    try:
        env = lmdb.open(str(out), map_size=map_size, subdir=True, readonly=False, meminit=False)
    except lmdb.Error as e:
        raise DataError(
            f"{key}: {out} cannot be opened as an LMDB environment ({type(e).__name__}: {e})"
        ) from None
    if env.info()["map_size"] < map_size:
        env.set_mapsize(map_size)
    return env


def _estimate_map_size(num: int, latent_bytes: int, ds: JsonImageDataset) -> int:
    # Latent values larger than a page live in overflow pages (one page of slack each); small records,
    # B-tree pages and free pages of the per-batch transactions are covered by the factor and the floor.
    per_entry = math.ceil(latent_bytes / _PAGE + 1) * _PAGE + 64
    text = sum(len(p.encode("utf-8")) + len(k.encode("utf-8")) + 64 for p, k in zip(ds.prompts, ds.keys))
    return max(_MIN_MAP_SIZE, int(1.5 * (num * per_entry + 2 * text)) + _MIN_MAP_SIZE)


def _settings(ds: JsonImageDataset, resolution: int, seed: int, skip_bad: bool, vae, shape) -> dict[str, Any]:
    return {
        "format": PROGRESS_FORMAT,
        "dataset_sha256": _fingerprint(ds),
        "num_source": len(ds),
        "resolution": resolution,
        "seed": seed,
        "skip_bad": skip_bad,
        "scaling_factor": float(vae.config.scaling_factor),
        "shift_factor": float(vae.config.get("shift_factor", None) or 0.0),
        "latent_shape": list(shape),
    }


def _check_settings(out: Path, stored: dict[str, Any], wanted: dict[str, Any]) -> None:
    for name, value in wanted.items():
        if stored.get(name) != value:
            what = "dataset content (keys/prompts)" if name == "dataset_sha256" else name
            raise DataError(
                f"--out: {out} was started with a different {what} ({stored.get(name)!r}, now {value!r}): "
                f"rerun with the original settings, or choose a new --out"
            )


def convert_json_to_lmdb(
    dataset: str | os.PathLike,
    vae: str | os.PathLike,
    out: str | os.PathLike,
    *,
    resolution: int = 1024,
    batch_size: int = 8,
    device: str = "auto",
    seed: int = 0,
    skip_bad: bool = False,
    limit: int | None = None,
    num_workers: int = 4,
    progress: bool = True,
) -> ConvertResult:
    """Convert (or continue converting) the JSON dataset ``dataset`` into the LMDB folder ``out``.

    ``vae`` is an SDXL diffusers folder (its ``vae/`` is used), a VAE folder or a ``tiny:``/``arch:`` spec.
    ``limit`` stops this run after JSON entry ``limit - 1`` (the database stays incomplete unless that
    covers the dataset; rerun without it to finish).  Returns what the database holds afterwards.
    """
    from tqdm import tqdm

    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0:
        raise ConfigError(f"--resolution must be a positive integer, got {resolution!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ConfigError(f"--batch-size must be a positive integer, got {batch_size!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"--seed must be a non-negative integer, got {seed!r}")
    if limit is not None and limit < 0:
        raise ConfigError(f"--limit must be >= 0, got {limit!r}")
    if num_workers < 0:
        raise ConfigError(f"--num-workers must be >= 0, got {num_workers!r}")
    out = Path(out).expanduser().resolve()
    ds = JsonImageDataset(
        dataset, resolution, resize=True, on_error="raise", check_paths=not skip_bad, config_key="--dataset"
    )
    dev = _resolve_device(device)
    model = load_vae(vae, dev)
    shape = _latent_shape(model, resolution)
    latent_bytes = math.prod(shape) * LATENT_DTYPE.itemsize
    settings = _settings(ds, resolution, seed, skip_bad, model, shape)
    n_src = len(ds)

    env = open_lmdb_writer(out, _estimate_map_size(n_src, latent_bytes, ds))
    try:
        with env.begin() as txn:
            raw = txn.get(PROGRESS_KEY.encode())
            if raw is None:
                if env.stat()["entries"]:
                    raise DataError(
                        f"--out: {out} already holds an LMDB database not written by this converter "
                        f"(no '{PROGRESS_KEY}' record): choose a new --out"
                    )
                state = {**settings, "next_source": 0, "count": 0, "skipped": [], "complete": False}
            else:
                try:
                    state = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    raise DataError(f"--out: {out} has an unreadable '{PROGRESS_KEY}' record") from None
                if state.get("format") != PROGRESS_FORMAT:
                    raise DataError(f"--out: {out} progress record has format {state.get('format')!r}")
                _check_settings(out, state, settings)

        def result() -> ConvertResult:
            return ConvertResult(
                path=out,
                count=state["count"],
                complete=state["complete"],
                next_source=state["next_source"],
                num_source=n_src,
                latent_shape=shape,
                skipped=list(state["skipped"]),
            )

        if state["complete"]:
            logger.info("%s is already complete (%d samples); nothing to do", out, state["count"])
            return result()
        start = state["next_source"]
        stop = n_src if limit is None else min(n_src, limit)
        if start:
            logger.info(
                "resuming %s at JSON entry %d of %d (%d samples written)", out, start, n_src, state["count"]
            )
        batches = _aligned_batches(start, stop, batch_size)
        loader = DataLoader(
            _Loadable(ds),
            batch_sampler=batches,
            num_workers=num_workers if batches else 0,
            collate_fn=list,
        )
        bar = tqdm(
            total=n_src, initial=start, unit="img", desc="encoding", disable=not progress, dynamic_ncols=True
        )
        try:
            for items in loader:
                good = []
                for i, image, error in items:
                    if error is None:
                        good.append((i, image))
                    elif skip_bad:
                        logger.warning("%s; leaving it out (--skip-bad)", error)
                    else:
                        raise DataError(f"{error} (use --skip-bad to leave unreadable entries out)")
                records: list[tuple[bytes, bytes]] = []
                if good:
                    z = encode_latents(model, torch.stack([im for _, im in good]), [i for i, _ in good], seed)
                    z16 = z.to(torch.float16).cpu()
                    for row, (i, _) in enumerate(good):
                        if not torch.isfinite(z16[row]).all():
                            raise DataError(
                                f"--dataset: entry {i} (key {ds.keys[i]!r}) encodes to a non-finite float16 latent"
                            )
                        j = state["count"] + row
                        array = z16[row].numpy().astype(LATENT_DTYPE, copy=False)
                        records += [
                            (latent_key(j).encode(), np.ascontiguousarray(array).tobytes()),
                            (prompt_key(j).encode(), ds.prompts[i].encode("utf-8")),
                            (orig_key_key(j).encode(), ds.keys[i].encode("utf-8")),
                        ]
                new_state = dict(state)
                new_state["next_source"] = items[-1][0] + 1
                new_state["count"] = state["count"] + len(good)
                new_state["skipped"] = state["skipped"] + [i for i, _, error in items if error is not None]
                if new_state["next_source"] == n_src:
                    if new_state["count"] == 0:
                        raise DataError(f"--dataset: none of the {n_src} images of {ds.path} can be read")
                    new_state["complete"] = True
                    count = new_state["count"]
                    records += [
                        (SHAPE_KEY.encode(), " ".join(map(str, (count, *shape))).encode("ascii")),
                        (PROMPTS_SHAPE_KEY.encode(), str(count).encode("ascii")),
                    ]
                records.append((PROGRESS_KEY.encode(), json.dumps(new_state, sort_keys=True).encode("utf-8")))
                _commit(env, records, expected_next=state["next_source"], out=out)
                state = new_state
                bar.update(len(items))
        finally:
            bar.close()
        if state["complete"]:
            logger.info(
                "wrote %s: %d latents of shape %s%s",
                out,
                state["count"],
                "x".join(map(str, shape)),
                f", {len(state['skipped'])} unreadable entries left out" if state["skipped"] else "",
            )
        else:
            logger.info(
                "stopped at JSON entry %d of %d (%d samples written); rerun to continue",
                state["next_source"],
                n_src,
                state["count"],
            )
        return result()
    finally:
        env.close()


def commit_records(
    env, records: list[tuple[bytes, bytes]], check: Callable[[Any], None] | None = None
) -> None:
    """Write ``records`` in one transaction, growing the map when full; ``check(txn)`` runs first in the
    same transaction and may raise to refuse the write."""
    import lmdb

    while True:
        try:
            with env.begin(write=True) as txn:
                if check is not None:
                    check(txn)
                for key, value in records:
                    txn.put(key, value)
            return
        except lmdb.MapFullError:
            size = env.info()["map_size"] * 2
            logger.info("LMDB map full; growing it to %.1f GiB", size / 2**30)
            env.set_mapsize(size)


def _commit(env, records: list[tuple[bytes, bytes]], expected_next: int, out: Path) -> None:
    """Write ``records`` and the progress record; refuse if another run moved on."""

    def unchanged(txn) -> None:
        raw = txn.get(PROGRESS_KEY.encode())
        if raw is not None and json.loads(raw.decode("utf-8"))["next_source"] != expected_next:
            raise DataError(f"--out: {out} is being written by another conversion at the same time")

    commit_records(env, records, unchanged)


def main(argv: list[str] | None = None) -> int:
    """Convert a JSON image-text dataset into a DMD2-format LMDB of SDXL latents."""
    parser = argparse.ArgumentParser(prog="python -m senseflow.data.lmdb_convert", description=main.__doc__)
    parser.add_argument("--dataset", required=True, help="JSON dataset (keys, image_paths, prompts)")
    parser.add_argument("--vae", required=True, help="SDXL diffusers folder (its vae/ is used), or tiny:sdxl")
    parser.add_argument("--out", required=True, help="output LMDB folder (created; rerun to resume)")
    parser.add_argument("--resolution", type=int, default=1024, help="image side after resize + crop")
    parser.add_argument("--batch-size", type=int, default=8, help="images per VAE forward / per commit")
    parser.add_argument("--device", default="auto", help="torch device of the VAE (auto: cuda if available)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the posterior samples")
    parser.add_argument("--skip-bad", action="store_true", help="leave unreadable images out (dense indices)")
    parser.add_argument(
        "--limit", type=int, default=None, help="stop this run after the first N JSON entries"
    )
    parser.add_argument("--num-workers", type=int, default=4, help="image loading processes")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        res = convert_json_to_lmdb(
            args.dataset,
            args.vae,
            args.out,
            resolution=args.resolution,
            batch_size=args.batch_size,
            device=args.device,
            seed=args.seed,
            skip_bad=args.skip_bad,
            limit=args.limit,
            num_workers=args.num_workers,
            progress=not args.no_progress,
        )
    except SenseFlowError as err:
        logger.error("%s", err)
        return 2
    status = (
        "complete" if res.complete else f"incomplete (next JSON entry {res.next_source} of {res.num_source})"
    )
    emit(f"lmdb: {res.path}", f"samples: {res.count} ({status}; {len(res.skipped)} skipped)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
