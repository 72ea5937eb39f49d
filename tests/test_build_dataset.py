"""senseflow.data.build: folder / JSONL / CSV / parquet sources, filters with exact counts, safe reruns."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from senseflow.data import build
from senseflow.data.build import build_dataset, list_parquet
from senseflow.data.json_dataset import JsonImageDataset
from senseflow.errors import DataError

BROKEN = b"\x89PNG\r\n\x1a\n this is not an image"


def _encode(w: int, h: int, fmt: str = "JPEG", color=(200, 40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format=fmt)
    return buf.getvalue()


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_bytes(data)
    return path


def _load(out: Path) -> dict:
    return json.loads((out / "dataset.json").read_text())


def _counts(report) -> dict:
    return {"total": report.total, "kept": report.kept, **report.rejected}


# ------------------------------------------------------------------------------------------ folder


def _folder(root: Path) -> None:
    _write(root / "a.jpg", _encode(64, 48))
    _write(root / "a.txt", "  a red cat\n")
    _write(root / "sub" / "b.png", _encode(40, 80, "PNG"))
    _write(root / "sub" / "b.txt", "a dog")
    _write(root / "c.jpg", _encode(64, 64))  # no caption file
    _write(root / "d.jpg", _encode(64, 64))
    _write(root / "d.txt", "   \n")  # empty caption
    _write(root / "e.jpg", BROKEN)
    _write(root / "e.txt", "broken")
    _write(root / "f.png", _encode(20, 100, "PNG"))  # short side 20
    _write(root / "f.txt", "thin")
    _write(root / "notes.txt", "a caption without an image")


def test_folder_source_counts_and_json(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    _folder(src)
    report = build_dataset(out, images_dir=src, min_size=32, workers=2, progress=False)
    assert _counts(report) == {
        "total": 6,
        "kept": 2,
        "no_caption": 2,
        "missing_image": 0,
        "unreadable": 1,
        "too_small": 1,
    }
    data = _load(out)
    assert data == {
        "keys": ["a", "sub/b"],
        "image_paths": [str(src.resolve() / "a.jpg"), str(src.resolve() / "sub" / "b.png")],
        "prompts": ["a red cat", "a dog"],
    }
    assert len(JsonImageDataset(out / "dataset.json", 32)) == 2  # the trainer reads it

    # the command line prints the table with the same numbers and the config line
    assert build.main(["--out", str(tmp_path / "cli"), "--images-dir", str(src), "--min-size", "32"]) == 0
    text = capsys.readouterr().out
    rows = {line.rsplit(None, 1)[0].strip(): int(line.rsplit(None, 1)[1]) for line in text.splitlines()[1:7]}
    assert rows == {
        "items read": 6,
        "kept": 2,
        "dropped: missing or empty caption": 2,
        "dropped: image missing": 0,
        "dropped: image cannot be decoded": 1,
        "dropped: short side below 32": 1,
    }
    assert f"  dataset: {(tmp_path / 'cli' / 'dataset.json').resolve()}" in text.splitlines()


def test_default_min_size_drops_small_images(tmp_path):
    src = tmp_path / "src"
    _write(src / "big.png", _encode(1024, 1300, "PNG"))
    _write(src / "big.txt", "big")
    _write(src / "small.png", _encode(1023, 2000, "PNG"))
    _write(src / "small.txt", "small")
    report = build_dataset(tmp_path / "out", images_dir=src, progress=False)
    assert (report.kept, report.rejected["too_small"]) == (1, 1)


def test_nothing_usable_is_one_clear_error(tmp_path):
    src = tmp_path / "src"
    _write(src / "a.jpg", _encode(8, 8))
    _write(src / "a.txt", "tiny")
    with pytest.raises(
        DataError, match=r"no usable image among 1 entries \(short side below --min-size: 1\)"
    ):
        build_dataset(tmp_path / "out", images_dir=src, min_size=64, progress=False)
    assert not (tmp_path / "out" / "dataset.json").exists()
    assert build.main(["--out", str(tmp_path / "o"), "--images-dir", str(src), "--min-size", "64"]) == 2


# ------------------------------------------------------------------------------------------ JSONL / CSV


def test_jsonl_source(tmp_path):
    src = tmp_path / "list"
    _write(src / "img" / "ok.jpg", _encode(50, 40))
    _write(src / "img" / "ok2.png", _encode(40, 40, "PNG"))
    absolute = _write(tmp_path / "elsewhere" / "abs.jpg", _encode(64, 64))
    _write(src / "img" / "broken.jpg", BROKEN)
    _write(src / "img" / "small.jpg", _encode(30, 64))
    lines = [
        {"file": "img/ok.jpg", "text": "first", "key": "k1"},
        {"file": str(absolute), "text": "absolute path"},
        {"file": "img/ok2.png", "text": "  third  "},
        {"file": "img/missing.jpg", "text": "missing"},
        {"file": "img/broken.jpg", "text": "broken"},
        {"file": "img/small.jpg", "text": "small"},
        {"file": "img/ok.jpg"},  # no caption key
        {"file": "img/ok.jpg", "text": None},
    ]
    jsonl = _write(src / "list.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n")
    report = build_dataset(
        tmp_path / "out", jsonl=jsonl, min_size=32, path_col="file", caption_col="text", progress=False
    )
    assert _counts(report) == {
        "total": 8,
        "kept": 3,
        "no_caption": 2,
        "missing_image": 1,
        "unreadable": 1,
        "too_small": 1,
    }
    data = _load(tmp_path / "out")
    assert data["keys"] == ["k1", "00000001", "00000002"]
    assert data["image_paths"] == [
        str((src / "img" / "ok.jpg").resolve()),
        str(absolute.resolve()),
        str((src / "img" / "ok2.png").resolve()),
    ]
    assert data["prompts"] == ["first", "absolute path", "third"]


def test_jsonl_errors_name_the_line_and_column(tmp_path):
    bad = _write(tmp_path / "bad.jsonl", '{"image": "a.jpg", "prompt": "x"}\n{not json\n')
    with pytest.raises(DataError, match=r"bad.jsonl line 2 is not valid JSON"):
        build_dataset(tmp_path / "out", jsonl=bad, progress=False)
    cols = _write(tmp_path / "cols.jsonl", '{"image": "a.jpg", "prompt": "x"}\n')
    with pytest.raises(
        DataError, match=r"no caption column 'caption' \(--caption-col\); columns: image, prompt"
    ):
        build_dataset(tmp_path / "out", jsonl=cols, caption_col="caption", progress=False)


def test_csv_source_with_default_columns(tmp_path):
    src = tmp_path / "csv"
    _write(src / "a.jpg", _encode(40, 40))
    _write(src / "b.png", _encode(40, 40, "PNG"))
    _write(src / "c.jpg", BROKEN)
    table = 'image,caption\na.jpg,"a cat, sitting"\nb.png,\nc.jpg,broken\nnope.jpg,missing\n'
    csv_file = _write(src / "list.csv", "\ufeff" + table)  # with a byte-order mark, as Excel writes
    report = build_dataset(tmp_path / "out", csv_file=csv_file, min_size=32, progress=False)
    assert _counts(report) == {
        "total": 4,
        "kept": 1,
        "no_caption": 1,
        "missing_image": 1,
        "unreadable": 1,
        "too_small": 0,
    }
    assert _load(tmp_path / "out")["prompts"] == ["a cat, sitting"]


# ------------------------------------------------------------------------------------------ parquet


def _shards(root: Path) -> dict[str, bytes]:
    """Three shards (one at the top level, two in a subfolder) covering every case; returns sources."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    on_disk = _write(root / "side" / "on_disk.jpg", _encode(48, 48))
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    jpeg, png, webp = _encode(64, 48), _encode(48, 64, "PNG"), _encode(50, 50, "WEBP")
    shards = {
        "a.parquet": [
            ({"bytes": jpeg, "path": "x.jpg"}, "jpeg ok"),  # row 0 -> 00000000.jpg (bytes copied)
            ({"bytes": png, "path": None}, "png ok"),  # row 1 -> 00000001.png
            ({"bytes": BROKEN, "path": None}, "broken"),  # row 2 unreadable
            ({"bytes": jpeg, "path": None}, None),  # row 3 no caption
        ],
        "sub/b.parquet": [
            ({"bytes": webp, "path": None}, "webp ok"),  # row 4 -> 00000004.jpg (re-encoded)
            ({"bytes": _encode(20, 64), "path": None}, "small"),  # row 5 too small
            ({"bytes": jpeg, "path": None}, "   "),  # row 6 empty caption
        ],
        "sub/c.parquet": [
            ({"bytes": None, "path": "../side/on_disk.jpg"}, "path ok"),  # row 7 in place
            (None, "no image"),  # row 8 missing
            ({"bytes": None, "path": "../side/nope.jpg"}, "gone"),  # row 9 missing
            ({"bytes": jpeg, "path": None}, "last ok"),  # row 10 -> 00000010.jpg
        ],
    }
    for name, rows in shards.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        table = pa.table(
            {
                "image": pa.array([r[0] for r in rows], type=image_type),
                "prompt": pa.array([r[1] for r in rows], type=pa.string()),
            }
        )
        pq.write_table(table, path)
    return {"jpeg": jpeg, "png": png, "on_disk": on_disk}


PARQUET_COUNTS = {
    "total": 11,
    "kept": 5,
    "no_caption": 2,
    "missing_image": 2,
    "unreadable": 1,
    "too_small": 1,
}


def test_parquet_source(tmp_path):
    src, out = tmp_path / "shards", tmp_path / "out"
    sources = _shards(src)
    assert [p.relative_to(src).as_posix() for p in list_parquet(src)] == [
        "a.parquet",
        "sub/b.parquet",
        "sub/c.parquet",
    ]  # the top-level shard is listed once
    assert len(list_parquet(f"{src}/**/*.parquet")) == 3
    report = build_dataset(out, parquet=src, min_size=32, workers=3, progress=False)
    assert _counts(report) == PARQUET_COUNTS
    assert report.written == 4 and report.reused == 0
    data = _load(out)
    images = out.resolve() / "images"
    assert data["keys"] == ["00000000", "00000001", "00000004", "00000007", "00000010"]
    assert data["image_paths"] == [
        str(images / "00000000.jpg"),
        str(images / "00000001.png"),
        str(images / "00000004.jpg"),
        str(sources["on_disk"].resolve()),
        str(images / "00000010.jpg"),
    ]
    assert data["prompts"] == ["jpeg ok", "png ok", "webp ok", "path ok", "last ok"]
    assert sorted(p.name for p in images.iterdir()) == [
        "00000000.jpg",
        "00000001.png",
        "00000004.jpg",
        "00000010.jpg",
    ]
    assert (images / "00000000.jpg").read_bytes() == sources["jpeg"]
    assert (images / "00000001.png").read_bytes() == sources["png"]
    with Image.open(images / "00000004.jpg") as im:
        assert im.format == "JPEG" and im.size == (50, 50)
    assert len(JsonImageDataset(out / "dataset.json", 32)) == 5


def test_parquet_rerun_skips_work_and_gives_the_same_json(tmp_path, monkeypatch):
    src, out = tmp_path / "shards", tmp_path / "out"
    _shards(src)
    build_dataset(out, parquet=src, min_size=32, progress=False)
    before = (out / "dataset.json").read_bytes()
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}

    def no_decoding(*args, **kwargs):
        raise AssertionError("a finished shard was decoded again")

    with monkeypatch.context() as m:
        m.setattr(build, "_decode", no_decoding)
        report = build_dataset(out, parquet=src, min_size=32, progress=False)
    assert _counts(report) == PARQUET_COUNTS
    assert (report.shards_skipped, report.written) == (3, 0)
    assert (out / "dataset.json").read_bytes() == before
    assert {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()} == mtimes

    # without the state file every row is checked again, but written images are not written again
    (out / build.STATE_NAME).unlink()
    report = build_dataset(out, parquet=src, min_size=32, progress=False)
    assert _counts(report) == PARQUET_COUNTS
    assert (report.shards_skipped, report.written, report.reused) == (0, 0, 4)
    assert (out / "dataset.json").read_bytes() == before
    assert {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()} == mtimes

    # other filters: rows are checked again, the images written before are reused
    report = build_dataset(out, parquet=src, min_size=49, progress=False)
    assert (report.kept, report.rejected["too_small"], report.written) == (1, 5, 0)


def test_parquet_interrupted_build_resumes(tmp_path, monkeypatch):
    src = tmp_path / "shards"
    _shards(src)
    clean = build_dataset(tmp_path / "clean", parquet=src, min_size=32, progress=False)
    out = tmp_path / "out"
    calls = {"n": 0}
    real = build._decode

    def crash_on_the_fifth(source):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(source)

    with monkeypatch.context() as m:
        m.setattr(build, "_decode", crash_on_the_fifth)
        with pytest.raises(KeyboardInterrupt):
            build_dataset(out, parquet=src, min_size=32, workers=1, progress=False)
    assert not (out / "dataset.json").exists()
    assert not list((out / "images").glob(".*.tmp"))
    report = build_dataset(out, parquet=src, min_size=32, workers=1, progress=False)
    assert _counts(report) == _counts(clean)
    assert (report.shards_skipped, report.written, report.reused) == (1, 1, 1)
    a, b = _load(tmp_path / "clean"), _load(out)
    assert a["keys"] == b["keys"] and a["prompts"] == b["prompts"]
    assert [os.path.basename(p) for p in a["image_paths"]] == [os.path.basename(p) for p in b["image_paths"]]


def test_parquet_changed_shards_are_refused(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    src, out = tmp_path / "shards", tmp_path / "out"
    _shards(src)
    build_dataset(out, parquet=src, min_size=32, progress=False)
    # a shard sorting first would shift every row number (image file names)
    pq.write_table(pa.table({"image": [_encode(64, 64)], "prompt": ["new"]}), src / "0.parquet")
    with pytest.raises(DataError, match="other parquet shards"):
        build_dataset(out, parquet=src, min_size=32, progress=False)
    # a shard sorting last is fine: the earlier row numbers stay
    (src / "0.parquet").rename(src / "z.parquet")
    report = build_dataset(out, parquet=src, min_size=32, progress=False)
    assert (report.shards_skipped, report.kept, report.written) == (3, 6, 1)


def test_parquet_bytes_column_and_auto_detected_names(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    src = tmp_path / "shards"
    src.mkdir()
    pq.write_table(
        pa.table(
            {"jpg": [_encode(40, 40), b"", BROKEN], "TEXT": ["one", "two", "three"], "key": ["a", "b", "c"]}
        ),
        src / "part.parquet",
    )
    report = build_dataset(tmp_path / "out", parquet=src / "*.parquet", min_size=32, progress=False)
    assert (report.kept, report.rejected["missing_image"], report.rejected["unreadable"]) == (1, 1, 1)
    assert _load(tmp_path / "out")["prompts"] == ["one"]
    with pytest.raises(DataError, match=r"no caption column \(tried prompt, caption.*columns: jpg, alt"):
        pq.write_table(pa.table({"jpg": [_encode(40, 40)], "alt": ["x"]}), src / "part.parquet")
        build_dataset(tmp_path / "out2", parquet=src, progress=False)


def test_exactly_one_source(tmp_path):
    with pytest.raises(DataError, match="exactly one source"):
        build_dataset(tmp_path, progress=False)
    with pytest.raises(DataError, match="no .parquet files"):
        build_dataset(tmp_path / "o", parquet=tmp_path / "nothing", progress=False)
