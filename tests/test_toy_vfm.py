"""The toy benchmark's discriminator backbone (senseflow.toy.vfm): masked image modelling targets line up
with the ViT's tokens, pre-training learns, the engine loads the result, and a sweep of the backbone's
settings reuses every other stage."""

from __future__ import annotations

import dataclasses
import json

import torch

from senseflow.discriminator.backbone import DinoBackbone, load_dinov2
from senseflow.toy.data import make_split
from senseflow.toy.pipeline import SHARED_STAGES, reuse_stages
from senseflow.toy.presets import PRESETS, RESOLUTION
from senseflow.toy.stages import write_json_atomic
from senseflow.toy.vfm import PATCH, build_backbone, build_dino, patchify, random_mask

CI = PRESETS["ci"]


def test_patchify_follows_the_patch_embedding_token_order():
    dino = build_dino(CI, seed=0)
    x = torch.randn(2, 3, RESOLUTION, RESOLUTION)
    patches = patchify(x)
    n = (RESOLUTION // PATCH) ** 2
    assert patches.shape == (2, n, PATCH * PATCH * 3)
    # the stride-PATCH convolution of the patch embedding is a linear map of exactly these pixels
    proj = dino.embeddings.patch_embeddings.projection
    weight = proj.weight.permute(0, 2, 3, 1).reshape(proj.out_channels, -1)  # (C, p·p·3), (y, x, c) order
    expected = dino.embeddings.patch_embeddings(x)
    assert torch.allclose(patches @ weight.T + proj.bias, expected, atol=1e-5)


def test_random_mask_counts():
    gen = torch.Generator().manual_seed(0)
    mask = random_mask(5, 64, 0.5, gen)
    assert mask.dtype == torch.bool and mask.sum(1).tolist() == [32] * 5
    assert not torch.equal(mask[0], mask[1])
    assert random_mask(3, 64, 0.0, gen).sum(1).tolist() == [1, 1, 1]


def test_pretraining_learns_and_the_engine_loads_the_backbone(tmp_path):
    train = make_split(256, RESOLUTION, 1)
    held = make_split(64, RESOLUTION, 2)
    preset = dataclasses.replace(CI, vfm_steps=60, vfm_batch=32)
    stats = build_backbone(tmp_path / "dino", train.images, held.images, preset, seed=0, device="cpu")
    before, after = stats["heldout_before"], stats["heldout_after"]
    # it learns the images: below its random start and below predicting the mean image
    assert after["masked_l1"] < 0.8 * before["masked_l1"], stats
    assert after["masked_l1"] < 0.9 * after["zero_prediction_l1"], stats
    # the saved folder loads through the engine's DINOv2 loader with the trained weights
    model = load_dinov2(tmp_path / "dino")
    assert model.config.patch_size == PATCH and model.config.hidden_size == CI.vfm_width
    fresh = build_dino(preset, seed=0)
    assert not torch.equal(
        model.embeddings.patch_embeddings.projection.weight,
        fresh.embeddings.patch_embeddings.projection.weight,
    )
    backbone = DinoBackbone(model, hooks=[1, 3])
    taps = backbone(torch.rand(2, 3, RESOLUTION, RESOLUTION) * 2 - 1)
    assert [t.shape for t in taps] == [(2, CI.vfm_width, 8, 8)] * 3  # the whole image, 8 x 8 tokens
    # vfm_steps 0: a random backbone, no training statistics
    no_mim = dataclasses.replace(CI, vfm_steps=0)
    random = build_backbone(tmp_path / "rand", train.images, held.images, no_mim, 0, "cpu")
    assert "heldout_after" not in random and (tmp_path / "rand" / "config.json").is_file()


def test_reuse_rebuilds_only_the_backbone_when_its_settings_differ(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "preset.json").write_text(json.dumps(CI.to_dict()))
    for name in SHARED_STAGES:
        (src / name).mkdir()
        write_json_atomic(src / name / ".done.json", {"seconds": 1.0})
    same = reuse_stages(src, tmp_path / "a", CI)
    assert same == list(SHARED_STAGES)
    other = reuse_stages(src, tmp_path / "b", dataclasses.replace(CI, vfm_steps=0, distill_lr=1e-4))
    assert other == [s for s in SHARED_STAGES if s != "backbones"]
