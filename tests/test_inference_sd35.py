"""SD3.5 inference on the tiny teacher: the scripts, every checkpoint format, user errors, and the export
loaded by the stock diffusers pipeline (spec §15)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from senseflow.errors import ConfigError
from senseflow.inference import (
    SEED_STRIDE,
    build_inference,
    generate,
    latent_shape,
    load_checkpoint_state,
    load_generator,
)
from senseflow.sampling import inference_levels, sample_x0, scheduler_sigmas

from .conftest import REPO, run_cmd

TINY = "configs/tiny/sd35_senseflow_tiny.yaml"
TINY_LARGE = "configs/tiny/sd35_large_senseflow_tiny.yaml"
PROMPTS = ["a red circle on the left", "a large blue square at the top", "a small green triangle"]


@pytest.fixture(scope="module")
def run_dir(tiny_cache, tmp_path_factory) -> Path:
    """A 2-iteration tiny SD3.5 Medium run: ckpt_model_2.pth and checkpoints/step_00000002."""
    run = tmp_path_factory.mktemp("inference") / "run"
    args = [sys.executable, "-m", "senseflow.train", TINY, str(run)]
    r = run_cmd([*args, "train.iter_num=2", "train.save_interval=2", "log.progress_bar=false"], tiny_cache)
    assert r.returncode == 0, r.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def reference(run_dir) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "ckpt_model_2.pth", weights_only=True)["model"]


@pytest.fixture(scope="module")
def built(tiny_cache):
    return build_inference(REPO / TINY, "tiny:sd3", "cpu", torch.float32)


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory, tiny_cache) -> Path:
    from senseflow.export import main

    out = tmp_path_factory.mktemp("export") / "transformer"
    args = ["--config", str(REPO / TINY), "--teacher", "tiny:sd3"]
    args += ["--checkpoint", str(run_dir), "--out", str(out)]
    assert main([*args, "--dtype", "fp32"]) == 0
    assert main([*args, "--dtype", "fp32"]) == 2  # refuses to overwrite a non-empty folder
    return out


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts_sd35" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _start_script(name: str, args: list[str], cwd: Path, cache: Path) -> subprocess.Popen:
    """Start a script from ``cwd`` (relative default paths must resolve from the repo root)."""
    env = {**os.environ, "SENSEFLOW_CACHE": str(cache)}
    cmd = [sys.executable, str(REPO / "scripts_sd35" / f"{name}.py"), "--sd35_ckpt", "tiny:sd3", *args]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> tuple[str, str]:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return out, err


def _pngs(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("[0-9]*.png"))}


# ------------------------------------------------------------------------------- scripts


def test_scripts_write_deterministic_batch_independent_images(run_dir, tiny_cache, tmp_path):
    """Both scripts as subprocesses from another working directory (concurrently), and in-process reruns
    of the Medium script with the same seed at batch sizes 1 and 3."""
    args = ["--checkpoint", str(run_dir / "ckpt_model_2.pth"), "--config", TINY, "--start_idx", "2"]
    args += ["--num_prompts", "3"]
    medium = _start_script(
        "test_senseflow_sd35", [*args, "--output_dir", str(tmp_path / "a")], tmp_path, tiny_cache
    )
    large_args = [
        "--checkpoint",
        str(run_dir),
        "--config",
        TINY_LARGE,
        "--num_prompts",
        "2",
        "--sampler",
        "euler",
    ]
    large = _start_script(
        "test_senseflow_sd35_large",
        [*large_args, "--output_dir", str(tmp_path / "large")],
        tmp_path,
        tiny_cache,
    )
    main = _script("test_senseflow_sd35").main
    for name, bs in (("b", "1"), ("c", "3")):
        assert (
            main(["--sd35_ckpt", "tiny:sd3", *args, "--batch_size", bs, "--output_dir", str(tmp_path / name)])
            == 0
        )

    out, _ = _finish(medium)
    assert "done: 3 images" in out and "images/s" in out and "4 steps" in out
    assert out.count("batch ") == 3
    runs = {}
    for name in "abc":
        folder = tmp_path / name / "senseflow_sd35"
        runs[name] = _pngs(folder)
        assert sorted(runs[name]) == ["0002.png", "0003.png", "0004.png"]
        assert all(a.shape == (128, 128, 3) for a in runs[name].values())  # the tiny teacher's native size
        assert (folder / "grid.png").is_file()
    # same seed and batch size: bitwise identical
    assert all(np.array_equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    # batch of 3 vs batches of 1: identical noise; batched float kernels may move a rare pixel by one level
    for k in runs["a"]:
        diff = np.abs(runs["a"][k].astype(int) - runs["c"][k].astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, k

    # Large: 4 steps by default (the original defaulted to 2), checkpoint given as the run directory
    out, _ = _finish(large)
    assert "euler sampler, 4 steps at levels [1.0, 0.9, 0.75, 0.5]" in out
    folder = tmp_path / "large" / "senseflow_sd35_large"
    assert sorted(_pngs(folder)) == ["0000.png", "0001.png"] and (folder / "grid.png").is_file()


def test_user_errors_are_one_line_with_exit_2(run_dir, built, tmp_path, capsys):
    main = _script("test_senseflow_sd35").main
    ckpt = ["--sd35_ckpt", "tiny:sd3", "--checkpoint", str(run_dir / "ckpt_model_2.pth"), "--config", TINY]
    ckpt += ["--output_dir", str(tmp_path)]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    teacher_cfg = Path(built[0].paths.pretrained_model) / "transformer" / "config.json"
    other_cfg = tmp_path / "config.json"
    other_cfg.write_text(json.dumps({**json.loads(teacher_cfg.read_text()), "num_layers": 3}))
    state = torch.load(run_dir / "ckpt_model_2.pth", weights_only=True)["model"]
    state["pos_embed.proj.weight"] = torch.zeros(8, 16, 2, 2)  # another architecture
    torch.save({"model": state}, tmp_path / "other.pth")
    cases = [
        (["--prompts_file", str(empty)], "--prompts_file", "no prompts"),
        (["--start_idx", "20", "--num_prompts", "5"], "--start_idx/--num_prompts", "20..24"),
        (["--num_steps", "5"], "--num_steps", "at most"),
        (
            ["--transformer_config", str(other_cfg), "--num_prompts", "1"],
            "--transformer_config",
            "num_layers: 3 != 2",
        ),
        (["--height", "100", "--num_prompts", "1"], "--height/--width", "not a multiple of 16"),
        (["--checkpoint", str(tmp_path / "missing.pth")], "--checkpoint", "does not exist"),
        (
            ["--checkpoint", str(tmp_path / "other.pth"), "--num_prompts", "1"],
            "--checkpoint",
            "pos_embed.proj.weight",
        ),
    ]
    for args, flag, text in cases:
        assert main([*ckpt, *args]) == 2, args
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith(flag) and text in last, (args, last)
    assert not (tmp_path / "senseflow_sd35").exists()
    # the same teacher config passes the check; the B5 levels on request
    args = ["--transformer_config", str(teacher_cfg), "--num_prompts", "1", "--sd35_legacy_sigmas"]
    assert main([*ckpt, *args]) == 0
    assert "levels [1.0, 0.964286, 0.9, 0.75]" in capsys.readouterr().out
    assert (tmp_path / "senseflow_sd35" / "0000.png").is_file()


# ------------------------------------------------------------------------------- checkpoint formats


def test_every_checkpoint_format_loads_the_same_weights(run_dir, reference, built, exported, tmp_path):
    from safetensors.torch import save_file

    torch.save({"ema_model": reference, "step": 2}, tmp_path / "ema.pth")
    torch.save(reference, tmp_path / "bare.pt")
    save_file(reference, str(tmp_path / "gen.safetensors"))
    step = run_dir / "checkpoints" / "step_00000002"
    exports_only = tmp_path / "run_without_states"
    exports_only.mkdir()
    (exports_only / "ckpt_model_1.pth").write_bytes(b"older, never read")
    shutil.copy(run_dir / "ckpt_model_2.pth", exports_only / "ckpt_model_2.pth")
    paths = {
        "pth model": run_dir / "ckpt_model_2.pth",
        "pth ema_model": tmp_path / "ema.pth",
        "bare state dict": tmp_path / "bare.pt",
        "safetensors": tmp_path / "gen.safetensors",
        "training checkpoint": step,
        "run dir (latest)": run_dir,
        "checkpoints dir": run_dir / "checkpoints",
        "run dir with ckpt_model files only": exports_only,
        "exported diffusers folder": exported,
    }
    _, adapter = built
    for what, path in paths.items():
        state = load_checkpoint_state(path, adapter.generator_config(), adapter.transformer_cls)
        assert state.keys() == reference.keys(), what
        assert all(torch.equal(state[k], reference[k]) for k in reference), what
    model = load_generator(adapter, exported, torch.float32)
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    info = json.loads((exported / "senseflow.json").read_text())
    assert info["scheduler_sigmas"] == [1.0, 0.75, 0.5, 0.25] and info["max_sequence_length"] == 77


def test_unreadable_and_foreign_checkpoints_are_refused(reference, built, exported, tmp_path):
    _, adapter = built
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 16)
    torch.save({"model": {"w": torch.zeros(1)}, "extra": Path("x")}, tmp_path / "pickled.pth")
    torch.save({"model": {"w": "not a tensor"}}, tmp_path / "strings.pth")
    (tmp_path / "empty_dir").mkdir()
    incomplete = tmp_path / "step_00000009"
    incomplete.mkdir()
    (incomplete / ".metadata").write_bytes(b"")
    foreign = tmp_path / "foreign"
    shutil.copytree(exported, foreign)
    cfg = json.loads((foreign / "config.json").read_text())
    (foreign / "config.json").write_text(json.dumps({**cfg, "num_attention_heads": 2}))
    cases = {
        "garbage.pth": "tensors-only PyTorch checkpoint",
        "garbage.safetensors": "as safetensors",
        "pickled.pth": "tensors-only PyTorch checkpoint",  # weights_only refuses arbitrary objects
        "strings.pth": "not a generator state dict",
        "empty_dir": "no known checkpoint",
        "step_00000009": "incomplete training checkpoint",
        "foreign": "num_attention_heads: 2 != 4",
    }
    for name, text in cases.items():
        with pytest.raises(ConfigError, match="^--checkpoint: ") as err:
            load_checkpoint_state(tmp_path / name, adapter.generator_config(), adapter.transformer_cls)
        assert text in str(err.value) and "\n" not in str(err.value), name
    missing = dict(reference)
    missing.pop("proj_out.weight")
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ConfigError, match="proj_out.weight"):
        load_generator(adapter, tmp_path / "missing.pth", torch.float32)


# ------------------------------------------------------------------------------- generation and diffusers


def test_generate_depends_only_on_seed_and_prompt_index(built, reference):
    cfg, adapter = built
    model = adapter.load_generator(reference, torch.float32)
    levels = inference_levels(cfg, adapter.schedule, 4)
    a = generate(adapter, model, PROMPTS, [0, 1, 2], 42, levels, "x0", 128, 128)
    b = generate(adapter, model, PROMPTS[1:], [1, 2], 42, levels, "x0", 128, 128)
    c = generate(adapter, model, PROMPTS[:1], [0], 7, levels, "x0", 128, 128)
    assert a.shape == (3, 3, 128, 128) and a.min() >= -1 and a.max() <= 1
    torch.testing.assert_close(a[1:], b, atol=1e-4, rtol=0)
    assert not torch.allclose(a[:1], c, atol=1e-2)
    wide = generate(adapter, model, PROMPTS[:1], [0], 42, levels, "euler", 64, 128)
    assert wide.shape == (1, 3, 64, 128) and latent_shape(adapter, 64, 128) == (16, 8, 16)


def test_export_runs_in_the_stock_diffusers_pipeline(built, exported):
    """The exported folder as the stock pipeline's transformer: FlowMatchEulerDiscreteScheduler with the
    unshifted sigmas reproduces our Euler sampler, FlowMatchLCMScheduler our x0 sampler."""
    from diffusers import FlowMatchLCMScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    cfg, adapter = built
    model = load_generator(adapter, exported, torch.float32)
    levels = inference_levels(cfg, adapter.schedule, 4)
    sigmas = scheduler_sigmas(levels, adapter.schedule)
    pipe = StableDiffusion3Pipeline.from_pretrained(
        cfg.paths.pretrained_model,
        transformer=SD3Transformer2DModel.from_pretrained(exported),
        torch_dtype=torch.float32,
    )
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(guidance_scale=0.0, max_sequence_length=77, height=128, width=128, output_type="pt")

    ours = generate(adapter, model, PROMPTS[:2], [0, 1], 42, levels, "euler", 128, 128)
    gens = [torch.Generator().manual_seed(42 * SEED_STRIDE + i) for i in (0, 1)]
    theirs = pipe(PROMPTS[:2], sigmas=sigmas, generator=gens, **kwargs).images
    torch.testing.assert_close(pipe.scheduler.sigmas, torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]))
    torch.testing.assert_close((ours + 1) / 2, theirs, atol=1e-4, rtol=0)

    # x0 sampler: the LCM scheduler re-noises from torch's global RNG (the pipeline passes it no generator)
    pipe.scheduler = FlowMatchLCMScheduler.from_config(pipe.scheduler.config)
    noise = torch.randn((2, *latent_shape(adapter, 128, 128)), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(123)
    theirs = pipe(PROMPTS[:2], sigmas=sigmas, latents=noise, **kwargs).images
    cond = adapter.encode_prompts(PROMPTS[:2])
    torch.manual_seed(123)
    with torch.no_grad():
        x0 = sample_x0(
            lambda x, lv: adapter.forward(model, x, lv, cond), noise, levels, adapter.schedule, torch.randn
        )
        ours = adapter.decode_latents(x0).clamp(-1, 1)
    torch.testing.assert_close((ours + 1) / 2, theirs, atol=1e-4, rtol=0)


def test_inference_keeps_the_vae_eager(tiny_cache):
    """The SD3.5 training config compiles the VAE and runs its attention on the math backend
    (``model.compile_vae``, ``model.vae_math_attention``); inference built from it does neither unless
    its overrides ask."""
    from senseflow.kernels import MathAttention

    config = REPO / "configs/SD35/sd35_senseflow.yaml"
    for overrides, math in (([], False), (["model.vae_math_attention=true"], True)):
        cfg, adapter = build_inference(config, "tiny:sd3", "cpu", torch.float32, overrides)
        vae = adapter.vae
        assert not cfg.model.compile_vae and cfg.model.vae_math_attention == math
        assert vae.encoder._compiled_call_impl is None and vae.decoder._compiled_call_impl is None
        processors = [m.processor for m in vae.modules() if hasattr(m, "set_processor")]
        assert processors and all(isinstance(p, MathAttention) == math for p in processors)
