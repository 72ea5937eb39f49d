"""``model.fsdp``: in a single process the generator, fake score and teacher are plain modules (``auto``,
the default) or FSDP2 modules (``always``); both train alike, and a checkpoint written by one resumes in
the other."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.fsdp import FSDPModule

from senseflow.config import load_config
from senseflow.errors import ConfigError

from .test_engine import TINY, _losses, _metrics, make_engine

COMMON = ["train.log_interval=1", "distill.generator_period=2", "train.iter_num=4"]


def _fsdp(net) -> bool:
    return any(isinstance(m, FSDPModule) for m in net.modules())


def _train(tmp_path, name: str, *overrides: str):
    (tmp_path / name).mkdir(exist_ok=True)
    e = make_engine(tmp_path / name, *COMMON, *overrides)
    e.train()
    return e


def _assert_close(tmp_path, a: str, b: str, ea, eb, rel: float) -> None:
    """Runs ``a`` and ``b`` logged the same metric names and losses within ``rel``, and ended with
    generator and fake-score weights within ``rel`` of the size of their update."""
    la, lb = _losses(_metrics(tmp_path / a)), _losses(_metrics(tmp_path / b))
    assert len(la) == len(lb) == 4
    for ra, rb in zip(la, lb):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert rb[k] == pytest.approx(ra[k], rel=rel, abs=1e-6), k
    for pa, pb in zip([*ea.G.params, *ea.F.params], [*eb.G.params, *eb.F.params]):
        pa, pb = pa.detach(), pb.detach()
        pa = pa.full_tensor() if hasattr(pa, "full_tensor") else pa
        pb = pb.full_tensor() if hasattr(pb, "full_tensor") else pb
        assert pa.shape == pb.shape
        assert (pa - pb).abs().max() <= rel * max(pa.abs().max().item(), 1e-3)


def test_single_process_nets_are_plain_unless_always(tiny_cache, tmp_path):
    plain = make_engine(tmp_path, "checkpoint.enabled=false")
    assert plain.cfg.model.fsdp == "auto"
    for net in (plain.G.net, plain.F.net, plain.teacher):
        assert not _fsdp(net)
        assert not any(hasattr(p, "to_local") for p in net.parameters())
    assert all(p.dtype == torch.float32 and p.requires_grad for p in plain.G.params)
    sharded = make_engine(tmp_path, "checkpoint.enabled=false", "model.fsdp=always")
    for net in (sharded.G.net, sharded.F.net, sharded.teacher):
        assert _fsdp(net)
    with pytest.raises(ConfigError, match="model.fsdp: must be auto, always or never"):
        load_config(TINY, ["model.fsdp=sometimes"])
    assert not load_config(TINY, ["model.fsdp=never"]).model.sharded(1)
    assert not load_config(TINY, ["model.fsdp=never"]).model.sharded(
        8
    )  # replicated (tests/test_replicate.py)
    assert load_config(TINY, []).model.sharded(2) and load_config(TINY, ["model.fsdp=always"]).model.sharded(
        1
    )


def test_unsharded_root_casts_its_inputs_like_fsdp(tiny_cache, tmp_path):
    """Under bf16 compute the transformer's patch embedding receives the latents in bf16 with and without
    FSDP2 (FSDP2's root casts them; the unsharded root's hook does the same), while the unsharded weights
    stay fp32 master weights."""
    seen = {}
    for mode in ("auto", "always"):
        (tmp_path / mode).mkdir()
        e = make_engine(
            tmp_path / mode, "checkpoint.enabled=false", "precision.compute=bf16", f"model.fsdp={mode}"
        )

        def record(module, args, mode=mode):
            seen.setdefault(mode, args[0].dtype)

        handle = e.G.net.pos_embed.register_forward_pre_hook(record)
        latents = torch.randn(1, *e.adapter.latent_shape(e.cfg.train.resolution))
        cond = e.adapter.encode_prompts(["a red circle"])
        t = torch.full((1,), 999.0)
        with torch.no_grad(), e._amp():
            e.adapter.forward(e.G.net, latents, t, cond)
        handle.remove()
        if mode == "auto":
            assert all(p.dtype == torch.float32 for p in e.G.net.parameters())
    assert seen == {"auto": torch.bfloat16, "always": torch.bfloat16}


def test_unsharded_bottleneck_casts_its_inputs_like_fsdp(tiny_cache, tmp_path):
    """DMD2's classifier runs the fake UNet's ``bottleneck`` method, a second forward of the root: its input
    conv receives the latents in bf16 with and without FSDP2, as the UNet's ``forward`` does."""
    seen = {}
    for mode in ("auto", "always"):
        (tmp_path / mode).mkdir()
        e = make_engine(
            tmp_path / mode,
            "checkpoint.enabled=false",
            "precision.compute=bf16",
            f"model.fsdp={mode}",
            config="configs/tiny/sdxl_dmd2_tiny.yaml",
        )

        def record(module, args, mode=mode):
            seen.setdefault(mode, args[0].dtype)

        handle = e.F.net.conv_in.register_forward_pre_hook(record)
        latents = torch.randn(1, *e.adapter.latent_shape(e.cfg.train.resolution))
        cond = e.adapter.encode_prompts(["a red circle"])
        with torch.no_grad(), e._amp():
            e.adapter.bottleneck(e.F.net, latents, torch.full((1,), 500.0), cond)
        handle.remove()
    assert seen == {"auto": torch.bfloat16, "always": torch.bfloat16}


def test_unsharded_trains_like_sharded(tiny_cache, tmp_path):
    """Four iterations (two generator steps) in fp32: the same losses and weights up to rounding."""
    plain = _train(tmp_path, "plain", "checkpoint.enabled=false")
    sharded = _train(tmp_path, "sharded", "checkpoint.enabled=false", "model.fsdp=always")
    _assert_close(tmp_path, "sharded", "plain", sharded, plain, rel=1e-4)


@pytest.mark.parametrize("first, second", [("always", "auto"), ("auto", "always")])
def test_checkpoint_resumes_across_modes(tiny_cache, tmp_path, first, second):
    """Two iterations written by one mode, resumed for two more by the other: the run an uninterrupted one
    in the second mode makes, up to rounding."""
    whole = _train(tmp_path, "whole", "checkpoint.enabled=false", f"model.fsdp={second}")
    split = ["train.save_interval=2", "checkpoint.enabled=true"]
    _train(tmp_path, "split", *split, "train.iter_num=2", f"model.fsdp={first}")
    resumed = make_engine(tmp_path / "split", *COMMON, *split, f"model.fsdp={second}")
    resumed.train()
    _assert_close(tmp_path, "whole", "split", whole, resumed, rel=1e-4)
