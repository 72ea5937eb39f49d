"""The FLUX and SDXL inference scripts on the tiny teachers with checkpoints of tiny training runs."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from .conftest import run_cmd

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tiny_cache, tmp_path_factory):
    """One 2-iteration training run per family (FLUX, SDXL) -> its ckpt_model_2.pth."""
    out = {}
    for name, config in (
        ("flux", "configs/tiny/flux_senseflow_tiny.yaml"),
        ("sdxl", "configs/tiny/sdxl_senseflow_tiny.yaml"),
    ):
        run = tmp_path_factory.mktemp(name)
        r = run_cmd(
            [
                sys.executable,
                "-m",
                "senseflow.train",
                config,
                str(run),
                "train.iter_num=2",
                "train.save_interval=2",
                "train.image_interval=0",
                "log.progress_bar=false",
                "distill.generator_period=1",
            ],
            tiny_cache,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        out[name] = run / "ckpt_model_2.pth"
    return out


def _script(cache, script, *args):
    return run_cmd([sys.executable, script, "--device", "cpu", "--num_prompts", "2", *args], cache)


def _images(folder):
    files = sorted(folder.glob("[0-9][0-9][0-9][0-9].png"))
    return [np.asarray(Image.open(f)) for f in files], files


def test_flux_script(tiny_cache, runs, tmp_path):
    teacher = tiny_cache / "tiny" / "flux-v1"
    dit = tmp_path / "dit.json"
    dit.write_text(
        json.dumps(
            {**json.loads((teacher / "transformer/config.json").read_text()), "guidance_embeds": False}
        )
    )
    common = [
        "--flux_ckpt",
        str(teacher),
        "--checkpoint",
        str(runs["flux"]),
        "--dit_config",
        str(dit),
        "--height",
        "128",
        "--width",
        "128",
    ]
    for name, extra in (("a", ["--batch_size", "2"]), ("b", ["--batch_size", "1", "--sampler", "x0"])):
        r = _script(
            tiny_cache,
            "scripts_flux/test_flux_senseflow.py",
            *common,
            "--output_dir",
            str(tmp_path / name),
            *extra,
        )
        assert r.returncode == 0, r.stderr[-2000:]
    (a, files), (b, _) = (
        _images(tmp_path / "a" / "senseflow_flux"),
        _images(tmp_path / "b" / "senseflow_flux"),
    )
    assert [f.name for f in files] == ["0000.png", "0001.png"] and a[0].shape == (128, 128, 3)
    assert all(
        np.abs(x.astype(int) - y.astype(int)).max() <= 1 for x, y in zip(a, b)
    )  # batch-size independent
    assert (tmp_path / "a" / "senseflow_flux" / "grid.png").is_file()
    # the default --dit_config is FLUX.1-dev's, which is not the tiny teacher's generator: one clear line
    r = _script(
        tiny_cache, "scripts_flux/test_flux_senseflow.py", *common[:4], "--output_dir", str(tmp_path / "c")
    )
    assert r.returncode == 2 and "--dit_config" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "script, folder",
    [
        ("scripts_sdxl/test_sdxl_senseflow.py", "senseflow_sdxl"),
        ("scripts_sdxl/test_sdxl_dmd2.py", "senseflow_sdxl_dmd2"),
    ],
)
def test_sdxl_scripts(tiny_cache, runs, tmp_path, script, folder):
    teacher = tiny_cache / "tiny" / "sdxl-v1"
    raw = tmp_path / "raw_unet.pth"  # DMD2's public checkpoints are raw state dicts (B6)
    torch.save(torch.load(runs["sdxl"], weights_only=True)["model"], raw)
    outs = []
    for i, ckpt in enumerate((runs["sdxl"], raw)):
        out = tmp_path / f"o{i}"
        r = _script(
            tiny_cache,
            script,
            "--sdxl_ckpt",
            str(teacher),
            "--checkpoint",
            str(ckpt),
            "--output_dir",
            str(out),
            "--unet_config",
            str(teacher / "unet" / "config.json"),
        )
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append(_images(out / folder)[0])
    assert len(outs[0]) == 2 and outs[0][0].shape == (128, 128, 3)
    assert all(np.array_equal(x, y) for x, y in zip(*outs))  # both checkpoint formats give the same generator
    bad = tmp_path / "bad.pth"
    state = torch.load(raw, weights_only=True)
    state.pop(next(iter(state)))
    torch.save(state, bad)
    r = _script(
        tiny_cache,
        script,
        "--sdxl_ckpt",
        str(teacher),
        "--checkpoint",
        str(bad),
        "--output_dir",
        str(tmp_path / "x"),
    )
    assert r.returncode == 2 and "missing" in r.stderr and "Traceback" not in r.stderr
