"""VFM discriminator (spec §8): tiny DINOv2/CLIP on CPU, full-size shapes on the meta device."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from senseflow.discriminator import (
    ClipTextEncoder,
    DinoBackbone,
    DiscHead,
    DiscriminatorConfig,
    LocalBatchNorm,
    VFMDiscriminator,
    diff_augment,
    downsampled_size,
    load_dinov2,
)
from senseflow.discriminator.diffaug import (
    rand_brightness,
    rand_contrast,
    rand_cutout,
    rand_saturation,
    rand_translation,
)
from senseflow.discriminator.tiny import (
    TINY_CLIP_MODEL_CFG,
    build_tiny_clip,
    build_tiny_dino,
    tiny_discriminator_config,
)
from senseflow.errors import ConfigError
from senseflow.losses.gan import hinge_d_fake, hinge_d_real, hinge_g

PROMPTS = ["a red cube on a table", "a portrait of an old fisherman"]


def make_disc(assets, **overrides) -> VFMDiscriminator:
    cfg = tiny_discriminator_config()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    return VFMDiscriminator(cfg, *assets)


def images(b: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) * 2 - 1


# ------------------------------------------------------------------------------------------ config


def test_config_defaults_are_the_spec_values():
    cfg = DiscriminatorConfig()
    assert cfg.hooks == [2, 5, 8, 10, 14, 19, 23] and cfg.tap_patch_embed
    assert (cfg.cmap_dim, cfg.num_downsamples, cfg.virtual_batch, cfg.c_dim) == (64, 3, 8, 768)
    assert cfg.diffaug == "color,translation,cutout"
    assert (cfg.translation_ratio, cfg.cutout_ratio, cfg.clip_context_length) == (0.125, 0.2, 77)
    # 1024 px: ±128 px shifts, 205 px cutout (spec §8.8)
    assert int(1024 * cfg.translation_ratio + 0.5) == 128 and int(1024 * cfg.cutout_ratio + 0.5) == 205
    cfg.validate()


@pytest.mark.parametrize(
    "key,value",
    [("hooks", [1, 1]), ("diffaug", "color,flip"), ("cmap_dim", 0), ("cutout_ratio", 1.5), ("resolution", 7)],
)
def test_config_validation_names_the_key(key, value):
    cfg = DiscriminatorConfig()
    setattr(cfg, key, value)
    with pytest.raises(ConfigError, match=f"discriminator.{key}"):
        cfg.validate()


# ------------------------------------------------------------------------------------------ shapes


def test_logit_shapes_tiny(assets):
    disc = make_disc(assets).eval()
    text = disc.encode_text(PROMPTS)
    assert text.shape == (2, 16) and text.dtype == torch.float32
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))
    for size, per_head in ((64, 1), (128, 4)):  # grids 4→2→1→1 and 9→5→3→2
        x = images(2, size, 0)
        ref = disc.reference_features(x)
        assert len(ref) == 3 and all(f.shape == (2, 32, size // 14, size // 14) for f in ref)
        logits = disc(x, text, ref, torch.Generator().manual_seed(0))
        assert logits.shape == (2, 3 * per_head) == (2, disc.num_logits(size, size))
        assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_grid_arithmetic_full_size():
    assert 1024 // 14 == 73
    sizes = [73]
    for _ in range(3):
        sizes.append(downsampled_size(sizes[-1], 1))
    assert sizes == [73, 37, 19, 10]
    assert 8 * downsampled_size(73, 3) ** 2 == 800


def test_full_size_on_meta_device():
    """ViT-L/14 backbone at 1024 px: 8 taps of 1024×73×73 and 8 × 10×10 = 800 logits (spec §8.6)."""
    from transformers import Dinov2Config, Dinov2Model

    with torch.device("meta"):
        model = Dinov2Model(
            Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, image_size=518)
        )
        backbone = DinoBackbone(model)
        head = DiscHead(1024, 768)
    assert backbone.pos_grid == (37, 37) and backbone.num_taps == 8
    feats = backbone(torch.zeros(1, 3, 1024, 1024, device="meta"))
    assert [tuple(f.shape) for f in feats] == [(1, 1024, 73, 73)] * 8
    text = torch.zeros(1, 768, device="meta")
    logits = torch.cat([head(f, f, text) for f in feats], dim=1)
    assert logits.shape == (1, 800)


def test_full_size_head_parameter_count():
    with torch.device("meta"):
        head = DiscHead(1024, 768, cmap_dim=64, num_downsamples=3)
    n = sum(p.numel() for p in head.parameters())
    conv1, conv3 = 1024 * 1024 + 1024, 9 * 1024 * 1024 + 1024
    per_branch = conv1 + 5 * conv3 + 3 * 2 * 1024 + (1024 * 64 + 64)  # convs, 3 BNL affines, cls conv
    assert n == 2 * per_branch + 768 * 64 + 64 == 96_673_984
    # The spec's ≈96.5 M counts the 1024-wide convolutions only; ≈0.77 B for 8 heads.
    assert abs(2 * (conv1 + 5 * conv3) - 96.5e6) < 0.05e6
    assert abs(8 * n - 0.77e9) < 0.01e9


# ------------------------------------------------------------------------------------------ conditioning


def test_prompt_and_reference_change_the_logits(assets):
    disc = make_disc(assets).eval()  # eval: no spectral-norm power iteration, so passes are comparable
    x, r1, r2 = images(2, 128, 0), images(2, 128, 1), images(2, 128, 2)

    def run(prompts, ref):
        text = disc.encode_text(prompts)
        return disc(x, text, disc.reference_features(ref), torch.Generator().manual_seed(3))

    base = run(PROMPTS, r1)
    torch.testing.assert_close(run(PROMPTS, r1), base, rtol=0, atol=0)
    assert (run(["a bowl of soup", "a blue car"], r1) - base).abs().max() > 1e-4
    assert (run(PROMPTS, r2) - base).abs().max() > 1e-4
    # the augmentation is drawn from the generator: another seed, other logits
    text = disc.encode_text(PROMPTS)
    other = disc(x, text, disc.reference_features(r1), torch.Generator().manual_seed(4))
    assert (other - base).abs().max() > 1e-4


# ------------------------------------------------------------------------------------------ frozen parts


@pytest.mark.parametrize("ckpt", [True, False])
def test_frozen_backbone_and_clip_gradient_reaches_image(assets, ckpt):
    disc = make_disc(assets, checkpoint_backbone=ckpt)
    disc.train()
    for part in (disc.backbone, disc.text_encoder):
        assert all(not m.training for m in part.modules())
        assert all(not p.requires_grad for p in part.parameters())
    assert all(m.training for m in disc.heads.modules())
    head_ids = {id(p) for p in disc.heads.parameters()}
    trainable = list(disc.trainable_parameters())
    assert {id(p) for p in trainable} == head_ids and len(trainable) == len(head_ids)
    assert {id(p) for p in disc.parameters() if p.requires_grad} == head_ids

    x = images(2, 64, 0).requires_grad_(True)
    text = disc.encode_text(PROMPTS)
    ref = disc.reference_features(images(2, 64, 1))
    assert not text.requires_grad and not any(f.requires_grad for f in ref)
    logits = disc(x, text, ref, torch.Generator().manual_seed(0))
    hinge_g(logits).mean().backward()
    assert all(p.grad is None for p in disc.backbone.parameters())
    assert all(p.grad is None for p in disc.text_encoder.parameters())
    assert all(p.grad is not None for p in disc.heads.parameters())
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_checkpointing_does_not_change_values_or_gradients(assets):
    grads, outs = [], []
    for ckpt in (True, False):
        disc = make_disc(assets, checkpoint_backbone=ckpt).eval()
        x = images(2, 64, 0).requires_grad_(True)
        out = disc(
            x,
            disc.encode_text(PROMPTS),
            disc.reference_features(x.detach()),
            torch.Generator().manual_seed(1),
        )
        out.sum().backward()
        outs.append(out.detach())
        grads.append(x.grad)
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(grads[0], grads[1])


# ------------------------------------------------------------------------------------------ backbone


def test_taps_match_transformers_at_the_stored_grid(assets):
    """At the stored 4×4 grid no interpolation happens: the taps equal transformers' hidden states."""
    model = load_dinov2(assets[0])
    backbone = DinoBackbone(model, hooks=[1, 3], tap_patch_embed=True, checkpoint_blocks=False)
    x = images(2, 56, 0)
    pixels = ((x + 1) / 2 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]
    ).view(1, 3, 1, 1)
    hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states
    feats = backbone(x)
    for feat, seq in zip(feats, (hidden[2], hidden[4], hidden[0])):
        expected = (seq[:, 1:] + seq[:, :1]).reshape(2, 4, 4, -1).permute(0, 3, 1, 2)
        torch.testing.assert_close(feat, expected, rtol=1e-5, atol=1e-5)


def test_position_embedding_interpolation_is_bilinear(assets):
    backbone = DinoBackbone(load_dinov2(assets[0]), hooks=[0])
    pos = backbone.model.embeddings.position_embeddings.detach()
    grid = pos[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    bilinear = F.interpolate(grid, size=(8, 8), mode="bilinear", align_corners=False)
    bicubic = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False)
    got = backbone.position_embeddings((8, 8))
    assert got.shape == (1, 65, pos.shape[-1])
    torch.testing.assert_close(got[:, :1], pos[:, :1])  # class slot kept
    got_grid = got[:, 1:].reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
    torch.testing.assert_close(got_grid, bilinear)
    assert (got_grid - bicubic).abs().max() > 1e-3
    # and that is what the embedding stage adds: 118 px -> 8×8 grid, the last 6 pixels dropped
    x = images(1, 118, 0)
    tokens, g = backbone.embed(x)
    assert g == (8, 8)
    proj = backbone.model.embeddings.patch_embeddings.projection
    patches = proj(backbone.preprocess(x[..., :112, :112])).flatten(2).transpose(1, 2)
    cls = backbone.model.embeddings.cls_token
    torch.testing.assert_close(tokens, torch.cat([cls, patches], 1) + got)


def test_resolution_option_resizes(assets):
    disc = make_disc(assets, resolution=56).eval()
    x = images(2, 128, 0)
    assert [f.shape[-1] for f in disc.reference_features(x)] == [4, 4, 4]
    assert disc.num_logits(128, 128) == 3


# ------------------------------------------------------------------------------------------ heads


def test_local_batch_norm_groups_of_eight():
    bn = LocalBatchNorm(4, virtual_batch=8)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5, 1.0]))
        bn.bias.copy_(torch.tensor([0.0, 1.0, -1.0, 0.5]))
    x = torch.randn(16, 4, 3, 3) * 3 + 1
    y = bn(x)
    for grp in (slice(0, 8), slice(8, 16)):
        xs = x[grp]
        mean = xs.mean(dim=(0, 2, 3), keepdim=True)
        var = xs.var(dim=(0, 2, 3), keepdim=True, unbiased=False)
        ref = (xs - mean) / torch.sqrt(var + 1e-5) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
        torch.testing.assert_close(y[grp], ref.detach())
    bn.eval()
    torch.testing.assert_close(bn(x), y)  # no running statistics
    one = bn(x[:1])  # B = 1: over space only
    ref = (x[:1] - x[:1].mean((2, 3), keepdim=True)) / torch.sqrt(
        x[:1].var((2, 3), keepdim=True, unbiased=False) + 1e-5
    )
    torch.testing.assert_close(one, (ref * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)).detach())


def test_head_layers_and_spectral_norm():
    torch.manual_seed(0)
    head = DiscHead(16, 8, cmap_dim=4, num_downsamples=3)
    convs = [m for m in head.main.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.kernel_size[0], c.stride[0]) for c in convs] == [
        (1, 1),
        (3, 2),
        (3, 1),
        (3, 2),
        (3, 1),
        (3, 2),
        (1, 1),
    ]
    assert all(c.padding_mode == "circular" and c.bias is not None for c in convs)
    x = torch.randn(3, 16, 9, 9)
    for _ in range(30):  # power iterations in train mode
        head(x, x, torch.randn(3, 8))
    for conv in convs:
        sigma = torch.linalg.matrix_norm(conv.normalized_weight().detach().flatten(1), ord=2)
        assert abs(sigma.item() - 1) < 0.05
    # text mapper: equalised LR, weight ~ N(0,1) scaled by 1/sqrt(c_dim) at run time, bias 0
    c = torch.randn(3, 8)
    torch.testing.assert_close(head.cmapper(c), c @ head.cmapper.weight.T / math.sqrt(8))
    # logit = <o, kappa + rho> / sqrt(cmap_dim)
    head.eval()
    r = torch.randn(3, 16, 9, 9)
    o, rho, kappa = head.main(x), head.ref(r), head.cmapper(c)
    expected = (o * (kappa[:, :, None, None] + rho)).sum(1).flatten(1) / 2
    torch.testing.assert_close(head(x, r, c), expected)


def test_paired_features_are_two_augmented_passes(assets):
    """The disc step's single DINOv2 pass over the real and fake batches: the same draws and taps as
    ``features`` of each in turn, and ``logits`` of them is ``forward``."""
    disc = make_disc(assets).train()
    real, fake = images(2, 64, 1), images(2, 64, 2)
    text = disc.encode_text(PROMPTS)
    ref = disc.reference_features(images(2, 64, 3))
    gen_a, gen_b = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    feats_real, feats_fake = disc.paired_features(real, fake, gen_a)
    with torch.no_grad():
        one_by_one = [disc.features(real, gen_b), disc.features(fake, gen_b)]
    assert gen_a.get_state().equal(gen_b.get_state())  # the same number of draws, in the same order
    for paired, alone in zip((feats_real, feats_fake), one_by_one):
        assert len(paired) == len(alone) == len(disc.heads)
        for a, b in zip(paired, alone):
            assert a.shape == b.shape and not a.requires_grad
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # the augmentation drew something: the fake batch's taps differ from its unaugmented ones
    with torch.no_grad():
        plain = disc.features(fake, augment=False)
    assert not torch.allclose(feats_fake[0], plain[0])
    gen_c = torch.Generator().manual_seed(7)
    disc.eval()  # no power iteration: two calls of the heads see the same weights
    with torch.no_grad():
        expected = disc(real, text, ref, gen_c)
        torch.testing.assert_close(disc.logits(feats_real, text, ref), expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ learning


def smooth_images(b: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    a, bb, c = (torch.rand(3, b, 3, 1, 1, generator=g) * 2 - 1).unbind(0)
    return (a * xx + bb * yy + 0.5 * c).clamp(-1, 1)


def test_discriminator_learns_smooth_vs_noise(assets):
    disc = make_disc(assets).train()
    opt = torch.optim.AdamW(disc.trainable_parameters(), lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    text = disc.encode_text(["an image"] * 4)
    losses = []
    for step in range(40):  # 128 px: 4 logits per head (64 px leaves a single, noisy one)
        real, fake = smooth_images(4, 128, step), images(4, 128, 1000 + step)
        ref = disc.reference_features(real)
        opt.zero_grad(set_to_none=True)
        loss_real = hinge_d_real(disc(real, text, ref, gen)).mean()
        loss_real.backward()
        loss_fake = hinge_d_fake(disc(fake, text, ref, gen)).mean()
        loss_fake.backward()
        torch.nn.utils.clip_grad_norm_(disc.trainable_parameters(), 1.0)
        opt.step()
        losses.append(loss_real.item() + loss_fake.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    real, fake = smooth_images(4, 128, 999), images(4, 128, 5000)
    ref = disc.reference_features(real)
    with torch.no_grad():
        d_real = disc(real, text, ref, torch.Generator().manual_seed(1)).mean()
        d_fake = disc(fake, text, ref, torch.Generator().manual_seed(1)).mean()
    assert d_real > d_fake + 0.5


# ------------------------------------------------------------------------------------------ DiffAugment

OPS = {
    "brightness": (rand_brightness, (-1.5, 1.5)),
    "saturation": (rand_saturation, (-3.0, 3.0)),
    "contrast": (rand_contrast, (-2.0, 2.0)),
    "translation": (rand_translation, (-1.0, 1.0)),
    "cutout": (rand_cutout, (-1.0, 1.0)),
}


@pytest.mark.parametrize("name", list(OPS))
def test_diffaug_op_shape_range_reproducible_differentiable(name):
    op, (lo, hi) = OPS[name]
    x = images(6, 20, 0)
    x[0] = 1.0  # extreme inputs
    x[1] = -1.0
    x[2, 0], x[2, 1:] = 1.0, -1.0
    out = op(x, torch.Generator().manual_seed(7))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= lo - 1e-6 and out.max() <= hi + 1e-6
    torch.testing.assert_close(op(x, torch.Generator().manual_seed(7)), out, rtol=0, atol=0)
    assert not torch.equal(op(x, torch.Generator().manual_seed(8)), out)
    xd = torch.rand(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: op(t, torch.Generator().manual_seed(3)), (xd,))


def test_translation_and_cutout_semantics():
    x = images(5, 16, 0)
    s = int(16 * 0.125 + 0.5)
    g = torch.Generator().manual_seed(11)
    dy, dx = torch.randint(-s, s + 1, (5,), generator=g), torch.randint(-s, s + 1, (5,), generator=g)
    out = rand_translation(x, torch.Generator().manual_seed(11))
    for b in range(5):
        for yy in range(16):
            for xx in range(16):
                sy, sx = yy + dy[b].item(), xx + dx[b].item()
                exp = x[b, :, sy, sx] if 0 <= sy < 16 and 0 <= sx < 16 else torch.zeros(3)
                torch.testing.assert_close(out[b, :, yy, xx], exp)
    ones = torch.ones(8, 1, 1024, 1024)
    cut = rand_cutout(ones, torch.Generator().manual_seed(0), ratio=0.2)
    g = torch.Generator().manual_seed(0)
    cy, cx = torch.randint(0, 1024, (8,), generator=g), torch.randint(0, 1024, (8,), generator=g)
    for b in range(8):
        y0, x0 = cy[b].item() - 102, cx[b].item() - 102
        rows = min(y0 + 205, 1024) - max(y0, 0)
        cols = min(x0 + 205, 1024) - max(x0, 0)
        assert (cut[b] == 0).sum().item() == rows * cols
        assert cut[b, 0, cy[b], cx[b]] == 0


def test_diff_augment_policy():
    x = images(3, 16, 0)
    torch.testing.assert_close(diff_augment(x, "", torch.Generator()), x)
    a = diff_augment(x, "color,translation,cutout", torch.Generator().manual_seed(0))
    b = diff_augment(x, "color,translation,cutout", torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    g = torch.Generator().manual_seed(0)
    manual = rand_contrast(rand_saturation(rand_brightness(x, g), g), g)
    manual = rand_cutout(rand_translation(manual, g, 0.125), g, 0.2)
    torch.testing.assert_close(a, manual)
    with pytest.raises(ConfigError, match="discriminator.diffaug"):
        diff_augment(x, "color,flip")


# ------------------------------------------------------------------------------------------ losses


def test_hinge_losses_by_hand():
    logits = torch.tensor([[2.0, -0.5, 0.5], [-2.0, 0.0, 1.0]], dtype=torch.bfloat16)
    real, fake, gen = hinge_d_real(logits), hinge_d_fake(logits), hinge_g(logits)
    assert real.dtype == fake.dtype == gen.dtype == torch.float32
    torch.testing.assert_close(real, torch.tensor([2 / 3, 4 / 3]))
    torch.testing.assert_close(fake, torch.tensor([5 / 3, 1.0]))
    torch.testing.assert_close(gen, torch.tensor([-2 / 3, 1 / 3]))


# ------------------------------------------------------------------------------------------ loading


def test_tiny_dino_reload_is_identical(tmp_path, assets):
    from transformers import Dinov2Config, Dinov2Model

    from senseflow.discriminator.tiny import TINY_DINO_CONFIG

    again = build_tiny_dino(tmp_path / "dino2", seed=0)
    a, b = load_dinov2(assets[0]), load_dinov2(again)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    x = images(2, 70, 0)
    fa = DinoBackbone(a, hooks=[0, 3])(x)
    fb = DinoBackbone(b, hooks=[0, 3])(x)
    for u, v in zip(fa, fb):
        torch.testing.assert_close(u, v, rtol=0, atol=0)
    other = load_dinov2(build_tiny_dino(tmp_path / "dino3", seed=1))
    assert not torch.equal(other.embeddings.position_embeddings, a.embeddings.position_embeddings)
    assert Dinov2Model(Dinov2Config(**TINY_DINO_CONFIG)).config.hidden_size == a.config.hidden_size


@pytest.mark.parametrize("fmt", ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"])
def test_tiny_clip_reload_matches_open_clip(tmp_path, fmt):
    import open_clip
    from open_clip.model import CLIP

    path = build_tiny_clip(tmp_path / "clip" / fmt, seed=0)
    torch.manual_seed(0)
    ref_model = CLIP(**TINY_CLIP_MODEL_CFG).eval()
    for source in (path, path.parent):  # a weights file or its directory
        enc = ClipTextEncoder(source, model_name="unused-with-config-json")
        assert enc.embed_dim == 16 and not any(p.requires_grad for p in enc.parameters())
        tokens = open_clip.tokenize(PROMPTS)
        with torch.no_grad():
            expected = ref_model.encode_text(tokens, normalize=True)
        torch.testing.assert_close(enc.encode(PROMPTS), expected, rtol=1e-5, atol=1e-6)
    long = enc.tokenize(["word " * 200])
    assert long.shape == (1, 77) and long[0, -1].item() == enc.tokenizer.eot_token_id


def test_text_tower_keys_of_full_vit_l_14():
    """The reader keeps exactly the text tower of a whole open_clip / OpenAI ViT-L-14 state dict."""
    import open_clip
    from open_clip.model import CLIP, CLIPTextCfg, _build_text_tower

    from senseflow.discriminator.text import _text_key

    cfg = open_clip.get_model_config("ViT-L-14")
    with torch.device("meta"):
        full = CLIP(**cfg, quick_gelu=True)
        text = _build_text_tower(cfg["embed_dim"], CLIPTextCfg(**cfg["text_cfg"]), quick_gelu=True)
    kept = {_text_key(k) for k in full.state_dict() if _text_key(k) is not None}
    assert kept == set(text.state_dict())
    assert cfg["embed_dim"] == DiscriminatorConfig().c_dim


def test_missing_or_wrong_paths_raise_config_errors(tmp_path, assets):
    cfg = tiny_discriminator_config()
    with pytest.raises(ConfigError, match="paths.dino"):
        VFMDiscriminator(cfg, tmp_path / "nope", assets[1])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="paths.dino"):
        load_dinov2(tmp_path / "empty")
    with pytest.raises(ConfigError, match="paths.clip"):
        VFMDiscriminator(cfg, assets[0], tmp_path / "nope.safetensors")
    with pytest.raises(ConfigError, match="paths.clip"):
        ClipTextEncoder(tmp_path / "empty")
    bad = tiny_discriminator_config()
    bad.c_dim = 768
    with pytest.raises(ConfigError, match="discriminator.c_dim"):
        VFMDiscriminator(bad, *assets)
    bad = tiny_discriminator_config()
    bad.hooks = [1, 4]
    with pytest.raises(ConfigError, match="discriminator.hooks"):
        VFMDiscriminator(bad, *assets)


def test_openai_torchscript_archive_is_read(tmp_path):
    """OpenAI's own release is a TorchScript archive with the same parameter names."""
    import json

    import open_clip
    from open_clip.model import CLIP

    from senseflow.discriminator.text import CONFIG_NAME

    torch.manual_seed(0)
    model = CLIP(**TINY_CLIP_MODEL_CFG).eval()

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name, child in model.named_children():
                setattr(self, name, child)
            for name, param in model.named_parameters(recurse=False):
                setattr(self, name, param)

        def forward(self, t):
            return self.token_embedding(t).sum() + self.positional_embedding.sum()

    scripted = torch.jit.trace(Holder(), (open_clip.tokenize(["a"]),), check_trace=False)
    torch.jit.save(scripted, str(tmp_path / "ViT-tiny.pt"))
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"model_cfg": TINY_CLIP_MODEL_CFG}))
    with torch.no_grad():
        expected = model.encode_text(open_clip.tokenize(PROMPTS), normalize=True)
    torch.testing.assert_close(ClipTextEncoder(tmp_path / "ViT-tiny.pt").encode(PROMPTS), expected)


def test_bf16_autocast_forward_backward(assets):
    disc = make_disc(assets).train()
    x = images(2, 64, 0).requires_grad_(True)
    text = disc.encode_text(PROMPTS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = disc.reference_features(x.detach())
        logits = disc(x, text, ref, torch.Generator().manual_seed(0))
        loss = hinge_g(logits).mean()
    assert logits.dtype == torch.float32 and loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in disc.trainable_parameters())
