"""The typed config: loading, inheritance, overrides, validation errors that name the key, docs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from senseflow.config import Config, load_config, save_config
from senseflow.config_doc import markdown, rows
from senseflow.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config) and cfg.recipe


def test_recipe_values_match_the_spec():
    medium = load_config(REPO / "configs/SD35/sd35_senseflow.yaml")
    large = load_config(REPO / "configs/SD35/sd35_large_senseflow.yaml")
    d = medium.distill  # spec §1.3, R1
    assert (d.generator_period, d.ida.lam, d.dm.guidance, d.isg.guidance, d.isg.weight) == (
        10,
        0.98,
        [2, 8],
        [2, 4],
        0.5,
    )
    assert (d.dm.timesteps.min_index, d.dm.timesteps.max_index, d.isg.margin, d.gan.weight) == (
        20,
        980,
        50,
        0.1,
    )
    assert (medium.train.seed, medium.train.save_interval, medium.lr_scheduler.lr_max) == (71801, 3000, 1e-6)
    d = large.distill  # R2
    assert (d.generator_period, d.ida.lam, d.dm.guidance, d.isg.guidance, d.isg.weight) == (
        5,
        0.97,
        [3, 10],
        [5, 5],
        1.0,
    )
    assert large.optimizer.name == "adamw8bit" and large.distill.anchors == [999, 749, 499, 249]
    dec = load_config(REPO / "configs/SD35/sd35_senseflow_decoupled.yaml")  # R6, the fork's settings
    assert dec.distill.decoupled.enabled and (
        dec.train.seed,
        dec.train.save_interval,
        dec.train.image_interval,
    ) == (42, 2000, 60)
    assert (dec.lr_scheduler.lr_start, dec.lr_scheduler.lr_max) == (1e-5, 1e-5)
    assert (
        dec.distill.dm.timesteps.dist,
        dec.distill.dm.timesteps.min_index,
        dec.distill.dm.timesteps.max_index,
    ) == ("logit_normal", 20, 980)
    flux = load_config(REPO / "configs/FLUX/flux_senseflow.yaml")  # R3
    d = flux.distill
    assert (d.generator_period, d.ida.lam, d.isg.weight, d.isg.margin, d.gan.weight, d.anchors) == (
        5,
        0.97,
        1.0,
        20,
        2.0,
        [1000, 904, 759, 512],
    )
    assert (flux.lr_scheduler.lr_start, flux.lr_scheduler.lr_max, flux.train.save_interval) == (
        5e-6,
        1e-5,
        1500,
    )
    assert (flux.optimizer.name, flux.precision.master, flux.model.t5_max_length) == (
        "adamw8bit",
        "bf16",
        512,
    )
    assert not flux.model.cudnn_attention and large.model.cudnn_attention  # FLUX: flash, not cuDNN SDPA
    sdxl, dmd2 = (
        load_config(REPO / f"configs/sdxl/{n}.yaml") for n in ("sdxl_senseflow", "sdxl_dmd2")
    )  # R4, R5
    assert (
        sdxl.distill.isg.weight,
        sdxl.distill.isg.guidance,
        sdxl.distill.gan.weight,
        sdxl.distill.ida.enabled,
    ) == (0.2, [3, 15], 0.5, False)
    assert (sdxl.distill.dm.guidance, sdxl.distill.gan.time_weight, sdxl.data.format) == (
        [8, 8],
        "signal",
        "lmdb",
    )
    c = dmd2.distill
    assert (
        c.backsim_prob,
        c.isg.weight,
        c.gan.weight,
        c.classifier.gen_weight,
        c.classifier.fake_weight,
    ) == (0, 0, 0, 0.005, 0.01)


def test_unknown_key_names_file_and_key(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(
        "base: " + str(REPO / "configs/SD35/sd35_senseflow.yaml") + "\ndistill:\n  isg:\n    wieght: 1\n"
    )
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown key 'distill\.isg\.wieght'"):
        load_config(f)
    with pytest.raises(ConfigError, match="unknown key 'train.iter_nmu'"):
        load_config(REPO / "configs/SD35/sd35_senseflow.yaml", ["train.iter_nmu=3"])


def test_overrides_types_and_inheritance():
    cfg = load_config(
        REPO / "configs/tiny/sd35_senseflow_tiny.yaml",
        [
            "train.iter_num=7",
            "distill.dm.guidance=[1.5, 3]",
            "lr_scheduler.lr_max=2e-5",
            "log.tensorboard=true",
        ],
    )
    assert (
        cfg.train.iter_num == 7 and cfg.distill.dm.guidance == [1.5, 3.0] and cfg.lr_scheduler.lr_max == 2e-5
    )
    assert cfg.log.tensorboard is True
    assert cfg.distill.generator_period == 10  # inherited from the SD3.5 Medium recipe
    with pytest.raises(ConfigError, match="train.iter_num: expected an integer"):
        load_config(REPO / "configs/tiny/sd35_senseflow_tiny.yaml", ["train.iter_num=many"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(REPO / "configs/tiny/sd35_senseflow_tiny.yaml", ["train.iter_num"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("distill.anchors=[249, 499]", "distill.anchors"),
        ("distill.isg.margin=200", "distill.isg.margin"),
        ("distill.dm.guidance=[8, 2]", "distill.dm.guidance"),
        ("distill.dm.timesteps.max_index=1000", "distill.dm.timesteps"),
        ("precision.compute=fp8", "precision.compute"),
        ("paths.dino=", "paths.dino"),
        ("paths.pretrained_model=arch:sd35_medium", "model.random_init"),
        ("discriminator.hooks=[1, 1]", "discriminator.hooks"),
        ("data.on_error=ignore", "data.on_error"),
        ("model.fsdp_blocks_per_unit=0", "model.fsdp_blocks_per_unit"),
        ("model.activation_memory_budget=1.5", "model.activation_memory_budget"),
        ("model.fake_activation_memory_budget=-0.1", "model.fake_activation_memory_budget"),
    ],
)
def test_cross_field_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(REPO / "configs/SD35/sd35_senseflow.yaml", [override])


def test_gan_off_needs_no_backbones():
    cfg = load_config(
        REPO / "configs/SD35/sd35_senseflow.yaml", ["distill.gan.weight=0", "paths.dino=", "paths.clip="]
    )
    assert cfg.distill.gan.weight == 0


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(REPO / "configs/SD35/sd35_large_senseflow.yaml", ["train.iter_num=5"])
    save_config(cfg, tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["distill"]["ida"]["lam"] == 0.97
    assert load_config(tmp_path / "config.yaml") == cfg


def test_every_field_is_documented_and_the_reference_is_current():
    assert [key for key, _, doc in rows() if not doc] == []
    assert (REPO / "docs/configuration.md").read_text() == markdown(), (
        "run: python -m senseflow.config_doc > docs/configuration.md"
    )
