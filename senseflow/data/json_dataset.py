"""JSON image-text dataset and a deterministic, resumable, distributed infinite loader.

Dataset file format (one JSON object)::

    {"keys": ["a", ...], "image_paths": ["img/a.png", ...], "prompts": ["a cat", ...]}

Index ``i`` of each list describes sample ``i``.  Relative image paths are resolved relative to the
directory of the JSON file.
"""

from __future__ import annotations

import json
import logging
import math
import operator
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from senseflow.errors import DataError
from senseflow.stop import ignore_stop_signals

logger = logging.getLogger(__name__)

_LIST_NAMES = ("keys", "image_paths", "prompts")
_ON_ERROR = ("skip", "raise")


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def load_json_index(
    path: str | os.PathLike, config_key: str = "paths.dataset"
) -> tuple[list[str], list[str], list[str]]:
    """Read and validate a dataset JSON file.

    Returns ``(keys, image_paths, prompts)``; the image paths are as written in the file (not resolved).
    Raises :class:`DataError` with a one-line message for every problem a user can fix.
    """
    path = os.fspath(path)
    where = f"{config_key}: {path}"
    if not os.path.exists(path):
        raise DataError(f"{where} does not exist")
    if not os.path.isfile(path):
        raise DataError(f"{where} is not a file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{where} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise DataError(f"{where} cannot be read: {e.strerror or e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(data, dict):
        raise DataError(
            f"{where} must contain a JSON object with lists 'keys', 'image_paths', 'prompts', "
            f"found a JSON {_type_name(data)}"
        )
    lists: dict[str, list] = {}
    for name in _LIST_NAMES:
        if name not in data:
            raise DataError(f"{where} has no list '{name}'")
        value = data[name]
        if not isinstance(value, list):
            raise DataError(f"{where} has no list '{name}' ('{name}' is a {_type_name(value)})")
        lists[name] = value
    lengths = {name: len(value) for name, value in lists.items()}
    if len(set(lengths.values())) != 1:
        desc = ", ".join(f"{name}={n}" for name, n in lengths.items())
        raise DataError(f"{where} lists differ in length: {desc}")
    if lengths["keys"] == 0:
        raise DataError(f"{where} is empty (the lists 'keys', 'image_paths', 'prompts' have no entries)")
    for name in _LIST_NAMES:
        for i, value in enumerate(lists[name]):
            if not isinstance(value, str):
                raise DataError(f"{where} {name}[{i}] is a {_type_name(value)}, not a string")
    return lists["keys"], lists["image_paths"], lists["prompts"]


def _resize_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Resize so the short side equals ``resolution`` (bicubic), then centre-crop a square."""
    w, h = image.size
    if w <= h:
        new_w, new_h = resolution, max(resolution, round(h * resolution / w))
    else:
        new_w, new_h = max(resolution, round(w * resolution / h)), resolution
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left = (new_w - resolution) // 2
    top = (new_h - resolution) // 2
    if (left, top) != (0, 0) or (new_w, new_h) != (resolution, resolution):
        image = image.crop((left, top, left + resolution, top + resolution))
    return image


class JsonImageDataset(Dataset):
    """Map-style dataset over a JSON index of images and prompts.

    Each item is a dict: ``image`` (float32 tensor (3, resolution, resolution) in [-1, 1], RGB),
    ``prompt`` (str), ``key`` (str), ``index`` (int: the entry actually loaded) and ``skipped``
    (int: how many unreadable entries were skipped to produce this item).

    ``on_error="skip"`` replaces an unreadable image by the next entry ((i + 1) % N, repeatedly) and
    logs a warning; ``on_error="raise"`` raises :class:`DataError`.  A wrong image size with
    ``resize=False`` always raises (it is a configuration mismatch, not a damaged file).

    The object holds only lists of strings (no open files), so it pickles into DataLoader workers.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        resolution: int,
        resize: bool = True,
        on_error: str = "skip",
        check_paths: bool = True,
        config_key: str = "paths.dataset",
    ) -> None:
        try:
            res = operator.index(resolution)
        except TypeError:
            res = 0
        if isinstance(resolution, bool) or res <= 0:
            raise ValueError(f"resolution must be a positive int, got {resolution!r}")
        if on_error not in _ON_ERROR:
            raise ValueError(f"on_error must be one of {_ON_ERROR}, got {on_error!r}")
        self.path = os.path.abspath(os.fspath(path))
        self.resolution = res
        self.resize = bool(resize)
        self.on_error = on_error
        self.config_key = config_key
        keys, image_paths, prompts = load_json_index(self.path, config_key=config_key)
        base = os.path.dirname(self.path)
        self.keys = keys
        self.prompts = prompts
        self.image_paths = [
            p if os.path.isabs(p) else os.path.normpath(os.path.join(base, p)) for p in image_paths
        ]
        if check_paths:
            self._check_paths()
        logger.info("%s: %d samples from %s", config_key, len(self.keys), self.path)

    def _check_paths(self) -> None:
        missing = [(i, self.keys[i], p) for i, p in enumerate(self.image_paths) if not os.path.isfile(p)]
        if missing:
            first = "; ".join(f"[{i}] key {key!r}: {p}" for i, key, p in missing[:3])
            raise DataError(
                f"{self.config_key}: {len(missing)} of {len(self.image_paths)} image paths listed in "
                f"{self.path} do not exist, first: {first}"
            )

    def __len__(self) -> int:
        return len(self.keys)

    def all_prompts(self) -> list[str]:
        """Every entry's prompt, in index order (no image is read)."""
        return list(self.prompts)

    def _describe(self, i: int) -> str:
        return f"{self.config_key}: entry {i} (key {self.keys[i]!r}, path {self.image_paths[i]})"

    def _load_image(self, i: int) -> torch.Tensor:
        """Load entry ``i`` as a (3, R, R) tensor in [-1, 1].

        Raises ``OSError``-like errors for unreadable files and :class:`DataError` for a wrong size.
        """
        with Image.open(self.image_paths[i]) as im:
            image = im.convert("RGB")  # forces a full decode while the file is open
        if self.resize:
            image = _resize_center_crop(image, self.resolution)
        elif image.size != (self.resolution, self.resolution):
            w, h = image.size
            raise DataError(
                f"{self._describe(i)} is {w}x{h}, expected {self.resolution}x{self.resolution} "
                f"(resize is off)"
            )
        array = np.asarray(image, dtype=np.uint8).copy()
        tensor = torch.from_numpy(array).permute(2, 0, 1).contiguous().to(torch.float32).div_(255.0)
        return tensor.sub_(0.5).div_(0.5)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.keys)
        i = int(index)
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for dataset of {n} samples")
        last_error: BaseException | None = None
        for attempt in range(n):
            j = (i + attempt) % n
            try:
                image = self._load_image(j)
            except DataError:
                raise
            except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
                last_error = e
                if self.on_error == "raise":
                    raise DataError(f"{self._describe(j)} cannot be read: {type(e).__name__}: {e}") from None
                logger.warning(
                    "%s cannot be read (%s: %s); loading entry %d instead",
                    self._describe(j),
                    type(e).__name__,
                    e,
                    (j + 1) % n,
                )
                continue
            return {
                "image": image,
                "prompt": self.prompts[j],
                "key": self.keys[j],
                "index": j,
                "skipped": attempt,
            }
        raise DataError(
            f"{self.config_key}: none of the {n} images listed in {self.path} can be read "
            f"(last error: {type(last_error).__name__}: {last_error})"
        )


class ShardedSampler(Sampler[int]):
    """Deterministic, epoch-based sampler sharding by GLOBAL rank.

    For epoch ``e`` the order is ``torch.randperm(num_samples)`` drawn from
    ``torch.Generator().manual_seed(seed + e)`` (identity when ``shuffle=False``), padded by wrapping
    around to a multiple of ``world_size``; rank ``r`` takes ``perm[r::world_size]``.

    ``set_epoch(e)`` selects the epoch and resets the start offset to 0; ``set_start(n)`` then skips the
    first ``n`` indices of this rank's list (for resuming).  ``len()`` is the remaining length.
    """

    def __init__(
        self, num_samples: int, rank: int, world_size: int, seed: int = 0, shuffle: bool = True
    ) -> None:
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if world_size <= 0:
            raise ValueError(f"world_size must be positive, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.num_samples = int(num_samples)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self.start = 0

    @property
    def samples_per_rank(self) -> int:
        """Length of one rank's full list for an epoch (after wrap-around padding)."""
        return math.ceil(self.num_samples / self.world_size)

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)
        self.start = 0

    def set_start(self, start: int) -> None:
        if not 0 <= start <= self.samples_per_rank:
            raise ValueError(f"start must be in [0, {self.samples_per_rank}], got {start}")
        self.start = int(start)

    def rank_indices(self, epoch: int | None = None) -> list[int]:
        """This rank's full index list for ``epoch`` (default: the current epoch), ignoring the start."""
        epoch = self.epoch if epoch is None else epoch
        n = self.num_samples
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            perm = torch.randperm(n, generator=g)
        else:
            perm = torch.arange(n)
        total = self.samples_per_rank * self.world_size
        if total > n:
            perm = perm.repeat(math.ceil(total / n))[:total]
        return perm[self.rank :: self.world_size].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.rank_indices()[self.start :])

    def __len__(self) -> int:
        return self.samples_per_rank - self.start


class InfiniteLoader:
    """Endless batch iterator over a dataset, deterministic and exactly resumable.

    Wraps a ``DataLoader`` (``ShardedSampler``, ``drop_last=True``, default collate) and advances the
    epoch each time a pass ends.  ``rank``/``world_size`` are the GLOBAL rank and world size.

    ``state_dict()`` returns ``{"epoch": e, "batches": n}`` (batches already yielded in epoch ``e``);
    a new loader given that state through ``load_state_dict`` yields exactly the batches the original
    would have yielded next, skipping consumed batches by index (their images are not loaded).
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int = 0,
        num_workers: int = 0,
        shuffle: bool = True,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        num_samples = len(dataset)  # type: ignore[arg-type]
        if num_samples <= 0:
            raise DataError("the dataset is empty")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.sampler = ShardedSampler(num_samples, rank, world_size, seed=seed, shuffle=shuffle)
        per_rank = self.sampler.samples_per_rank
        if per_rank < self.batch_size:
            raise DataError(
                f"each rank's shard has {per_rank} samples ({num_samples} samples over world size "
                f"{world_size}), fewer than one batch of {batch_size}: use a smaller batch size, "
                f"fewer processes or more data"
            )
        self.batches_per_epoch = per_rank // self.batch_size
        self.epoch = 0
        self.batches = 0
        self._iterator: Iterator | None = None
        # A private generator keeps DataLoader from drawing worker seeds from the global torch RNG.
        self.loader = DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=self.sampler,
            drop_last=True,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            generator=torch.Generator().manual_seed(int(seed)),
            worker_init_fn=ignore_stop_signals,  # the training loop stops on them, with a checkpoint
        )

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self.batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        try:
            epoch, batches = int(state["epoch"]), int(state["batches"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"loader state must be {{'epoch': int, 'batches': int}}, got {state!r}") from None
        if epoch < 0 or batches < 0:
            raise DataError(f"loader state has negative values: {state!r}")
        if batches > self.batches_per_epoch:
            raise DataError(
                f"loader state says {batches} batches of epoch {epoch} were consumed, but an epoch has only "
                f"{self.batches_per_epoch} (did the dataset, batch size or world size change?)"
            )
        if batches == self.batches_per_epoch:
            epoch, batches = epoch + 1, 0
        self.epoch, self.batches = epoch, batches
        self._iterator = None

    def __iter__(self) -> InfiniteLoader:
        return self

    def _start_pass(self) -> None:
        self.sampler.set_epoch(self.epoch)
        self.sampler.set_start(self.batches * self.batch_size)
        self._iterator = iter(self.loader)

    def __next__(self) -> dict[str, Any]:
        if self._iterator is None:
            self._start_pass()
        try:
            batch = next(self._iterator)  # type: ignore[arg-type]
        except StopIteration:
            self.epoch += 1
            self.batches = 0
            logger.debug("data loader: starting epoch %d", self.epoch)
            self._start_pass()
            batch = next(self._iterator)  # type: ignore[arg-type]
        self.batches += 1
        return batch
