"""Small pure training functions over a ``TrainState``, in the style of Flax's examples."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from jaxnet import losses
from jaxnet.model import Net

__all__ = ["Batch", "Criterion", "TrainState", "create_train_state", "eval_step", "loss_fn",
           "train_step", "train_step_donated", "train_steps"]

Batch = tuple[jax.Array, jax.Array]
"""``(images, targets)``: images NHWC ``(N, 32, 32, 1)``; targets as the criterion wants them."""

Criterion = Callable[[jax.Array, jax.Array], jax.Array]
"""``criterion(logits, targets) -> scalar loss``, e.g. ``jaxnet.losses.cross_entropy``."""


class TrainState(train_state.TrainState):
    """Flax's ``TrainState``: ``step``, ``params``, ``opt_state``; static ``apply_fn``, ``tx``."""


def create_train_state(
    key: jax.Array, net: Net, tx: optax.GradientTransformation, params: Any = None
) -> TrainState:
    """A fresh state for ``net`` (initialised from ``key`` unless ``params`` is given)."""
    if params is None:
        params = net.init(key, jnp.zeros((1, 32, 32, 1), jnp.float32))["params"]
    return TrainState.create(apply_fn=net.apply, params=params, tx=tx)


def loss_fn(
    params: Any, apply_fn: Callable[..., jax.Array], batch: Batch, criterion: Criterion
) -> tuple[jax.Array, jax.Array]:
    """``(criterion(apply_fn(params, images), targets), logits)``; pure, differentiable."""
    images, targets = batch
    logits = apply_fn({"params": params}, images)
    # A Net computing in bfloat16 (dtype=jnp.bfloat16) still gets its loss in float32.
    loss_logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    return criterion(loss_logits, targets), logits


def _raise_bad_labels(low: Any, high: Any, num_classes: int) -> None:
    raise ValueError(
        f"class labels must lie in [0, {num_classes}), found values from {low} to {high}. "
        "Map the labels to 0..num_classes-1 or build Net(num_classes=...) to match."
    )


def _guard_labels(targets: jax.Array, num_classes: int) -> None:
    """Inside jit: raise (through a host callback) if an integer label is out of range.

    Only integer targets are class indices. torch's ``ignore_index`` (-100) stays allowed.
    """
    if not jnp.issubdtype(targets.dtype, jnp.integer) or targets.size == 0:
        return
    kept = targets != -100
    low = jnp.min(jnp.where(kept, targets, 0))
    high = jnp.max(jnp.where(kept, targets, 0))
    jax.lax.cond(
        (low < 0) | (high >= num_classes),
        lambda: jax.debug.callback(_raise_bad_labels, low, high, num_classes),
        lambda: None,
    )


def _metrics(loss: jax.Array, logits: jax.Array, targets: jax.Array) -> dict[str, jax.Array]:
    metrics = {"loss": loss}
    if jnp.issubdtype(targets.dtype, jnp.integer) and targets.shape == logits.shape[:1]:
        kept = targets != -100
        hits = (jnp.argmax(logits, axis=-1) == targets) & kept
        metrics["accuracy"] = jnp.sum(hits) / jnp.maximum(jnp.sum(kept), 1)
    return metrics


def _step(
    state: TrainState, batch: Batch, criterion: Criterion, in_place: bool
) -> tuple[TrainState, dict[str, jax.Array]]:
    _, targets = batch
    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.apply_fn, batch, criterion
    )
    _guard_labels(targets, logits.shape[-1])
    if in_place:  # only then: it costs the non-donated step a transposed copy of fc1's kernel
        state = state.replace(params=_after_gradients(grads, state.params))
    return state.apply_gradients(grads=grads), _metrics(loss, logits, targets)


def _train_step(
    state: TrainState, batch: Batch, criterion: Criterion = losses.cross_entropy
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step: ``value_and_grad`` of ``loss_fn``, then ``state.apply_gradients``.

    The same as ``zero_grad(); loss.backward(); optimizer.step()`` in PyTorch. ``criterion`` is
    static: pass the same function object every step (a new ``functools.partial`` each call
    would recompile). Returns ``(new_state, {"loss", and "accuracy" for class-index targets})``,
    where the metrics are those of the parameters *before* the step. Class-index targets outside
    ``[0, num_classes)`` raise a ``ValueError``.
    """
    return _step(state, batch, criterion, in_place=False)


def _train_step_donated(
    state: TrainState, batch: Batch, criterion: Criterion = losses.cross_entropy
) -> tuple[TrainState, dict[str, jax.Array]]:
    """``train_step`` that donates ``state``'s buffers to the new state.

    XLA then updates the parameters and optimizer state in place instead of allocating new
    ones, which is faster where the step is bound by memory traffic (small batches: fc1's
    6.4 M weights, their gradient and momentum). The ``state`` passed in is deleted: use it
    only as ``state, metrics = train_step_donated(state, batch)``; reading the old state (or
    anything sharing its arrays) afterwards raises "Array has been deleted". ``train_step`` is
    the safe default when old states are kept (e.g. for checkpoints or comparisons).
    """
    return _step(state, batch, criterion, in_place=True)


def _after_gradients(grads: Any, params: Any) -> Any:
    """``params``, bit for bit, but data-dependent on every gradient.

    Why: XLA may only update a parameter in place (donated step, ``lax.scan`` carry) once
    every read of its old value is done, and it cannot see that the backward pass's reads
    (e.g. fc1's kernel in ``dy @ W.T``) come before the optimizer's write; it then copies fc1's
    25 MB kernel first, every step (measured: up to 2x slower at batch 1). Every such read feeds a
    gradient, so depending on all gradients orders them. ``zero`` is exactly +0.0 for any
    gradient value (NaN and inf included), and ``p - (+0.0)`` is ``p`` for every float,
    including -0.0 and NaN.
    """
    firsts = [jnp.ravel(g)[0] for g in jax.tree.leaves(grads) if jnp.size(g) > 0]
    if not firsts:
        return params
    zero = sum(
        jnp.where(jnp.isnan(g), 0.0, jnp.abs(jnp.clip(g, -1.0, 1.0))).astype(jnp.float32) * 0.0
        for g in firsts
    )
    return jax.tree.map(lambda p: p - zero.astype(p.dtype), params)


train_step = jax.jit(_train_step, static_argnames=("criterion",))

train_step_donated = jax.jit(
    _train_step_donated, static_argnames=("criterion",), donate_argnames=("state",)
)


def _train_steps(
    state: TrainState, batches: Batch, criterion: Criterion = losses.cross_entropy
) -> tuple[TrainState, dict[str, jax.Array]]:
    """``S`` training steps fused into one XLA program with ``lax.scan``.

    ``batches`` is ``(images (S, N, 32, 32, 1), targets (S, N, ...))``: a stack of ``S``
    batches already on the device. Equal to ``S`` calls of ``train_step`` up to float32 round-off
    (XLA compiles the loop body on its own, so fusion may differ), without the per-step
    Python dispatch and host round trips.
    Returns ``(state after S steps, metrics stacked along a leading axis of length S)``.
    """
    images, targets = batches
    if jnp.ndim(images) < 1 or jnp.shape(images)[:1] != jnp.shape(targets)[:1]:
        raise ValueError(
            "train_steps takes a stack of batches: images (S, N, 32, 32, 1) and targets "
            f"(S, N, ...) with the same S; got shapes {jnp.shape(images)} and "
            f"{jnp.shape(targets)}. Stack per-step batches with jnp.stack."
        )

    def body(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        return _step(state, batch, criterion, in_place=True)

    return jax.lax.scan(body, state, batches)


train_steps = jax.jit(_train_steps, static_argnames=("criterion",))


@functools.partial(jax.jit, static_argnames=("criterion",))
def eval_step(
    state: TrainState, batch: Batch, criterion: Criterion = losses.cross_entropy
) -> dict[str, jax.Array]:
    """Loss (and accuracy for class-index targets) of ``state.params`` on ``batch``; no update."""
    _, targets = batch
    loss, logits = loss_fn(state.params, state.apply_fn, batch, criterion)
    _guard_labels(targets, logits.shape[-1])
    return _metrics(loss, logits, targets)
