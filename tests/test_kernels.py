"""senseflow/kernels.py: the split GroupNorm equals torch's GroupNorm (values and gradients) in fp32; the
VAE's attention on the math backend gives the default backend's decode."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from senseflow.kernels import (
    MathAttention,
    SplitGroupNorm,
    split_group_norm,
    use_matmul_attention,
    use_split_group_norm,
)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(1, 64, 16, 16), (2, 32, 8, 8, 3), (3, 96, 7, 5)])
def test_split_group_norm_matches_torch(shape, affine):
    torch.manual_seed(0)
    ref = nn.GroupNorm(32, shape[1], eps=1e-6, affine=affine)
    if affine:
        nn.init.normal_(ref.weight)
        nn.init.normal_(ref.bias)
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 1).float().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    want = ref(x)
    got = split_group_norm(x2, 32, ref.weight, ref.bias, ref.eps)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    g = torch.randn_like(want)
    want.backward(g)
    got.backward(g)
    torch.testing.assert_close(x2.grad, x.grad, atol=2e-5, rtol=1e-4)


def test_swap_keeps_parameters_and_uses_torch_off_cuda():
    net = nn.Sequential(
        nn.Conv2d(3, 32, 3), nn.GroupNorm(8, 32), nn.SiLU(), nn.GroupNorm(4, 32, affine=False)
    )
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 3, 10, 10)
    want = net(x)
    assert use_split_group_norm(net) == 2
    assert isinstance(net[1], SplitGroupNorm) and isinstance(net[3], SplitGroupNorm)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert torch.equal(net(x), want)  # CPU input: torch's kernel, bit for bit


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run on the device machine)")
def test_split_group_norm_on_cuda_at_vae_size():
    torch.manual_seed(0)
    ref = nn.GroupNorm(32, 128, eps=1e-6).cuda()
    nn.init.normal_(ref.weight)
    fast = SplitGroupNorm(32, 128, eps=1e-6).cuda()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(1, 128, 512, 512, device="cuda") * 2 + 0.5
    torch.testing.assert_close(fast(x), ref(x), atol=1e-5, rtol=1e-5)


def test_precast_backbone_gives_the_autocast_results(assets):
    """The discriminator's frozen DINOv2 with bf16 matmul weights computes under bf16 autocast exactly what
    it computes with fp32 weights cast by autocast (the engine stores them so for bf16 compute)."""
    from senseflow.kernels import cast_matmul_weights_

    from .test_discriminator import PROMPTS, images, make_disc

    ref, cast = make_disc(assets), make_disc(assets)
    assert cast_matmul_weights_(cast.backbone.model, torch.bfloat16) > 0
    assert cast.backbone.model.embeddings.patch_embeddings.projection.weight.dtype == torch.bfloat16
    x = images(2, 64, seed=1)
    text = ref.encode_text(PROMPTS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_feats = ref.reference_features(x)
        cast_feats = cast.reference_features(x)
        for a, b in zip(ref_feats, cast_feats):
            assert torch.equal(a, b)
        want = ref(x, text, ref_feats, augment=False)
        got = cast(x, text, cast_feats, augment=False)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="trainable"):
        cast_matmul_weights_(nn.Linear(2, 2), torch.bfloat16)


def test_matmul_attention_decodes_as_the_default_backend():
    """``model.vae_math_attention``: a VAE whose mid-block attention is swapped to the math backend decodes
    the same image and latent gradient in fp32 (a checkpointed decode, as the GAN term's), and swapping
    twice changes nothing more."""
    from diffusers import AutoencoderKL
    from torch.nn.attention import SDPBackend

    torch.manual_seed(0)
    kw = dict(block_out_channels=(32, 64), latent_channels=4, norm_num_groups=8, layers_per_block=1)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, **kw
    ).requires_grad_(False)
    vae.enable_gradient_checkpointing()
    z = torch.randn(2, 4, 16, 16)

    def decode():
        zz = z.clone().requires_grad_(True)
        out = vae.decode(zz, return_dict=False)[0]
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out.detach(), zz.grad

    want = decode()
    backends = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):  # which backends torch may use inside the swapped processor
        from torch.nn.attention import _cur_sdpa_kernel_backends

        backends.append(set(_cur_sdpa_kernel_backends()))
        return real_sdpa(*args, **kwargs)

    assert use_matmul_attention(vae) == 2  # the encoder's and the decoder's mid-block attention
    assert use_matmul_attention(vae) == 0
    assert isinstance(vae.decoder.mid_block.attentions[0].processor, MathAttention)
    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        got = decode()
    finally:
        torch.nn.functional.scaled_dot_product_attention = real_sdpa
    assert backends and all(b == {SDPBackend.MATH} for b in backends)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
