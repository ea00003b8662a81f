"""Shared fixtures: one small reference training run, reused by several test modules."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from jaxnet.train import TrainConfig, train_and_evaluate

# A few steps on a small subset of the digits: 128 train / 32 val examples, 8 steps per epoch,
# and per-example gradient norms of 3 training examples logged every epoch.
SMALL = TrainConfig(limit=160, batch_size=16, epochs=2, per_example_grad_norms=3, progress=False)


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory: pytest.TempPathFactory):
    """An uninterrupted ``SMALL`` run: ``(workdir, TrainResult)``. Copy the workdir to modify it."""
    workdir = tmp_path_factory.mktemp("reference")
    result = train_and_evaluate(SMALL, workdir)
    return workdir, result


@pytest.fixture
def copy_of_reference(reference_run, tmp_path: Path) -> Path:
    workdir, _ = reference_run
    dst = tmp_path / "run"
    shutil.copytree(workdir, dst)
    return dst


def small(**changes) -> TrainConfig:
    return dataclasses.replace(SMALL, **changes)
