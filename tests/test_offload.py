"""``optimizer.offload_generator_state`` / ``offload_fake_state``: the generator's and the fake score's
AdamW states live in host memory between their steps (senseflow/offload.py) and training is unchanged,
also across a checkpoint and resume."""

from __future__ import annotations

import pytest
import torch

from senseflow.config import load_config
from senseflow.errors import ConfigError
from senseflow.offload import StateOffload
from senseflow.parallel import local_tensor

from .test_engine import TINY, _losses, _metrics, make_engine

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run on the device machine)")


def _adamw(model, fused: bool = False):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False, fused=fused)


def _step(model, opt, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    model(torch.randn(8, 16, generator=g)).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _assert_trained_alike(tmp_path, plain, name: str, other) -> None:
    """The run in ``tmp_path / name`` logged the losses of the run in ``tmp_path / "plain"`` and ended with
    the same generator and fake-score weights, bit for bit."""
    assert _losses(_metrics(tmp_path / name)) == _losses(_metrics(tmp_path / "plain"))
    for a, b in zip([*plain.G.params, *plain.F.params], [*other.G.params, *other.F.params]):
        assert torch.equal(a, b)


def test_offload_round_trip_keeps_the_updates():
    torch.manual_seed(0)
    ref = torch.nn.Linear(16, 16)
    off = torch.nn.Linear(16, 16)
    off.load_state_dict(ref.state_dict())
    opt_ref, opt_off = _adamw(ref), _adamw(off)
    offload = StateOffload(opt_off, pin=False, label="test")
    for k in range(3):
        _step(ref, opt_ref, k)
        offload.load()
        _step(off, opt_off, k)
        offload.offload()
        # both moments of weight and bias are off the device; the step counters stay
        assert offload.offloaded_bytes == 2 * (16 * 16 + 16) * 4
        for p in off.parameters():
            state = opt_off.state[p]
            assert state["exp_avg"].untyped_storage().nbytes() == 0
            assert state["exp_avg_sq"].untyped_storage().nbytes() == 0
            assert state["step"].item() == k + 1
        assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), off.parameters())), k
    offload.load()
    for p_ref, p_off in zip(ref.parameters(), off.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt_ref.state[p_ref][key], opt_off.state[p_off][key])
    assert offload.offloaded_bytes == 0
    offload.load()  # nothing away: a no-op


def _resident_state_bytes(opt) -> int:
    """Device bytes under the states (each storage once: after a round trip a part's states view one)."""
    storages = {
        v.untyped_storage().data_ptr(): v.untyped_storage().nbytes()
        for st in opt.state.values()
        for v in st.values()
        if v.numel() > 1 and v.untyped_storage().nbytes()
    }
    return sum(storages.values())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_chunked_step_keeps_the_updates_with_a_part_of_the_states_on_the_device(device):
    """``step`` in 3 parts: the updates and states of one step over all parameters (first step included),
    the next part's states loaded while a part steps (at most two parts on the device), earlier parts
    away, the gradients back afterwards. On a GPU the copies run on two side streams (fused AdamW)."""
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 16))
    off = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 16))
    off.load_state_dict(ref.state_dict())
    ref.to(device)
    off.to(device)
    cuda = device == "cuda"
    opt_ref, opt_off = _adamw(ref, fused=cuda), _adamw(off, fused=cuda)
    offload = StateOffload(opt_off, pin=cuda, chunks=3)
    total = 2 * sum(p.numel() for p in off.parameters()) * 4
    resident: list[int] = []

    def step() -> None:
        resident.append(_resident_state_bytes(opt_off))  # states of earlier parts are away by now
        opt_off.step()
        resident.append(_resident_state_bytes(opt_off))

    for k in range(3):
        for model in (ref, off):
            g = torch.Generator().manual_seed(k)
            model(torch.randn(8, 16, generator=g).to(device)).square().mean().backward()
        opt_ref.step()
        grads = [p.grad for p in off.parameters()]
        resident.clear()
        offload.step(step)
        if k == 0:  # the first step creates each part's states in its turn
            assert resident == [0, total // 3, 0, total // 3, 0, total // 3], resident
        else:
            assert resident == [2 * total // 3] * 4 + [total // 3] * 2, resident
        assert all(p.grad is g for p, g in zip(off.parameters(), grads))  # restored, same objects
        assert offload.offloaded_bytes == total
        opt_ref.zero_grad(set_to_none=True)
        opt_off.zero_grad(set_to_none=True)
        assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), off.parameters())), k
    offload.load()
    for p_ref, p_off in zip(ref.parameters(), off.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt_ref.state[p_ref][key], opt_off.state[p_off][key])


def test_parts_are_consecutive_of_about_equal_size_and_one_dtype():
    from senseflow.offload import _split_by_size

    def sizes(params, parts):
        return [[p.numel() for p in run] for run in _split_by_size(params, parts)]

    ps = [torch.zeros(n) for n in (100, 1, 1, 100, 1, 100)]
    assert sizes(ps, 1) == [[100, 1, 1, 100, 1, 100]]
    assert sizes(ps, 3) == [[100, 1], [1, 100], [1, 100]]
    assert sizes(ps, 8) == [[100], [1], [1], [100], [1], [100]]  # never more parts than parameters
    assert sizes([torch.zeros(1000)] + [torch.zeros(1)] * 5, 3) == [[1000], [1], [1, 1, 1, 1]]
    mixed = [torch.zeros(100), torch.zeros(100, dtype=torch.bfloat16), torch.zeros(100), torch.zeros(100)]
    runs = _split_by_size(mixed, 2)  # a part's states share one buffer: one dtype per part
    assert [[p.dtype for p in r] for r in runs] == [[torch.float32] * 2, [torch.float32], [torch.bfloat16]]


def test_replaced_states_are_not_overwritten():
    """States replaced while offloaded (a resume loading a checkpoint) keep their new values on load."""
    model = torch.nn.Linear(16, 16)
    opt = _adamw(model)
    offload = StateOffload(opt, pin=False)
    _step(model, opt, 0)
    saved = {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state_dict()["state"][0].items()}
    offload.offload()
    fresh = _adamw(model)
    _step(model, fresh, 1)
    opt.load_state_dict(fresh.state_dict())  # new tensor objects
    offload.load()
    assert torch.equal(opt.state[model.weight]["exp_avg"], fresh.state[model.weight]["exp_avg"])
    assert not torch.equal(opt.state[model.weight]["exp_avg"], saved["exp_avg"])


def test_needs_plain_adamw(tiny_cache):
    with pytest.raises(ConfigError, match="optimizer.offload_generator_state"):
        load_config(TINY, ["optimizer.offload_generator_state=true", "optimizer.name=adamw8bit"])
    with pytest.raises(ConfigError, match="optimizer.offload_fake_state"):
        load_config(TINY, ["optimizer.offload_fake_state=between_steps", "optimizer.name=adamw8bit"])
    with pytest.raises(ConfigError, match="optimizer.offload_step_chunks"):
        load_config(TINY, ["optimizer.offload_generator_state=true", "optimizer.offload_step_chunks=0"])
    with pytest.raises(ConfigError, match="optimizer.offload_overlap: applies to"):
        load_config(TINY, ["optimizer.offload_overlap=true", "optimizer.offload_fake_state=between_steps"])


def test_engine_trains_the_same_and_resumes(tiny_cache, tmp_path, caplog):
    """Four iterations with a generator step at 2 and 4: the same losses and weights with and without
    offloading the generator's and the fake score's states, also when stopped after iteration 2
    (checkpoint) and resumed; the states are away after each step."""
    common = ["train.log_interval=1", "distill.generator_period=2", "train.iter_num=4"]
    for name in ("plain", "off", "split"):
        (tmp_path / name).mkdir()
    plain = make_engine(tmp_path / "plain", *common, "checkpoint.enabled=false")
    plain.train()
    with caplog.at_level("INFO", logger="senseflow.offload"):
        off = make_engine(
            tmp_path / "off",
            *common,
            "checkpoint.enabled=false",
            "optimizer.offload_generator_state=true",
            "optimizer.offload_fake_state=between_steps",
        )
        off.train()
    # logged once, after the whole first step (all parts), with the default 8 parts
    (logged,) = [m for m in caplog.messages if "generator optimiser states" in m]
    assert "stepped in 8 parts" in logged
    assert f"{off.G.offload.offloaded_bytes / 2**30:.2f} GiB" in logged
    assert off.G.offload.offloaded_bytes == 8 * sum(p.numel() for p in off.G.params)
    # the rank-local tensors (DTensor shards under FSDP2) hold no storage
    assert all(local_tensor(s["exp_avg"]).untyped_storage().nbytes() == 0 for s in off.G.opt.state.values())
    (logged,) = [m for m in caplog.messages if "fake score optimiser states" in m]
    assert off.F.offload.offloaded_bytes == 8 * sum(p.numel() for p in off.F.params)
    assert all(local_tensor(s["exp_avg"]).untyped_storage().nbytes() == 0 for s in off.F.opt.state.values())
    _assert_trained_alike(tmp_path, plain, "off", off)

    split = [
        *common[:2],
        "checkpoint.enabled=true",
        "train.save_interval=2",
        "optimizer.offload_generator_state=true",
        "optimizer.offload_fake_state=between_steps",
    ]
    make_engine(tmp_path / "split", *split, "train.iter_num=2").train()
    resumed = make_engine(tmp_path / "split", *split, "train.iter_num=4")
    resumed.train()
    # offloaded again after the resume and each step
    assert resumed.G.offload.offloaded_bytes > 0 and resumed.F.offload.offloaded_bytes > 0
    _assert_trained_alike(tmp_path, plain, "split", resumed)


def _tiny_engine(path, device: str, *overrides: str):
    from senseflow.distributed import init_distributed
    from senseflow.engine import Engine

    cfg = load_config(TINY, ["log.progress_bar=false", "train.image_interval=0", *overrides])
    return Engine(cfg, init_distributed(device), path)


def _plain_and_variant(tmp_path, device: str, overrides: list[str], *variant: str):
    """A plain tiny run trained in ``tmp_path / "plain"`` (logging every iteration, no checkpoints) and the
    same with ``variant`` overrides built, not trained, in ``tmp_path / "variant"``."""
    common = ["train.log_interval=1", "checkpoint.enabled=false", *overrides]
    (tmp_path / "plain").mkdir()
    (tmp_path / "variant").mkdir()
    plain = _tiny_engine(tmp_path / "plain", device, *common)
    plain.train()
    return plain, _tiny_engine(tmp_path / "variant", device, *common, *variant)


def _adamw_round_trips(parking_of, device: str):
    """Three steps of a small model with its AdamW states parked between steps by ``parking_of(opt)``,
    against the same steps without; returns (reference optimiser, parked optimiser, parking)."""
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)).to(device)
    off = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)).to(device)
    off.load_state_dict(ref.state_dict())
    fused = device == "cuda"
    opt_ref, opt_off = _adamw(ref, fused=fused), _adamw(off, fused=fused)
    parking = parking_of(opt_off)
    for k in range(3):
        g = torch.Generator().manual_seed(k)
        x = torch.randn(8, 16, generator=g).to(device)
        for model, opt in ((ref, opt_ref), (off, opt_off)):
            if model is off:
                parking.load()
                parking.ready()
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        parking.offload()
        parking.release()
        assert all(s["exp_avg"].untyped_storage().nbytes() == 0 for s in opt_off.state.values())
        assert parking.offloaded_bytes == sum(8 * p.numel() for p in off.parameters())
    parking.load()
    parking.ready()
    for a, b in zip(opt_ref.state.values(), opt_off.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), off.parameters()))
    return opt_ref, opt_off, parking


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_flat_parking_keeps_the_updates_with_one_buffer(device):
    """``FlatStateParking``: after the first round trip every state views one device buffer (so later
    round trips are one copy each way), the updates equal unparked AdamW's, and states the optimiser
    replaced (as a resume may) are gathered again. On a GPU the copies run on a side stream."""
    from senseflow.offload import FlatStateParking

    def parking_of(opt):
        stream = torch.cuda.Stream() if device == "cuda" else None
        return FlatStateParking(opt, pin=device == "cuda", label="test", stream=stream)

    _, opt, parking = _adamw_round_trips(parking_of, device)
    states = [t for s in opt.state.values() for k, t in s.items() if k != "step"]
    assert len({t.untyped_storage().data_ptr() for t in states}) == 1  # views of one buffer
    # the optimiser gets new state tensors: the next round trip gathers them into the buffer again
    first = next(iter(opt.state.values()))
    first["exp_avg"] = first["exp_avg"].clone()
    want = first["exp_avg"].clone()
    parking.offload()
    parking.release()
    parking.load()
    parking.ready()
    assert torch.equal(first["exp_avg"], want)
    states = [t for s in opt.state.values() for k, t in s.items() if k != "step"]
    assert len({t.untyped_storage().data_ptr() for t in states}) == 1


@pytest.mark.parametrize(
    "device,overlap",
    [("cpu", False), pytest.param("cuda", False, marks=CUDA), pytest.param("cuda", True, marks=CUDA)],
)
def test_fake_states_away_during_generator_steps_only(tiny_cache, tmp_path, monkeypatch, device, overlap):
    """``offload_fake_state=generator_step``: the fake score's states are on the host while the generator
    steps and back on the device for its own steps; the same losses and weights as without, also with the
    copies overlapped on a side stream (``optimizer.offload_overlap``, GPU only)."""
    extra = ["optimizer.offload_overlap=true"] if overlap else []
    plain, park = _plain_and_variant(
        tmp_path,
        device,
        ["distill.generator_period=2", "train.iter_num=4"],
        "optimizer.offload_fake_state=generator_step",
        *extra,
    )
    assert park.F.offload is None and park.park_fake is not None
    assert (park.park_fake.stream is not None) is overlap
    seen = []  # (net stepped, bytes of the fake score's exp_avg on the device then)
    step = park._step

    def spy(t, losses, name, **kw):
        device_bytes = sum(
            local_tensor(s["exp_avg"]).untyped_storage().nbytes() for s in park.F.opt.state.values()
        )
        seen.append((name, device_bytes, len(park.F.opt.state)))
        return step(t, losses, name, **kw)

    monkeypatch.setattr(park, "_step", spy)
    park.timer.enabled = True  # as the benchmark does: the copies are a phase of their own
    park.train()
    assert park.timer.collect()["fake_state_offload"] > 0
    gen = [(b, n) for name, b, n in seen if name == "gen"]
    fake = [(b, n) for name, b, n in seen if name != "gen"]
    assert len(gen) == 2 and all(b == 0 for b, _ in gen)
    assert gen[-1][1] > 0  # the second generator step had fake-score states to move (and moved them)
    assert all(b > 0 for b, n in fake if n > 0) and any(n > 0 for _, n in fake)
    assert park.park_fake.offloaded_bytes == 0  # all back after the last generator step
    _assert_trained_alike(tmp_path, plain, "variant", park)


def test_bench_counts_freed_storage_as_nothing():
    """The benchmark's per-GPU state size leaves out offloaded (freed) state tensors."""
    from senseflow.bench import _tensor_bytes

    t = torch.zeros(10)
    assert _tensor_bytes(t) == 40
    t.untyped_storage().resize_(0)
    assert _tensor_bytes(t) == 0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_teacher_parked_outside_generator_iterations(tiny_cache, tmp_path, monkeypatch, device):
    """``model.offload_teacher``: the teacher's weights leave the device after each iteration that used it
    and are back (copied on a side stream on GPUs) when a generator iteration or an image strip runs it;
    the same losses and weights as without."""
    plain, park = _plain_and_variant(
        tmp_path,
        device,
        ["distill.generator_period=2", "train.iter_num=5", "train.image_interval=3"],
        "model.offload_teacher=true",
    )
    parking = park.park_teacher
    assert parking.parked and all(s.nbytes() == 0 for s in parking.storages)
    seen = []  # (iteration, teacher bytes on the device during the fake step, during the teacher's forwards)
    fake_step, forward = park.fake_step, park.adapter.forward

    def spy_fake(*a, **kw):
        seen.append(("fake", park.iteration + 1, sum(s.nbytes() for s in parking.storages)))
        return fake_step(*a, **kw)

    def spy_forward(net, *a, **kw):
        if net is park._teacher:
            seen.append(("teacher", park.iteration + 1, sum(s.nbytes() for s in parking.storages)))
        return forward(net, *a, **kw)

    monkeypatch.setattr(park, "fake_step", spy_fake)
    monkeypatch.setattr(park.adapter, "forward", spy_forward)
    park.train()
    total = sum(parking.nbytes)
    assert total > 0
    teacher_its = {k for what, k, _ in seen if what == "teacher"}
    assert teacher_its == {2, 3, 4}  # generator iterations 2 and 4, the image strip of iteration 3
    assert all(b == total for what, _, b in seen if what == "teacher")
    # parked again right after the generator's step, unless an image strip still needs it
    assert {k: b for what, k, b in seen if what == "fake"} == {1: 0, 2: 0, 3: total, 4: 0, 5: 0}
    assert parking.parked
    _assert_trained_alike(tmp_path, plain, "variant", park)
