"""``torch.optim`` optimizers as optax ``GradientTransformation``s, with torch's semantics,
argument names and defaults. Built from optax pieces; a custom transform only where optax has
no equivalent, each saying which torch behaviour it reproduces.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = ["ScalarOrSchedule", "sgd", "torch_dampened_momentum"]

ScalarOrSchedule = float | optax.Schedule


class DampenedMomentumState(NamedTuple):
    """The momentum buffer and whether it has been filled yet (torch's ``buf is None``)."""

    count: jax.Array
    buf: Any


def torch_dampened_momentum(
    momentum: float, dampening: float, nesterov: bool = False
) -> optax.GradientTransformation:
    """torch.optim.SGD's momentum buffer with dampening.

    Step 1: ``buf = g``; step t > 1: ``buf = momentum * buf + (1 - dampening) * g``.
    Output: ``g + momentum * buf`` if ``nesterov`` else ``buf``.

    ``optax.trace`` starts its buffer at zero and has no dampening, so for ``dampening == 0`` it
    equals torch (``0 * momentum + g = g``) and is used instead; with dampening, torch's first
    step keeps the undamped gradient, which only this transform reproduces.
    """

    def init_fn(params: Any) -> DampenedMomentumState:
        return DampenedMomentumState(
            count=jnp.zeros([], jnp.int32), buf=jax.tree.map(jnp.zeros_like, params)
        )

    def update_fn(updates: Any, state: DampenedMomentumState, params: Any = None):
        del params
        first = state.count == 0
        buf = jax.tree.map(
            lambda g, b: jnp.where(first, g, momentum * b + (1 - dampening) * g),
            updates,
            state.buf,
        )
        out = jax.tree.map(lambda g, b: g + momentum * b, updates, buf) if nesterov else buf
        return out, DampenedMomentumState(count=optax.safe_increment(state.count), buf=buf)

    return optax.GradientTransformation(init_fn, update_fn)


def sgd(
    lr: ScalarOrSchedule = 1e-3,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    *,
    maximize: bool = False,
) -> optax.GradientTransformation:
    """``torch.optim.SGD``.

    Per parameter ``p`` with gradient ``g`` at step t::

        g = -g                                  if maximize
        g = g + weight_decay * p                (L2 decay, before momentum)
        buf = g                                 at t = 1
        buf = momentum * buf + (1 - dampening) * g   at t > 1
        g = g + momentum * buf if nesterov else buf  (when momentum != 0)
        p = p - lr * g

    ``lr`` may be an optax schedule ``step -> lr``. Raises ``ValueError`` for the combinations
    torch rejects (negative values; nesterov without momentum or with dampening).
    """
    if not callable(lr) and lr < 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")
    if momentum < 0.0:
        raise ValueError(f"Invalid momentum value: {momentum}")
    if weight_decay < 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")

    parts: list[optax.GradientTransformation] = []
    if maximize:
        parts.append(optax.scale(-1.0))
    if weight_decay != 0:
        parts.append(optax.add_decayed_weights(weight_decay))
    if momentum != 0:
        if dampening == 0:
            parts.append(optax.trace(decay=momentum, nesterov=nesterov))
        else:
            parts.append(torch_dampened_momentum(momentum, dampening, nesterov))
    parts.append(optax.scale_by_learning_rate(lr))
    return optax.chain(*parts)
