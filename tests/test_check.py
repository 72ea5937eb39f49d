"""python -m senseflow.check: the tiny default passes; each broken setup fails with a line naming it."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from senseflow import check
from senseflow.config import load_config, resolve_paths
from senseflow.errors import ConfigError, DataError

from .conftest import run_cmd

TINY = "configs/tiny/sd35_senseflow_tiny.yaml"


@pytest.fixture(scope="module")
def tiny_paths(tiny_cache):
    """The resolved tiny assets (built once per session)."""
    cfg = load_config(TINY)
    resolve_paths(cfg)
    return cfg.paths


def _check(capsys, *args: str) -> tuple[int, list[str]]:
    code = check.main([TINY, *args])
    return code, capsys.readouterr().out.splitlines()


def _fails(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("FAIL")]


def test_tiny_default_passes(tiny_cache, tmp_path):
    r = run_cmd(
        [sys.executable, "-m", "senseflow.check", TINY, "--nproc", "2", "--save-dir", str(tmp_path / "run")],
        tiny_cache,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[-1] == "all checks passed" and not _fails(lines)
    text = r.stdout
    for expected in (
        "OK   config:",
        "OK   paths.pretrained_model:",
        "OK   paths.dataset:",
        "(64 entries, every image path exists)",
        "OK   sample batch: 1 image(s) load as (1, 3, 128, 128) float32",
        "OK   paths.dino:",
        "OK   devices:",
        f"OK   save dir: {(tmp_path / 'run').resolve()} is writable",
    ):
        assert expected in text, expected
    assert "gloo" in text or "NCCL" in text


def test_misspelt_key(tiny_paths, capsys):
    code, lines = _check(capsys, "train.iter_nmu=3")
    assert code == 2 and len(_fails(lines)) == 1
    assert "unknown key 'train.iter_nmu'" in _fails(lines)[0]


def test_missing_teacher_folder(tiny_paths, capsys):
    code, lines = _check(capsys, "paths.pretrained_model=/nonexistent/sd35")
    assert code == 2
    assert _fails(lines) == [
        "FAIL paths.pretrained_model: /nonexistent/sd35 is not a directory (expected a teacher folder in "
        "diffusers layout)"
    ]
    # the other checks still ran
    assert any(line.startswith("OK   paths.dataset:") for line in lines)
    assert any(line.startswith("OK   sample batch:") for line in lines)


def _teacher_copy(tiny_paths, tmp_path: Path) -> Path:
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_paths.pretrained_model, teacher)
    return teacher


def test_teacher_missing_a_component(tiny_paths, tmp_path, capsys):
    teacher = _teacher_copy(tiny_paths, tmp_path)
    shutil.rmtree(teacher / "text_encoder_3")
    code, lines = _check(capsys, f"paths.pretrained_model={teacher}")
    assert code == 2 and len(_fails(lines)) == 1
    assert (
        f"paths.pretrained_model: {teacher} is not a complete teacher folder: missing text_encoder_3"
        in (_fails(lines)[0])
    )


def test_teacher_missing_weights_and_truncated_weights(tiny_paths, tmp_path, capsys):
    teacher = _teacher_copy(tiny_paths, tmp_path)
    (teacher / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    vae = teacher / "vae" / "diffusion_pytorch_model.safetensors"
    vae.write_bytes(vae.read_bytes()[:-10])
    code, lines = _check(capsys, f"paths.pretrained_model={teacher}")
    fails = _fails(lines)
    assert code == 2 and len(fails) == 2
    assert any(f"{teacher}: transformer: no weights" in f for f in fails)
    assert any(f"{teacher}: vae/diffusion_pytorch_model.safetensors is truncated" in f for f in fails)
    # random weights need no weight files
    code, lines = _check(capsys, f"paths.pretrained_model={teacher}", "model.random_init=true")
    assert not any("paths.pretrained_model" in f for f in _fails(lines))


def test_dataset_with_unequal_lists(tiny_paths, tmp_path, capsys):
    data = tmp_path / "data.json"
    data.write_text(json.dumps({"keys": ["a", "b"], "image_paths": ["a.png"], "prompts": ["x", "y"]}))
    code, lines = _check(capsys, f"paths.dataset={data}")
    assert code == 2
    assert (
        len(_fails(lines)) == 1
        and "lists differ in length: keys=2, image_paths=1, prompts=2" in _fails(lines)[0]
    )
    assert "SKIP sample batch: the dataset index did not load" in lines


def test_dataset_missing_images_are_counted(tiny_paths, tmp_path, capsys):
    data = json.loads(Path(tiny_paths.dataset).read_text())
    data["image_paths"][3] = str(tmp_path / "gone.png")
    data["image_paths"][7] = str(tmp_path / "gone2.png")
    path = tmp_path / "data.json"
    path.write_text(json.dumps(data))
    code, lines = _check(capsys, f"paths.dataset={path}")
    assert code == 2 and len(_fails(lines)) == 1
    assert "paths.dataset: 2 of 64 image paths" in _fails(lines)[0] and "gone.png" in _fails(lines)[0]


def test_missing_dino(tiny_paths, capsys):
    code, lines = _check(capsys, "paths.dino=/nonexistent/dinov2")
    assert code == 2 and len(_fails(lines)) == 1
    assert _fails(lines)[0].startswith("FAIL paths.dino: /nonexistent/dinov2 is not a DINOv2 folder")
    # without the GAN term the backbones are not needed
    code, lines = _check(capsys, "paths.dino=/nonexistent/dinov2", "distill.gan.weight=0")
    assert code == 0 and "OK   paths.dino, paths.clip: not needed (distill.gan.weight=0)" in lines


def test_all_problems_are_collected(tiny_paths, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    code, lines = _check(
        capsys,
        "paths.pretrained_model=/nonexistent/sd35",
        "paths.dataset=/nonexistent/data.json",
        "paths.dino=/nonexistent/dinov2",
        "paths.clip=/nonexistent/clip.bin",
        "--save-dir",
        str(tmp_path / "afile" / "run"),
    )
    fails = _fails(lines)
    assert code == 2 and len(fails) == 5, lines
    for key in ("paths.pretrained_model", "paths.dataset", "paths.dino", "paths.clip", "save dir"):
        assert any(f.startswith(f"FAIL {key}") for f in fails), key
    assert lines[-1] == "5 problem(s) found"


def test_batch_larger_than_a_process_shard(tiny_paths, capsys):
    code, lines = _check(capsys, "train.batch_size=40", "--nproc", "2")
    assert code == 2
    assert _fails(lines) == [
        "FAIL paths.dataset: 64 entries over 2 process(es) leave 32 per process, fewer than train.batch_size=40"
    ]


def test_preflight_raises_the_first_problem(tiny_paths, tmp_path):
    from senseflow.train import preflight

    cfg = load_config(TINY)
    resolve_paths(cfg)
    preflight(cfg)  # the tiny default is fine
    teacher = _teacher_copy(tiny_paths, tmp_path)
    (teacher / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    cfg.paths.pretrained_model = str(teacher)
    cfg.paths.dataset = "/nonexistent/data.json"
    with pytest.raises(ConfigError, match="transformer: no weights"):
        preflight(cfg)
    cfg.paths.pretrained_model = tiny_paths.pretrained_model
    with pytest.raises(DataError, match="paths.dataset: /nonexistent/data.json does not exist"):
        preflight(cfg)
