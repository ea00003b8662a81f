"""The pure training steps over a ``TrainState``, in the style of Flax's examples.

``compute_grads`` (Flax mnist's ``apply_model``) takes the gradient of ``loss_fn``, checks the
labels and measures the batch; ``apply_gradients`` (``update_model``) takes the optimizer step.
``train_step``, ``train_step_donated``, ``train_steps`` and the validator are built from the two.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from jaxnet import host, losses
from jaxnet.criteria import ignored_label
from jaxnet.model import Net, init_params

__all__ = [
    "Batch",
    "Criterion",
    "TrainState",
    "apply_gradients",
    "compute_grads",
    "create_train_state",
    "eval_step",
    "loss_fn",
    "per_example_grad_norms",
    "train_step",
    "train_step_donated",
    "train_steps",
]

Batch = tuple[jax.Array, jax.Array]
"""``(images, targets)``: images NHWC ``(N, 32, 32, 1)``; targets as the criterion wants them."""

Criterion = Callable[[jax.Array, jax.Array], jax.Array]
"""``criterion(logits, targets) -> scalar loss``, e.g. ``jaxnet.losses.cross_entropy``."""


class TrainState(train_state.TrainState):
    """Flax's ``TrainState``: ``step``, ``params``, ``opt_state``; static ``apply_fn``, ``tx``.

    ``create`` starts ``step`` as an int32 array rather than Flax's Python ``0``, so the first
    and later calls of a jitted step see the same argument types and compile once.
    """

    @classmethod
    def create(cls, *, apply_fn: Callable[..., Any], params: Any, tx: Any, **kwargs: Any):
        state = super().create(apply_fn=apply_fn, params=params, tx=tx, **kwargs)
        return state.replace(step=jnp.asarray(state.step, jnp.int32))


def create_train_state(
    key: jax.Array, net: Net, tx: optax.GradientTransformation, params: Any = None
) -> TrainState:
    """A fresh state for ``net`` (initialised from ``key`` unless ``params`` is given)."""
    if params is None:
        params = init_params(net, key)
    return TrainState.create(apply_fn=net.apply, params=params, tx=tx)


def loss_fn(
    params: Any, apply_fn: Callable[..., jax.Array], batch: Batch, criterion: Criterion
) -> tuple[jax.Array, jax.Array]:
    """``(criterion(apply_fn(params, images), targets), logits)``; pure, differentiable."""
    images, targets = batch
    if jnp.ndim(targets) == 0 or jnp.shape(targets)[0] != jnp.shape(images)[0]:
        raise ValueError(
            f"the batch has {jnp.shape(images)[0] if jnp.ndim(images) else 0} images but targets "
            f"of shape {jnp.shape(targets)}; give one target row per image."
        )
    logits = apply_fn({"params": params}, images)
    # A Net computing in bfloat16 (dtype=jnp.bfloat16) still gets its loss in float32.
    loss_logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    return criterion(loss_logits, targets), logits


def _raise_bad_labels(low: Any, high: Any, num_classes: int) -> None:
    raise ValueError(
        f"class labels must lie in [0, {num_classes}), found values from {low} to {high}. "
        "Map the labels to 0..num_classes-1 or build Net(num_classes=...) to match."
    )


def _guard_labels(targets: jax.Array, num_classes: int, ignore: int | None) -> None:
    """Inside jit: raise (through a host callback) if an integer label is out of range.

    Only integer targets are class indices; those equal to ``ignore`` (the criterion's
    ``ignore_index``, see ``ignored_label``) stay allowed.
    """
    if not jnp.issubdtype(targets.dtype, jnp.integer) or targets.size == 0:
        return
    kept = targets != ignore if ignore is not None else jnp.ones(targets.shape, bool)
    low = jnp.min(jnp.where(kept, targets, 0))
    high = jnp.max(jnp.where(kept, targets, 0))
    jax.lax.cond(
        (low < 0) | (high >= num_classes),
        lambda: jax.debug.callback(_raise_bad_labels, low, high, num_classes),
        lambda: None,
    )


def _metrics(
    loss: jax.Array, logits: jax.Array, targets: jax.Array, ignore: int | None
) -> dict[str, jax.Array]:
    metrics = {"loss": loss}
    if jnp.issubdtype(targets.dtype, jnp.integer) and targets.shape == logits.shape[:1]:
        kept = targets != ignore if ignore is not None else jnp.ones(targets.shape, bool)
        hits = (jnp.argmax(logits, axis=-1) == targets) & kept
        metrics["accuracy"] = jnp.sum(hits) / jnp.maximum(jnp.sum(kept), 1)
    return metrics


def compute_grads(
    params: Any, apply_fn: Callable[..., jax.Array], batch: Batch, criterion: Criterion
) -> tuple[Any, jax.Array, jax.Array]:
    """``(grads, loss, logits)`` of ``loss_fn`` at ``params`` (Flax mnist's ``apply_model``).

    Class-index targets outside ``[0, num_classes)`` raise a ``ValueError`` (through a host
    callback inside ``jit``), except the criterion's ``ignore_index`` (``ignored_label``).
    Pure: jit it with ``apply_fn`` and ``criterion`` static, or call it inside a jitted step.
    """
    return _grads(params, apply_fn, batch, criterion, guard=True)


def _grads(
    params: Any, apply_fn: Callable[..., jax.Array], batch: Batch, criterion: Criterion, guard: bool
) -> tuple[Any, jax.Array, jax.Array]:
    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, apply_fn, batch, criterion
    )
    if guard:
        _guard_labels(batch[1], logits.shape[-1], ignored_label(criterion))
    return grads, loss, logits


def apply_gradients(state: TrainState, grads: Any, *, in_place: bool = False) -> TrainState:
    """One optimizer step with ``grads`` (Flax mnist's ``update_model``): the new state.

    ``in_place=True`` (donated steps, ``lax.scan``) lets XLA overwrite the parameters once
    every read of them is done; see ``_after_gradients``. It costs a non-donated step a copy of
    fc1's kernel, so the plain step leaves it off.
    """
    if in_place:
        state = state.replace(params=_after_gradients(grads, state.params))
    return state.apply_gradients(grads=grads)


def _step(
    state: TrainState, batch: Batch, criterion: Criterion, in_place: bool, guard: bool
) -> tuple[TrainState, dict[str, jax.Array]]:
    grads, loss, logits = _grads(state.params, state.apply_fn, batch, criterion, guard)
    metrics = _metrics(loss, logits, batch[1], ignored_label(criterion))
    return apply_gradients(state, grads, in_place=in_place), metrics


def _train_step(
    state: TrainState, batch: Batch, criterion: Criterion = losses.cross_entropy, guard: bool = True
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step: ``value_and_grad`` of ``loss_fn``, then ``state.apply_gradients``.

    The same as ``zero_grad(); loss.backward(); optimizer.step()`` in PyTorch. ``criterion`` is
    static: pass the same function object every step (a new ``functools.partial`` each call
    would recompile). Returns ``(new_state, {"loss", and "accuracy" for class-index targets})``,
    where the metrics are those of the parameters *before* the step. Class-index targets outside
    ``[0, num_classes)`` raise a ``ValueError``, except the criterion's ``ignore_index``
    (``ignored_label``).
    """
    return _step(state, batch, criterion, in_place=False, guard=guard)


def _train_step_donated(
    state: TrainState, batch: Batch, criterion: Criterion = losses.cross_entropy, guard: bool = True
) -> tuple[TrainState, dict[str, jax.Array]]:
    """``train_step`` that donates ``state``'s buffers to the new state.

    XLA then updates the parameters and optimizer state in place instead of allocating new
    ones, which is faster where the step is bound by memory traffic (small batches: fc1's
    6.4 M weights, their gradient and momentum). The ``state`` passed in is deleted: use it
    only as ``state, metrics = train_step_donated(state, batch)``; reading the old state (or
    anything sharing its arrays) afterwards raises "Array has been deleted". ``train_step`` is
    the safe default when old states are kept (e.g. for checkpoints or comparisons).
    """
    return _step(state, batch, criterion, in_place=True, guard=guard)


def _after_gradients(grads: Any, params: Any) -> Any:
    """``params``, bit for bit, but data-dependent on every gradient.

    Why: XLA may only update a parameter in place (donated step, ``lax.scan`` carry) once
    every read of its old value is done, and it cannot see that the backward pass's reads
    (e.g. fc1's kernel in ``dy @ W.T``) come before the optimizer's write; it then copies fc1's
    25 MB kernel first, every step (docs/performance.md). Every such read feeds a
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


_NUM_OUTPUTS: dict[Any, int] = {}


def _num_outputs(apply_fn: Callable[..., Any], params: Any, images: Any, stacked: bool) -> int:
    """The size of ``apply_fn``'s last output axis for these params and images (``eval_shape``,
    once per model, parameter shapes and image shape)."""
    leaves, treedef = jax.tree.flatten(params)
    shape = tuple(jnp.shape(images)[1:] if stacked else jnp.shape(images))
    key = (apply_fn, treedef, tuple((jnp.shape(x), jnp.result_type(x)) for x in leaves), shape)
    if key not in _NUM_OUTPUTS:
        if len(_NUM_OUTPUTS) > 256:
            _NUM_OUTPUTS.clear()
        spec = jax.ShapeDtypeStruct(shape, jnp.result_type(images))
        _NUM_OUTPUTS[key] = int(jax.eval_shape(apply_fn, {"params": params}, spec).shape[-1])
    return _NUM_OUTPUTS[key]


def _labels_checked_on_host(
    state: TrainState, batch: Batch, criterion: Criterion, stacked: bool = False
) -> bool:
    """Check class-index labels on the host, before the step is dispatched. Returns False if
    they cannot be read here (traced inside the caller's ``jit``, or spread over processes):
    the step then checks them itself, through a host callback."""
    images, targets = batch
    try:
        if isinstance(targets, jax.Array) and not targets.is_fully_addressable:
            return False
        labels = np.asarray(targets)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return False  # traced: only the compiled step can see the values
    if not np.issubdtype(labels.dtype, np.integer) or labels.size == 0:
        return True
    ignore = ignored_label(criterion)
    kept = labels[labels != ignore] if ignore is not None else labels
    if kept.size:
        low, high = int(kept.min()), int(kept.max())
        num_classes = _num_outputs(state.apply_fn, state.params, images, stacked)
        if low < 0 or high >= num_classes:
            _raise_bad_labels(low, high, num_classes)
    return True


class _PublicStep:
    """A jitted step as the public API: the step, with its class-index labels checked on the
    host before dispatch whenever they can be read there.

    Why: a host callback in a compiled function (the in-step label check) takes every call
    off JAX's fast C++ dispatch path onto its Python one, 0.3-1 ms per call: a third of a
    training step at batch 1 and half of an ``eval_step``. The first call also tunes the
    host's malloc (``jaxnet.host``). ``lower`` gives the program a call runs; ``trace`` and
    the docstring are the jitted step's.
    """

    def __init__(self, jitted: Callable[..., Any], stacked: bool = False) -> None:
        self._jitted = host.tunes_malloc_on_first_call(jitted)
        self._stacked = stacked
        functools.update_wrapper(self, jitted)

    def __call__(
        self, state: TrainState, batch: Batch, criterion: Criterion = losses.cross_entropy
    ):
        checked = _labels_checked_on_host(state, batch, criterion, self._stacked)
        return self._jitted(state, batch, criterion=criterion, guard=not checked)

    def lower(
        self,
        state: TrainState,
        batch: Batch,
        criterion: Criterion = losses.cross_entropy,
        *,
        guard: bool | None = None,
    ) -> Any:
        """``jax.stages.Lowered`` of the program a call with these arguments runs (without the
        in-step label check when the labels can be read on the host), for ``.compile()``,
        ``.as_text()`` and ``memory_analysis()``; ``guard=True``/``False`` picks the version."""
        if guard is None:
            guard = not _labels_checked_on_host(state, batch, criterion, self._stacked)
        return self._jitted.lower(state, batch, criterion=criterion, guard=guard)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._jitted, name)


train_step = _PublicStep(jax.jit(_train_step, static_argnames=("criterion", "guard")))

train_step_donated = _PublicStep(
    jax.jit(_train_step_donated, static_argnames=("criterion", "guard"), donate_argnames=("state",))
)


def _train_steps(
    state: TrainState,
    batches: Batch,
    criterion: Criterion = losses.cross_entropy,
    guard: bool = True,
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
        return _step(state, batch, criterion, in_place=True, guard=guard)

    return jax.lax.scan(body, state, batches)


train_steps = _PublicStep(jax.jit(_train_steps, static_argnames=("criterion", "guard")), True)


def _eval_step(
    state: TrainState, batch: Batch, criterion: Criterion = losses.cross_entropy, guard: bool = True
) -> dict[str, jax.Array]:
    """Loss (and accuracy for class-index targets) of ``state.params`` on ``batch``; no update.

    Class-index targets outside ``[0, num_classes)`` raise a ``ValueError``, except the
    criterion's ``ignore_index``, as in ``train_step``.
    """
    _, targets = batch
    loss, logits = loss_fn(state.params, state.apply_fn, batch, criterion)
    ignore = ignored_label(criterion)
    if guard:
        _guard_labels(targets, logits.shape[-1], ignore)
    return _metrics(loss, logits, targets, ignore)


eval_step = _PublicStep(jax.jit(_eval_step, static_argnames=("criterion", "guard")))


@host.tunes_malloc_on_first_call
@functools.partial(jax.jit, static_argnames=("criterion", "chunk_size"))
def per_example_grad_norms(
    state: TrainState,
    batch: Batch,
    criterion: Criterion = losses.cross_entropy,
    chunk_size: int = 8,
) -> jax.Array:
    """The L2 norm of each example's own gradient, ``(N,)``, via ``jax.vmap`` of ``jax.grad``.

    PyTorch's autograd sums the gradient over the batch; here the per-example gradient is one
    ``vmap`` away. To bound memory (each example's gradient is the size of the params),
    ``chunk_size`` examples are vmapped at a time under ``lax.map``.
    """
    images, labels = batch
    n = images.shape[0]
    chunk_size = min(chunk_size, n)
    pad = -n % chunk_size
    if pad:  # repeat examples to fill the last chunk; their norms are dropped below
        fill = jnp.arange(n + pad) % n
        images, labels = images[fill], labels[fill]

    def norm_of_one(x: jax.Array, t: jax.Array) -> jax.Array:
        grads = jax.grad(lambda p: loss_fn(p, state.apply_fn, (x[None], t[None]), criterion)[0])(
            state.params
        )
        return optax.tree.norm(grads)

    chunks = (
        images.reshape(-1, chunk_size, *images.shape[1:]),
        labels.reshape(-1, chunk_size, *labels.shape[1:]),
    )
    norms = jax.lax.map(lambda c: jax.vmap(norm_of_one)(*c), chunks)
    return norms.reshape(-1)[:n]
