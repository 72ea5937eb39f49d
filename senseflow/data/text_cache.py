"""Precomputed teacher prompt embeddings (``paths.text_embeddings``): training without the text encoders.

Build once per dataset and teacher::

    python -m senseflow.data.text_cache CONFIG [key=value ...] [--out DIR] [--batch-size 64]

This encodes every prompt of the config's dataset (``paths.dataset``, JSON or LMDB) and the empty prompt
with the teacher's text encoders (``paths.pretrained_model``; ``precision.text_encoders``,
``model.t5_max_length``), exactly as the engine would, and writes them to an LMDB folder (``--out``, else
``paths.text_embeddings``). A run with ``paths.text_embeddings`` set reads the embeddings from there and
never loads the text encoders: for SD3.5 and FLUX that is T5-XXL and the CLIP encoders, 11.4 GiB of bf16
weights per GPU (less when ``model.shard_text_encoders`` shards them), and no encoder forward per
iteration. The embeddings are the same tensors (up to the last bits of batched matrix products).

Layout of the LMDB (keys are bytes):

    sha256(prompt as UTF-8)     safetensors bytes of that prompt's tensors, without the batch dimension
                                (SD3.5: ``prompt_embeds`` (77 + T5 length, 4096) and ``pooled`` (2048);
                                FLUX: (T5 length, 4096) and (768); SDXL: (77, 2048) and (1280)), in the
                                text encoders' dtype. SD3.5 with 77 T5 tokens: 1.3 MB per prompt in bf16.
    senseflow_text_cache        JSON: the settings the embeddings depend on, the number of prompts and
                                whether every prompt of the dataset is in

Each batch of prompts is one transaction, so an interrupted build loses at most the batch in flight; the
same command resumes it (prompts already present are skipped). A run checks the settings against its
config, and that every prompt of its dataset is present, before it builds anything else.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, DataError, SenseFlowError

logger = logging.getLogger(__name__)

KEY = "paths.text_embeddings"
META_KEY = b"senseflow_text_cache"
FORMAT = 1
_MIN_MAP_SIZE = 64 << 20


def prompt_key(prompt: str) -> bytes:
    """The LMDB key of a prompt's embeddings."""
    return hashlib.sha256(prompt.encode("utf-8")).digest()


def cache_settings(cfg) -> dict[str, Any]:
    """What the embeddings depend on, with the config key that sets each (checked when a run opens them)."""
    return {
        "model.family": cfg.model.family,
        "precision.text_encoders": cfg.precision.text_encoders,
        "model.t5_max_length": cfg.model.t5_max_length if cfg.model.family != "sdxl" else None,
        "model.random_init": cfg.model.random_init,
    }


def _unique(prompts: list[str]) -> list[str]:
    return list(dict.fromkeys(prompts))


def _pack(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})


def _unpack(raw: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(raw)


def _read_meta(txn, where: str) -> dict[str, Any] | None:
    raw = txn.get(META_KEY)
    if raw is None:
        return None
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise DataError(f"{where}: its '{META_KEY.decode()}' record is not JSON") from None


def _mismatches(recorded: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    return [
        f"{key}={recorded.get(key)!r} there, {value!r} here"
        for key, value in wanted.items()
        if recorded.get(key) != value
    ]


class TextEmbeddingCache:
    """Read side: the embeddings of ``paths.text_embeddings`` for a run with config ``cfg``.

    Construction checks the folder and its settings against ``cfg`` (a :class:`ConfigError` naming the
    key to fix); :meth:`require` checks that a list of prompts is present; :meth:`lookup` returns a
    batch's tensors on a device, as the adapter's text encoding would.
    """

    def __init__(self, path: str, cfg) -> None:
        self.path = str(Path(path).expanduser().resolve())
        where = f"{KEY}: {self.path}"
        with self._env().begin(buffers=False) as txn:
            meta = _read_meta(txn, where)
        if meta is None:
            raise ConfigError(
                f"{where} holds no prompt embeddings (no '{META_KEY.decode()}' record); build them with "
                "python -m senseflow.data.text_cache CONFIG"
            )
        if meta.get("format") != FORMAT:
            raise ConfigError(f"{where} has format {meta.get('format')}, this version reads {FORMAT}")
        wrong = _mismatches(meta.get("settings", {}), cache_settings(cfg))
        if wrong:
            raise ConfigError(
                f"{where} was built for other settings ({'; '.join(wrong)}); rebuild it with this config "
                "(python -m senseflow.data.text_cache CONFIG --out NEW_DIR) or unset paths.text_embeddings"
            )
        self.meta = meta
        self.names: list[str] = list(meta["names"])
        logger.info(
            "%s: %d precomputed prompt embeddings (%s) from %s; the text encoders are not loaded",
            KEY,
            meta["count"],
            ", ".join(f"{n} {tuple(s)}" for n, s in zip(self.names, meta["shapes"])),
            self.path,
        )

    def _env(self):
        """This process's read-only environment (opened on first use, also in forked processes)."""
        from .lmdb_dataset import _shared_env

        return _shared_env(self.path, KEY)

    def missing(self, prompts: list[str]) -> list[str]:
        """The prompts (unique, in order) that have no embeddings here."""
        with self._env().begin(buffers=True) as txn:
            return [p for p in _unique(prompts) if txn.get(prompt_key(p)) is None]

    def require(self, prompts: list[str], what: str = "paths.dataset") -> None:
        """Raise a :class:`ConfigError` unless every prompt of ``prompts`` (and the empty one) is present."""
        absent = self.missing(["", *prompts])
        if absent:
            raise ConfigError(
                f"{KEY}: {len(absent)} of the {len(_unique(['', *prompts]))} prompts of {what} (and the empty "
                f"prompt) have no embeddings in {self.path} (first: {absent[0]!r}); build the missing ones "
                "with python -m senseflow.data.text_cache CONFIG (it resumes)"
            )

    def lookup(self, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """The embeddings of ``prompts`` stacked into a batch on ``device``."""
        rows = []
        with self._env().begin(buffers=False) as txn:
            for p in prompts:
                raw = txn.get(prompt_key(p))
                if raw is None:
                    raise DataError(f"{KEY}: {self.path} has no embeddings for the prompt {p!r}")
                rows.append(_unpack(raw))
        return {n: torch.stack([r[n] for r in rows]).to(device, non_blocking=True) for n in self.names}


def open_text_cache(cfg) -> TextEmbeddingCache | None:
    """The cache named by ``paths.text_embeddings``, or None when it is empty (encode prompts online)."""
    return TextEmbeddingCache(cfg.paths.text_embeddings, cfg) if cfg.paths.text_embeddings else None


def build_text_cache(
    cfg, out: str | Path, info, batch_size: int = 64, progress: bool = True, limit: int | None = None
) -> dict[str, Any]:
    """Encode the prompts of ``cfg``'s dataset (and the empty prompt) into the LMDB folder ``out``.

    Resumes an earlier build of the same settings; refuses one of other settings. Returns the metadata
    record written (``count``: prompts in the cache, ``added``: encoded by this call)."""
    from tqdm import tqdm

    from ..adapters import build_adapter
    from . import build_dataset
    from .lmdb_convert import commit_records, open_lmdb_writer
    from .lmdb_dataset import close_lmdb

    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    out = Path(out).expanduser().resolve()
    prompts = _unique(["", *build_dataset(cfg, check_paths=False).all_prompts()])
    if limit is not None:
        prompts = prompts[: limit + 1]
    settings = cache_settings(cfg)
    close_lmdb(out)  # this process's reader, if any (py-lmdb opens an environment once per process)
    env = open_lmdb_writer(out, _MIN_MAP_SIZE, key="--out")
    try:
        # what is there, and whether it may be extended, before the text encoders are loaded
        with env.begin() as txn:
            meta = _read_meta(txn, f"--out: {out}")
            todo = [p for p in prompts if txn.get(prompt_key(p)) is None]
        if meta is not None:
            wrong = _mismatches(meta.get("settings", {}), settings)
            if wrong:
                raise ConfigError(
                    f"--out: {out} holds embeddings of other settings ({'; '.join(wrong)}); choose another folder"
                )
        enc_cfg = copy.deepcopy(cfg)
        enc_cfg.paths.text_embeddings = ""  # this is what builds them
        enc_cfg.model.shard_text_encoders = False  # this process alone encodes (no collectives)
        adapter = build_adapter(enc_cfg, info)
        with torch.no_grad():
            sample = adapter.encode_text([""])
        names = list(sample)
        per_prompt = sum(v[0].numel() * v.element_size() for v in sample.values()) + 4096
        map_size = int(1.3 * per_prompt * len(prompts))
        if env.info()["map_size"] < map_size:
            env.set_mapsize(map_size)
        meta = {
            "format": FORMAT,
            "settings": settings,
            "teacher": str(cfg.paths.pretrained_model),
            "dataset": str(cfg.paths.dataset),
            "names": names,
            "shapes": [list(sample[n].shape[1:]) for n in names],
            "dtypes": [str(sample[n].dtype).removeprefix("torch.") for n in names],
            "count": len(prompts) - len(todo) if meta is not None else 0,
            "complete": False,
        }
        logger.info(
            "%d prompts (with the empty one), %d to encode into %s (%.2f MB each)",
            len(prompts),
            len(todo),
            out,
            per_prompt / 1e6,
        )
        bar = tqdm(
            total=len(todo), unit="prompt", desc="encoding prompts", disable=None if progress else True
        )
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            with torch.no_grad():
                cond = adapter.encode_text(batch)
            records = [(prompt_key(p), _pack({n: cond[n][i] for n in names})) for i, p in enumerate(batch)]
            meta["count"] += len(batch)
            commit_records(env, [*records, (META_KEY, json.dumps(meta).encode())])
            bar.update(len(batch))
        bar.close()
        meta["complete"] = limit is None
        commit_records(env, [(META_KEY, json.dumps(meta).encode())])
    finally:
        env.close()
    return {**meta, "added": len(todo), "path": str(out)}


def main(argv: list[str] | None = None) -> int:
    """Encode a dataset's prompts with the teacher's text encoders, for ``paths.text_embeddings``."""
    p = argparse.ArgumentParser(prog="python -m senseflow.data.text_cache", description=main.__doc__)
    p.add_argument("config", help="the training config (its dataset, teacher and precision are used)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. paths.dataset=...")
    p.add_argument("--out", default=None, help="output LMDB folder (default: paths.text_embeddings)")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per encoder forward and per commit")
    p.add_argument("--limit", type=int, default=None, help="encode only the first N prompts (a trial run)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    from ..config import load_config, resolve_paths
    from ..distributed import cleanup, init_distributed
    from ..hub import paths_lines
    from ..metrics import setup_logging
    from ..output import emit

    setup_logging(0)
    try:
        cfg = load_config(args.config, args.overrides)
        out = args.out or cfg.paths.text_embeddings
        if not out:
            raise ConfigError("--out: no output folder (give --out or set paths.text_embeddings)")
        cfg.paths.text_embeddings = ""
        resolve_paths(cfg)
        info = init_distributed(cfg.train.device)
        if info.world_size > 1:
            raise ConfigError("python -m senseflow.data.text_cache runs as one process (not under torchrun)")
        meta = build_text_cache(cfg, out, info, args.batch_size, not args.no_progress, args.limit)
    except SenseFlowError as err:
        logger.error("%s", err)
        return 2
    finally:
        cleanup()
    emit(
        f"{meta['count']} prompt embeddings in {meta['path']} ({meta['added']} added; "
        f"{len(meta['names'])} tensors per prompt)",
        *paths_lines([("text_embeddings", Path(meta["path"]))]),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
