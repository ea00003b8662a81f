"""A training run's folder: trained params in and out of it, whether a run can resume, and
who may write it.

``<workdir>/checkpoints`` is ``jaxnet.checkpoint.Checkpoints``; ``metrics.jsonl`` and
``curves.png`` are written by ``jaxnet.train``. One writer at a time: ``train`` and ``import``
hold ``<workdir>/.jaxnet.lock`` (an advisory ``flock``, released by the OS when the process
ends, however it ends) for as long as they run. Readers (``load_params``: ``export``,
``features``) take no lock and write nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from jaxnet.checkpoint import CheckpointError, Checkpoints
from jaxnet.config import RESUMABLE_CHANGES, TrainConfig, config_from_json, config_to_json
from jaxnet.convert import params_from_torch
from jaxnet.data import check_source
from jaxnet.errors import JaxnetError
from jaxnet.model import Net, abstract_params

__all__ = [
    "LOCK_NAME",
    "WorkdirError",
    "check_resumable",
    "check_writable",
    "checkpoints_of",
    "import_params",
    "load_params",
    "locked",
]

LOCK_NAME = ".jaxnet.lock"
"""The file in a workdir that its one writer holds an ``flock`` on (it keeps the writer's pid)."""


class WorkdirError(JaxnetError, RuntimeError):
    """A workdir that cannot be written now: read-only, not a folder, or in use by another
    writer. Nothing was run or changed."""


def checkpoints_of(workdir: str | os.PathLike, read_only: bool = False) -> Checkpoints:
    """The checkpoints of the run in ``workdir`` (``read_only``: for readers)."""
    return Checkpoints(Path(workdir) / "checkpoints", read_only=read_only)


def _unwritable(folder: Path, e: OSError) -> WorkdirError:
    return WorkdirError(
        f"workdir {folder} cannot be written ({e.strerror or e}); nothing was run. Make it "
        "writable, or choose another --workdir."
    )


def check_writable(workdir: str | os.PathLike) -> None:
    """Create ``workdir`` if needed, then create and remove a file in it and in each checkpoint
    folder already there; ``WorkdirError`` naming the folder when one cannot be written."""
    root = Path(workdir)
    if root.exists() and not root.is_dir():
        raise WorkdirError(f"--workdir {root} is a file; give a folder (new or a run's).")
    ckpts = root / "checkpoints"
    if ckpts.exists() and not ckpts.is_dir():
        raise WorkdirError(
            f"{ckpts} is a file, where jaxnet keeps its checkpoints; move it away or choose "
            "another --workdir."
        )
    folders = [root, ckpts, ckpts / "last", ckpts / "best"]
    for folder in folders:
        if folder is not root and not folder.is_dir():
            continue
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".jaxnet-probe.", dir=folder)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise _unwritable(folder, e) from None


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


@contextlib.contextmanager
def locked(workdir: str | os.PathLike) -> Iterator[None]:
    """Hold ``workdir``'s writer lock for the block (``check_writable`` first). A second writer
    stops at once with ``WorkdirError`` "workdir W is in use by pid P". The lock is the OS's:
    a process that dies, however, releases it."""
    check_writable(workdir)
    path = Path(workdir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise _unwritable(Path(workdir), e) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkdirError(
                f"workdir {workdir} is in use by pid {_holder(path)} (a jaxnet train or import "
                "writing it); wait for it to finish, or choose another --workdir."
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the lock


def load_params(
    workdir: str | os.PathLike, which: str = "best"
) -> tuple[Any, TrainConfig, dict[str, Any]]:
    """``(params, config, meta)`` of the ``best`` (lowest val loss) or ``last`` checkpoint,
    read-only (safe while a run is training in ``workdir``), verified against its checksums."""
    with checkpoints_of(workdir, read_only=True) as ckpts:
        _, meta = ckpts.read_meta(which)
        config = config_from_json(meta["config"])
        target = abstract_params(Net(num_classes=config.num_classes))
        params, meta = ckpts.restore_params(target, which)
    return params, config, meta


def import_params(
    weights: str | os.PathLike,
    workdir: str | os.PathLike,
    config: TrainConfig | None = None,
    overwrite: bool = False,
    data_meta: Mapping[str, Any] | None = None,
) -> Any:
    """Read a PyTorch ``state_dict`` (``.pt``/``.safetensors``, or a checkpoint dict holding
    one) into ``workdir``'s ``best`` checkpoint, for ``jaxnet export``/``features`` or as the
    start of ``jaxnet train --resume``; ``config`` names the data it belongs to, ``data_meta``
    (``mean``, ``std``, ...) is kept as the checkpoint's ``data`` when given."""
    config = config or TrainConfig()
    check_source(config.data)
    params = params_from_torch(weights)
    num_classes = int(params["fc3"]["bias"].shape[0])
    config = dataclasses.replace(config, num_classes=num_classes, epochs=0)
    with locked(workdir), checkpoints_of(workdir) as ckpts:
        if ckpts.exists():
            if not overwrite:
                raise CheckpointError(
                    f"{ckpts.directory} already holds checkpoints; pass --overwrite to replace "
                    "them or choose another --workdir."
                )
            ckpts.clear()
        meta = {"config": config_to_json(config), "source": str(weights)}
        if data_meta is not None:
            meta["data"] = dict(data_meta)
        ckpts.save_best(0, params, meta)
    return params


def _differences(
    saved: Mapping[str, Any], now: Mapping[str, Any], skip: frozenset[str] = frozenset()
) -> list[str]:
    return [
        f"{k}: checkpoint {saved.get(k)!r}, now {now[k]!r}"
        for k in now
        if k not in skip and saved.get(k) != now[k]
    ]


def check_resumable(
    meta: Mapping[str, Any], config: TrainConfig, data_meta: Mapping[str, Any]
) -> None:
    """Raise ``CheckpointError`` naming every setting (or property of the data) that differs
    between the run recorded in ``meta`` and ``config``; only ``RESUMABLE_CHANGES`` may differ.
    The data's ``fingerprint`` is compared when the checkpoint has one (format 2)."""
    now = json.loads(json.dumps(config_to_json(config)))  # as it reads back (tuples -> lists)
    diffs = _differences(meta.get("config", {}), now, RESUMABLE_CHANGES)
    if diffs:
        raise CheckpointError(
            "cannot resume: the run in the workdir was made with other settings ("
            + "; ".join(diffs)
            + "). Use the same settings to resume (only --epochs and --early-stopping may "
            "change), or a new --workdir. The checkpoint is intact."
        )
    saved_data = meta.get("data") or {}
    skip = frozenset() if "fingerprint" in saved_data else frozenset({"fingerprint"})
    diffs = _differences(saved_data, json.loads(json.dumps(dict(data_meta))), skip)
    if diffs:
        raise CheckpointError(
            "cannot resume: the data differs from the run's in the workdir ("
            + "; ".join(d.replace("checkpoint ", "the run's ") for d in diffs)
            + "). Resume with the data the run was trained on, or start a new --workdir. "
            "The checkpoint is intact."
        )
