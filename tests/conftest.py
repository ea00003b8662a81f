"""Shared fixtures: the PyTorch reference and identical jaxnet copies of it; one small
reference training run, reused by several test modules."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import jaxnet
from jaxnet.torch_reference import make_torch_net
from jaxnet.train import TrainConfig, train_and_evaluate

BATCH = 16


def torch_criteria():
    """The four losses of the tutorial, as ``criterion(logits, target)`` in torch."""
    return {
        "l1": F.l1_loss,
        "mse": F.mse_loss,
        "cross_entropy": F.cross_entropy,
        "kl_div": lambda o, t: F.kl_div(F.log_softmax(o, -1), t, reduction="batchmean"),
    }


def _kl_on_logits(logits, target):
    return jaxnet.losses.kl_div(jax.nn.log_softmax(logits, -1), target, reduction="batchmean")


JAX_CRITERIA = {
    "l1": jaxnet.losses.l1_loss,
    "mse": jaxnet.losses.mse_loss,
    "cross_entropy": jaxnet.losses.cross_entropy,
    "kl_div": _kl_on_logits,
}


def make_targets(kind: str, n: int, seed: int = 2, num_classes: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind in ("l1", "mse"):
        return torch.randn(n, num_classes, generator=g)
    if kind == "cross_entropy":
        return torch.randint(0, num_classes, (n,), generator=g)
    return torch.softmax(torch.randn(n, num_classes, generator=g), -1)


def to_jax_batch(x: torch.Tensor, t: torch.Tensor):
    return jnp.asarray(jaxnet.nchw_to_nhwc(x.numpy())), jnp.asarray(t.numpy())


def max_abs_diff_params(params, torch_net) -> dict[str, float]:
    """Per state_dict key: max |jaxnet - torch|, compared in torch's layout."""
    ours = jaxnet.params_to_torch(params, as_numpy=True)
    ref = {k: v.detach().double().numpy() for k, v in torch_net.state_dict().items()}
    return {k: float(np.abs(ours[k].astype(np.float64) - ref[k]).max()) for k in ref}


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(BATCH, 1, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def net() -> jaxnet.Net:
    return jaxnet.Net()


@pytest.fixture
def torch_net():
    return make_torch_net(0)


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
