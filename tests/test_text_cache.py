"""Precomputed prompt embeddings (``paths.text_embeddings``, senseflow/data/text_cache.py): the cache holds
what the text encoders produce, a run reads it without loading them and trains as with online encoding,
builds resume, and wrong settings or missing prompts are refused naming the key to fix."""

from __future__ import annotations

import json

import lmdb
import pytest
import torch

from senseflow.adapters import build_adapter
from senseflow.config import load_config, resolve_paths
from senseflow.data import build_dataset
from senseflow.data.text_cache import TextEmbeddingCache, build_text_cache, main, prompt_key
from senseflow.distributed import init_distributed
from senseflow.engine import Engine
from senseflow.errors import ConfigError, SenseFlowError

SD35 = "configs/tiny/sd35_senseflow_tiny.yaml"
SDXL = "configs/tiny/sdxl_senseflow_tiny.yaml"
BASE = ["log.progress_bar=false", "train.image_interval=0"]


def dataset_prompts(cfg) -> list[str]:
    """The empty prompt and the dataset's, unique, in order (what the cache holds)."""
    return list(dict.fromkeys(["", *build_dataset(cfg, check_paths=False).all_prompts()]))


def config(path: str = SD35, *overrides: str):
    cfg = load_config(path, [*BASE, *overrides])
    resolve_paths(cfg)
    return cfg


@pytest.fixture(scope="module")
def sd35_cache(tiny_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("text_cache") / "sd35"
    meta = build_text_cache(config(), out, init_distributed("cpu"), batch_size=7, progress=False)
    return out, meta


def test_cache_holds_the_encoders_outputs(sd35_cache):
    out, meta = sd35_cache
    cfg = config()
    prompts = dataset_prompts(cfg)
    assert meta["count"] == meta["added"] == len(prompts) and meta["complete"]
    adapter = build_adapter(cfg, init_distributed("cpu"))  # online
    cached = build_adapter(config(SD35, f"paths.text_embeddings={out}"), init_distributed("cpu"))
    assert adapter.text_encoders and cached.text_encoders == [] and cached.tokenizers == []
    batch = prompts[1:4]
    want, got = adapter.encode_prompts(batch), cached.encode_prompts(batch)
    assert set(got) == set(want) == {"prompt_embeds", "pooled"}
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cached.empty_cond(2)["pooled"], adapter.empty_cond(2)["pooled"])
    assert cached.text_cache.missing(prompts) == []
    assert cached.text_cache.missing(["not in the dataset", prompts[1]]) == ["not in the dataset"]


def test_training_reads_the_cache_and_matches_online_encoding(sd35_cache, tmp_path):
    out, _ = sd35_cache
    metrics = []
    for name, extra in (("online", []), ("cached", [f"paths.text_embeddings={out}"])):
        cfg = load_config(SD35, [*BASE, "train.iter_num=3", "checkpoint.enabled=false", *extra])
        (tmp_path / name).mkdir()
        engine = Engine(cfg, init_distributed("cpu"), tmp_path / name)
        assert bool(engine.adapter.text_encoders) is (name == "online")
        engine.train()
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        metrics.append(json.loads(lines[-1]))
    online, cached = metrics
    for key in ("loss/fake", "grad_norm/fake", "loss/disc_real"):
        assert cached[key] == pytest.approx(online[key], rel=1e-3, abs=1e-7), key


def test_build_resumes_and_skips_present_prompts(tiny_cache, tmp_path):
    info = init_distributed("cpu")
    first = build_text_cache(config(), tmp_path / "c", info, batch_size=4, progress=False, limit=5)
    assert first["added"] == 6 and first["count"] == 6 and not first["complete"]  # 5 + the empty prompt
    second = build_text_cache(config(), tmp_path / "c", info, batch_size=4, progress=False)
    assert second["count"] == first["count"] + second["added"] and second["complete"]
    cache = TextEmbeddingCache(str(tmp_path / "c"), config())
    assert cache.meta["count"] == second["count"]


def test_missing_prompts_stop_the_run_before_training(tiny_cache, tmp_path):
    build_text_cache(config(), tmp_path / "part", init_distributed("cpu"), progress=False, limit=3)
    cfg = load_config(SD35, [*BASE, f"paths.text_embeddings={tmp_path / 'part'}"])
    with pytest.raises(
        ConfigError, match=r"paths\.text_embeddings: \d+ of the \d+ prompts of paths\.dataset"
    ):
        Engine(cfg, init_distributed("cpu"), tmp_path / "run")


def test_other_settings_are_refused(sd35_cache, tmp_path):
    out, _ = sd35_cache
    with pytest.raises(ConfigError, match=r"model\.t5_max_length=77 there, 12 here"):
        TextEmbeddingCache(str(out), config(SD35, "model.t5_max_length=12"))
    with pytest.raises(ConfigError, match=r"--out: .* other settings \(precision\.text_encoders"):
        build_text_cache(config(SD35, "precision.text_encoders=bf16"), out, init_distributed("cpu"))
    with pytest.raises(SenseFlowError, match=r"paths\.text_embeddings: .* does not exist"):
        TextEmbeddingCache(str(tmp_path / "nowhere"), config())
    (tmp_path / "empty").mkdir()
    with pytest.raises(SenseFlowError, match=r"paths\.text_embeddings: .*not an LMDB environment"):
        TextEmbeddingCache(str(tmp_path / "empty"), config())


def test_sdxl_adds_its_micro_conditioning(tiny_cache, tmp_path):
    out = tmp_path / "sdxl"
    build_text_cache(config(SDXL), out, init_distributed("cpu"), progress=False, limit=4)
    online = build_adapter(config(SDXL), init_distributed("cpu"))
    cached = build_adapter(config(SDXL, f"paths.text_embeddings={out}"), init_distributed("cpu"))
    prompts = dataset_prompts(config(SDXL))[1:3]
    want, got = online.encode_prompts(prompts), cached.encode_prompts(prompts)
    assert set(got) == {"prompt_embeds", "pooled", "time_ids"}
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-4)
    assert not cached.empty_cond(2)["prompt_embeds"].any()  # DMD2's all-zero unconditional branch
    torch.testing.assert_close(cached.empty_cond(2)["time_ids"], want["time_ids"])


def test_cli_prints_the_paths_line_and_inference_ignores_the_key(tiny_cache, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main([SD35, "--out", str(out), "--limit", "2", "--no-progress"]) == 0
    printed = capsys.readouterr()
    assert f"paths.text_embeddings={out}" in printed.out + printed.err
    assert main([SD35]) == 2  # no --out and no paths.text_embeddings
    with lmdb.open(str(out), readonly=True, lock=False) as env, env.begin() as txn:
        assert txn.get(prompt_key("")) is not None
    from senseflow.inference import build_inference

    _, adapter = build_inference(SD35, "tiny:sd3", "cpu", torch.bfloat16, [f"paths.text_embeddings={out}"])
    assert adapter.text_cache is None and adapter.text_encoders


def test_check_reports_the_cache(sd35_cache, tmp_path):
    from senseflow.check import run_checks

    out, meta = sd35_cache
    lines = run_checks(SD35, [f"paths.text_embeddings={out}"])
    assert (
        f"OK   paths.text_embeddings: {meta['count']} prompt embeddings (every prompt of paths.dataset)"
        in lines
    )
    build_text_cache(config(), tmp_path / "part", init_distributed("cpu"), progress=False, limit=2)
    lines = run_checks(SD35, [f"paths.text_embeddings={tmp_path / 'part'}"])
    assert any(
        line.startswith("FAIL paths.text_embeddings:") and "have no embeddings" in line for line in lines
    )
