"""Tests for senseflow.data.json_dataset: JSON index validation, image loading, sampler and resumable loader."""

from __future__ import annotations

import json
import logging
import pickle

import pytest
import torch
from PIL import Image

from senseflow.data.json_dataset import InfiniteLoader, JsonImageDataset, ShardedSampler, load_json_index
from senseflow.errors import DataError

SIZES = [(40, 30), (30, 50), (32, 32), (16, 16), (64, 20), (20, 64), (17, 33), (50, 40), (33, 17), (16, 24)]


def _write_json(path, obj) -> str:
    path.write_text(json.dumps(obj))
    return str(path)


def _make_dataset(tmp_path, n=10, sizes=SIZES) -> str:
    """Write n images (assorted sizes, solid colours) under tmp_path/img and an index with relative paths."""
    (tmp_path / "img").mkdir(exist_ok=True)
    keys, paths, prompts = [], [], []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        Image.new("RGB", (w, h), (i * 20 % 256, 255 - i * 20 % 256, 128)).save(tmp_path / "img" / f"{i}.png")
        keys.append(f"k{i}")
        paths.append(f"img/{i}.png")
        prompts.append(f"prompt {i}")
    return _write_json(tmp_path / "data.json", {"keys": keys, "image_paths": paths, "prompts": prompts})


# ---------------------------------------------------------------- load_json_index


def test_load_json_index_ok(tmp_path):
    path = _make_dataset(tmp_path, n=3)
    keys, paths, prompts = load_json_index(path)
    assert keys == ["k0", "k1", "k2"]
    assert paths == ["img/0.png", "img/1.png", "img/2.png"]
    assert prompts == ["prompt 0", "prompt 1", "prompt 2"]


def test_missing_file(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(DataError, match="does not exist") as e:
        load_json_index(path, config_key="paths.dataset")
    assert str(e.value) == f"paths.dataset: {path} does not exist"


def test_invalid_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"keys": [1,\n  ]}')
    with pytest.raises(DataError) as e:
        load_json_index(path)
    msg = str(e.value)
    assert str(path) in msg and "not valid JSON" in msg and "line 2" in msg and "column" in msg
    assert "\n" not in msg


def test_not_an_object(tmp_path):
    path = _write_json(tmp_path / "d.json", [1, 2])
    with pytest.raises(DataError, match="JSON object"):
        load_json_index(path)


@pytest.mark.parametrize("value", [None, "abc"])
def test_missing_or_wrong_list(tmp_path, value):
    obj = {"keys": ["a"], "image_paths": ["a.png"]}
    if value is not None:
        obj["prompts"] = value
    path = _write_json(tmp_path / "d.json", obj)
    with pytest.raises(DataError, match="has no list 'prompts'"):
        load_json_index(path)


def test_lengths_differ(tmp_path):
    obj = {"keys": ["a"] * 10, "image_paths": ["a.png"] * 9, "prompts": ["p"] * 10}
    path = _write_json(tmp_path / "d.json", obj)
    with pytest.raises(DataError) as e:
        load_json_index(path)
    assert "lists differ in length: keys=10, image_paths=9, prompts=10" in str(e.value)


def test_empty_dataset(tmp_path):
    path = _write_json(tmp_path / "d.json", {"keys": [], "image_paths": [], "prompts": []})
    with pytest.raises(DataError, match="empty"):
        load_json_index(path)


def test_prompt_not_string(tmp_path):
    obj = {"keys": ["a", "b", "c"], "image_paths": ["a", "b", "c"], "prompts": ["x", "y", 7]}
    path = _write_json(tmp_path / "d.json", obj)
    with pytest.raises(DataError, match=r"prompts\[2\] is a int, not a string"):
        load_json_index(path)


# ---------------------------------------------------------------- JsonImageDataset


def test_check_paths_missing(tmp_path):
    path = _make_dataset(tmp_path, n=6)
    for i in (1, 3, 4, 5):
        (tmp_path / "img" / f"{i}.png").unlink()
    with pytest.raises(DataError) as e:
        JsonImageDataset(path, 16)
    msg = str(e.value)
    assert "4 of 6" in msg
    assert "[1] key 'k1'" in msg and str(tmp_path / "img" / "1.png") in msg
    assert "[3]" in msg and "[4]" in msg and "[5]" not in msg
    # without the check, construction succeeds
    JsonImageDataset(path, 16, check_paths=False)


def test_bad_on_error(tmp_path):
    path = _make_dataset(tmp_path, n=2)
    with pytest.raises(ValueError, match="on_error"):
        JsonImageDataset(path, 16, on_error="ignore")


def test_items_shape_and_range(tmp_path):
    ds = JsonImageDataset(_make_dataset(tmp_path), 16)
    assert len(ds) == 10
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (3, 16, 16)
        assert item["image"].dtype == torch.float32
        assert item["image"].min() >= -1.0 and item["image"].max() <= 1.0
        assert item["prompt"] == f"prompt {i}" and item["key"] == f"k{i}"
        assert item["index"] == i and item["skipped"] == 0
    # solid colour image 0: (0, 255, 128) -> (-1, 1, 128/255*2-1)
    img = ds[0]["image"]
    assert torch.allclose(img[0], torch.full((16, 16), -1.0))
    assert torch.allclose(img[1], torch.full((16, 16), 1.0))
    assert torch.allclose(img[2], torch.full((16, 16), 128 / 255 * 2 - 1), atol=1e-6)


def test_resize_crop_keeps_left_right(tmp_path):
    im = Image.new("RGB", (64, 32), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 32, 32))
    im.save(tmp_path / "lr.png")
    path = _write_json(tmp_path / "d.json", {"keys": ["lr"], "image_paths": ["lr.png"], "prompts": ["p"]})
    img = JsonImageDataset(path, 16)[0]["image"]
    assert img.shape == (3, 16, 16)
    left, right = img[:, :, :4], img[:, :, -4:]
    assert (left[0] > 0.9).all() and (left[2] < -0.9).all()  # red on the left
    assert (right[2] > 0.9).all() and (right[0] < -0.9).all()  # blue on the right


def test_no_resize_wrong_size(tmp_path):
    path = _make_dataset(tmp_path, n=4)
    ds = JsonImageDataset(path, 16, resize=False)
    assert ds[3]["image"].shape == (3, 16, 16)  # 16x16 image passes
    with pytest.raises(DataError) as e:
        ds[0]
    msg = str(e.value)
    assert "entry 0" in msg and "'k0'" in msg and "40x30" in msg and "16x16" in msg


def _corrupt(tmp_path, i=2) -> str:
    path = _make_dataset(tmp_path, n=5)
    (tmp_path / "img" / f"{i}.png").write_bytes(b"this is not a png at all" * 10)
    return path


def test_corrupt_skip(tmp_path, caplog):
    ds = JsonImageDataset(_corrupt(tmp_path), 16)
    with caplog.at_level(logging.WARNING, logger="senseflow.data.json_dataset"):
        item = ds[2]
    assert item["index"] == 3 and item["key"] == "k3" and item["skipped"] == 1
    assert item["prompt"] == "prompt 3"
    assert any("entry 2" in r.getMessage() and "'k2'" in r.getMessage() for r in caplog.records)


def test_corrupt_skip_wraps_around(tmp_path):
    path = _make_dataset(tmp_path, n=3)
    (tmp_path / "img" / "2.png").write_bytes(b"garbage")
    item = JsonImageDataset(path, 16)[2]
    assert item["index"] == 0 and item["skipped"] == 1


def test_corrupt_raise(tmp_path):
    ds = JsonImageDataset(_corrupt(tmp_path), 16, on_error="raise")
    with pytest.raises(DataError) as e:
        ds[2]
    msg = str(e.value)
    assert "entry 2" in msg and "'k2'" in msg and str(tmp_path / "img" / "2.png") in msg


def test_all_corrupt(tmp_path):
    path = _make_dataset(tmp_path, n=3)
    for i in range(3):
        (tmp_path / "img" / f"{i}.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="none of the 3 images"):
        JsonImageDataset(path, 16)[1]


def test_dataset_pickles(tmp_path):
    ds = JsonImageDataset(_make_dataset(tmp_path, n=3), 16)
    ds2 = pickle.loads(pickle.dumps(ds))
    assert torch.equal(ds[1]["image"], ds2[1]["image"])


# ---------------------------------------------------------------- ShardedSampler


def _epoch(n, world, epoch, seed=0, shuffle=True):
    out = []
    for r in range(world):
        s = ShardedSampler(n, r, world, seed=seed, shuffle=shuffle)
        s.set_epoch(epoch)
        out.append(list(s))
    return out


def test_sampler_even_disjoint_cover():
    a, b = _epoch(10, 2, 0)
    assert len(a) == len(b) == 5
    assert not set(a) & set(b)
    assert set(a) | set(b) == set(range(10))


def test_sampler_odd_wraps():
    a, b = _epoch(11, 2, 0)
    assert len(a) == len(b) == 6
    assert set(a) | set(b) == set(range(11))
    assert len(a) + len(b) == 12  # one index repeated by wrap-around padding
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(11, generator=g).tolist()
    assert b[-1] == perm[0]


def test_sampler_tiny_dataset_more_ranks_than_samples():
    shards = _epoch(2, 5, 0)
    assert all(len(s) == 1 for s in shards)
    assert set(sum(shards, [])) == {0, 1}


def test_sampler_epochs_and_seed():
    assert _epoch(20, 2, 0) != _epoch(20, 2, 1)
    assert _epoch(20, 2, 3, seed=7) == _epoch(20, 2, 3, seed=7)
    assert _epoch(20, 2, 0, seed=1) != _epoch(20, 2, 0, seed=2)
    assert _epoch(6, 2, 0, shuffle=False) == [[0, 2, 4], [1, 3, 5]]


def test_sampler_start_and_len():
    s = ShardedSampler(10, 1, 2, seed=3)
    s.set_epoch(2)
    full = list(s)
    s.set_start(3)
    assert len(s) == 2 and list(s) == full[3:]
    s.set_epoch(3)  # resets the start
    assert len(s) == 5


# ---------------------------------------------------------------- InfiniteLoader


def _take(loader, k):
    return [next(loader) for _ in range(k)]


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for x, y in zip(batches_a, batches_b):
        assert x["key"] == y["key"]
        assert torch.equal(x["index"], y["index"])
        assert torch.equal(x["image"], y["image"])


def test_loader_batches(tmp_path):
    ds = JsonImageDataset(_make_dataset(tmp_path), 16)
    loader = InfiniteLoader(ds, batch_size=2, rank=0, world_size=2, seed=1)
    batch = next(iter(loader))
    assert batch["image"].shape == (2, 3, 16, 16)
    assert isinstance(batch["prompt"], list) and isinstance(batch["prompt"][0], str)
    assert isinstance(batch["key"], list)
    assert batch["index"].shape == (2,) and batch["skipped"].shape == (2,)
    assert loader.batches_per_epoch == 2  # 5 samples per rank, drop_last
    assert loader.state_dict() == {"epoch": 0, "batches": 1}
    _take(loader, 2)
    assert loader.state_dict() == {"epoch": 1, "batches": 1}


def test_loader_ranks_disjoint(tmp_path):
    ds = JsonImageDataset(_make_dataset(tmp_path), 16)
    keys = []
    for r in range(2):
        loader = InfiniteLoader(ds, batch_size=5, rank=r, world_size=2, seed=4)
        keys.append(set(next(loader)["key"]))
    assert not keys[0] & keys[1] and len(keys[0] | keys[1]) == 10


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4, 5, 7])
def test_loader_resume_equivalence(tmp_path, k):
    # 10 samples, world 2 -> 5 per rank, batch 2 -> 2 batches per epoch: k crosses several epoch ends
    ds = JsonImageDataset(_make_dataset(tmp_path), 16)
    a = InfiniteLoader(ds, batch_size=2, rank=1, world_size=2, seed=5)
    _take(a, k)
    b = InfiniteLoader(ds, batch_size=2, rank=1, world_size=2, seed=5)
    b.load_state_dict(a.state_dict())
    _assert_same(_take(a, 5), _take(b, 5))


def test_loader_resume_with_workers(tmp_path):
    ds = JsonImageDataset(_make_dataset(tmp_path), 16)
    a = InfiniteLoader(ds, batch_size=2, rank=0, world_size=2, seed=9, num_workers=2)
    _take(a, 3)  # one batch into epoch 1
    b = InfiniteLoader(ds, batch_size=2, rank=0, world_size=2, seed=9, num_workers=2)
    b.load_state_dict(a.state_dict())
    _assert_same(_take(a, 4), _take(b, 4))
    # workers give the same batches as the main process
    c = InfiniteLoader(ds, batch_size=2, rank=0, world_size=2, seed=9)
    _take(c, 7)
    _assert_same(_take(b, 2), _take(c, 2))


def test_loader_resume_skips_without_loading(tmp_path, monkeypatch):
    ds = JsonImageDataset(_make_dataset(tmp_path), 16)
    a = InfiniteLoader(ds, batch_size=2, rank=0, world_size=1, seed=0)
    _take(a, 3)
    loaded = []
    original = JsonImageDataset.__getitem__
    monkeypatch.setattr(
        JsonImageDataset, "__getitem__", lambda self, i: loaded.append(i) or original(self, i)
    )
    b = InfiniteLoader(ds, batch_size=2, rank=0, world_size=1, seed=0)
    b.load_state_dict(a.state_dict())
    nxt = next(b)
    assert loaded == nxt["index"].tolist()


def test_loader_state_at_epoch_end(tmp_path):
    ds = JsonImageDataset(_make_dataset(tmp_path), 16)
    a = InfiniteLoader(ds, batch_size=2, rank=0, world_size=2, seed=2)
    _take(a, 2)
    assert a.state_dict() == {"epoch": 0, "batches": 2}
    b = InfiniteLoader(ds, batch_size=2, rank=0, world_size=2, seed=2)
    b.load_state_dict(a.state_dict())
    _assert_same(_take(a, 3), _take(b, 3))
    assert a.state_dict() == b.state_dict() == {"epoch": 2, "batches": 1}


def test_loader_shard_smaller_than_batch(tmp_path):
    ds = JsonImageDataset(_make_dataset(tmp_path), 16)
    with pytest.raises(DataError) as e:
        InfiniteLoader(ds, batch_size=4, rank=0, world_size=4)
    msg = str(e.value)
    assert "3 samples" in msg and "10 samples" in msg and "world size 4" in msg and "batch of 4" in msg
