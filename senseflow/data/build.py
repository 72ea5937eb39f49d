"""Build the JSON dataset (``DIR/dataset.json``) the trainer reads, from captioned images.

Usage (one source)::

    python -m senseflow.data.build --out DIR --images-dir IMAGES      # a.jpg + a.txt (recursive)
    python -m senseflow.data.build --out DIR --jsonl list.jsonl        # {"image": "a.jpg", "prompt": "..."}
    python -m senseflow.data.build --out DIR --csv list.csv            # header row, same columns
    python -m senseflow.data.build --out DIR --parquet SHARDS_DIR_OR_GLOB
        [--min-size 1024] [--image-col image] [--caption-col prompt] [--path-col COL] [--key-col COL]

Folder, JSONL and CSV images stay where they are (relative paths in a JSONL/CSV file are resolved next
to the file). Parquet shards hold the images themselves (a bytes column, a ``{"bytes", "path"}`` struct
as Hugging Face datasets write it, or a path string); they are written to ``DIR/images/{index:08d}.jpg``
(``.png`` for PNG sources; JPEG and PNG bytes are copied unchanged, other formats re-encoded as JPEG at
quality 95), ``index`` counting rows over the sorted shards.

Entries are dropped, and counted per reason, when the caption is missing or empty, the image is
missing, cannot be decoded, or its short side is below ``--min-size``. The written ``dataset.json``
holds equally long lists ``keys``, ``image_paths`` (absolute) and ``prompts``.

A rerun is cheap and gives the same file: shards finished before are skipped
(``DIR/.build_state.json`` records them and their results), images already written are not written
again, and ``dataset.json`` is replaced atomically.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from senseflow.errors import DataError

from ..output import emit

logger = logging.getLogger("senseflow.data.build")

DATASET_NAME = "dataset.json"
STATE_NAME = ".build_state.json"
STATE_VERSION = 1
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
JPEG_QUALITY = 95

REASONS = ("no_caption", "missing_image", "unreadable", "too_small")
REASON_TEXT = {
    "no_caption": "missing or empty caption",
    "missing_image": "image missing",
    "unreadable": "image cannot be decoded",
    "too_small": "short side below --min-size",
}

# columns tried, in order, when no column is named on the command line
CAPTION_COLUMNS = ("prompt", "caption", "text", "TEXT", "txt", "prompts", "captions")
PATH_COLUMNS = ("image_path", "path", "image", "file_name", "filename", "file", "img")
IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "img", "image_bytes", "bytes")


@dataclass
class BuildReport:
    """What a build read, kept and dropped (per reason), and where it wrote the dataset."""

    source: str
    total: int = 0
    kept: int = 0
    rejected: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    written: int = 0
    """Images written to ``DIR/images`` by this run."""
    reused: int = 0
    """Images found already written (interrupted earlier run) and not written again."""
    shards_skipped: int = 0
    """Parquet shards finished by an earlier run and not read again."""
    min_size: int = 0
    dataset: Path | None = None

    def add(self, reason: str | None) -> None:
        self.total += 1
        if reason is None:
            self.kept += 1
        else:
            self.rejected[reason] += 1

    def summary_lines(self) -> list[str]:
        """A small table of the counts, for the command line."""
        rows = [("items read", self.total), ("kept", self.kept)]
        for reason in REASONS:
            text = REASON_TEXT[reason]
            if reason == "too_small":
                text = f"short side below {self.min_size}"
            rows.append((f"dropped: {text}", self.rejected[reason]))
        if self.written or self.reused or self.shards_skipped:
            rows += [
                ("images written now", self.written),
                ("images already written", self.reused),
                ("shards done before", self.shards_skipped),
            ]
        width = max(len(name) for name, _ in rows)
        lines = [f"source: {self.source}"]
        lines += [f"  {name:<{width}}  {count:>9d}" for name, count in rows]
        if self.dataset is not None:
            lines.append(f"dataset: {self.dataset}")
        return lines


@dataclass
class _Item:
    """One candidate entry: a caption and an image on disk (``path``) or in memory (``data``)."""

    index: int
    key: str
    caption: Any
    path: str | None = None
    data: bytes | None = None


# ---------------------------------------------------------------------------------------------------
# Small helpers


def _caption(value: Any) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if not isinstance(value, str):
        return None
    value = value.strip()
    return value or None


def _decode(source: str | io.BytesIO) -> tuple[str | None, tuple[int, int]]:
    """Fully decode an image; returns (PIL format, (width, height)); raises on broken data."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DecompressionBombWarning, EXIF warnings
        with Image.open(source) as im:
            im.load()
            return im.format, im.size


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _atomic_write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def _imap(fn: Callable, items: Iterable, workers: int, chunk: int = 256) -> Iterator:
    """``map(fn, items)`` in order, on ``workers`` threads, holding at most ``chunk`` items at a time."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers) as pool:
        batch: list = []
        for item in items:
            batch.append(item)
            if len(batch) >= chunk:
                yield from pool.map(fn, batch)
                batch = []
        if batch:
            yield from pool.map(fn, batch)


def _unique_keys(keys: list[str]) -> list[str]:
    """Make keys unique by suffixing repeats with ``#n`` (first occurrence unchanged)."""
    seen: dict[str, int] = {}
    out = []
    for key in keys:
        n = seen.get(key, 0)
        seen[key] = n + 1
        out.append(key if n == 0 else f"{key}#{n}")
    return out


def _pick_column(
    names: Iterable[str], wanted: str | None, candidates: tuple[str, ...], what: str, where: str, flag: str
) -> str:
    """``wanted`` if it is a column, else the first candidate present; DataError naming the columns."""
    names = list(names)
    if wanted is not None:
        if wanted not in names:
            raise DataError(f"{where}: no {what} column {wanted!r} ({flag}); columns: {', '.join(names)}")
        return wanted
    for name in candidates:
        if name in names:
            return name
    raise DataError(
        f"{where}: no {what} column (tried {', '.join(candidates)}); name it with {flag}; "
        f"columns: {', '.join(names)}"
    )


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="building dataset", disable=None if enabled else True)


# ---------------------------------------------------------------------------------------------------
# Checking one item


class _Processor:
    """Checks one item and, for in-memory images, writes it to ``out/images`` (thread-safe)."""

    def __init__(self, out: Path, min_size: int) -> None:
        self.out = out
        self.images = out / "images"
        self.min_size = min_size

    def existing(self, index: int) -> Path | None:
        for ext in (".jpg", ".png"):
            path = self.images / f"{index:08d}{ext}"
            if path.is_file():
                return path
        return None

    def __call__(self, item: _Item) -> tuple[str | None, tuple[str, str, str] | None, str]:
        """-> (reason or None, (key, image path, prompt) or None, "inplace"/"written"/"reused"/"")."""
        prompt = _caption(item.caption)
        if prompt is None:
            return "no_caption", None, ""
        if item.data is None:
            if not item.path or not os.path.isfile(item.path):
                return "missing_image", None, ""
            try:
                _, size = _decode(item.path)
            except Exception:  # PIL raises many types for broken files
                return "unreadable", None, ""
            if min(size) < self.min_size:
                return "too_small", None, ""
            return None, (item.key, item.path, prompt), "inplace"
        done = self.existing(item.index)
        if done is not None:  # written atomically by an earlier run: complete
            try:
                with Image.open(done) as im:
                    size = im.size
            except Exception:
                done.unlink(missing_ok=True)
            else:
                if min(size) < self.min_size:
                    return "too_small", None, ""
                return None, (item.key, done.relative_to(self.out).as_posix(), prompt), "reused"
        try:
            fmt, size = _decode(io.BytesIO(item.data))
        except Exception:
            return "unreadable", None, ""
        if min(size) < self.min_size:
            return "too_small", None, ""
        if fmt in ("JPEG", "PNG"):
            target = self.images / f"{item.index:08d}{'.png' if fmt == 'PNG' else '.jpg'}"
            _atomic_write_bytes(target, item.data)
        else:
            target = self.images / f"{item.index:08d}.jpg"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(io.BytesIO(item.data)) as im:
                    rgb = im.convert("RGB")
            buf = io.BytesIO()
            rgb.save(buf, format="JPEG", quality=JPEG_QUALITY)
            _atomic_write_bytes(target, buf.getvalue())
        return None, (item.key, target.relative_to(self.out).as_posix(), prompt), "written"


# ---------------------------------------------------------------------------------------------------
# Sources


def _folder_items(root: Path) -> list[_Item]:
    if not root.is_dir():
        raise DataError(f"--images-dir: {root} is not a directory")
    files = sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTS
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    items = []
    for i, path in enumerate(files):
        txt = path.with_suffix(".txt")
        caption = txt.read_text(encoding="utf-8", errors="replace") if txt.is_file() else None
        key = path.relative_to(root).with_suffix("").as_posix()
        items.append(_Item(i, key, caption, path=str(path)))
    return items


def _resolve(value: Any, base: Path) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return None
    path = Path(value.strip()).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def _table_items(records: list[dict], where: str, base: Path, args: dict) -> list[_Item]:
    """Items of a JSONL/CSV list of records (image path + caption, optional key)."""
    if not records:
        return []
    names: list[str] = list(dict.fromkeys(k for r in records[:1000] for k in r))
    path_col = _pick_column(
        names, args.get("path_col") or args.get("image_col"), PATH_COLUMNS, "image path", where, "--path-col"
    )
    caption_col = _pick_column(
        names, args.get("caption_col"), CAPTION_COLUMNS, "caption", where, "--caption-col"
    )
    key_col = args.get("key_col") or ("key" if "key" in names else None)
    items = []
    for i, record in enumerate(records):
        key = record.get(key_col) if key_col else None
        key = str(key) if key not in (None, "") else f"{i:08d}"
        items.append(_Item(i, key, record.get(caption_col), path=_resolve(record.get(path_col), base)))
    return items


def _jsonl_items(path: Path, args: dict) -> list[_Item]:
    if not path.is_file():
        raise DataError(f"--jsonl: {path} does not exist")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"--jsonl: {path} line {lineno} is not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"--jsonl: {path} line {lineno} is not a JSON object")
            records.append(record)
    return _table_items(records, f"--jsonl {path}", path.parent, args)


def _csv_items(path: Path, args: dict) -> list[_Item]:
    if not path.is_file():
        raise DataError(f"--csv: {path} does not exist")
    csv.field_size_limit(2**31 - 1)
    with open(path, encoding="utf-8-sig", newline="") as f:
        records = list(csv.DictReader(f))
    return _table_items(records, f"--csv {path}", path.parent, args)


def list_parquet(spec: str | os.PathLike) -> list[Path]:
    """The parquet files of a folder (recursive), a glob or a single file, each once, sorted."""
    path = Path(spec).expanduser()
    if path.is_dir():
        found = path.rglob("*.parquet")  # includes the top level exactly once
    elif path.is_file():
        found = [path]
    else:
        found = (Path(p) for p in glob.glob(str(path), recursive=True))
    files = sorted({p.resolve() for p in found if p.is_file() and p.suffix == ".parquet"})
    if not files:
        raise DataError(f"--parquet: no .parquet files at {spec}")
    return files


def _shard_names(files: list[Path]) -> list[str]:
    """Shard names relative to their common folder (stable when the whole tree moves)."""
    root = Path(os.path.commonpath([str(f.parent) for f in files]))
    return [f.relative_to(root).as_posix() for f in files]


def _image_value(value: Any, base: Path) -> tuple[bytes | None, str | None]:
    """(bytes, None), (None, path) or (None, None) from a parquet image cell."""
    if isinstance(value, dict):
        data = value.get("bytes")
        if data:
            return bytes(data), None
        return None, _resolve(value.get("path"), base)
    if isinstance(value, bytes | bytearray | memoryview):
        return (bytes(value), None) if len(value) else (None, None)
    return None, _resolve(value, base)


# ---------------------------------------------------------------------------------------------------
# Build


def _finish(out: Path, entries: list[tuple[str, str, str]], report: BuildReport) -> BuildReport:
    for reason in REASONS:
        if report.rejected[reason]:
            logger.info("dropped %d: %s", report.rejected[reason], REASON_TEXT[reason])
    logger.info("kept %d of %d images", report.kept, report.total)
    if not entries:
        counts = ", ".join(f"{REASON_TEXT[r]}: {report.rejected[r]}" for r in REASONS if report.rejected[r])
        raise DataError(
            f"{report.source}: no usable image among {report.total} entries"
            + (f" ({counts})" if counts else "")
        )
    keys = _unique_keys([e[0] for e in entries])
    paths = [p if os.path.isabs(p) else str(out / p) for _, p, _ in entries]
    dataset = out / DATASET_NAME
    _atomic_write_json(dataset, {"keys": keys, "image_paths": paths, "prompts": [e[2] for e in entries]})
    report.dataset = dataset
    logger.info("wrote %s (%d entries)", dataset, len(entries))
    return report


def _run_items(
    items: list[_Item], out: Path, report: BuildReport, min_size: int, workers: int, progress: bool
) -> BuildReport:
    process = _Processor(out, min_size)
    entries = []
    with _progress(len(items), progress) as bar:
        for reason, entry, _ in _imap(process, items, workers):
            report.add(reason)
            if entry is not None:
                entries.append(entry)
            bar.update(1)
    return _finish(out, entries, report)


def _with_row(process: _Processor) -> Callable[[_Item], tuple]:
    def run(item: _Item) -> tuple:
        return (*process(item), item.index)

    return run


def _ranges(rows: list[int]) -> list[list[int]]:
    """Sorted row numbers as ``[start, stop)`` runs (compact state)."""
    runs: list[list[int]] = []
    for r in rows:
        if runs and runs[-1][1] == r:
            runs[-1][1] = r + 1
        else:
            runs.append([r, r + 1])
    return runs


def _expand(runs: list[list[int]]) -> set[int]:
    return {r for start, stop in runs for r in range(start, stop)}


def _load_state(path: Path) -> dict:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) and state.get("version") == STATE_VERSION else {}


def _build_parquet(
    spec: str | os.PathLike,
    out: Path,
    report: BuildReport,
    min_size: int,
    workers: int,
    progress: bool,
    args: dict,
) -> BuildReport:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            "--parquet needs pyarrow: pip install pyarrow (or pip install -e '.[data]')"
        ) from None
    files = list_parquet(spec)
    names = _shard_names(files)
    rows = [pq.read_metadata(f).num_rows for f in files]
    report.source = f"parquet, {len(files)} shard(s), {sum(rows)} rows under {os.path.commonpath([str(f.parent) for f in files])}"

    columns = pq.read_schema(files[0]).names
    where = f"--parquet {files[0]}"
    if args.get("path_col"):
        image_col, image_kind = (
            _pick_column(columns, args["path_col"], PATH_COLUMNS, "image path", where, "--path-col"),
            "path",
        )
    else:
        image_col, image_kind = (
            _pick_column(columns, args.get("image_col"), IMAGE_COLUMNS, "image", where, "--image-col"),
            "image",
        )
    caption_col = _pick_column(
        columns, args.get("caption_col"), CAPTION_COLUMNS, "caption", where, "--caption-col"
    )
    key_col = args.get("key_col")

    # Image file names are row numbers over the sorted shards: an earlier run's files are valid only if
    # its shards are a prefix of this run's (same names, same row counts) and it read the same column.
    state_path = out / STATE_NAME
    state = _load_state(state_path)
    layout = [[n, r] for n, r in zip(names, rows)]
    image_source = f"{image_kind}:{image_col}"
    params = {"min_size": min_size, "caption_col": caption_col, "key_col": key_col}
    if state:
        old = state.get("layout", [])
        if state.get("image_source") != image_source or layout[: len(old)] != old:
            if any((out / "images").glob("*")):
                raise DataError(
                    f"--out {out}: holds images of a build from other parquet shards or another image "
                    f"column ({state_path}); build into a new --out, or delete {out / 'images'} and {state_path}"
                )
            state = {}
        elif state.get("params") != params:
            state["shards"] = {}  # other filters: recheck every row (written images are reused)
    state = {
        "version": STATE_VERSION,
        "layout": layout,
        "image_source": image_source,
        "params": params,
        "shards": state.get("shards", {}),
    }
    (out / "images").mkdir(parents=True, exist_ok=True)
    _atomic_write_json(state_path, state)

    process = _Processor(out, min_size)
    entries: list[tuple[str, str, str]] = []
    offset = 0
    with _progress(sum(rows), progress) as bar:
        for path, name, n in zip(files, names, rows):
            shard_cols = pq.read_schema(path).names
            needed = [c for c in (image_col, caption_col, key_col) if c]
            for col in needed:
                if col not in shard_cols:
                    raise DataError(f"--parquet {path}: no column {col!r}; columns: {', '.join(shard_cols)}")

            def rows_of(columns, path=path, offset=offset) -> Iterator[tuple[int, dict]]:
                row = offset
                with pq.ParquetFile(path) as shard:
                    for batch in shard.iter_batches(batch_size=64, columns=columns):
                        cells = {c: batch.column(c).to_pylist() for c in columns}
                        for i in range(batch.num_rows):
                            yield row, {c: cells[c][i] for c in columns}
                            row += 1

            def item(row: int, cells: dict, path=path) -> _Item:
                data, image_path = _image_value(cells.get(image_col), path.parent)
                key = cells[key_col] if key_col else None
                key = str(key) if key not in (None, "") else f"{row:08d}"
                return _Item(row, key, cells[caption_col], path=image_path, data=data)

            done = state["shards"].get(name)
            if done is not None:
                # finished before: rebuild its entries from the text columns and the written files
                kept = _expand(done["kept"])
                # the image column only when some kept image was not written (a path read in place)
                in_place = image_kind == "path" or any(process.existing(r) is None for r in kept)
                light = [c for c in needed if c != image_col or in_place]
                replay = []
                for row, cells in rows_of(light):
                    if row in kept:
                        it = item(row, cells)
                        written = process.existing(row) if image_kind == "image" else None
                        image = written.relative_to(out).as_posix() if written else it.path
                        replay.append((it.key, image, _caption(it.caption)))
                if all(e[1] and e[2] for e in replay) and len(replay) == len(kept):
                    for reason in REASONS:
                        report.rejected[reason] += done["counts"][reason]
                    report.total += done["counts"]["total"]
                    report.kept += len(replay)
                    entries += replay
                    report.shards_skipped += 1
                    bar.update(n)
                    offset += n
                    continue
                logger.info(
                    "%s: finished before, but not all its images are in %s; checking it again", name, out
                )

            counts = {"total": 0, **dict.fromkeys(REASONS, 0)}
            kept_rows = []
            items = (item(row, cells) for row, cells in rows_of(needed))
            for it_reason, entry, how, row in _imap(_with_row(process), items, workers):
                report.add(it_reason)
                counts["total"] += 1
                if it_reason is not None:
                    counts[it_reason] += 1
                else:
                    entries.append(entry)
                    kept_rows.append(row)
                    report.written += how == "written"
                    report.reused += how == "reused"
                bar.update(1)
            state["shards"][name] = {"counts": counts, "kept": _ranges(kept_rows)}
            _atomic_write_json(state_path, state)
            offset += n
    return _finish(out, entries, report)


def build_dataset(
    out: str | os.PathLike,
    *,
    images_dir: str | os.PathLike | None = None,
    jsonl: str | os.PathLike | None = None,
    csv_file: str | os.PathLike | None = None,
    parquet: str | os.PathLike | None = None,
    min_size: int = 1024,
    image_col: str | None = None,
    caption_col: str | None = None,
    path_col: str | None = None,
    key_col: str | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> BuildReport:
    """Write ``out/dataset.json`` from exactly one source; returns the counts (see the module docstring)."""
    sources = {"--images-dir": images_dir, "--jsonl": jsonl, "--csv": csv_file, "--parquet": parquet}
    given = [k for k, v in sources.items() if v is not None]
    if len(given) != 1:
        raise DataError(f"name exactly one source of {', '.join(sources)} (got {', '.join(given) or 'none'})")
    if min_size < 0:
        raise DataError(f"--min-size must be >= 0, got {min_size}")
    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    workers = workers if workers is not None else min(8, os.cpu_count() or 1)
    args = {"image_col": image_col, "caption_col": caption_col, "path_col": path_col, "key_col": key_col}
    report = BuildReport(source="", min_size=min_size)
    if parquet is not None:
        return _build_parquet(parquet, out, report, min_size, workers, progress, args)
    if images_dir is not None:
        root = Path(images_dir).expanduser().resolve()
        items = _folder_items(root)
        report.source = f"folder {root} ({len(items)} images)"
    elif jsonl is not None:
        path = Path(jsonl).expanduser().resolve()
        items = _jsonl_items(path, args)
        report.source = f"JSONL {path} ({len(items)} entries)"
    else:
        path = Path(csv_file).expanduser().resolve()
        items = _csv_items(path, args)
        report.source = f"CSV {path} ({len(items)} rows)"
    return _run_items(items, out, report, min_size, workers, progress)


def main(argv: list[str] | None = None) -> int:
    """Command line: build, print the counts and the ``paths.dataset`` line."""
    p = argparse.ArgumentParser(prog="python -m senseflow.data.build", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (dataset.json, images/ for parquet)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images-dir", help="folder of images with same-name .txt captions (recursive)")
    src.add_argument("--jsonl", help="JSON lines file of image path + caption")
    src.add_argument("--csv", help="CSV file (header row) of image path + caption")
    src.add_argument("--parquet", help="folder (recursive), glob or file of parquet shards")
    p.add_argument("--min-size", type=int, default=1024, help="drop images whose short side is smaller")
    p.add_argument(
        "--image-col",
        default=None,
        help=f"parquet image column (default: first of {', '.join(IMAGE_COLUMNS)})",
    )
    p.add_argument(
        "--caption-col", default=None, help=f"caption column (default: first of {', '.join(CAPTION_COLUMNS)})"
    )
    p.add_argument(
        "--path-col",
        default=None,
        help=f"image path column (JSONL/CSV default: first of {', '.join(PATH_COLUMNS)})",
    )
    p.add_argument(
        "--key-col", default=None, help="key column (default: 'key' in JSONL/CSV if present, else the index)"
    )
    p.add_argument("--workers", type=int, default=None, help="decoding threads (default: min(8, CPUs))")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = build_dataset(
            args.out,
            images_dir=args.images_dir,
            jsonl=args.jsonl,
            csv_file=args.csv,
            parquet=args.parquet,
            min_size=args.min_size,
            image_col=args.image_col,
            caption_col=args.caption_col,
            path_col=args.path_col,
            key_col=args.key_col,
            workers=args.workers,
            progress=not args.no_progress,
        )
    except DataError as err:
        logger.error("%s", err)
        return 2
    from senseflow.hub import paths_lines

    emit(*report.summary_lines(), *paths_lines([("dataset", report.dataset)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
