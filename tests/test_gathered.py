"""``model.keep_generator_gathered``: the generator's FSDP2 units stay all-gathered between its passes of an
iteration and are freed before the fake-score step and before its own optimiser step; training is
unchanged."""

from __future__ import annotations

from .test_offload import _assert_trained_alike, _plain_and_variant


def _gathered(net) -> bool:
    """Whether the first block's parameters are the all-gathered ones (plain tensors, not DTensor shards)."""
    block = next(iter(net.transformer_blocks))
    return not any(hasattr(p, "to_local") for p in block.parameters())


def test_generator_stays_gathered_between_its_passes(tiny_cache, tmp_path, monkeypatch):
    plain, kept = _plain_and_variant(
        tmp_path,
        "cpu",
        ["distill.generator_period=3", "distill.backsim_prob=1.0", "train.iter_num=7", "model.fsdp=always"],
        "model.keep_generator_gathered=true",
    )
    assert kept.gathered_G
    seen = {"before_pass": [], "fake_step": [], "gen_step": []}
    forward, fake_step, opt_step = kept.adapter.forward, kept.fake_step, kept._opt_step

    def spy_forward(net, *a, **kw):
        if net is kept.G.net:
            seen["before_pass"].append(_gathered(net))
        return forward(net, *a, **kw)

    def spy_fake(*a, **kw):
        seen["fake_step"].append(_gathered(kept.G.net))
        return fake_step(*a, **kw)

    def spy_opt(t, name):
        if name == "gen":
            seen["gen_step"].append(_gathered(kept.G.net))
        return opt_step(t, name)

    monkeypatch.setattr(kept.adapter, "forward", spy_forward)
    monkeypatch.setattr(kept, "fake_step", spy_fake)
    monkeypatch.setattr(kept, "_opt_step", spy_opt)
    kept.train()
    # later passes of an iteration find the weights gathered; none remain gathered at the fake step or when
    # the generator's optimiser changes its weights
    assert any(seen["before_pass"]) and not all(seen["before_pass"])
    assert seen["fake_step"] and not any(seen["fake_step"])
    assert len(seen["gen_step"]) == 2 and not any(seen["gen_step"])
    _assert_trained_alike(tmp_path, plain, "variant", kept)


def test_no_effect_without_fsdp(tiny_cache, tmp_path):
    """Unsharded (``model.fsdp=auto`` in one process) there is nothing to keep gathered: the option is
    ignored."""
    from .test_offload import _tiny_engine

    e = _tiny_engine(tmp_path, "cpu", "checkpoint.enabled=false", "model.keep_generator_gathered=true")
    assert not e.gathered_G
