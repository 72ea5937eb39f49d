"""End-to-end runs of every recipe on the tiny default through the real launchers (CPU, gloo)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from .conftest import free_port, launch, run_cmd

LAUNCHER = "exp_sd35/train_SD35_senseflow.sh"
TINY = "configs/tiny/sd35_senseflow_tiny.yaml"
FAST = (
    "log.progress_bar=false",
    "distill.generator_period=3",
    "train.log_interval=3",
    "train.save_interval=3",
    "train.image_interval=3",
)

pytestmark = pytest.mark.slow


def _metrics(run: Path) -> dict[int, dict]:
    return {r["iter"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def _losses(record: dict) -> dict[str, float]:
    return {k: v for k, v in record.items() if k.startswith(("loss/", "grad_norm/", "dm/"))}


# every memory option at once (sharded text encoders and discriminator heads, generator states offloaded)
LEAN = (
    "model.shard_text_encoders=true",
    "model.shard_discriminator=true",
    "optimizer.offload_generator_state=true",
)
RECIPES = [
    pytest.param("exp_sd35/train_SD35_senseflow.sh", "configs/tiny/sd35_senseflow_tiny.yaml", (), id="sd35"),
    pytest.param(
        "exp_sd35/train_SD35_senseflow.sh", "configs/tiny/sd35_senseflow_tiny.yaml", LEAN, id="sd35_lean"
    ),
    pytest.param(
        "exp_sd35/train_SD35_large_senseflow.sh",
        "configs/tiny/sd35_large_senseflow_tiny.yaml",
        (),
        id="sd35_large",
    ),
    pytest.param(
        "exp_sd35/train_SD35_senseflow_decoupled.sh",
        "configs/tiny/sd35_senseflow_decoupled_tiny.yaml",
        (),
        id="decoupled",
    ),
    pytest.param("exp_flux/train_flux_senseflow.sh", "configs/tiny/flux_senseflow_tiny.yaml", (), id="flux"),
    pytest.param("exp_sdxl/train_sdxl_senseflow.sh", "configs/tiny/sdxl_senseflow_tiny.yaml", (), id="sdxl"),
    pytest.param("exp_sdxl/train_sdxl_dmd2.sh", "configs/tiny/sdxl_dmd2_tiny.yaml", (), id="sdxl_dmd2"),
]
# which losses each recipe logs on a generator iteration
LOSSES = {
    "sdxl_dmd2_tiny": ("loss/dm", "loss/cls_gen", "loss/fake", "loss/cls_fake"),
    "sd35_senseflow_decoupled_tiny": (
        "loss/dm",
        "loss/ca",
        "loss/isg",
        "loss/gan",
        "loss/fake",
        "loss/disc_fake",
    ),
}
DEFAULT_LOSSES = ("loss/dm", "loss/isg", "loss/gan", "loss/fake", "loss/disc_real", "loss/disc_fake")


@pytest.mark.parametrize("launcher, config, extra", RECIPES)
def test_two_process_run_resumes_exactly(tiny_cache, tmp_path, launcher, config, extra):
    """Stop after 6 iterations, rerun to 9: same losses and weights as an uninterrupted 9-iteration run."""
    full, split = tmp_path / "full", tmp_path / "split"
    fast = (*FAST, *extra)
    r = launch(launcher, 1, 2, config, full, *fast, "train.iter_num=9", cache=tiny_cache)
    assert r.returncode == 0, r.stderr[-3000:]
    r = launch(launcher, 1, 2, config, split, *fast, "train.iter_num=6", cache=tiny_cache)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (split / "checkpoints" / "latest").read_text() == "step_00000006"
    r = launch(launcher, 1, 2, config, split, *fast, "train.iter_num=9", cache=tiny_cache)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr and "at iteration 6" in r.stderr
    if extra:  # each option took effect (rank 0 logs)
        for line in ("text encoders sharded", "discriminator heads sharded", "generator optimiser states"):
            assert line in r.stderr, line

    a, b = _metrics(full), _metrics(split)
    assert sorted(a) == sorted(b) == [3, 6, 9]
    for it in (3, 6, 9):
        assert _losses(a[it]) == _losses(b[it]), it
    for key in LOSSES.get(Path(config).stem, DEFAULT_LOSSES):
        assert key in a[9], key

    # the exported generators are bitwise identical, and hold the SD3 transformer's keys
    ga = torch.load(full / "ckpt_model_9.pth", weights_only=True)["model"]
    gb = torch.load(split / "ckpt_model_9.pth", weights_only=True)["model"]
    assert ga.keys() == gb.keys() and any(
        k.startswith(("transformer_blocks.0.", "down_blocks.1.")) for k in ga
    )
    assert not any(k.startswith("cls_head") for k in ga)  # DMD2's head belongs to the fake score
    assert not any("guidance_embedder" in k for k in ga)  # FLUX: the student has no guidance embedder
    assert all(torch.equal(ga[k], gb[k]) for k in ga)
    g6 = torch.load(split / "ckpt_model_6.pth", weights_only=True)["model"]
    assert any(not torch.equal(g6[k], ga[k]) for k in ga), "the generator did not train"
    assert (full / "config.yaml").is_file() and (full / "images" / "iter_0000009.png").is_file()
    # only the newest keep_last=2 training states remain
    assert sorted(p.name for p in (full / "checkpoints").glob("step_*")) == ["step_00000006", "step_00000009"]


def test_multinode_simulated_reads_disjoint_shards(tiny_cache, tmp_path):
    """Two 'nodes' (one process each) on one machine: the run completes, ranks read different data."""
    import subprocess
    import sys

    from .conftest import REPO

    port = free_port()
    save = tmp_path / "mn"
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    args = [TINY, str(save), *FAST, "train.iter_num=4", "log.trace_data=true"]
    procs = []
    import os

    for node in (0, 1):
        e = {
            **os.environ,
            "SENSEFLOW_CACHE": str(tiny_cache),
            "PYTHON": sys.executable,
            **env,
            "NODE_RANK": str(node),
        }
        procs.append(
            subprocess.Popen(
                ["sh", LAUNCHER, "2", "1", *args],
                cwd=REPO,
                env=e,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    keys = [
        [
            k
            for line in (save / f"data_trace_rank{r}.jsonl").read_text().splitlines()
            for k in json.loads(line)["keys"]
        ]
        for r in (0, 1)
    ]
    assert len(keys[0]) == len(keys[1]) == 4
    assert not set(keys[0]) & set(keys[1])
    assert _metrics(save)[3]["loss/dm"] > 0


def _bad(tmp_path, tiny_cache, *args):
    r = launch(LAUNCHER, 1, 1, *args, cache=tiny_cache)
    errors = [line for line in r.stderr.splitlines() if " ERROR " in line]
    return r, errors


def test_misspelt_key_is_one_clear_line(tiny_cache, tmp_path):
    cfg = tmp_path / "typo.yaml"
    cfg.write_text(f"base: {Path(TINY).resolve()}\ntrain:\n  iter_nmu: 3\n")
    r, errors = _bad(tmp_path, tiny_cache, str(cfg), str(tmp_path / "run"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(errors) == 1 and "unknown key 'train.iter_nmu'" in errors[0] and str(cfg) in errors[0]


def test_missing_teacher_is_one_clear_line(tiny_cache, tmp_path):
    r, errors = _bad(
        tmp_path, tiny_cache, TINY, str(tmp_path / "run"), "paths.pretrained_model=/nonexistent/sd35"
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(errors) == 1 and "paths.pretrained_model: /nonexistent/sd35 is not a directory" in errors[0]
    r, errors = _bad(tmp_path, tiny_cache, TINY, str(tmp_path / "run"), "paths.pretrained_model=")
    assert r.returncode == 2 and len(errors) == 1 and "paths.pretrained_model" in errors[0]


def test_missing_discriminator_backbone_is_one_clear_line(tiny_cache, tmp_path):
    r, errors = _bad(tmp_path, tiny_cache, TINY, str(tmp_path / "run"), "paths.dino=/nonexistent/dinov2")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(errors) == 1 and "paths.dino: /nonexistent/dinov2" in errors[0]


def test_dataset_with_unequal_lists_is_one_clear_line(tiny_cache, tmp_path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps({"keys": ["a", "b"], "image_paths": ["a.png"], "prompts": ["x", "y"]}))
    r, errors = _bad(tmp_path, tiny_cache, TINY, str(tmp_path / "run"), f"paths.dataset={data}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(errors) == 1 and "lists differ in length: keys=2, image_paths=1, prompts=2" in errors[0]


def test_single_process_without_torchrun(tiny_cache, tmp_path):
    """The entry point runs as a plain process (no torchrun) and writes everything a user looks at."""
    import sys

    run = tmp_path / "single"
    r = run_cmd(
        [sys.executable, "-m", "senseflow.train", TINY, str(run), *FAST, "train.iter_num=3"], tiny_cache
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run / "ckpt_model_3.pth").is_file() and (run / "images" / "iter_0000003.png").is_file()
    assert (run / "train.log").read_text().count("training finished") == 1
