"""Tests of the tiny SDXL teacher, the DMD2 LMDB latent dataset and the JSON -> LMDB converter (CPU)."""

import json
import pickle
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from PIL import Image

from senseflow.data import lmdb_convert
from senseflow.data.json_dataset import InfiniteLoader, JsonImageDataset
from senseflow.data.lmdb_convert import convert_json_to_lmdb, load_vae, posterior_noise
from senseflow.data.lmdb_dataset import PROGRESS_KEY, LmdbLatentDataset
from senseflow.data.tiny_sdxl import build_tiny_sdxl
from senseflow.errors import ConfigError, DataError

RES = 64  # 64 px -> 4x8x8 latents with the tiny VAE (factor 8)
N_IMAGES = 6


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "sdxl", seed=0)


def _write_dataset(root: Path, n: int = N_IMAGES, bad: tuple[int, ...] = ()) -> Path:
    """n random images (mixed sizes, so resize + crop is exercised); entries in ``bad`` are not images."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    keys, paths, prompts = [], [], []
    for i in range(n):
        path = root / "img" / f"{i}.png"
        if i in bad:
            path.write_bytes(b"this is not a png")
        else:
            h, w = [(64, 64), (64, 80), (72, 64)][i % 3]
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        keys.append(f"key_{i:03d}")
        paths.append(f"img/{i}.png")
        prompts.append(f"a small red circle number {i} \u00e9")
    index = root / "data.json"
    index.write_text(json.dumps({"keys": keys, "image_paths": paths, "prompts": prompts}), encoding="utf-8")
    return index


@pytest.fixture(scope="module")
def dataset_json(tmp_path_factory) -> Path:
    return _write_dataset(tmp_path_factory.mktemp("json"))


def _convert(dataset, vae, out, **kwargs):
    opts = dict(resolution=RES, batch_size=4, device="cpu", seed=0, num_workers=0, progress=False)
    opts.update(kwargs)
    return convert_json_to_lmdb(dataset, vae, out, **opts)


@pytest.fixture(scope="module")
def converted(sdxl_dir, dataset_json, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lmdb") / "db"
    res = _convert(dataset_json, sdxl_dir, out)
    assert res.complete and res.count == N_IMAGES and res.latent_shape == (4, 8, 8)
    return out


def _dump(path: Path) -> dict[bytes, bytes]:
    env = lmdb.open(str(path), readonly=True, lock=False)
    try:
        with env.begin() as txn:
            return dict(txn.cursor())
    finally:
        env.close()


def _write_dmd2(path: Path, records: dict[str, bytes]) -> Path:
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for key, value in records.items():
            txn.put(key.encode(), value)
    env.close()
    return path


def _dmd2_records(
    n: int = 3, shape=(4, 8, 8), seed: int = 0
) -> tuple[dict[str, bytes], np.ndarray, list[str]]:
    """Records in DMD2's exact key layout (as its writer produced them), plus the arrays and prompts."""
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((n, *shape)).astype(np.float16)
    prompts = [f"prompt {i} \u4e2d\u6587" for i in range(n)]
    records = {"latents_shape": " ".join(map(str, (n, *shape))).encode(), "prompts_shape": str(n).encode()}
    for i in range(n):
        records[f"latents_{i}_data"] = latents[i].tobytes()
        records[f"prompts_{i}_data"] = prompts[i].encode("utf-8")
    return records, latents, prompts


# ------------------------------------------------------------------------------------------ tiny SDXL


def test_tiny_sdxl_layout(sdxl_dir):
    index = json.loads((sdxl_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["tokenizer"] == index["tokenizer_2"] == ["transformers", "CLIPTokenizer"]
    assert index["scheduler"] == ["diffusers", "EulerDiscreteScheduler"]
    for sub in ("tokenizer", "tokenizer_2"):
        assert (sdxl_dir / sub / "vocab.json").is_file() and (sdxl_dir / sub / "merges.txt").is_file()
    sched = json.loads((sdxl_dir / "scheduler" / "scheduler_config.json").read_text())
    expected = {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "prediction_type": "epsilon",
    }
    assert {k: sched[k] for k in expected} == expected
    unet = json.loads((sdxl_dir / "unet" / "config.json").read_text())
    assert unet["cross_attention_dim"] == 32 and unet["projection_class_embeddings_input_dim"] == 72
    assert unet["addition_embed_type"] == "text_time" and unet["sample_size"] == 16
    vae = json.loads((sdxl_dir / "vae" / "config.json").read_text())
    assert vae["scaling_factor"] == 0.13025 and vae["latent_channels"] == 4


def test_tiny_sdxl_pipeline_generates(sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.text_encoder_2.config.projection_dim == 24
    out = pipe(
        "a red circle on a plain gray background",
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert out.shape == (1, 128, 128, 3) and np.isfinite(out).all()


def test_tiny_sdxl_deterministic(sdxl_dir, tmp_path):
    from safetensors.torch import load_file

    state = torch.random.get_rng_state()
    again = build_tiny_sdxl(tmp_path / "again", seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    for sub, name in (("unet", "diffusion_pytorch_model"), ("text_encoder_2", "model")):
        a = load_file(sdxl_dir / sub / f"{name}.safetensors")
        b = load_file(again / sub / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------ converter


def test_convert_roundtrip_bit_exact(converted, sdxl_dir, dataset_json):
    raw = _dump(converted)
    assert raw[b"latents_shape"] == f"{N_IMAGES} 4 8 8".encode()
    assert raw[b"prompts_shape"] == str(N_IMAGES).encode()
    progress = json.loads(raw[PROGRESS_KEY.encode()])
    assert progress["complete"] and progress["count"] == N_IMAGES and progress["skipped"] == []

    # Recompute independently: the same images, the VAE posterior sampled with the per-entry noise, scaled.
    images = JsonImageDataset(dataset_json, RES, on_error="raise")
    vae = load_vae(sdxl_dir)
    ds = LmdbLatentDataset(converted)
    assert len(ds) == N_IMAGES and ds.latent_shape == (4, 8, 8)
    for batch in ([0, 1, 2, 3], [4, 5]):  # the converter's batches (batch size 4)
        with torch.no_grad():
            dist = vae.encode(torch.stack([images[i]["image"] for i in batch])).latent_dist
        noise = torch.stack([posterior_noise(0, i, (4, 8, 8)) for i in batch])
        expected = ((dist.mean + dist.std * noise) * 0.13025).to(torch.float16).numpy()
        for row, i in enumerate(batch):
            stored = np.frombuffer(raw[f"latents_{i}_data".encode()], dtype=np.float16).reshape(4, 8, 8)
            assert stored.tobytes() == expected[row].tobytes()
            item = ds[i]
            assert item["latent"].dtype == torch.float32 and item["latent"].shape == (4, 8, 8)
            assert torch.equal(item["latent"], torch.from_numpy(stored.astype(np.float32)))
            assert item["prompt"] == images.prompts[i]
            assert item["key"] == images.keys[i] == raw[f"keys_{i}_data".encode()].decode()
            assert (item["index"], item["skipped"]) == (i, 0)
            assert item["orig_size"] == (1024, 1024) and item["crop_coords"] == (0, 0)
            # sampled, not the mode: differs from the scaled mean
            assert not torch.allclose(item["latent"], dist.mean[row] * 0.13025, atol=1e-3)
    ds.close()  # py-lmdb opens an environment once per process: let the other tests open it


def test_convert_other_seed_differs(converted, sdxl_dir, dataset_json, tmp_path):
    _convert(dataset_json, sdxl_dir, tmp_path / "s1", seed=1, batch_size=8)
    a, b = _dump(converted), _dump(tmp_path / "s1")
    assert a[b"latents_0_data"] != b[b"latents_0_data"]
    assert a[b"prompts_0_data"] == b[b"prompts_0_data"]


def test_resume_with_limit_identical(converted, sdxl_dir, dataset_json, tmp_path):
    out = tmp_path / "db"
    res = _convert(dataset_json, sdxl_dir, out, limit=4)
    assert not res.complete and res.count == 4 and res.next_source == 4
    assert b"latents_shape" not in _dump(out)
    with pytest.raises(DataError, match="incomplete.*rerun"):
        LmdbLatentDataset(out)
    res = _convert(dataset_json, sdxl_dir, out)
    assert res.complete and res.count == N_IMAGES
    assert _dump(out) == _dump(converted)
    # rerunning a complete database changes nothing
    res = _convert(dataset_json, sdxl_dir, out, batch_size=2)
    assert res.complete and _dump(out) == _dump(converted)


def test_resume_after_crash_identical(converted, sdxl_dir, dataset_json, tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    real = lmdb_convert.encode_latents

    def crash_on_second_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated interruption")
        return real(*args, **kwargs)

    monkeypatch.setattr(lmdb_convert, "encode_latents", crash_on_second_batch)
    out = tmp_path / "db"
    argv = ["--dataset", str(dataset_json), "--vae", str(sdxl_dir), "--out", str(out)]
    argv += [
        "--resolution",
        str(RES),
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--num-workers",
        "0",
        "--no-progress",
    ]
    with pytest.raises(KeyboardInterrupt):
        lmdb_convert.main(argv)
    progress = json.loads(_dump(out)[PROGRESS_KEY.encode()])
    assert progress["next_source"] == 4 and not progress["complete"]
    monkeypatch.setattr(lmdb_convert, "encode_latents", real)
    assert lmdb_convert.main(argv) == 0
    assert "samples: 6 (complete" in capsys.readouterr().out
    assert _dump(out) == _dump(converted)


def test_resume_refuses_other_settings(sdxl_dir, dataset_json, tmp_path):
    out = tmp_path / "db"
    _convert(dataset_json, sdxl_dir, out, limit=4)
    with pytest.raises(DataError, match=r"different seed \(0, now 3\)"):
        _convert(dataset_json, sdxl_dir, out, seed=3)
    with pytest.raises(DataError, match="different resolution"):
        _convert(dataset_json, sdxl_dir, out, resolution=128)


def test_convert_refuses_foreign_output(sdxl_dir, dataset_json, tmp_path):
    records, _, _ = _dmd2_records()
    db = _write_dmd2(tmp_path / "dmd2", records)
    with pytest.raises(DataError, match="not written by this converter"):
        _convert(dataset_json, sdxl_dir, db)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="non-empty folder.*notes.txt"):
        _convert(dataset_json, sdxl_dir, tmp_path / "other")


def test_convert_bad_image_raises(sdxl_dir, tmp_path):
    index = _write_dataset(tmp_path / "data", bad=(2,))
    with pytest.raises(DataError, match=r"entry 2 \(key 'key_002'.*cannot be read.*--skip-bad") as err:
        _convert(index, sdxl_dir, tmp_path / "db")
    assert "\n" not in str(err.value)


def test_convert_skip_bad_dense(sdxl_dir, tmp_path):
    index = _write_dataset(tmp_path / "data", bad=(1, 4))
    (tmp_path / "data" / "img" / "5.png").unlink()  # missing files are skipped too
    res = _convert(index, sdxl_dir, tmp_path / "db", skip_bad=True, batch_size=2)
    assert res.complete and res.count == 3 and res.skipped == [1, 4, 5]
    raw = _dump(tmp_path / "db")
    assert raw[b"latents_shape"] == b"3 4 8 8" and raw[b"prompts_shape"] == b"3"
    ds = LmdbLatentDataset(tmp_path / "db")
    assert [ds[j]["key"] for j in range(3)] == ["key_000", "key_002", "key_003"]
    assert [ds[j]["index"] for j in range(3)] == [0, 1, 2]
    assert ds[1]["prompt"].startswith("a small red circle number 2 ")


def test_convert_all_bad(sdxl_dir, tmp_path):
    index = _write_dataset(tmp_path / "data", n=2, bad=(0, 1))
    with pytest.raises(DataError, match="none of the 2 images"):
        _convert(index, sdxl_dir, tmp_path / "db", skip_bad=True)


def test_convert_with_workers(converted, sdxl_dir, dataset_json, tmp_path):
    _convert(dataset_json, sdxl_dir, tmp_path / "db", num_workers=2)
    assert _dump(tmp_path / "db") == _dump(converted)


def test_convert_bad_arguments(sdxl_dir, dataset_json, tmp_path):
    with pytest.raises(ConfigError, match="--resolution: 60 is not a multiple"):
        _convert(dataset_json, sdxl_dir, tmp_path / "db", resolution=60)
    with pytest.raises(ConfigError, match="--vae: .* neither"):
        _convert(dataset_json, tmp_path, tmp_path / "db")
    with pytest.raises(DataError, match="--dataset: .* does not exist"):
        _convert(tmp_path / "nope.json", sdxl_dir, tmp_path / "db")


# ------------------------------------------------------------------------------------------ DMD2 layout


def test_dmd2_layout_reads(tmp_path):
    records, latents, prompts = _dmd2_records()
    ds = LmdbLatentDataset(_write_dmd2(tmp_path / "db", records))
    assert len(ds) == 3 and ds.shape == (3, 4, 8, 8)
    for i in range(3):
        item = ds[i]
        assert torch.equal(item["latent"], torch.from_numpy(latents[i].astype(np.float32)))
        assert item["prompt"] == prompts[i] and item["key"] == str(i) and item["index"] == i
        assert item["orig_size"] == (1024, 1024) and item["crop_coords"] == (0, 0)
    with pytest.raises(IndexError):
        ds[3]
    clone = pickle.loads(pickle.dumps(ds))  # holds no environment
    assert clone[1]["prompt"] == prompts[1]
    other = LmdbLatentDataset(tmp_path / "db")  # a second dataset on the same path shares the environment
    assert other[2]["prompt"] == prompts[2] and ds[2]["prompt"] == prompts[2]
    ds.close()
    assert ds[0]["prompt"] == prompts[0]  # reopened on demand
    ds.close()


def test_dmd2_layout_infinite_loader_workers(tmp_path):
    records, latents, prompts = _dmd2_records()
    ds = LmdbLatentDataset(_write_dmd2(tmp_path / "db", records))
    ds[0]  # open in the parent first: forked workers must open their own environment
    loader = InfiniteLoader(ds, batch_size=3, rank=0, world_size=1, seed=0, num_workers=2)
    for _ in range(2):
        batch = next(loader)
        assert batch["latent"].shape == (3, 4, 8, 8) and batch["latent"].dtype == torch.float32
        for row, i in enumerate(batch["index"].tolist()):
            assert torch.equal(batch["latent"][row], torch.from_numpy(latents[i].astype(np.float32)))
            assert batch["prompt"][row] == prompts[i] and batch["key"][row] == str(i)
        assert sorted(batch["index"].tolist()) == [0, 1, 2]
        assert [t.tolist() for t in batch["orig_size"]] == [[1024] * 3, [1024] * 3]
        assert batch["skipped"].tolist() == [0, 0, 0]


def _corrupt(records: dict[str, bytes], change: dict[str, bytes | None]) -> dict[str, bytes]:
    out = dict(records)
    for key, value in change.items():
        if value is None:
            out.pop(key)
        else:
            out[key] = value
    return out


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"latents_shape": None}, "has no 'latents_shape' record"),
        ({"latents_shape": b"3 4 x 8"}, "'latents_shape' must be positive integers .*found '3 4 x 8'"),
        ({"latents_shape": b"3"}, "'latents_shape' must be positive integers .*found '3'"),
        ({"latents_shape": b"0 4 8 8"}, "'latents_shape' must be positive integers"),
        ({"latents_shape": b"3 -4 8 8"}, "'latents_shape' must be positive integers"),
        ({"latents_shape": b"\xff\xfe"}, "'latents_shape' is not ASCII"),
        ({"latents_shape": b"4 4 8 8"}, r"entry 3: key 'latents_3_data' is missing"),
        ({"prompts_2_data": None}, r"entry 2: key 'prompts_2_data' is missing"),
        ({"latents_2_data": b"\x00" * 100}, r"entry 2: 'latents_2_data' has 100 bytes, expected 512"),
        ({"latents_shape": b"3 4 8 16"}, r"'latents_2_data' has 512 bytes, expected 1024 .*4x8x16"),
    ],
)
def test_dmd2_corruption_at_construction(tmp_path, change, message):
    records, _, _ = _dmd2_records()
    db = _write_dmd2(tmp_path / "db", _corrupt(records, change))
    with pytest.raises(DataError, match=message) as err:
        LmdbLatentDataset(db)
    assert str(err.value).startswith(f"paths.dataset: {db}") and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"latents_1_data": None}, r"entry 1: key 'latents_1_data' is missing"),
        ({"prompts_1_data": None}, r"entry 1: key 'prompts_1_data' is missing"),
        ({"latents_1_data": b"\x00" * 514}, r"entry 1: 'latents_1_data' has 514 bytes, expected 512"),
        ({"prompts_1_data": b"caf\xe9"}, r"entry 1: 'prompts_1_data' is not UTF-8 \(byte 3"),
    ],
)
def test_dmd2_corruption_on_read(tmp_path, change, message):
    records, _, _ = _dmd2_records()
    ds = LmdbLatentDataset(_write_dmd2(tmp_path / "db", _corrupt(records, change)))
    ds[0]
    with pytest.raises(DataError, match=message):
        ds[1]


def test_not_an_lmdb(tmp_path):
    with pytest.raises(DataError, match=r"paths.dataset: .*missing does not exist"):
        LmdbLatentDataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty is not an LMDB environment \(no data.mdb"):
        LmdbLatentDataset(tmp_path / "empty")
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "data.mdb").write_bytes(b"\x00garbage" * 1000)
    with pytest.raises(DataError, match="garbage is not an LMDB environment"):
        LmdbLatentDataset(tmp_path / "garbage")
    (tmp_path / "file.json").write_text("{}")
    with pytest.raises(DataError, match=r"file.json is not an LMDB environment"):
        LmdbLatentDataset(tmp_path / "file.json", config_key="data.lmdb")


def test_open_while_writer_holds_it(tmp_path):
    records, _, _ = _dmd2_records()
    db = _write_dmd2(tmp_path / "db", records)
    writer = lmdb.open(str(db))
    try:
        with pytest.raises(DataError, match="already open in this process through another handle"):
            LmdbLatentDataset(db)
    finally:
        writer.close()
    assert len(LmdbLatentDataset(db)) == 3
