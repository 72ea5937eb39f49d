"""senseflow.hub: what each download fetches, resuming, and one-line errors (hub mocked, offline)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
from huggingface_hub.utils import filter_repo_objects

from senseflow import hub
from senseflow.errors import ConfigError

_TOK_CLIP = ["merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
_TOK_T5 = ["special_tokens_map.json", "spiece.model", "tokenizer.json", "tokenizer_config.json"]


def _folder(name: str, files: list[str]) -> list[str]:
    return [f"{name}/{f}" for f in files]


def _sharded(folder: str, stem: str, n: int) -> list[str]:
    shards = [f"{folder}/{stem}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    return [*shards, f"{folder}/{stem}.safetensors.index.json"]


# File listings of the real repos (abridged to what matters: everything a careless pattern would catch)
_SD3_COMMON = [
    ".gitattributes",
    "LICENSE.md",
    "README.md",
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder_2/config.json",
    "text_encoder_2/model.safetensors",
    "text_encoder_3/config.json",
    *_sharded("text_encoder_3", "model", 2),
    "text_encoders/README.md",
    "text_encoders/clip_g.safetensors",
    "text_encoders/clip_l.safetensors",
    "text_encoders/t5xxl_fp16.safetensors",
    "text_encoders/t5xxl_fp8_e4m3fn.safetensors",
    *_folder("tokenizer", _TOK_CLIP),
    *_folder("tokenizer_2", _TOK_CLIP),
    *_folder("tokenizer_3", _TOK_T5),
    "transformer/config.json",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
]
REPOS = {
    "stabilityai/stable-diffusion-3.5-medium": [
        *_SD3_COMMON,
        "sd3.5_medium.safetensors",
        "SD3.5M_example_workflow.json",
        "mmdit-x.png",
        "transformer/diffusion_pytorch_model.safetensors",
    ],
    "stabilityai/stable-diffusion-3.5-large": [
        *_SD3_COMMON,
        "sd3.5_large.safetensors",
        "sd3.5_large_demo.png",
        *_sharded("transformer", "diffusion_pytorch_model", 2),
    ],
    "black-forest-labs/FLUX.1-dev": [
        ".gitattributes",
        "LICENSE.md",
        "README.md",
        "ae.safetensors",
        "flux1-dev.safetensors",
        "dev_grid.jpg",
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "text_encoder_2/config.json",
        *_sharded("text_encoder_2", "model", 2),
        *_folder("tokenizer", _TOK_CLIP),
        *_folder("tokenizer_2", _TOK_T5),
        "transformer/config.json",
        *_sharded("transformer", "diffusion_pytorch_model", 3),
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ],
    "stabilityai/stable-diffusion-xl-base-1.0": [
        "LICENSE.md",
        "README.md",
        "sd_xl_base_1.0.safetensors",
        "sd_xl_base_1.0_0.9vae.safetensors",
        "sd_xl_offset_example-lora_1.0.safetensors",
        "model_index.json",
        "scheduler/scheduler_config.json",
        *[
            f"{te}/{f}"
            for te in ("text_encoder", "text_encoder_2")
            for f in (
                "config.json",
                "model.safetensors",
                "model.fp16.safetensors",
                "flax_model.msgpack",
                "model.onnx",
                "openvino_model.bin",
                "openvino_model.xml",
            )
        ],
        *_folder("tokenizer", _TOK_CLIP),
        *_folder("tokenizer_2", _TOK_CLIP),
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_flax_model.msgpack",
        "unet/model.onnx",
        "unet/model.onnx_data",
        "unet/openvino_model.bin",
        "unet/openvino_model.xml",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_flax_model.msgpack",
        "vae_1_0/config.json",
        "vae_1_0/diffusion_pytorch_model.safetensors",
        "vae_decoder/config.json",
        "vae_decoder/model.onnx",
        "vae_encoder/config.json",
        "vae_encoder/model.onnx",
    ],
    "facebook/dinov2-large": [
        ".gitattributes",
        "README.md",
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "pytorch_model.bin",
    ],
    "timm/vit_large_patch14_clip_224.openai": [
        ".gitattributes",
        "README.md",
        "config.json",
        "model.safetensors",
        "pytorch_model.bin",
        "open_clip_config.json",
        "open_clip_model.safetensors",
        "open_clip_pytorch_model.bin",
    ],
}

SAFETENSORS = struct.pack("<Q", 2) + b"{}"  # a valid, empty safetensors file


def _content(repo: list[str], name: str) -> bytes:
    if name.endswith(".safetensors"):
        return SAFETENSORS
    if name.endswith(".index.json"):
        folder = name.rsplit("/", 1)[0]
        stem = name.rsplit("/", 1)[1][: -len(".safetensors.index.json")]
        shards = [f.rsplit("/", 1)[1] for f in repo if f.startswith(f"{folder}/{stem}-")]
        return json.dumps({"weight_map": {f"w{i}": s for i, s in enumerate(shards)}}).encode()
    return b"{}"


class FakeHub:
    """Stands in for huggingface_hub.snapshot_download: writes the matching files of a fake listing.

    Like the real one it skips files already complete in local_dir; ``fail_after`` raises ``error``
    after writing that many files (an interrupted download); ``drop`` leaves files out of the repo.
    """

    def __init__(self, repos=REPOS):
        self.repos = {k: list(v) for k, v in repos.items()}
        self.calls: list[dict] = []
        self.fetched: list[str] = []
        self.fail_after: int | None = None
        self.error: BaseException = ConnectionError("connection reset by peer")
        self.content = _content

    def __call__(self, repo_id, *, local_dir, allow_patterns=None, ignore_patterns=None, **kwargs):
        self.calls.append(
            {
                "repo_id": repo_id,
                "allow_patterns": allow_patterns,
                "ignore_patterns": ignore_patterns,
                **kwargs,
            }
        )
        listing = self.repos[repo_id]
        selected = list(
            filter_repo_objects(listing, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns)
        )
        written = 0
        for name in selected:
            target = Path(local_dir) / name
            if target.is_file():
                continue
            if self.fail_after is not None and written >= self.fail_after:
                self.fail_after = None
                raise self.error
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.content(listing, name))
            self.fetched.append(name)
            written += 1
        return str(local_dir)


@pytest.fixture
def fake(monkeypatch):
    f = FakeHub()
    monkeypatch.setattr(hub, "snapshot_download", f)
    return f


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _sd3_expected(transformer: list[str]) -> set[str]:
    return {
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "text_encoder_2/config.json",
        "text_encoder_2/model.safetensors",
        "text_encoder_3/config.json",
        *_sharded("text_encoder_3", "model", 2),
        *_folder("tokenizer", _TOK_CLIP),
        *_folder("tokenizer_2", _TOK_CLIP),
        *_folder("tokenizer_3", _TOK_T5),
        "transformer/config.json",
        *transformer,
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    }


EXPECTED = {
    "sd35_medium": _sd3_expected(["transformer/diffusion_pytorch_model.safetensors"]),
    "sd35_large": _sd3_expected(_sharded("transformer", "diffusion_pytorch_model", 2)),
    "flux_dev": {
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "text_encoder_2/config.json",
        *_sharded("text_encoder_2", "model", 2),
        *_folder("tokenizer", _TOK_CLIP),
        *_folder("tokenizer_2", _TOK_T5),
        "transformer/config.json",
        *_sharded("transformer", "diffusion_pytorch_model", 3),
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    },
    "sdxl_base": {
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "text_encoder_2/config.json",
        "text_encoder_2/model.safetensors",
        *_folder("tokenizer", _TOK_CLIP),
        *_folder("tokenizer_2", _TOK_CLIP),
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",  # the fp32 VAE
    },
    "dinov2_large": {"config.json", "model.safetensors", "preprocessor_config.json"},
    "clip_vit_l14": {"open_clip_config.json", "open_clip_model.safetensors"},
}
REPO_IDS = {
    "sd35_medium": "stabilityai/stable-diffusion-3.5-medium",
    "sd35_large": "stabilityai/stable-diffusion-3.5-large",
    "flux_dev": "black-forest-labs/FLUX.1-dev",
    "sdxl_base": "stabilityai/stable-diffusion-xl-base-1.0",
    "dinov2_large": "facebook/dinov2-large",
    "clip_vit_l14": "timm/vit_large_patch14_clip_224.openai",
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_download_fetches_only_what_the_recipes_read(fake, tmp_path, name):
    out = tmp_path / name
    result = hub.download(name, out, token="hf_x", revision="abc")
    assert [c["repo_id"] for c in fake.calls] == [REPO_IDS[name]]
    call = fake.calls[0]
    assert call["revision"] == "abc" and call["token"] == "hf_x"
    assert call["allow_patterns"] == list(hub.MODELS[name].allow)
    assert _files(out) == EXPECTED[name]
    # no top-level single-file checkpoint, no duplicate formats or precisions
    assert not any(
        "/" not in f and f.endswith((".safetensors", ".bin"))
        for f in _files(out) - {"model.safetensors", "open_clip_model.safetensors"}
    )
    assert not any(
        f.endswith((".bin", ".msgpack", ".onnx", ".onnx_data", ".fp16.safetensors")) for f in _files(out)
    )
    assert result.folder == out.resolve()
    key = {"dinov2_large": "dino", "clip_vit_l14": "clip"}.get(name, "pretrained_model")
    assert result.config_key == key
    expected_value = out.resolve() / "open_clip_model.safetensors" if key == "clip" else out.resolve()
    assert result.value == expected_value


def test_explicit_patterns_exclude_single_file_checkpoints():
    sd3 = hub.MODELS["sd35_medium"].allow
    assert "model_index.json" in sd3 and "transformer/*.safetensors" in sd3
    assert not any(p.startswith("*") or p.startswith("text_encoders") for p in sd3)
    flux = list(
        filter_repo_objects(
            REPOS["black-forest-labs/FLUX.1-dev"], allow_patterns=list(hub.MODELS["flux_dev"].allow)
        )
    )
    assert "ae.safetensors" not in flux and "flux1-dev.safetensors" not in flux


def test_clip_falls_back_to_the_bin_when_no_safetensors(monkeypatch, tmp_path):
    repos = dict(REPOS)
    repos["timm/vit_large_patch14_clip_224.openai"] = [
        f for f in REPOS["timm/vit_large_patch14_clip_224.openai"] if f != "open_clip_model.safetensors"
    ]
    f = FakeHub(repos)
    monkeypatch.setattr(hub, "snapshot_download", f)
    result = hub.download("clip_vit_l14", tmp_path / "clip")
    assert [c["allow_patterns"] for c in f.calls] == [
        ["open_clip_config.json", "open_clip_model.safetensors"],
        ["open_clip_pytorch_model.bin"],
    ]
    assert result.value == (tmp_path / "clip" / "open_clip_pytorch_model.bin").resolve()
    assert _files(tmp_path / "clip") == {"open_clip_config.json", "open_clip_pytorch_model.bin"}


def test_interrupted_download_resumes(fake, tmp_path):
    out = tmp_path / "sd35"
    fake.fail_after = 5
    with pytest.raises(ConfigError) as err:
        hub.download("sd35_medium", out)
    assert "\n" not in str(err.value) and "rerun" in str(err.value)
    first = {name: (out / name).stat().st_mtime_ns for name in fake.fetched}
    assert len(first) == 5
    hub.download("sd35_medium", out)  # the rerun completes
    assert _files(out) == EXPECTED["sd35_medium"]
    assert len(fake.fetched) == len(EXPECTED["sd35_medium"])  # nothing fetched twice
    assert all((out / name).stat().st_mtime_ns == t for name, t in first.items())
    hub.download("sd35_medium", out)  # a third run finds everything and fetches nothing
    assert len(fake.fetched) == len(EXPECTED["sd35_medium"])


def test_missing_shard_is_reported(monkeypatch, tmp_path):
    repos = dict(REPOS)
    listing = REPOS["stabilityai/stable-diffusion-3.5-large"]
    repos["stabilityai/stable-diffusion-3.5-large"] = [
        f for f in listing if f != "transformer/diffusion_pytorch_model-00002-of-00002.safetensors"
    ]
    f = FakeHub(repos)
    index = "transformer/diffusion_pytorch_model.safetensors.index.json"
    # the index still names both shards
    f.content = lambda repo, name: _content(listing if name == index else repo, name)
    monkeypatch.setattr(hub, "snapshot_download", f)
    with pytest.raises(ConfigError, match=r"incomplete: transformer: 1 of 2 weight shards .* missing"):
        hub.download("sd35_large", tmp_path / "l")


def _http_error(cls, status: int, message: str):
    """A huggingface_hub HTTP error as the library builds it (response of its HTTP client)."""
    for module in ("httpx2", "httpx"):
        try:
            http = __import__(module)
            response = http.Response(status, request=http.Request("GET", "https://huggingface.co/x"))
            return cls(message, response=response)
        except Exception:
            continue
    try:
        import requests

        response = requests.Response()
        response.status_code = status
        return cls(message, response=response)
    except Exception:
        pass

    class Fake(cls):  # last resort: no HTTP client we know of
        def __init__(self, msg):
            Exception.__init__(self, msg)
            self.response = type("R", (), {"status_code": status})()

    return Fake(message)


def _one_line_error(fake, exc, name="sd35_medium", tmp_path=None) -> str:
    fake.fail_after = 0
    fake.error = exc
    with pytest.raises(ConfigError) as err:
        hub.download(name, tmp_path / name)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_gated_repo_gives_one_clear_line(fake, tmp_path):
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    url = "https://huggingface.co/stabilityai/stable-diffusion-3.5-medium"
    for exc in (
        _http_error(
            GatedRepoError, 401, "Access to model stabilityai/stable-diffusion-3.5-medium is restricted."
        ),
        _http_error(RepositoryNotFoundError, 401, "401 Client Error. Repository Not Found"),
        _http_error(HfHubHTTPError, 403, "403 Forbidden"),
    ):
        message = _one_line_error(fake, exc, tmp_path=tmp_path)
        assert url in message and "licence" in message
        assert "--token" in message and "huggingface-cli login" in message and "HF_TOKEN" in message
    message = _one_line_error(fake, _http_error(GatedRepoError, 403, "gated"), "flux_dev", tmp_path)
    assert "https://huggingface.co/black-forest-labs/FLUX.1-dev" in message


def test_offline_gives_one_clear_line(fake, tmp_path, monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    message = _one_line_error(
        fake, LocalEntryNotFoundError("cannot find the requested files"), tmp_path=tmp_path
    )
    assert "offline" in message and "rerun" in message
    message = _one_line_error(fake, ConnectionError("Name or service not known"), "dinov2_large", tmp_path)
    assert "offline" in message
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = _one_line_error(
        fake, LocalEntryNotFoundError("outgoing traffic has been disabled"), tmp_path=tmp_path
    )
    assert "offline" in message and "HF_HUB_OFFLINE=1" in message


def test_offline_rerun_of_a_complete_download_succeeds(fake, tmp_path, caplog):
    from huggingface_hub.errors import LocalEntryNotFoundError

    out = tmp_path / "sdxl"
    hub.download("sdxl_base", out)
    fake.fail_after = 0
    fake.error = LocalEntryNotFoundError("outgoing traffic has been disabled")
    fake.repos["stabilityai/stable-diffusion-xl-base-1.0"].append("unet/new_file.json")  # would be fetched
    result = hub.download("sdxl_base", out)
    assert result.folder == out.resolve() and _files(out) == EXPECTED["sdxl_base"]
    assert any("already holds a complete copy" in r.getMessage() for r in caplog.records)


def test_cli_prints_the_paths_lines(fake, tmp_path, capsys):
    out = tmp_path / "dinov2-large"
    assert hub.main(["download", "dinov2_large", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "paths:" in lines
    assert f"  dino: {out.resolve()}" in lines
    assert f"  paths.dino={out.resolve()}" in lines
    clip = tmp_path / "clip"
    assert hub.main(["download", "clip_vit_l14", "--out", str(clip)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"  clip: {clip.resolve() / 'open_clip_model.safetensors'}" in lines
    teacher = tmp_path / "sd35m"
    assert hub.main(["download", "sd35_medium", "--out", str(teacher), "--token", "hf_t"]) == 0
    assert f"  pretrained_model: {teacher.resolve()}" in capsys.readouterr().out.splitlines()
    assert fake.calls[-1]["token"] == "hf_t"


def test_cli_error_is_one_line_and_exit_2(fake, tmp_path, caplog):
    from huggingface_hub.errors import GatedRepoError

    fake.fail_after = 0
    fake.error = _http_error(GatedRepoError, 401, "restricted")
    assert hub.main(["download", "sd35_large", "--out", str(tmp_path / "l")]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "https://huggingface.co/stabilityai/stable-diffusion-3.5-large" in errors[0]


def test_dataset_download_builds_the_json(monkeypatch, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    def jpeg(w, h):
        buf = io.BytesIO()
        Image.new("RGB", (w, h), (200, 10, 10)).save(buf, format="JPEG")
        return buf.getvalue()

    calls = []

    def snapshot(repo_id, *, local_dir, allow_patterns=None, repo_type=None, **kwargs):
        calls.append((repo_id, repo_type, allow_patterns))
        for i in range(2):
            table = pa.table({"image": [jpeg(40, 32), jpeg(8, 8)], "prompt": [f"cat {i}", f"dog {i}"]})
            path = Path(local_dir) / "data" / f"train-{i:05d}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, path)
        return str(local_dir)

    monkeypatch.setattr(hub, "snapshot_download", snapshot)
    report = hub.download_dataset("laion_aesthetics_1024", tmp_path / "laion", min_size=16, workers=1)
    assert calls == [("limingcv/LAION_Aesthetics_1024", "dataset", ["*.parquet"])]
    assert (report.total, report.kept, report.rejected["too_small"]) == (4, 2, 2)
    data = json.loads((tmp_path / "laion" / "dataset.json").read_text())
    assert data["prompts"] == ["cat 0", "cat 1"]
    assert all(os.path.isfile(p) for p in data["image_paths"])
