"""The tutorial's steps, in jaxnet: random input, forward, L1 loss, backward, one SGD step."""

from __future__ import annotations

from typing import Any

import jax

from jaxnet import losses, optim
from jaxnet.model import Net
from jaxnet.step import create_train_state, train_step


def run_tutorial(seed: int = 0, lr: float = 0.01) -> dict[str, Any]:
    """Run the tutorial once and return what it prints: input, outputs and losses.

    ``net(input)`` on a random ``(1, 32, 32, 1)`` input, an L1 loss against a random ``(1, 2)``
    target, one ``SGD(lr=0.01)`` step, then the output and loss again.
    """
    key_init, key_x, key_t = jax.random.split(jax.random.key(seed), 3)
    net = Net()
    state = create_train_state(key_init, net, optim.sgd(lr=lr))
    x = jax.random.normal(key_x, (1, 32, 32, 1))
    target = jax.random.normal(key_t, (2,)).reshape(1, -1)
    # Compiled once for both calls: run eagerly, Net dispatches (and compiles) op by op.
    forward = jax.jit(net.apply)
    out_before = forward({"params": state.params}, x)
    state, metrics = train_step(state, (x, target), criterion=losses.l1_loss)
    out_after = forward({"params": state.params}, x)
    return {
        "input_shape": tuple(x.shape),
        "target": target,
        "output_before": out_before,
        "loss_before": metrics["loss"],
        "output_after": out_after,
        "loss_after": losses.l1_loss(out_after, target),
    }
