"""jaxnet.train, the training job end to end: files, resume, kill-and-resume, signals, NaN,
bad checkpoints, early stopping, schedules."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from conftest import SMALL, signal_after_step, small
from flax import serialization

import jaxnet.train as train_mod
from jaxnet.checkpoint import CheckpointError, Checkpoints
from jaxnet.criteria import criterion
from jaxnet.errors import ConfigError
from jaxnet.train import NonFiniteLossError, train_and_evaluate
from jaxnet.workdir import load_params

ROOT = Path(__file__).resolve().parents[1]


def assert_same_bits(a, b) -> None:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def without_seconds(history):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


def test_end_to_end_writes_metrics_curves_checkpoints(reference_run, capsys):
    workdir, result = reference_run
    assert result.status == "finished"
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "seconds"):
            assert np.isfinite(r[key])
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert (workdir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Checkpoints(workdir / "checkpoints") as ckpts:
        step, meta = ckpts.read_meta("last")
        best_epoch, _ = ckpts.read_meta("best")
    assert step == 16 and meta["status"] == "finished" and meta["epoch"] == 3
    assert best_epoch == result.best_epoch == min(records, key=lambda r: r["val_loss"])["epoch"]
    assert result.diagnosis.text


def test_logged_grad_norms_are_those_of_the_probe(reference_run):
    """Every epoch logs the per-example gradient norms of the first 3 training examples (their
    correctness: test_step.py)."""
    from jaxnet.data import load_data
    from jaxnet.step import per_example_grad_norms

    workdir, result = reference_run
    ds = load_data(limit=SMALL.limit)
    probe = (ds.x_train[:3], ds.y_train[:3])  # what the run logged: 3 examples, one chunk
    # The job's own state and criterion: its compiled per_example_grad_norms is reused.
    norms = np.asarray(per_example_grad_norms(result.state, probe, criterion(SMALL.loss)))
    assert norms.shape == (3,)
    last = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["grad_norm_mean"] == float(norms.mean())
    assert last["grad_norm_max"] == float(norms.max())
    assert last["grad_norm_median"] == float(np.median(norms))


def test_resume_continues_bit_identically(reference_run, tmp_path: Path, capsys):
    _, reference = reference_run
    # What a process killed while writing its first checkpoint leaves: an orbax temporary.
    (tmp_path / "checkpoints" / "last" / "8.orbax-checkpoint-tmp-1").mkdir(parents=True)
    first = train_and_evaluate(small(epochs=1, resume=True), tmp_path)
    assert "no complete checkpoint" in capsys.readouterr().out
    assert first.status == "finished" and len(first.history) == 1
    resumed = train_and_evaluate(small(resume=True), tmp_path)
    assert resumed.status == "finished"
    assert_same_bits(
        serialization.to_state_dict(resumed.state), serialization.to_state_dict(reference.state)
    )
    assert without_seconds(resumed.history) == without_seconds(reference.history)
    # Resuming a finished run does nothing more.
    again = train_and_evaluate(small(resume=True), tmp_path)
    assert int(again.state.step) == int(reference.state.step)


def _start_training(workdir: Path) -> subprocess.Popen:
    # SMALL's settings but 50 epochs, so the process is surely still running when killed; the
    # resume may change --epochs back to SMALL's 2.
    cmd = [
        sys.executable,
        "-m",
        "jaxnet",
        "train",
        "--workdir",
        str(workdir),
        "--limit",
        str(SMALL.limit),
        "--batch-size",
        str(SMALL.batch_size),
        "--epochs",
        "50",
        "--per-example-grad-norms",
        str(SMALL.per_example_grad_norms),
        "--no-progress",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for_first_checkpoint(proc: subprocess.Popen, workdir: Path) -> None:
    last = workdir / "checkpoints" / "last"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if last.is_dir() and any(p.name.isdigit() for p in last.iterdir()):
            return
        if proc.poll() is not None:
            pytest.fail(f"training ended before its first checkpoint: {proc.communicate()}")
        time.sleep(0.005)
    proc.kill()
    pytest.fail("no checkpoint within 240 s")


def test_sigkill_mid_run_then_resume_is_bit_identical(reference_run, tmp_path: Path):
    """A real `jaxnet train` process killed by SIGKILL (which cannot be caught) after its first
    epoch's checkpoint, so during epoch 2; the resume replays epoch 2 from its start and ends
    with the reference run's exact bits and metrics."""
    _, reference = reference_run
    proc = _start_training(tmp_path)
    _wait_for_first_checkpoint(proc, tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=240)
    assert proc.returncode == -signal.SIGKILL
    resumed = train_and_evaluate(small(resume=True), tmp_path)
    assert resumed.status == "finished"
    assert_same_bits(
        serialization.to_state_dict(resumed.state), serialization.to_state_dict(reference.state)
    )
    assert without_seconds(resumed.history) == without_seconds(reference.history)


def test_sigterm_mid_epoch_saves_and_resumes_identically(reference_run, tmp_path, monkeypatch):
    """A real SIGTERM, raised at step 11 (epoch 2, batch 3): the run saves a mid-epoch
    checkpoint and returns; resuming from it gives the reference run's bits and metrics."""
    _, reference = reference_run
    signal_after_step(monkeypatch, signal.SIGTERM, at_step=11)
    stopped = train_and_evaluate(SMALL, tmp_path)
    monkeypatch.undo()
    assert stopped.status == "interrupted" and stopped.signal == "SIGTERM"
    assert int(stopped.state.step) == 11
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed again
    with Checkpoints(tmp_path / "checkpoints") as ckpts:
        step, meta = ckpts.read_meta("last")
    assert step == 11 and meta["partial"]["batches_done"] == 3
    resumed = train_and_evaluate(small(resume=True), tmp_path)
    assert_same_bits(
        serialization.to_state_dict(resumed.state), serialization.to_state_dict(reference.state)
    )
    assert without_seconds(resumed.history) == without_seconds(reference.history)


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    real_step = train_mod.train_step

    def nan_at_step_11(state, batch, criterion):
        new_state, metrics = real_step(state, batch, criterion)
        if int(state.step) + 1 == 11:
            metrics = {**metrics, "loss": np.float32("nan")}
        return new_state, metrics

    monkeypatch.setattr(train_mod, "train_step", nan_at_step_11)
    with pytest.raises(
        NonFiniteLossError,
        match=r"nan at step 11 \(epoch 2, batch 3 of 8\)"
        r".*last good checkpoint \(step 8\)",
    ):
        train_and_evaluate(SMALL, tmp_path)
    with Checkpoints(tmp_path / "checkpoints") as ckpts:
        assert ckpts.read_meta("last")[0] == 8
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
    assert (tmp_path / "curves.png").exists()


@pytest.mark.parametrize("field", ["params", "opt_state"])
def test_non_finite_state_after_an_epochs_last_step_is_never_saved(tmp_path, monkeypatch, field):
    """The loss guard sees each step's loss before its update: params or an optimizer state
    that overflow on an epoch's last step (finite loss) must still never become ``last`` or
    ``best``."""
    real_step = train_mod.train_step

    def inf_at_step_8(state, batch, criterion):
        new_state, metrics = real_step(state, batch, criterion)
        if int(new_state.step) == 8:  # the last of epoch 1's 8 steps
            tree = jax.tree.map(lambda a: a * np.float32("inf"), getattr(new_state, field))
            new_state = new_state.replace(**{field: tree})
        return new_state, metrics

    monkeypatch.setattr(train_mod, "train_step", inf_at_step_8)
    name = {"params": "params", "opt_state": "optimizer state"}[field]
    with pytest.raises(
        NonFiniteLossError,
        match=rf"the {name} hold NaN or infinite values after step 8 \(epoch 1\)",
    ):
        train_and_evaluate(SMALL, tmp_path)
    with Checkpoints(tmp_path / "checkpoints", read_only=True) as ckpts:
        assert ckpts.steps("last") == [] and ckpts.steps("best") == []
    assert not (tmp_path / "metrics.jsonl").exists()


def test_diverging_learning_rate_is_caught(tmp_path: Path):
    with pytest.raises(NonFiniteLossError, match=r"at step \d+ \(epoch 1.*Lower --lr"):
        train_and_evaluate(small(lr=1e12, epochs=1), tmp_path)


def test_bad_settings_are_refused_before_anything_is_written(tmp_path: Path):
    for bad, message in (
        (small(loss="nope"), "unknown loss 'nope'"),
        (small(optimizer="nope"), "unknown optimizer 'nope'"),
        (small(optimizer_kwargs={"betas": (0.9, 0.99)}), "takes no betas"),
        (small(epochs=0), r"epochs must be"),
    ):
        with pytest.raises(ConfigError, match=message):
            train_and_evaluate(bad, tmp_path / "run")
        assert not (tmp_path / "run").exists()


def test_existing_run_needs_resume_or_overwrite(copy_of_reference: Path):
    with pytest.raises(CheckpointError, match=r"--resume.*--overwrite"):
        train_and_evaluate(SMALL, copy_of_reference)
    with pytest.raises(CheckpointError, match=r"other settings \(lr: checkpoint 0.01, now 0.02"):
        train_and_evaluate(small(resume=True, lr=0.02), copy_of_reference)


def test_foreign_and_corrupt_checkpoint_dirs(copy_of_reference: Path, tmp_path: Path):
    foreign = tmp_path / "foreign"
    (foreign / "checkpoints" / "something").mkdir(parents=True)
    (foreign / "checkpoints" / "model.pkl").write_bytes(b"\x80\x04junk")
    with pytest.raises(CheckpointError, match=r"holds no jaxnet checkpoint.*model\.pkl"):
        train_and_evaluate(small(resume=True), foreign)
    assert (foreign / "checkpoints" / "model.pkl").read_bytes() == b"\x80\x04junk"
    # A real orbax checkpoint without jaxnet's meta is foreign too.
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(tmp_path / "other" / "checkpoints" / "last") as manager:
        manager.save(1, args=ocp.args.Composite(meta=ocp.args.JsonSave({"x": 1})))
    with pytest.raises(CheckpointError, match="not a jaxnet training checkpoint"):
        train_and_evaluate(small(resume=True), tmp_path / "other")
    # Damaged array data in a jaxnet checkpoint.
    state_dir = next((copy_of_reference / "checkpoints" / "last").iterdir()) / "state"
    shutil.rmtree(state_dir)
    state_dir.mkdir()
    (state_dir / "garbage").write_text("x")
    with pytest.raises(CheckpointError, match="corrupt"):
        train_and_evaluate(small(resume=True), copy_of_reference)


def test_early_stopping_keeps_best(tmp_path: Path, monkeypatch):
    real_evaluate = train_mod.evaluate
    val_losses = iter([0.5, 0.4, 0.45])

    def scripted_evaluate(*args, **kwargs):  # the real evaluation, with a scripted val loss
        return {**real_evaluate(*args, **kwargs), "loss": next(val_losses)}

    monkeypatch.setattr(train_mod, "evaluate", scripted_evaluate)
    result = train_and_evaluate(small(epochs=5, early_stopping=1), tmp_path)
    assert result.status == "early-stopped" and result.best_epoch == 2
    assert [r["epoch"] for r in result.history] == [1, 2, 3]  # not 4 and 5
    with Checkpoints(tmp_path / "checkpoints") as ckpts:
        assert ckpts.read_meta("best")[0] == 2
        assert ckpts.read_meta("last")[1]["status"] == "early-stopped"
    best, _, _ = load_params(tmp_path, "best")
    last, _, _ = load_params(tmp_path, "last")
    assert not np.array_equal(best["fc3"]["bias"], last["fc3"]["bias"])


def test_train_with_schedule_resumes_bit_identically(reference_run, tmp_path):
    """The schedule's position lives in the optimizer state: a resumed run continues it."""
    sched = {"schedule": "step_lr", "schedule_kwargs": {"step_size": 1, "gamma": 0.5}}
    first = train_and_evaluate(small(epochs=1, **sched), tmp_path / "a")
    assert first.status == "finished"
    with pytest.raises((ValueError, CheckpointError), match="schedule"):
        train_and_evaluate(small(resume=True), tmp_path / "a")
    resumed = train_and_evaluate(small(resume=True, **sched), tmp_path / "a")
    whole = train_and_evaluate(small(**sched), tmp_path / "b")
    assert_same_bits(
        serialization.to_state_dict(resumed.state), serialization.to_state_dict(whole.state)
    )
    # Each epoch's "lr" is the one the next step uses: torch's after scheduler.step().
    net = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(net.parameters(), lr=SMALL.lr, momentum=0.9)
    step_lr = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    torch_lrs = []
    for _ in whole.history:
        opt.step()
        step_lr.step()
        torch_lrs.append(opt.param_groups[0]["lr"])
    assert [r["lr"] for r in whole.history] == pytest.approx(torch_lrs, rel=1e-6)
    assert [r["lr"] for r in resumed.history] == [r["lr"] for r in whole.history]
    _, plain = reference_run  # the same run without the schedule
    assert SMALL == small(epochs=2) and SMALL.schedule is None
    assert not np.array_equal(
        np.asarray(plain.state.params["fc3"]["bias"]), np.asarray(whole.state.params["fc3"]["bias"])
    )


def test_reduce_lr_on_plateau_steps_on_val_loss_and_resumes(tmp_path):
    """--schedule reduce_lr_on_plateau: torch's scheduler.step(val_loss) after every epoch, its
    state in the checkpointed optimizer state, so a resumed run continues it (a lost state
    would restart at best=inf: epoch 2 would improve and keep the lr)."""
    from jaxnet import optim

    # threshold 0.5: only a halving of the val loss counts as better, so epoch 2 reduces the lr.
    sched = {
        "schedule": "reduce_lr_on_plateau",
        "schedule_kwargs": {"patience": 0, "factor": 0.5, "threshold": 0.5},
    }
    first = train_and_evaluate(small(epochs=1, **sched), tmp_path)
    after_one = optim.plateau_of(first.state.opt_state[1])
    assert after_one == (SMALL.lr, first.history[0]["val_loss"], 1, 0, 0)
    resumed = train_and_evaluate(small(resume=True, **sched), tmp_path)
    assert resumed.status == "finished" and len(resumed.history) == 2
    plateau = optim.plateau_of(resumed.state.opt_state[1])
    assert plateau == (SMALL.lr * 0.5, first.history[0]["val_loss"], 2, 0, 0)
    # The reduction shows at the epoch that caused it (the lr the next step uses).
    assert [r["lr"] for r in resumed.history] == [SMALL.lr, SMALL.lr * 0.5]
