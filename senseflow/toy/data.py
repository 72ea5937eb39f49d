"""The toy data: captioned scenes of one to three coloured shapes, with their attributes.

Scenes come from :func:`senseflow.data.tiny._make_sample` (1-3 shapes of 8 colours, 3 kinds and 2 sizes in
distinct cells of a 3x3 grid, on a plain or gradient background of 5 colours; captions such as "a small
red circle at the top left and a large blue square at the bottom on a plain gray background"), drawn at
twice the resolution and box-filtered down (anti-aliased edges). A split is seeded and can be made as
large as wanted; every object's colour, shape, size and cell is recorded for the evaluation.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.tiny import BACKGROUND_COLORS, POSITIONS, SHAPE_COLORS, SHAPES, SIZES, _make_sample

logger = logging.getLogger(__name__)

COLORS = list(SHAPE_COLORS)
"""Colour classes; label ``1 + COLORS.index(c)``, 0 is an empty cell."""
SHAPE_NAMES = list(SHAPES)
"""Shape classes; label ``1 + SHAPE_NAMES.index(s)``, 0 is an empty cell."""
SIZE_NAMES = list(SIZES)
"""Size classes; label ``1 + SIZE_NAMES.index(s)``, 0 is an empty cell."""
BACKGROUNDS = list(BACKGROUND_COLORS)
"""Background colour classes (label = index)."""
CELL_OF_POSITION = {name: row * 3 + col for name, _, col, row in POSITIONS}
"""Grid cell (row-major 0..8) of each position name."""
NUM_CELLS = 9


@dataclass
class Split:
    """Rendered scenes: ``images`` (N, R, R, 3) uint8, their captions and objects.

    ``objects[i]`` lists the shapes of scene ``i`` in caption order, each a dict with ``shape``,
    ``color``, ``size``, ``position`` (name) and ``cell`` (0..8, row-major)."""

    images: np.ndarray
    captions: list[str]
    objects: list[list[dict]]

    def __len__(self) -> int:
        return len(self.captions)

    def subset(self, n: int) -> Split:
        """The first ``n`` scenes."""
        return Split(self.images[:n], self.captions[:n], self.objects[:n])


def render_scene(rng: np.random.Generator, resolution: int) -> tuple[np.ndarray, str, list[dict]]:
    """One random scene: (R, R, 3) uint8 image, caption, objects (see :class:`Split`)."""
    from PIL import Image

    image, caption, shapes = _make_sample(rng, 2 * resolution, 2 * resolution)
    image = image.resize((resolution, resolution), Image.Resampling.BOX)
    objects = [
        {
            "shape": s["shape"],
            "color": s["color"],
            "size": s["size"],
            "position": s["position"],
            "cell": CELL_OF_POSITION[s["position"]],
        }
        for s in shapes
    ]
    return np.asarray(image, dtype=np.uint8), caption, objects


CHUNK = 2000
"""Scenes per independently seeded chunk (chunks are rendered in parallel processes)."""


def _render_chunk(args: tuple[int, int, int, int]) -> tuple[np.ndarray, list[str], list[list[dict]]]:
    seed, chunk, num, resolution = args
    rng = np.random.default_rng([seed, chunk])
    images = np.empty((num, resolution, resolution, 3), dtype=np.uint8)
    captions, objects = [], []
    for i in range(num):
        images[i], caption, objs = render_scene(rng, resolution)
        captions.append(caption)
        objects.append(objs)
    return images, captions, objects


def make_split(num: int, resolution: int, seed: int, workers: int | None = None) -> Split:
    """``num`` scenes of the stream seeded with ``seed``: chunk ``c`` of :data:`CHUNK` scenes draws from
    ``default_rng([seed, c])``, so the result does not depend on ``workers`` (processes; default: CPUs)."""
    jobs = [(seed, c, min(CHUNK, num - c * CHUNK), resolution) for c in range((num + CHUNK - 1) // CHUNK)]
    workers = min(workers or os.cpu_count() or 1, len(jobs))
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # fork: the children only run NumPy and PIL
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            parts = list(pool.map(_render_chunk, jobs))
    else:
        parts = [_render_chunk(job) for job in jobs]
    if not parts:
        return Split(np.empty((0, resolution, resolution, 3), dtype=np.uint8), [], [])
    return Split(
        np.concatenate([p[0] for p in parts]),
        [c for p in parts for c in p[1]],
        [o for p in parts for o in p[2]],
    )


def save_split(split: Split, stem: Path) -> None:
    """Write ``stem.npz`` (images) and ``stem.json`` (captions and objects)."""
    np.savez_compressed(stem.with_suffix(".npz"), images=split.images)
    meta = {"captions": split.captions, "objects": split.objects}
    stem.with_suffix(".json").write_text(json.dumps(meta))


def load_split(stem: Path) -> Split:
    """Read a split written by :func:`save_split`."""
    with np.load(stem.with_suffix(".npz")) as f:
        images = f["images"]
    meta = json.loads(stem.with_suffix(".json").read_text())
    return Split(images, meta["captions"], meta["objects"])


def cell_labels(objects: list[list[dict]]) -> dict[str, np.ndarray]:
    """Per-cell labels (N, 9) int64 of ``color``, ``shape`` and ``size`` (0 = empty cell)."""
    n = len(objects)
    out = {key: np.zeros((n, NUM_CELLS), dtype=np.int64) for key in ("color", "shape", "size")}
    for i, objs in enumerate(objects):
        for o in objs:
            out["color"][i, o["cell"]] = 1 + COLORS.index(o["color"])
            out["shape"][i, o["cell"]] = 1 + SHAPE_NAMES.index(o["shape"])
            out["size"][i, o["cell"]] = 1 + SIZE_NAMES.index(o["size"])
    return out


def background_labels(captions: list[str]) -> dict[str, np.ndarray]:
    """Background colour (index into :data:`BACKGROUNDS`) and kind (0 plain, 1 gradient) of each caption."""
    color = np.zeros(len(captions), dtype=np.int64)
    kind = np.zeros(len(captions), dtype=np.int64)
    for i, caption in enumerate(captions):
        words = caption.split()
        # captions end with "on a plain <bg> background" or "on a <bg> gradient background"
        if words[-2] == "gradient":
            color[i], kind[i] = BACKGROUNDS.index(words[-3]), 1
        else:
            color[i] = BACKGROUNDS.index(words[-2])
    return {"background": color, "background_kind": kind}


def cell_boxes(resolution: int) -> list[tuple[int, int, int, int]]:
    """Pixel boxes ``(x0, y0, x1, y1)`` (end exclusive) of the 9 grid cells, row-major."""
    edges = [round(k * resolution / 3) for k in range(4)]
    return [(edges[c], edges[r], edges[c + 1], edges[r + 1]) for r in range(3) for c in range(3)]


def write_engine_dataset(split: Split, out_dir: Path) -> Path:
    """The distillation engine's JSON dataset: PNG images + ``dataset.json`` (absolute paths)."""
    from PIL import Image

    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    keys, paths = [], []
    for i, arr in enumerate(split.images):
        key = f"toy_{i:06d}"
        path = images_dir / f"{key}.png"
        Image.fromarray(arr).save(path)
        keys.append(key)
        paths.append(str(path.resolve()))
    index = out_dir / "dataset.json"
    tmp = index.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"keys": keys, "image_paths": paths, "prompts": list(split.captions)}))
    os.replace(tmp, index)
    return index


def images_to_tensor(images: np.ndarray):
    """(N, R, R, 3) uint8 -> (N, 3, R, R) float32 tensor in [-1, 1]."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def tensor_to_images(x) -> np.ndarray:
    """(N, 3, R, R) float tensor in [-1, 1] -> (N, R, R, 3) uint8."""
    from ..metrics import to_uint8

    return to_uint8(x)
