"""Teacher adapters, one per model family, behind :class:`~senseflow.adapters.base.TeacherAdapter`."""

from __future__ import annotations

from pathlib import Path

from .base import TeacherAdapter, resolve_teacher_dir


def _adapter_module(family: str):
    if family == "sd3":
        from . import sd3

        return sd3, sd3.SD3Adapter
    if family == "flux":
        from . import flux

        return flux, flux.FluxAdapter
    if family == "sdxl":
        from . import sdxl

        return sdxl, sdxl.SDXLAdapter
    raise ValueError(f"model.family: unknown family {family!r}")


def check_teacher_dir(cfg) -> Path:
    """Resolve ``paths.pretrained_model`` and check it holds every file the family needs."""
    module, _ = _adapter_module(cfg.model.family)
    return resolve_teacher_dir(cfg.paths.pretrained_model, module.REQUIRED)


def build_adapter(cfg, info) -> TeacherAdapter:
    """Instantiate the adapter named by ``cfg.model.family``."""
    _, cls = _adapter_module(cfg.model.family)
    adapter = cls(cfg, info)
    if cfg.model.shard_text_encoders and info.world_size > 1:
        adapter.shard_text_encoders()
    return adapter
