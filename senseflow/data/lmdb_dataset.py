"""DMD2's LMDB latent dataset (SDXL recipes R4/R5), read exactly as the original does.

Database layout (spec §13.2; keys are UTF-8 strings)::

    latents_shape        ASCII "N C H W" (integers separated by spaces); N is the dataset length
    latents_{i}_data     float16 C-order bytes of sample i's latent, shape (C, H, W), already multiplied
                         by the VAE scaling factor (0.13025 for SDXL)
    prompts_{i}_data     UTF-8 caption of sample i
    prompts_shape        ASCII "N" (written by the converters, not needed to read)
    keys_{i}_data        optional UTF-8 original key of sample i (written by senseflow.data.lmdb_convert)

The environment is opened read-only without locking, readahead or meminit, lazily in each process that
reads it and shared by all datasets of that process reading the same path (the dataset object holds only
the path and the shape, so it pickles into DataLoader workers; forked workers open their own).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from senseflow.errors import DataError

logger = logging.getLogger(__name__)

SHAPE_KEY = "latents_shape"
PROMPTS_SHAPE_KEY = "prompts_shape"
PROGRESS_KEY = "senseflow_convert_progress"  # written by lmdb_convert while (and after) converting
LATENT_DTYPE = np.dtype("<f2")  # DMD2 wrote numpy float16 on little-endian machines

# SDXL micro-conditioning reported for every sample (DMD2: original size 1024x1024, crop (0, 0)).
ORIG_SIZE = (1024, 1024)
CROP_COORDS = (0, 0)


def latent_key(i: int) -> str:
    return f"latents_{i}_data"


def prompt_key(i: int) -> str:
    return f"prompts_{i}_data"


def orig_key_key(i: int) -> str:
    return f"keys_{i}_data"


def open_lmdb_readonly(path: str, config_key: str = "paths.dataset"):
    """Open the LMDB environment at ``path`` read-only (no lock, readahead or meminit); DataError if not one.

    ``path`` is the environment folder (containing ``data.mdb``) or a bare ``data.mdb``-style file.
    """
    import lmdb

    if not os.path.exists(path):
        raise DataError(f"{config_key}: {path} does not exist")
    subdir = os.path.isdir(path)
    if subdir and not os.path.isfile(os.path.join(path, "data.mdb")):
        raise DataError(f"{config_key}: {path} is not an LMDB environment (no data.mdb in the folder)")
    try:
        return lmdb.open(
            path,
            subdir=subdir,
            readonly=True,
            lock=False,
            readahead=False,
            meminit=False,
        )
    except lmdb.Error as e:
        if "already open" in str(e):  # py-lmdb: this process holds another handle (e.g. a writer)
            raise DataError(
                f"{config_key}: {path} is already open in this process through another handle; close it first"
            ) from None
        raise DataError(
            f"{config_key}: {path} is not an LMDB environment ({type(e).__name__}: {e})"
        ) from None


# One read-only environment per (process, path): py-lmdb refuses to open an environment twice in a process
# (also when a forked child inherited the parent's handle), and LMDB forbids using a handle across fork, so
# a forked child closes the inherited handles (unmapping only its own copy: lock=False, no shared lock
# table) and opens its own.
_ENVS: dict[str, Any] = {}
_ENVS_PID: int | None = None
_INHERITED: list[Any] = []  # inherited handles that could not be closed: kept alive, never used


def _shared_env(path: str, config_key: str):
    """This process's read-only environment for ``path`` (opened on first use)."""
    global _ENVS_PID
    if _ENVS_PID != os.getpid():
        for env in _ENVS.values():
            try:
                env.close()
            except Exception:  # best effort: the handle is never used again
                _INHERITED.append(env)
        _ENVS.clear()
        _ENVS_PID = os.getpid()
    env = _ENVS.get(path)
    if env is None:
        env = _ENVS[path] = open_lmdb_readonly(path, config_key)
    return env


def close_lmdb(path: str | os.PathLike) -> None:
    """Close this process's shared environment for ``path`` if open (datasets reopen it on their next read)."""
    key = os.path.abspath(os.fspath(path))
    if _ENVS_PID == os.getpid() and key in _ENVS:
        _ENVS.pop(key).close()


def parse_shape(raw: bytes, where: str) -> tuple[int, ...]:
    """Parse a ``latents_shape`` record (ASCII integers separated by spaces) into a tuple, or raise DataError."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise DataError(f"{where}: '{SHAPE_KEY}' is not ASCII text: {raw[:40]!r}") from None
    fields = text.split()
    try:
        shape = tuple(int(f) for f in fields)
    except ValueError:
        shape = ()
    if len(shape) < 2 or any(d <= 0 for d in shape):
        raise DataError(
            f"{where}: '{SHAPE_KEY}' must be positive integers 'N C H W' separated by spaces, found {text!r}"
        )
    return shape


class LmdbLatentDataset(Dataset):
    """Map-style dataset over a DMD2-format LMDB of SDXL latents and captions.

    Each item is a dict: ``latent`` (float32 tensor of shape ``shape[1:]``, e.g. (4, 128, 128), already
    scaled by the VAE scaling factor), ``prompt`` (str), ``key`` (str: the original key recorded by
    :mod:`senseflow.data.lmdb_convert` in ``keys_{i}_data``, else ``"{i}"``), ``index`` (int),
    ``skipped`` (int, always 0: a missing or damaged record raises), ``orig_size`` ((1024, 1024)) and
    ``crop_coords`` ((0, 0)).  The keys ``prompt``/``key``/``index``/``skipped`` match
    :class:`~senseflow.data.json_dataset.JsonImageDataset`, so :class:`InfiniteLoader` serves both
    (default collation turns ``orig_size``/``crop_coords`` into a list of two int64 tensors of shape (B,)).

    Construction reads ``latents_shape`` and checks that the records of the last index exist and have the
    right size (cheap); every other record is checked when it is read.
    """

    def __init__(
        self, path: str | os.PathLike, config_key: str = "paths.dataset", check_last: bool = True
    ) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.config_key = config_key
        cached = _ENVS_PID == os.getpid() and self.path in _ENVS
        env = _shared_env(self.path, config_key) if cached else open_lmdb_readonly(self.path, config_key)
        try:
            with env.begin(buffers=False) as txn:
                raw = txn.get(SHAPE_KEY.encode())
                if raw is None:
                    hint = (
                        " (the conversion is incomplete: rerun python -m senseflow.data.lmdb_convert "
                        "with the same arguments to finish it)"
                        if txn.get(PROGRESS_KEY.encode()) is not None
                        else ""
                    )
                    raise DataError(f"{self._where()} has no '{SHAPE_KEY}' record{hint}")
                self.shape = parse_shape(raw, self._where())
                self.latent_shape = self.shape[1:]
                self.latent_bytes = math.prod(self.latent_shape) * LATENT_DTYPE.itemsize
                if check_last:
                    self._read(txn, self.shape[0] - 1)
        finally:
            if not cached:  # opened only to validate: the readers open their own, lazily
                env.close()
        logger.info(
            "%s: %d latents of shape %s from %s",
            config_key,
            len(self),
            "x".join(map(str, self.latent_shape)),
            self.path,
        )

    def _where(self) -> str:
        return f"{self.config_key}: {self.path}"

    def __len__(self) -> int:
        return self.shape[0]

    def all_prompts(self) -> list[str]:
        """Every entry's prompt, in index order (no latent is read)."""
        with _shared_env(self.path, self.config_key).begin(buffers=False) as txn:
            return [self._read_prompt(txn, i) for i in range(len(self))]

    def close(self) -> None:
        """Close this process's environment of the database (it is reopened on the next read)."""
        close_lmdb(self.path)

    def _read_prompt(self, txn, i: int) -> str:
        where = f"{self._where()} entry {i}"
        raw = txn.get(prompt_key(i).encode())
        if raw is None:
            raise DataError(f"{where}: key '{prompt_key(i)}' is missing")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: '{prompt_key(i)}' is not UTF-8 (byte {e.start}: {e.reason})") from None

    def _read(self, txn, i: int) -> tuple[np.ndarray, str, str]:
        where = f"{self._where()} entry {i}"
        raw = txn.get(latent_key(i).encode())
        if raw is None:
            raise DataError(f"{where}: key '{latent_key(i)}' is missing")
        if len(raw) != self.latent_bytes:
            raise DataError(
                f"{where}: '{latent_key(i)}' has {len(raw)} bytes, expected {self.latent_bytes} "
                f"(float16 of shape {'x'.join(map(str, self.latent_shape))} from '{SHAPE_KEY}')"
            )
        latent = np.frombuffer(raw, dtype=LATENT_DTYPE).reshape(self.latent_shape)
        prompt = self._read_prompt(txn, i)
        raw_key = txn.get(orig_key_key(i).encode())
        key = str(i)
        if raw_key is not None:
            try:
                key = raw_key.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{where}: '{orig_key_key(i)}' is not UTF-8 (byte {e.start}: {e.reason})"
                ) from None
        return latent, prompt, key

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        i = int(index)
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for dataset of {n} samples")
        with _shared_env(self.path, self.config_key).begin(buffers=False) as txn:
            latent, prompt, key = self._read(txn, i)
        return {
            "latent": torch.from_numpy(latent.astype(np.float32)),
            "prompt": prompt,
            "key": key,
            "index": i,
            "skipped": 0,
            "orig_size": ORIG_SIZE,
            "crop_coords": CROP_COORDS,
        }
