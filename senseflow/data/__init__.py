"""Datasets and data loaders."""

from __future__ import annotations


def build_dataset(cfg, check_paths: bool | None = None):
    """The training dataset named by ``paths.dataset`` in the format ``data.format`` (json or lmdb).

    ``check_paths`` overrides ``data.check_paths`` (whether every image path is checked up front)."""
    if cfg.data.format == "lmdb":
        from .lmdb_dataset import LmdbLatentDataset

        return LmdbLatentDataset(cfg.paths.dataset)
    from .json_dataset import JsonImageDataset

    return JsonImageDataset(
        cfg.paths.dataset,
        cfg.train.resolution,
        resize=not cfg.compat.no_image_resize,
        on_error=cfg.data.on_error,
        check_paths=cfg.data.check_paths if check_paths is None else check_paths,
    )
