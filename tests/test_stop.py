"""Graceful stop on SIGTERM / SIGUSR1: a checkpoint at the iteration in flight, then an exact resume."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from senseflow.stop import StopNow, StopRequest, TrainingStopped, ignore_stop_signals

from .conftest import REPO, free_port
from .test_engine import _losses, _metrics, make_engine


def test_stop_request_sets_flag_once_and_restores_handlers():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    seen = []
    with StopRequest(on_signal=seen.append) as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.signum == signal.SIGUSR1
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal changes nothing
        assert stop.signum == signal.SIGUSR1
    assert seen == [signal.SIGUSR1]
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_inner_stop_request_inherits_a_caught_signal():
    with StopRequest() as outer:
        os.kill(os.getpid(), signal.SIGTERM)
        with StopRequest() as inner:
            assert inner.signum == signal.SIGTERM
        with StopRequest() as again:
            assert again.requested
    with StopRequest() as fresh:
        assert not fresh.requested and outer.requested


def test_immediate_request_raises_from_the_handler_and_logs_off_the_main_thread(monkeypatch):
    """With ``immediate`` the first signal raises StopNow where the main thread is; the handler never logs
    in the main thread (a signal during a log write would re-enter the stream), yet the lines are
    written by the time the request is left."""
    import senseflow.stop as stop_module

    logged = []

    def warning(msg, *args):
        logged.append((msg % args, threading.current_thread() is threading.main_thread()))

    monkeypatch.setattr(stop_module.logger, "warning", warning)
    after = []
    with StopRequest(immediate=True, immediate_action="stopping now") as stop:
        with pytest.raises(StopNow) as info:
            os.kill(os.getpid(), signal.SIGTERM)
            after.append("not reached")
        assert info.value.signum == signal.SIGTERM and stop.signum == signal.SIGTERM
        stop.immediate = False
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal: logged, no exception
    assert after == []
    assert sorted(logged) == [
        ("SIGTERM again: already stopping", False),
        ("SIGTERM received: stopping now", False),
    ]


def test_stop_now_passes_through_torch_compile():
    """``torch.compile`` re-wraps the exceptions raised while it compiles (InternalTorchDynamoError,
    BackendCompilerFailed): StopNow, a BaseException, must reach the engine as itself."""

    def backend(gm, example_inputs):
        os.kill(os.getpid(), signal.SIGUSR1)  # the signal lands in the middle of the compilation
        return gm.forward

    fn = torch.compile(lambda x: torch.sin(x) * 2, backend=backend)
    with StopRequest(immediate=True):
        with pytest.raises(StopNow):
            fn(torch.ones(3))
    torch._dynamo.reset()


def test_training_stopped_pickles_with_its_signal():
    err = pickle.loads(pickle.dumps(TrainingStopped("stopped at iteration 3", signal.SIGTERM)))
    assert isinstance(err, TrainingStopped) and str(err) == "stopped at iteration 3"
    assert err.signum == signal.SIGTERM and err.exit_code == 143


def test_data_workers_ignore_stop_signals():
    code = (
        "import os, signal, sys; sys.path.insert(0, '.');"
        "from senseflow.stop import ignore_stop_signals; ignore_stop_signals(0);"
        "os.kill(os.getpid(), signal.SIGTERM); os.kill(os.getpid(), signal.SIGUSR1); print('alive')"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "alive", r.stderr
    assert callable(ignore_stop_signals)


def _stop_at(engine, k_stop: int, signum: int) -> None:
    """Make the engine signal itself during iteration ``k_stop``."""
    run = engine.run_iteration

    def run_and_signal(k, batch):
        if k == k_stop:
            os.kill(os.getpid(), signum)
        return run(k, batch)

    engine.run_iteration = run_and_signal


def _uninterrupted_run(tmp_path: Path, args: tuple[str, ...]) -> tuple[Path, Path]:
    """Train ``args`` to the end in ``tmp_path/full``; returns it and an empty ``tmp_path/split``."""
    full, split = tmp_path / "full", tmp_path / "split"
    full.mkdir()
    split.mkdir()
    make_engine(full, *args).train()
    return full, split


def _assert_same_generator(full: Path, split: Path, k: int) -> None:
    """The generators both runs exported at iteration ``k`` are bit-identical."""
    ga = torch.load(full / f"ckpt_model_{k}.pth", weights_only=True)["model"]
    gb = torch.load(split / f"ckpt_model_{k}.pth", weights_only=True)["model"]
    assert ga.keys() == gb.keys() and all(torch.equal(ga[n], gb[n]) for n in ga)


def test_engine_stops_with_checkpoint_and_resumes_exactly(tiny_cache, tmp_path):
    """SIGTERM in iteration 4 of 7: a checkpoint at 4 (not a save iteration), TrainingStopped; the rerun
    ends with the weights and last losses of an uninterrupted run."""
    args = (
        "train.iter_num=7",
        "train.save_interval=100",
        "train.log_interval=3",
        "distill.generator_period=2",
    )
    full, split = _uninterrupted_run(tmp_path, args)

    e = make_engine(split, *args)
    _stop_at(e, 4, signal.SIGTERM)
    with pytest.raises(TrainingStopped, match="iteration 4 of 7.*run the same command again") as info:
        e.train()
    assert info.value.exit_code == 128 + signal.SIGTERM
    assert (split / "checkpoints" / "latest").read_text() == "step_00000004"
    assert [r["iter"] for r in _metrics(split)] == [3, 4]  # the partial window is logged
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored

    e = make_engine(split, *args)
    e.train()
    assert e.iteration == 7
    assert [r["iter"] for r in _metrics(split)] == [3, 4, 6, 7]
    a, b = _metrics(full), _metrics(split)
    assert [r["iter"] for r in a] == [3, 6, 7]
    assert _losses(a[-1:]) == _losses(b[-1:])  # iteration 7 (records at 6 average 4-6 and 5-6)
    _assert_same_generator(full, split, 7)


def test_engine_signal_in_last_iteration_just_finishes(tiny_cache, tmp_path):
    e = make_engine(tmp_path, "train.iter_num=3", "train.save_interval=100", "train.log_interval=3")
    _stop_at(e, 3, signal.SIGUSR1)
    e.train()  # no TrainingStopped: the run is complete
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000003"


@pytest.mark.slow
def test_two_ranks_under_torchrun_stop_together_and_resume(tiny_cache, tmp_path):
    """SIGTERM to the launcher's whole process group (torchrun, 2 gloo ranks, DataLoader workers), as
    ``timeout`` or Ctrl-C would: both ranks stop at the same log-interval iteration with one checkpoint,
    and the same command resumes from it to the end."""
    save = tmp_path / "run"
    cmd = [
        "sh",
        "exp_sd35/train_SD35_senseflow.sh",
        "1",
        "2",
        "configs/tiny/sd35_senseflow_tiny.yaml",
        str(save),
        "log.progress_bar=false",
        "train.iter_num=200",
        "train.log_interval=2",
        "train.save_interval=1000",
        "train.image_interval=0",
        "data.num_workers=1",
    ]
    env = {**os.environ, "SENSEFLOW_CACHE": str(tiny_cache), "PYTHON": sys.executable}
    env.update(MASTER_PORT=str(free_port()))
    for key in ("NODE_RANK", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    log = (tmp_path / "log.txt").open("w")
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    metrics = save / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None, (tmp_path / "log.txt").read_text()[-3000:]
        assert time.time() < deadline, "no metrics after 300 s"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGTERM)
    rc = proc.wait(timeout=300)
    log.close()
    out = (tmp_path / "log.txt").read_text()
    assert rc != 0, out[-3000:]
    assert "run the same command again to resume" in out, out[-3000:]
    step = (save / "checkpoints" / "latest").read_text()
    stopped = int(step.rsplit("_", 1)[1])
    assert stopped % 2 == 0 and 4 <= stopped < 200, step
    assert _metrics(save)[-1]["iter"] == stopped

    r = subprocess.run(
        [*cmd[:-4], "train.iter_num=" + str(stopped + 2), *cmd[-3:]],
        cwd=REPO,
        env={**env, "MASTER_PORT": str(free_port())},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"at iteration {stopped}" in r.stderr and "resumed from" in r.stderr
    assert (save / f"ckpt_model_{stopped + 2}.pth").is_file()
    assert _metrics(save)[-1]["iter"] == stopped + 2
    assert Path(save / "checkpoints" / "latest").read_text() == f"step_{stopped + 2:08d}"


def test_engine_stops_at_once_while_nothing_is_new_to_save(tiny_cache, tmp_path):
    """A signal in the first iteration after a start or a resume (e.g. during a long compilation) stops
    at once, with no checkpoint (the one on disk holds that state); later ones finish their iteration
    and checkpoint it. The run still ends exactly as an uninterrupted one."""
    args = ("train.iter_num=6", "train.save_interval=3", "train.log_interval=1", "distill.generator_period=2")
    full, split = _uninterrupted_run(tmp_path, args)

    e = make_engine(split, *args)
    _stop_at(e, 1, signal.SIGTERM)
    with pytest.raises(
        TrainingStopped, match="iteration 1 of 6.*no iteration done yet.*again to start"
    ) as info:
        e.train()
    assert info.value.exit_code == 143 and e.iteration == 0
    assert not (split / "checkpoints" / "latest").exists() and not (split / "metrics.jsonl").exists()

    e = make_engine(split, *args)
    _stop_at(e, 4, signal.SIGUSR1)  # first iteration after the checkpoint of iteration 3
    with pytest.raises(TrainingStopped, match="iteration 4 of 6.*checkpoint of iteration 3 holds"):
        e.train()
    assert (split / "checkpoints" / "latest").read_text() == "step_00000003"
    assert [r["iter"] for r in _metrics(split)] == [1, 2, 3]

    e = make_engine(split, *args)
    _stop_at(e, 5, signal.SIGTERM)  # resumed at 3: iteration 4 is done, so 5 is finished and saved
    with pytest.raises(TrainingStopped, match="iteration 5 of 6 after writing its checkpoint"):
        e.train()
    assert (split / "checkpoints" / "latest").read_text() == "step_00000005"

    e = make_engine(split, *args)
    e.train()
    assert [r["iter"] for r in _metrics(split)] == [1, 2, 3, 4, 5, 6]
    _assert_same_generator(full, split, 6)


def test_signal_while_the_models_are_built_stops_before_the_first_iteration(tiny_cache, tmp_path):
    ran = []
    with StopRequest():  # as the toy benchmark's variants: the signal lands before Engine.train
        e = make_engine(tmp_path, "train.iter_num=3")
        os.kill(os.getpid(), signal.SIGTERM)
        e.run_iteration = lambda k, batch: ran.append(k)
        with pytest.raises(TrainingStopped, match="iteration 1 of 3.*no iteration done yet"):
            e.train()
    assert ran == []
