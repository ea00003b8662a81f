"""jaxnet.tutorial: the PyTorch tutorial's steps (random input, forward, L1 loss against a
random target, backward, one SGD step), and the same step in torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import max_abs_diff_params, to_jax_batch

import jaxnet
from jaxnet.torch_reference import make_torch_net
from jaxnet.tutorial import run_tutorial


def test_run_tutorial_takes_one_step_downhill():
    r = run_tutorial(seed=3)
    assert r["input_shape"] == (1, 32, 32, 1)
    assert r["target"].shape == r["output_before"].shape == r["output_after"].shape == (1, 2)
    assert float(r["loss_after"]) < float(r["loss_before"])
    # The loss it reports is the L1 loss of the outputs it reports.
    l1 = float(np.abs(np.asarray(r["output_before"]) - np.asarray(r["target"])).mean())
    assert float(r["loss_before"]) == pytest.approx(l1, rel=1e-6)


def test_tutorial_step_changes_params_as_torch(net, images):
    """The tutorial: L1 loss on a random (1, 2) target, one SGD(lr=0.01) step. The target is
    not a class label, so the loss is jaxnet.losses.l1_loss itself, not a named criterion."""
    x, target = images[:1], torch.randn(2, generator=torch.Generator().manual_seed(0)).view(1, -1)
    torch_net = make_torch_net(0)
    before = jaxnet.params_from_torch(torch_net.state_dict())
    state = jaxnet.TrainState.create(apply_fn=net.apply, params=before, tx=jaxnet.optim.sgd(0.01))
    state, metrics = jaxnet.train_step(state, to_jax_batch(x, target), jaxnet.losses.l1_loss)
    torch_net.zero_grad()
    torch.nn.L1Loss()(torch_net(x), target).backward()
    torch.optim.SGD(torch_net.parameters(), lr=0.01).step()
    assert max(max_abs_diff_params(state.params, torch_net).values()) <= 1e-6
    assert not np.array_equal(before["fc3"]["bias"], state.params["fc3"]["bias"])
    with torch.no_grad():
        after_torch = float(torch.nn.L1Loss()(torch_net(x), target))
    after = jaxnet.eval_step(state, to_jax_batch(x, target), jaxnet.losses.l1_loss)["loss"]
    assert float(after) == pytest.approx(after_torch, rel=1e-5)
    assert float(after) < float(metrics["loss"])
