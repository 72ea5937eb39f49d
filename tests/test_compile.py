"""``discriminator.compile_heads`` and ``model.compile_blocks``: the heads' spectral-norm convs are torch's
parametrization bit for bit; the compiled branches compute what eager ones do, with one compiled graph
shared by every branch of every head (a graph per module would recompile for each head); a run with
compiled heads and transformer blocks logs the eager run's losses."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters
from torch.nn.utils.parametrizations import spectral_norm

from senseflow.discriminator.heads import SNConv2d
from senseflow.losses.gan import hinge_d_fake, hinge_d_real, hinge_g

from .test_discriminator import PROMPTS, images, make_disc
from .test_engine import TINY, _losses, _metrics, make_engine


@pytest.mark.parametrize("kernel, stride", [(1, 1), (3, 1), (3, 2)])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_sn_conv_is_torch_spectral_norm(kernel, stride, autocast):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, kernel, stride=stride, padding=kernel // 2, padding_mode="circular")
    ref = spectral_norm(conv, n_power_iterations=1, eps=1e-12, dim=0)
    torch.manual_seed(0)
    ours = SNConv2d(8, 16, kernel, stride)
    ref_sn = ref.parametrizations.weight
    assert torch.equal(ours.weight, ref_sn.original) and torch.equal(ours.bias, ref.bias)
    assert torch.equal(ours._u, ref_sn[0]._u) and torch.equal(ours._v, ref_sn[0]._v)
    x = torch.randn(2, 8, 9, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for _ in range(3):  # each training call runs one power iteration
            a, b = ref(x), ours(x)
            assert torch.equal(a, b)
        a.float().square().sum().backward()
        b.float().square().sum().backward()
    assert torch.equal(ours.weight.grad, ref_sn.original.grad) and torch.equal(ours.bias.grad, ref.bias.grad)
    assert torch.equal(ours._u, ref_sn[0]._u) and torch.equal(ours._v, ref_sn[0]._v)
    u = ours._u.clone()
    ours.eval()(x)
    assert torch.equal(ours._u, u)  # no power iteration in eval mode


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run on the device machine)")
@pytest.mark.parametrize("kernel, stride", [(1, 1), (3, 1), (3, 2)])
def test_sn_conv_channels_last_on_cuda(kernel, stride):
    """On CUDA the convolution's input is made channels-last (no cuDNN layout conversions): the same output
    and gradients as with the NCHW input, in fp32 without TF32."""
    torch.manual_seed(0)
    conv = (
        SNConv2d(64, 32, kernel, stride).cuda().eval()
    )  # eval: no power iteration, both calls see one weight
    x = torch.randn(2, 64, 19, 19, device="cuda")
    outs, grads = [], []
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        for channels_last in (False, True):
            conv.channels_last = channels_last
            xi = x.clone().requires_grad_(True)
            y = conv(xi)
            assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
            y.square().sum().backward()
            outs.append(y.detach())
            grads.append((xi.grad, conv.weight.grad.clone()))
            conv.weight.grad = None
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(grads[1], grads[0]):  # cuDNN's weight-gradient algorithms sum in another order per layout
        _close(a, b, rel=1e-5)


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> None:
    err = (a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)
    assert err < rel, err.item()


def test_compiled_heads_match_eager(assets):
    """A discriminator step (real and fake passes, hinge losses) and a generator pass through the frozen
    heads, eager and compiled from the same initialisation."""
    eager = make_disc(assets)
    compiled = make_disc(assets, compile_heads=True)
    assert compiled.heads[0].main._compiled_call_impl is not None
    assert eager.heads[0].main._compiled_call_impl is None
    torch._dynamo.reset()
    counters.clear()
    size = 56
    real, fake = images(2, size, seed=1), images(2, size, seed=2)
    results = []
    for disc in (eager, compiled):
        text = disc.encode_text(PROMPTS)
        ref = disc.reference_features(real)
        g = torch.Generator().manual_seed(0)
        loss_d = (hinge_d_real(disc(real, text, ref, g)) + hinge_d_fake(disc(fake, text, ref, g))).mean()
        loss_d.backward()
        grads = {n: p.grad.clone() for n, p in disc.heads.named_parameters()}
        disc.heads.requires_grad_(False)
        x = fake.clone().requires_grad_(True)
        logits = disc(x, text, ref, torch.Generator().manual_seed(1))
        hinge_g(logits).mean().backward()
        disc.heads.requires_grad_(True)
        results.append((loss_d.detach(), grads, logits.detach(), x.grad, dict(disc.heads.named_buffers())))
    (l0, g0, z0, x0, b0), (l1, g1, z1, x1, b1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-4, atol=1e-5)
    # the compiled branches fuse kernels, which rounds differently (1.3e-4 seen with torch 2.15 on a CPU)
    _close(z1, z0, rel=5e-4)
    _close(x1, x0, rel=5e-4)
    # heads' weight gradients match; the biases before a batch norm get a zero gradient up to rounding
    total = torch.stack([g.norm() for g in g0.values()]).norm()
    for name, g in g0.items():
        assert (g1[name] - g).norm() < 1e-4 * total + 1e-3 * g.norm(), name
    assert b1.keys() == b0.keys() and any(k.endswith("._u") for k in b0)
    for name, buf in b0.items():
        torch.testing.assert_close(b1[name], buf, rtol=0, atol=1e-5)
    # one graph for every branch of every head in the D step, plus the frozen-heads pass (its main
    # branch takes an input with gradient, its reference branch none): no compilation per head
    assert len(compiled.heads) == 3 and counters["stats"]["unique_graphs"] <= 3, dict(counters["stats"])


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(16, 64), nn.Linear(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        return self.down(torch.nn.functional.gelu(h) * torch.sigmoid(h)) + x


def _saved_bytes(net: nn.Module, x: torch.Tensor) -> int:
    """Bytes ``net`` saves for its backward in one training pass on ``x`` (the pass runs its backward)."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = net(x)
    y.square().sum().backward()
    return sum(saved)


def _saved_bytes_and_grads(memory_budget):
    """Bytes a compiled ``_MLP`` saves for its backward, its gradients, and the budget seen after the call."""
    from senseflow.parallel import compile_modules

    torch._dynamo.reset()  # the budget is read when a graph is compiled, not guarded
    torch.manual_seed(0)
    net = _MLP()
    compile_modules([net], memory_budget=memory_budget)
    x = torch.randn(8, 16, requires_grad=True)
    saved = _saved_bytes(net, x)
    grads = [x.grad, *(p.grad for p in net.parameters())]
    return saved, grads, torch._functorch.config.activation_memory_budget


def test_memory_budget_recomputes_inside_the_compiled_backward():
    """``compile_modules(memory_budget=0)`` (``model.activation_memory_budget``): the compiled graph saves
    fewer activation bytes for its backward (it recomputes the pointwise ones) and gives the same
    gradients; the budget applies during the module's calls only."""
    default = torch._functorch.config.activation_memory_budget
    full, grads_full, after_full = _saved_bytes_and_grads(None)
    lean, grads_lean, after_lean = _saved_bytes_and_grads(0.0)
    torch._dynamo.reset()
    assert lean < full, (lean, full)
    for a, b in zip(grads_lean, grads_full):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert after_full == after_lean == default


def test_modules_of_one_class_keep_their_own_budget():
    """Two modules of one class compiled under different budgets in one process (the generator's and the
    fake score's blocks under ``model.fake_activation_memory_budget``) each save what their own budget
    allows: the budget is not among dynamo's guards, the class is (each budget gets a subclass)."""
    from senseflow.parallel import compile_modules

    torch._dynamo.reset()
    torch.manual_seed(0)
    full, lean = _MLP(), _MLP()
    lean.load_state_dict(full.state_dict())
    compile_modules([full], memory_budget=1.0)
    compile_modules([lean], memory_budget=0.0)
    assert type(full).__name__ == type(lean).__name__ == "_MLP" and isinstance(lean, _MLP)
    assert (type(full).memory_budget, type(lean).memory_budget) == (1.0, 0.0)
    x = torch.randn(8, 16, requires_grad=True)
    first, second, again = _saved_bytes(full, x), _saved_bytes(lean, x), _saved_bytes(full, x)
    torch._dynamo.reset()
    assert second < first == again, (first, second, again)
    for a, b in zip(full.parameters(), lean.parameters()):
        torch.testing.assert_close(a.grad, 2 * b.grad, rtol=1e-5, atol=1e-6)  # full ran twice


def test_budget_class_of_an_fsdp2_module(tmp_path):
    """A sharded block compiled under a budget (the SD3.5 configs on several GPUs) stays an FSDP2 module of
    its class, and its class still constructs the unsharded class (FSDP2's ``__new__`` looks the latter up
    at a fixed place in the MRO, which the budget subclass would shift)."""
    from torch.distributed.fsdp import FSDPModule

    from senseflow.distributed import init_distributed
    from senseflow.parallel import compile_modules, shard

    info = init_distributed("cpu")
    torch._dynamo.reset()
    net = nn.Sequential(_MLP(), _MLP())
    shard(net, list(net), None, device=info.device)
    compile_modules(list(net), memory_budget=0.5)
    block = net[0]
    assert isinstance(block, FSDPModule) and isinstance(block, _MLP) and type(block).memory_budget == 0.5
    fresh = type(block).__new__(type(block))
    assert type(fresh) is _MLP
    x = torch.randn(4, 16, requires_grad=True)
    net(x).square().sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in net.parameters())
    torch._dynamo.reset()


def test_partitioner_keeps_cudnn_attention_saved():
    """Under a memory budget torch's partitioner recomputes whatever it does not list as compute-intensive;
    its list has the flash and memory-efficient attention kernels but not cuDNN's, which torch picks on
    H100/H200. ``compile_modules`` with a budget adds it (once), leaving the rest of the list."""
    from torch._functorch import partitioners

    from senseflow.parallel import compile_modules, keep_cudnn_attention_saved

    cudnn = torch.ops.aten._scaled_dot_product_cudnn_attention
    flash = torch.ops.aten._scaled_dot_product_flash_attention
    compile_modules([_MLP()], memory_budget=0.5)
    keep_cudnn_attention_saved()  # idempotent: the list function is wrapped once
    ops = partitioners.get_default_op_list().compute_intensive_ops
    assert cudnn in ops and flash in ops and torch.ops.aten.mm in ops
    assert partitioners.get_default_op_list.keeps_cudnn_attention
    assert not getattr(
        partitioners.get_default_op_list.__closure__[0].cell_contents, "keeps_cudnn_attention", False
    )
    torch._dynamo.reset()


def test_engine_with_compiled_blocks_and_heads(tiny_cache, tmp_path):
    """The tiny SD3.5 recipe with ``model.compile_blocks`` and ``discriminator.compile_heads`` logs the
    losses of the eager run (a generator and a fake-score iteration), and every block of the three
    transformers and every head branch is compiled: unsharded (this single process's default), with
    FSDP2, both blocks in one unit (``model.fsdp_blocks_per_unit=2``: the blocks are compiled, not the
    unit), and with ``model.activation_memory_budget`` (the trained nets' blocks not checkpointed)."""
    from senseflow.parallel import fsdp_units

    common = ["train.log_interval=1", "distill.generator_period=2", "train.iter_num=2"]
    common += ["checkpoint.enabled=false"]
    names = ("eager", "compiled", "compiled_grouped", "compiled_budget")
    for name in names:
        (tmp_path / name).mkdir()
    eager = make_engine(tmp_path / "eager", *common)
    eager.train()
    assert all(b._compiled_call_impl is None for b in eager.adapter.blocks(eager.G.net))
    assert eager.G.net.gradient_checkpointing and eager.F.net.gradient_checkpointing
    # the checkpointed blocks (the SD3.5 configs' budget off), then the budget
    compile_on = ["model.compile_blocks=true", "discriminator.compile_heads=true"]
    grouped = ["model.fsdp=always", "model.fsdp_blocks_per_unit=2", "model.activation_memory_budget=null"]
    budget = ["model.activation_memory_budget=0.5", "model.fake_activation_memory_budget=1.0"]
    plain = ["model.activation_memory_budget=null"]
    for name, extra in (("compiled", plain), ("compiled_grouped", grouped), ("compiled_budget", budget)):
        if extra is budget:
            torch._dynamo.reset()  # compile the blocks' training graphs again, under the budget
        compiled = make_engine(tmp_path / name, *common, *compile_on, *extra)
        for net in (compiled.G.net, compiled.F.net, compiled.teacher):
            blocks = compiled.adapter.blocks(net)
            assert len(blocks) == 2 and all(b._compiled_call_impl is not None for b in blocks)
            assert len(fsdp_units(net)) == (2 if extra is grouped else 0), name  # the root and the block unit
            # sharded on the engine's device (the CPU here), not on the machine's GPU, FSDP2's default
            tensors = [*net.parameters(), *net.buffers()]
            assert all(t.device.type == compiled.device.type for t in tensors), name
        for net, own in ((compiled.G.net, 0.5), (compiled.F.net, 1.0)):
            assert net.gradient_checkpointing == (extra is not budget), name
            budgets = {getattr(b, "memory_budget", None) for b in compiled.adapter.blocks(net)}
            assert budgets == ({own} if extra is budget else {None}), name
        compiled.train()
    torch._dynamo.reset()
    runs = [_losses(_metrics(tmp_path / name)) for name in names]
    assert len(runs[0]) == 2
    for run in runs[1:]:
        assert run[1].keys() == runs[0][1].keys()
        for a, b in zip(runs[0], run):
            for key, value in a.items():
                assert b[key] == pytest.approx(value, rel=1e-3, abs=1e-5), key


def test_compiled_backbone_matches_eager(assets):
    """``discriminator.compile_backbone``: DINOv2's blocks compiled give the eager features, logits and image
    gradient (no-gradient reference pass, discriminator pass, generator pass with gradient to the image),
    from a few graphs shared by all blocks."""
    eager = make_disc(assets)
    compiled = make_disc(assets, compile_backbone=True)
    layers = compiled.backbone.model.encoder.layer
    assert all(b._compiled_call_impl is not None for b in layers)
    torch._dynamo.reset()
    counters.clear()
    real, fake = images(2, 56, seed=1), images(2, 56, seed=2)
    results = []
    for disc in (eager, compiled):
        text = disc.encode_text(PROMPTS)
        ref = disc.reference_features(real)
        x = fake.clone().requires_grad_(True)
        logits = disc(x, text, ref, torch.Generator().manual_seed(1))
        hinge_g(logits).mean().backward()
        results.append((ref, logits.detach(), x.grad))
    (r0, z0, x0), (r1, z1, x1) = results
    for a, b in zip(r0, r1):
        _close(b, a)
    # the compiled branches fuse kernels, which rounds differently (1.3e-4 seen with torch 2.15 on a CPU)
    _close(z1, z0, rel=5e-4)
    _close(x1, x0, rel=5e-4)
    assert len(layers) >= 2 and counters["stats"]["unique_graphs"] <= 4, dict(counters["stats"])


def test_compile_mode_refuses_fsdp(tiny_cache, tmp_path):
    """``model.compile_mode`` (CUDA graphs of the blocks) needs unsharded nets: with FSDP2 the error names
    the key before any weight is loaded."""
    from senseflow.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model\.compile_mode: 'reduce-overhead' is for unsharded nets"):
        make_engine(
            tmp_path,
            "model.compile_blocks=true",
            "model.compile_mode=reduce-overhead",
            "model.fsdp=always",
        )


def test_disc_compile_mode_refuses_sharded_heads(tiny_cache):
    """``discriminator.compile_mode`` (CUDA graphs of the heads) with heads sharded over several ranks: the
    error names the key before the discriminator is built."""
    import types

    from senseflow.config import load_config
    from senseflow.engine import Engine
    from senseflow.errors import ConfigError

    overrides = ["discriminator.compile_heads=true", "discriminator.compile_mode=reduce-overhead"]
    cfg = load_config(TINY, [*overrides, "model.shard_discriminator=true"])
    two_ranks = types.SimpleNamespace(cfg=cfg, info=types.SimpleNamespace(world_size=2))
    with pytest.raises(ConfigError, match=r"discriminator\.compile_mode: 'reduce-overhead' is for unsharded"):
        Engine._build_discriminator(two_ranks)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run on the device machine)")
def test_engine_blocks_as_cuda_graphs(tiny_cache, tmp_path):
    """``model.compile_mode=reduce-overhead`` on a GPU: the trained nets' compiled blocks (with the SD3.5
    configs' activation memory budget) replay as CUDA graphs, none skipped, and the run logs the losses
    of the same run without CUDA graphs (generator and fake-score iterations). With
    ``discriminator.compile_mode=reduce-overhead`` too, the heads' branches replay as CUDA graphs, the
    losses are the same again and so are the spectral-norm vectors their power iterations update in place."""
    from senseflow.config import load_config
    from senseflow.distributed import init_distributed
    from senseflow.engine import Engine

    common = ["log.progress_bar=false", "train.image_interval=0", "train.device=cuda"]
    common += ["train.log_interval=1", "distill.generator_period=2", "train.iter_num=4"]
    common += ["checkpoint.enabled=false", "model.compile_blocks=true", "model.activation_memory_budget=0.3"]
    common += ["discriminator.compile_heads=true"]
    blocks = ["model.compile_mode=reduce-overhead"]
    runs, sn = [], []
    for name, extra in (
        ("default", []),
        ("cuda_graphs", blocks),
        ("heads_too", [*blocks, "discriminator.compile_mode=reduce-overhead"]),
    ):
        torch._dynamo.reset()
        counters.clear()
        (tmp_path / name).mkdir()
        cfg = load_config(TINY, [*common, *extra])
        e = Engine(cfg, init_distributed("cuda"), tmp_path / name)
        start = {k: v.clone() for k, v in e.disc.heads.state_dict().items() if k.endswith("_u")}
        e.train()
        runs.append(_losses(_metrics(tmp_path / name)))
        sn.append({k: v for k, v in e.disc.heads.state_dict().items() if k in start})
        assert all(not torch.equal(start[k], sn[-1][k]) for k in start)  # 4 disc steps of power iterations
        graphs = counters["inductor"]["cudagraph_recorded_non_static_inputs"]
        assert (graphs > 0) == bool(extra) and counters["inductor"]["cudagraph_skips"] == 0, dict(
            counters["inductor"]
        )
        del e
    torch._dynamo.reset()
    assert len(runs[0]) == 4
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert b.keys() == a.keys()
            for key, value in a.items():
                assert b[key] == pytest.approx(value, rel=1e-3, abs=1e-5), key
    for key, u in sn[0].items():
        torch.testing.assert_close(sn[2][key], u, rtol=1e-3, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run on the device machine)")
def test_engine_compiled_vae_on_cuda(tiny_cache, tmp_path):
    """``model.compile_vae`` and ``model.vae_math_attention`` on a GPU: the VAE's encoder and decoder are
    compiled, its attention runs on the math backend, TF32 is on (``precision.tf32``), and the run logs
    the losses of the same run with the eager VAE (generator and fake-score iterations: the no-gradient
    encode and decode, and the differentiated decode of the GAN term)."""
    from senseflow.config import load_config
    from senseflow.distributed import init_distributed
    from senseflow.engine import Engine
    from senseflow.kernels import MathAttention

    common = ["log.progress_bar=false", "train.image_interval=0", "train.device=cuda"]
    common += ["train.log_interval=1", "distill.generator_period=2", "train.iter_num=4"]
    common += ["checkpoint.enabled=false"]
    runs = []
    for on in (False, True):  # the tiny config inherits vae_math_attention from the SD3.5 one: set both
        name = "compiled" if on else "eager"
        extra = [f"model.compile_vae={str(on).lower()}", f"model.vae_math_attention={str(on).lower()}"]
        torch._dynamo.reset()
        (tmp_path / name).mkdir()
        e = Engine(load_config(TINY, [*common, *extra]), init_distributed("cuda"), tmp_path / name)
        vae = e.adapter.vae
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        compiled = [m._compiled_call_impl is not None for m in (vae.encoder, vae.decoder)]
        math = [isinstance(m.processor, MathAttention) for m in vae.modules() if hasattr(m, "set_processor")]
        assert compiled == [on, on] and math and all(x == on for x in math), (compiled, math)
        e.train()
        runs.append(_losses(_metrics(tmp_path / name)))
        del e
    torch._dynamo.reset()
    assert len(runs[0]) == 4
    off = []
    for i, (a, b) in enumerate(zip(*runs)):
        assert b.keys() == a.keys()
        # abs: the bf16 discriminator's mean logits lie near 0 (about 0.02 on the tiny recipe) and move by
        # a few 1e-5 with the images' TF32 rounding
        off += [(i, k, v, b[k]) for k, v in a.items() if b[k] != pytest.approx(v, rel=1e-3, abs=1e-4)]
    assert not off, off
