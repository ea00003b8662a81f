"""Fault injection: a workdir survives concurrent readers, corrupt bytes, a full disk, a
read-only mount and a second writer (the promises of docs/reliability.md).

We run as root, where ``chmod`` does not stop a write, and a real full disk needs a mount:
the faults are injected as the ``OSError`` the operating system would raise, at the write.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import LIVE, SMALL, STOPPING, background_result, in_background, small

import jaxnet.train as train_mod
import jaxnet.workdir as workdir_mod
from jaxnet.checkpoint import CheckpointError, Checkpoints, CheckpointWriteError
from jaxnet.cli import main
from jaxnet.errors import EXIT_BAD_INPUT, EXIT_RUN_FAILED
from jaxnet.train import train_and_evaluate
from jaxnet.workdir import LOCK_NAME, WorkdirError, load_params, locked

ROOT = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` but the writer's lock, ``path -> (size, mtime_ns)``, and
    every folder (``(0, 0)``: a writer's probe changes a folder's mtime, never its contents)."""
    found = {}
    for p in sorted(folder.rglob("*")):
        if p.name != LOCK_NAME:
            st = p.stat()
            found[str(p.relative_to(folder))] = (
                (st.st_size, st.st_mtime_ns) if p.is_file() else (0, 0)
            )
    return found


def _no_training(monkeypatch) -> list:
    """Record the training steps taken (none, where a fault must stop the run first)."""
    steps = []
    real = train_mod.train_step

    def step(state, batch, criterion):
        steps.append(int(state.step))
        return real(state, batch, criterion)

    monkeypatch.setattr(train_mod, "train_step", step)
    return steps


# --- readers never write ---------------------------------------------------------------------


def test_a_reader_leaves_a_save_in_flight_alone(copy_of_reference: Path):
    """``export``/``features`` read while ``train`` saves: orbax's temporary folder of the save
    in flight must survive them (a reader that cleaned it up killed the run)."""
    in_flight = copy_of_reference / "checkpoints" / "last" / "99.orbax-checkpoint-tmp-1"
    (in_flight / "state").mkdir(parents=True)
    (in_flight / "state" / "part").write_bytes(b"being written")
    before = snapshot(copy_of_reference)
    for which in ("last", "best"):
        load_params(copy_of_reference, which)
    assert snapshot(copy_of_reference) == before


def test_readers_during_a_training_run_never_break_it(tmp_path: Path):
    """A reader loop (``load_params``: what ``export`` and ``features`` do) while a run trains
    and saves three epochs: the run finishes, and no read fails once a checkpoint exists."""
    outcome = {}

    def train() -> None:
        outcome["result"] = train_and_evaluate(small(epochs=3), tmp_path)

    writer = threading.Thread(target=train)
    writer.start()
    read: set[str] = set()
    errors = []
    while writer.is_alive():
        for which in ("best", "last"):
            try:
                load_params(tmp_path, which)
                read.add(which)
            except CheckpointError as e:
                not_yet = "no checkpoints at" in str(e) or "no complete" in str(e)
                if which in read or not not_yet:  # before its first save, "none yet" is right
                    errors.append(str(e))
    writer.join()
    assert outcome["result"].status == "finished"
    assert not errors, errors
    assert read == {"best", "last"}
    assert not list(tmp_path.glob("checkpoints/*/*orbax-checkpoint-tmp*"))


def test_a_step_deleted_while_a_reader_lists_the_folder_is_taken_as_a_newer_view(
    copy_of_reference: Path, monkeypatch
):
    """Orbax's manager lists the step folders and then stats each one: a live run deleting its
    previous ``last`` step in between makes the constructor raise ``FileNotFoundError``. The
    reader must list again, not fail."""
    real = ocp.CheckpointManager
    calls = []

    def racing(directory, *args, **kwargs):
        calls.append(directory)
        if len(calls) == 1:
            gone = Path(directory) / "8"
            raise FileNotFoundError(2, "No such file or directory", str(gone))
        return real(directory, *args, **kwargs)

    monkeypatch.setattr(ocp, "CheckpointManager", racing)
    params = load_params(copy_of_reference, "last")
    assert len(calls) == 2 and params


# --- verified on restore ---------------------------------------------------------------------


def _flip_a_byte(checkpoint: Path) -> None:
    """Flip one bit in the middle of the largest array file of ``checkpoint``."""
    largest = max((p for p in checkpoint.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    data[len(data) // 2] ^= 0x40
    largest.write_bytes(bytes(data))


@pytest.mark.parametrize("which", ["best", "last"])
def test_flipped_bytes_are_refused_naming_the_checkpoint(copy_of_reference: Path, which: str):
    checkpoint = next((copy_of_reference / "checkpoints" / which).iterdir())
    _flip_a_byte(checkpoint)
    with pytest.raises(
        CheckpointError, match=re.escape(f"checkpoint {checkpoint} is corrupt")
    ) as info:
        load_params(copy_of_reference, which)
    assert "['params']['fc1']['kernel']" in str(info.value)
    if which == "last":  # --resume stops with the message; it never starts over
        before = snapshot(copy_of_reference)
        with pytest.raises(CheckpointError, match="is corrupt"):
            train_and_evaluate(small(resume=True, epochs=3), copy_of_reference)
        assert snapshot(copy_of_reference) == before


def test_format_1_checkpoints_without_checksums_are_still_read(copy_of_reference: Path):
    """A checkpoint from before the checksums (format ``jaxnet-train/1``) is read unchecked."""
    best = copy_of_reference / "checkpoints" / "best"
    step = next(best.iterdir()).name
    params, _, meta = load_params(copy_of_reference)
    meta = {**meta, "format": "jaxnet-train/1"}
    del meta["checksums"]
    shutil.rmtree(best)
    with ocp.CheckpointManager(best) as manager:
        manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave({"params": params}), meta=ocp.args.JsonSave(meta)
            ),
        )
    again, _, meta = load_params(copy_of_reference)
    assert meta["format"] == "jaxnet-train/1"
    np.testing.assert_array_equal(again["fc1"]["kernel"], params["fc1"]["kernel"])


# --- a full disk -----------------------------------------------------------------------------


def test_full_disk_at_a_save_keeps_the_last_good_checkpoint(
    reference_run, tmp_path: Path, monkeypatch
):
    """``OSError(ENOSPC)`` when epoch 2's checkpoint is written: one message naming the last
    good checkpoint (epoch 1's, intact), exit status 1; ``--resume`` then finishes the run."""
    real_save = ocp.CheckpointManager.save
    calls = []

    def save(self, step, *args, **kwargs):
        calls.append(step)
        if len(calls) == 3:  # best/1, last/8, then epoch 2's best/2
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    with pytest.raises(CheckpointWriteError) as info:
        train_and_evaluate(SMALL, tmp_path)
    message = str(info.value)
    assert "no space left on device; free space and run again with --resume" in message
    assert f"the last good checkpoint is {tmp_path / 'checkpoints' / 'last' / '8'}" in message
    assert info.value.exit_code == EXIT_RUN_FAILED
    monkeypatch.undo()
    resumed = train_and_evaluate(small(resume=True), tmp_path)
    _, reference = reference_run
    assert resumed.status == "finished" and int(resumed.state.step) == 16
    drop = {"seconds"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed.history] == [
        {k: v for k, v in r.items() if k not in drop} for r in reference.history
    ]


def test_re_saving_a_step_on_disk_keeps_the_same_arrays_and_replaces_others(
    copy_of_reference: Path, monkeypatch
):
    """A resumed run re-saving the step an interrupted one wrote: the same arrays stay as they
    are on disk, so a failing write (ENOSPC here) cannot lose the only copy; other arrays at
    that step replace it."""
    import jax

    import jaxnet
    from jaxnet.model import abstract_params
    from jaxnet.workdir import checkpoints_of

    target = abstract_params(jaxnet.Net())
    with checkpoints_of(copy_of_reference) as ckpts:
        params, meta = ckpts.restore_params(target, "best")
        step = ckpts.steps("best")[-1]
    before = snapshot(copy_of_reference)

    def no_space(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as m:
        m.setattr(ocp.CheckpointManager, "save", no_space)
        with checkpoints_of(copy_of_reference) as ckpts:
            ckpts.save_best(step, params, meta)
    assert snapshot(copy_of_reference) == before
    changed = jax.tree.map(lambda a: a + 1, params)
    with checkpoints_of(copy_of_reference) as ckpts:
        ckpts.save_best(step, changed, meta)
    with checkpoints_of(copy_of_reference, read_only=True) as ckpts:
        again, _ = ckpts.restore_params(target, "best")
    jax.tree.map(np.testing.assert_array_equal, again, changed)


@in_background("enospc_in_background")
def _enospc_in_background(out: Path) -> tuple[int, str, Path]:
    """``jaxnet train`` whose orbax thread fails with ENOSPC at the third checkpoint (of 2-step
    epochs: best/1, last/2, then best/2): ``(exit status, stderr, workdir)``. A subprocess,
    started when the session starts (conftest's ``in_background``)."""
    if STOPPING.is_set():
        pytest.fail("the session ended before the run started")
    workdir = out / "run"
    argv = ["train", "--workdir", str(workdir), "--limit", "40", "--batch-size", "16"]
    argv += ["--epochs", "3", "--no-progress", "--malloc-defaults"]
    worker = ROOT / "tests" / "workers" / "fault_worker.py"
    proc = subprocess.Popen(
        [sys.executable, str(worker), "enospc-at-finalize:3", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    LIVE.add(proc)
    try:
        _, err = proc.communicate(timeout=300)  # a thread left waiting would hang it here
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail("jaxnet train did not end within 300 s after its save failed")
    finally:
        LIVE.discard(proc)
    return proc.returncode, err, workdir


@pytest.fixture(scope="module")
def enospc_in_background(request) -> tuple[int, str, Path]:
    return background_result(request, "enospc_in_background")


def test_full_disk_in_the_background_save_ends_the_process_with_one_line(enospc_in_background):
    """orbax saves in background threads: a disk that fills up there still ends ``jaxnet
    train`` (no thread keeps it alive) with one ``error:`` line and no traceback."""
    code, err, workdir = enospc_in_background
    assert code == EXIT_RUN_FAILED, err
    assert "Traceback" not in err, err
    (line,) = err.strip().splitlines()
    assert line.startswith("jaxnet train: error: cannot write") and "no space left" in line
    assert f"the last good checkpoint is {workdir / 'checkpoints' / 'last' / '2'}" in line
    with Checkpoints(workdir / "checkpoints", read_only=True) as ckpts:
        assert ckpts.read_meta("last")[0] == 2


# --- a read-only workdir ---------------------------------------------------------------------


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_an_unwritable_workdir_is_refused_before_any_training(
    copy_of_reference: Path, monkeypatch, capsys, code: int
):
    def mkstemp(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(workdir_mod.tempfile, "mkstemp", mkstemp)
    steps = _no_training(monkeypatch)
    before = snapshot(copy_of_reference)
    argv = ["train", "--workdir", str(copy_of_reference), "--limit", str(SMALL.limit)]
    argv += ["--batch-size", "16", "--epochs", "3", "--resume", "--no-progress"]
    assert main([*argv, "--malloc-defaults"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith(f"jaxnet train: error: workdir {copy_of_reference} cannot be written")
    assert os.strerror(code) in err and "Traceback" not in err
    assert steps == [] and snapshot(copy_of_reference) == before


# --- a single writer -------------------------------------------------------------------------


def test_a_second_writer_stops_at_once_and_readers_still_work(copy_of_reference: Path, monkeypatch):
    steps = _no_training(monkeypatch)
    with locked(copy_of_reference):
        with pytest.raises(WorkdirError, match=f"in use by pid {os.getpid()}"):
            train_and_evaluate(small(resume=True, epochs=3), copy_of_reference)
        load_params(copy_of_reference)  # readers take no lock
    assert steps == []


def test_a_crashed_writer_releases_the_lock(tmp_path: Path):
    """The lock is the OS's: a writer killed with SIGKILL holds it no longer."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT);"
            "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'%d' % os.getpid());"
            "print('held', flush=True); time.sleep(60)",
            str(tmp_path / LOCK_NAME),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WorkdirError, match=f"in use by pid {holder.pid}"):
            with locked(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    with locked(tmp_path):
        assert (tmp_path / LOCK_NAME).read_text().strip() == str(os.getpid())


# --- nothing deleted without --overwrite -----------------------------------------------------


def test_resume_with_only_imported_weights_starts_from_them(
    tmp_path: Path, torch_net, capsys, monkeypatch
):
    """``--resume`` in a ``jaxnet import`` workdir (``best/`` but no ``last/``) trains from the
    imported weights and deletes nothing; they stay the best until an epoch beats them."""
    import torch

    weights = tmp_path / "w.pt"
    torch.save(torch_net.state_dict(), weights)
    run = tmp_path / "run"
    imported = workdir_mod.import_params(weights, run)
    seen = []
    real = train_mod.train_step

    def step(state, batch, criterion):
        seen.append(state.params)
        return real(state, batch, criterion)

    monkeypatch.setattr(train_mod, "train_step", step)
    result = train_and_evaluate(small(resume=True, epochs=1), run)
    assert "starting a new run from the weights in" in capsys.readouterr().out
    np.testing.assert_array_equal(seen[0]["fc1"]["kernel"], imported["fc1"]["kernel"])
    assert result.status == "finished"
    with Checkpoints(run / "checkpoints", read_only=True) as ckpts:
        assert ckpts.steps("last") == [8]
        # best/0 (the imported weights) stays unless epoch 1 beat their val loss
        assert ckpts.steps("best") in ([0], [1])


def test_overwrite_refuses_a_folder_holding_foreign_files(copy_of_reference: Path):
    mine = copy_of_reference / "checkpoints" / "last" / "my-notes.txt"
    mine.write_text("mine")
    before = snapshot(copy_of_reference)
    with pytest.raises(CheckpointError, match=r"last/my-notes\.txt, which jaxnet did not write"):
        train_and_evaluate(small(overwrite=True), copy_of_reference)
    assert snapshot(copy_of_reference) == before


def test_a_changed_setting_on_resume_is_named_and_the_checkpoint_kept(copy_of_reference: Path):
    with pytest.raises(CheckpointError) as info:
        train_and_evaluate(small(resume=True, num_classes=10), copy_of_reference)
    message = str(info.value)
    assert "num_classes: checkpoint 2, now 10" in message
    assert "corrupt" not in message and "Delete" not in message
    assert "The checkpoint is intact" in message


# --- non-finite values never become a checkpoint ---------------------------------------------


def test_metrics_jsonl_is_valid_json_with_null_for_non_finite(tmp_path: Path, monkeypatch):
    """A NaN validation loss is written as ``null`` and never ranked best."""
    real_evaluate = train_mod.evaluate
    val_losses = iter([float("nan"), 0.5])

    def scripted(*args, **kwargs):
        return {**real_evaluate(*args, **kwargs), "loss": next(val_losses)}

    monkeypatch.setattr(train_mod, "evaluate", scripted)
    result = train_and_evaluate(SMALL, tmp_path)
    assert result.status == "finished"

    def refuse(constant: str):
        raise ValueError(f"invalid JSON constant {constant}")

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=refuse) for line in lines]
    assert [r["val_loss"] for r in records] == [None, 0.5]
    with Checkpoints(tmp_path / "checkpoints", read_only=True) as ckpts:
        assert ckpts.steps("best") == [2]
