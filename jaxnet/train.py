"""Small pure training functions over a ``TrainState``, in the style of Flax's examples."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization
from flax.training import train_state
from rich.console import Console

from jaxnet import checkpoint, data, losses
from jaxnet.checkpoint import CheckpointError
from jaxnet.model import Net

if TYPE_CHECKING:
    from jax.sharding import Mesh

__all__ = [
    "Batch",
    "CRITERIA",
    "Criterion",
    "EpochProgress",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "create_train_state",
    "eval_step",
    "evaluate",
    "ignored_label",
    "loss_fn",
    "make_criterion",
    "make_optimizer",
    "optimizer_registry",
    "per_example_grad_norms",
    "train_and_evaluate",
    "train_epoch",
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
        params = net.init(key, jnp.zeros((1, 32, 32, 1), jnp.float32))["params"]
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


def ignored_label(criterion: Criterion) -> int | None:
    """The class-index target ``criterion`` skips: its ``ignore_index`` keyword when it is a
    ``functools.partial`` that sets one, torch's default -100 for ``losses.cross_entropy``, and
    None (every label must be a class) for the other criteria."""
    keywords: dict[str, Any] = {}
    while isinstance(criterion, functools.partial):
        keywords = {**criterion.keywords, **keywords}
        criterion = criterion.func
    if "ignore_index" in keywords:
        return int(keywords["ignore_index"])
    return -100 if criterion is losses.cross_entropy else None


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


def _step(
    state: TrainState, batch: Batch, criterion: Criterion, in_place: bool
) -> tuple[TrainState, dict[str, jax.Array]]:
    _, targets = batch
    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.apply_fn, batch, criterion
    )
    ignore = ignored_label(criterion)
    _guard_labels(targets, logits.shape[-1], ignore)
    if in_place:  # only then: it costs the non-donated step a transposed copy of fc1's kernel
        state = state.replace(params=_after_gradients(grads, state.params))
    return state.apply_gradients(grads=grads), _metrics(loss, logits, targets, ignore)


def _train_step(
    state: TrainState, batch: Batch, criterion: Criterion = losses.cross_entropy
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step: ``value_and_grad`` of ``loss_fn``, then ``state.apply_gradients``.

    The same as ``zero_grad(); loss.backward(); optimizer.step()`` in PyTorch. ``criterion`` is
    static: pass the same function object every step (a new ``functools.partial`` each call
    would recompile). Returns ``(new_state, {"loss", and "accuracy" for class-index targets})``,
    where the metrics are those of the parameters *before* the step. Class-index targets outside
    ``[0, num_classes)`` raise a ``ValueError``, except the criterion's ``ignore_index``
    (``ignored_label``).
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
    ignore = ignored_label(criterion)
    _guard_labels(targets, logits.shape[-1], ignore)
    return _metrics(loss, logits, targets, ignore)


# =============================================================================================
# The training job: train_epoch, evaluate, train_and_evaluate (Flax examples' structure)
# =============================================================================================


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a ``jaxnet train`` run (``jaxnet train --help`` names each).

    The defaults are the README's default run: the digits, even vs odd, 8 epochs of
    ``SGD(lr=0.01, momentum=0.9)`` with batches of 32.
    """

    data: str = "digits"
    num_classes: int = 2
    label_rule: str = "parity"
    limit: int | None = None
    val_fraction: float = 0.2
    split_seed: int = 0
    epochs: int = 8
    batch_size: int = 32
    eval_batch_size: int = 512
    loss: str = "cross_entropy"
    optimizer: str = "sgd"
    lr: float = 0.01
    optimizer_kwargs: Mapping[str, Any] | None = None
    schedule: str | None = None
    schedule_kwargs: Mapping[str, Any] | None = None
    seed: int = 0
    weight_init: str = "torch"
    early_stopping: int | None = None
    per_example_grad_norms: int = 0
    progress: bool = True
    resume: bool = False
    overwrite: bool = False


# Hyperparameters each optimizer gets unless the config names its own (torch's defaults otherwise).
DEFAULT_OPTIMIZER_KWARGS: Mapping[str, Mapping[str, Any]] = {"sgd": {"momentum": 0.9}}

# The config fields a resumed run may change; every other one must equal the checkpoint's.
_RESUMABLE_CHANGES = frozenset(
    {"epochs", "early_stopping", "progress", "resume", "overwrite", "eval_batch_size"}
)


def optimizer_registry() -> dict[str, Callable[..., optax.GradientTransformation]]:
    """``{name: constructor}`` of the torch.optim-like optimizers ``jaxnet.optim`` defines."""
    from jaxnet import optim

    return dict(optim.OPTIMIZERS)


def make_optimizer(
    name: str,
    lr: float,
    kwargs: Mapping[str, Any] | None = None,
    schedule: str | None = None,
    schedule_kwargs: Mapping[str, Any] | None = None,
    steps_per_epoch: int = 1,
    epochs: int = 1,
) -> optax.GradientTransformation:
    """``jaxnet.optim.<name>(lr=lr, **kwargs)``, refusing unknown names and hyperparameters.

    With ``schedule`` (a ``jaxnet.schedules`` name and its torch arguments) the lr follows it,
    stepped once per epoch like ``scheduler.step()`` at the end of each epoch; ``one_cycle_lr``
    is stepped every batch, as torch requires, with ``epochs``/``steps_per_epoch`` filled in.
    """
    from jaxnet import optim

    registry = optimizer_registry()
    if name not in registry:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {sorted(registry)}.")
    fn = registry[name]
    # The given hyperparameters override the defaults one by one (--momentum 0 turns it off).
    kwargs = {**DEFAULT_OPTIMIZER_KWARGS.get(name, {}), **(kwargs or {})}
    accepted = [p for p in inspect.signature(fn).parameters if p != "lr"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(
            f"optimizer {name!r} takes no {', '.join(unknown)}; its hyperparameters are "
            f"{', '.join(accepted)}."
        )
    sched_kwargs = dict(schedule_kwargs or {})
    if schedule == "one_cycle_lr":
        sched_kwargs.setdefault("max_lr", lr)
        if "total_steps" not in sched_kwargs:
            sched_kwargs.setdefault("epochs", epochs)
            sched_kwargs.setdefault("steps_per_epoch", steps_per_epoch)
    return optim.build(
        name,
        {"lr": lr, **kwargs},
        schedule,
        sched_kwargs,
        steps_per_epoch=1 if schedule == "one_cycle_lr" else steps_per_epoch,
    )


def _one_hot_like(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)


def mse_on_labels(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """``F.mse_loss(logits, one_hot(labels))``: the tutorial's regression losses on classes."""
    return losses.mse_loss(logits, _one_hot_like(logits, labels))


def l1_on_labels(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """``F.l1_loss(logits, one_hot(labels))``."""
    return losses.l1_loss(logits, _one_hot_like(logits, labels))


def kl_div_on_labels(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """``F.kl_div(log_softmax(logits), one_hot(labels), reduction="batchmean")``."""
    return losses.kl_div(
        jax.nn.log_softmax(logits), _one_hot_like(logits, labels), reduction="batchmean"
    )


# Criteria on integer labels (so train_step reports accuracy and checks the label range). Module
# level functions: train_step's criterion is static, and the same object must come every step.
CRITERIA: Mapping[str, Criterion] = {
    "cross_entropy": losses.cross_entropy,
    "mse": mse_on_labels,
    "l1": l1_on_labels,
    "kl_div": kl_div_on_labels,
}


def make_criterion(name: str) -> Criterion:
    if name not in CRITERIA:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(CRITERIA)}.")
    return CRITERIA[name]


class NonFiniteLossError(FloatingPointError):
    """Training met a NaN or infinite loss; the message names the step and the last checkpoint."""


@dataclasses.dataclass
class EpochProgress:
    """Running sums of one epoch, enough to resume it mid-way with identical metrics."""

    batches_done: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    count: int = 0
    seconds: float = 0.0

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.count, 1)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.count, 1)


def train_epoch(
    state: TrainState,
    x: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int,
    seed: int,
    epoch: int,
    criterion: Criterion = losses.cross_entropy,
    progress: EpochProgress | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_step: Callable[[EpochProgress, float], None] | None = None,
    mesh: Mesh | None = None,
) -> tuple[TrainState, EpochProgress, bool]:
    """One pass over the shuffled training data ``x (N, 32, 32, 1)``, ``y (N,)``.

    The batches are ``jaxnet.data.batches(x, y, batch_size, seed=seed, epoch=epoch)``;
    ``progress`` (from an interrupted run) skips the batches already done and continues its sums.
    ``should_stop`` is polled after every step. ``on_step(progress, loss)`` is called after each.

    With a ``mesh`` (``jaxnet.parallel.make_mesh``), the steps are data-parallel: ``state`` must
    be replicated over it (``jaxnet.parallel.replicate``), each global batch of ``batch_size`` is
    split over the ``data`` axis, and each process takes only its own rows of it
    (``local_batch_indices`` + ``assemble_batch``). The same ``train_step`` runs; XLA's
    all-reduce averages the gradients. Without one, the batches are plain host arrays.

    Returns ``(state, progress, finished)``; ``finished`` is False when stopped early.

    Raises:
      NonFiniteLossError: naming the step, when a loss is NaN or infinite (``state`` then stays
        as it was before that step, inside the caller).
    """
    progress = dataclasses.replace(progress) if progress is not None else EpochProgress()
    steps = data.num_batches(len(x), batch_size)
    start = time.perf_counter() - progress.seconds
    rows = None
    if mesh is not None:
        from jaxnet import parallel

        rows = parallel.local_batch_indices(batch_size, mesh)
    for images, labels in data.batches(
        x, y, batch_size, seed=seed, epoch=epoch, start=progress.batches_done, rows=rows
    ):
        batch: Batch = (images, labels)
        if mesh is not None:
            batch = parallel.assemble_batch(batch, mesh)
        new_state, metrics = train_step(state, batch, criterion)
        loss = float(metrics["loss"])
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"the loss is {loss} at step {int(state.step) + 1} (epoch {epoch}, batch "
                f"{progress.batches_done + 1} of {steps}); training stopped"
            )
        state = new_state
        n = batch_size
        progress.batches_done += 1
        progress.loss_sum += loss * n
        progress.correct += round(float(metrics.get("accuracy", 0.0)) * n)
        progress.count += n
        progress.seconds = time.perf_counter() - start
        if on_step is not None:
            on_step(progress, loss)
        if should_stop is not None and should_stop() and progress.batches_done < steps:
            return state, progress, False
    return state, progress, True


def evaluate(
    state: TrainState,
    x: np.ndarray,
    y: np.ndarray,
    criterion: Criterion = losses.cross_entropy,
    batch_size: int = 512,
    mesh: Mesh | None = None,
) -> dict[str, float]:
    """``{"loss", "accuracy"}`` of ``state.params`` on all of ``x``, ``y`` (no update).

    Evaluated in batches of ``batch_size``; the batch means are weighted by the batch sizes,
    which gives the mean over all examples for the mean-reduced losses.

    With a ``mesh`` (``state`` replicated over it), each batch is sharded over the ``data`` axis
    (``batch_size`` rounded down to a multiple of the device count), each process taking only
    its rows. Of a last partial batch, the largest part that splits evenly is sharded too, and
    the few examples left (fewer than the devices) are evaluated by every process on its own
    copy of the params: no padding, so the metrics equal the single-device ones up to float32
    round-off.
    """
    if mesh is not None:
        from jaxnet import parallel

        devices = mesh.devices.size
        batch_size = max(batch_size // devices, 1) * devices
        local_state = None
    loss_sum, correct = 0.0, 0

    def add(m: Mapping[str, jax.Array], count: int) -> None:
        nonlocal loss_sum, correct
        loss_sum += float(m["loss"]) * count
        correct += round(float(m.get("accuracy", 0.0)) * count)

    for i in range(0, len(x), batch_size):
        images, labels = x[i : i + batch_size], y[i : i + batch_size]
        if mesh is None:
            add(eval_step(state, (images, labels), criterion), len(labels))
            continue
        even = len(labels) // devices * devices
        if even:
            rows = parallel.local_batch_indices(even, mesh)
            batch = parallel.assemble_batch((images[rows], labels[rows]), mesh)
            add(eval_step(state, batch, criterion), even)
        if even < len(labels):
            if local_state is None:
                local_state = _local_copy(state)
            rest = (images[even:], labels[even:])
            add(eval_step(local_state, rest, criterion), len(labels) - even)
    n = max(len(x), 1)
    return {"loss": loss_sum / n, "accuracy": correct / n}


def _local_copy(tree: Any) -> Any:
    """This process' own copy of a tree of replicated arrays, on one of its devices: for work
    every process does alike, outside the mesh (no collectives)."""
    return jax.tree.map(lambda a: a.addressable_data(0) if isinstance(a, jax.Array) else a, tree)


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


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What ``train_and_evaluate`` ends with.

    ``status``: ``"finished"``, ``"early-stopped"`` or ``"interrupted"`` (by SIGINT/SIGTERM,
    checkpoint saved; continue with ``resume=True``). ``history``: the ``metrics.jsonl`` records.
    """

    state: TrainState
    status: str
    history: list[dict[str, Any]]
    diagnosis: Any
    best_epoch: int
    signal: str | None = None


def config_to_json(config: TrainConfig) -> dict[str, Any]:
    d = dataclasses.asdict(config)
    for field in ("optimizer_kwargs", "schedule_kwargs"):
        value = getattr(config, field)
        d[field] = None if value is None else dict(value)
    return d


def _check_resumable(saved: Mapping[str, Any], config: TrainConfig) -> None:
    now = json.loads(json.dumps(config_to_json(config)))  # as it reads back (tuples -> lists)
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r}, now {now[k]!r}"
        for k in now
        if k not in _RESUMABLE_CHANGES and saved.get(k) != now[k]
    ]
    if diffs:
        raise CheckpointError(
            "cannot resume: the run in the workdir was made with other settings ("
            + "; ".join(diffs)
            + "). Use the same settings to resume (only --epochs and --early-stopping may "
            "change), or a new --workdir."
        )


class _StopFlag:
    """Set by SIGINT/SIGTERM: the run finishes its current step, saves and returns."""

    def __init__(self) -> None:
        self.signal: str | None = None

    def __call__(self) -> bool:
        return self.signal is not None

    def handler(self, signum: int, frame: Any) -> None:
        del frame
        self.signal = signal.Signals(signum).name


def _agreed(flag: _StopFlag) -> Callable[[], bool]:
    """``flag``, agreed on by all processes: whether any of them got a signal. Every process
    polls it at the same points, so all stop after the same step and save together (orbax's
    save is collective); a signal to one process alone would otherwise leave the others
    waiting in the next step's all-reduce."""
    from jax.experimental import multihost_utils

    def stop() -> bool:
        votes = multihost_utils.process_allgather(np.asarray(flag(), np.int32))
        return bool(np.any(votes))

    return stop


@contextlib.contextmanager
def _catch_stop_signals(flag: _StopFlag) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = {s: signal.signal(s, flag.handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@functools.partial(jax.jit, static_argnames=("net",))
def _init_params(net: Net, key: jax.Array) -> Any:
    """``net.init(key, x)["params"]`` as one compiled function (the same bits as ``Net.init``'s
    dozens of eagerly compiled ops, in a fraction of the time), cached across runs."""
    return net.init(key, jnp.zeros((1, 32, 32, 1), jnp.float32))["params"]


def _epoch_record(
    state: TrainState,
    ds: data.Dataset,
    config: TrainConfig,
    criterion: Criterion,
    epoch: int,
    progress: EpochProgress,
    probe: Batch | None,
    mesh: Mesh | None = None,
) -> dict[str, Any]:
    """The ``metrics.jsonl`` record of a finished epoch: train sums, validation, grad norms."""
    t0 = time.perf_counter()
    val = evaluate(state, ds.x_val, ds.y_val, criterion, config.eval_batch_size, mesh)
    record: dict[str, Any] = {
        "epoch": epoch,
        "step": int(state.step),
        "train_loss": progress.loss,
        "train_accuracy": progress.accuracy,
        "val_loss": val["loss"],
        "val_accuracy": val["accuracy"],
    }
    if probe is not None:
        # A few examples: each process computes them on its own copy of the params.
        local = state if mesh is None else _local_copy(state)
        norms = np.asarray(per_example_grad_norms(local, probe, criterion))
        record.update(
            grad_norm_mean=float(norms.mean()),
            grad_norm_median=float(np.median(norms)),
            grad_norm_max=float(norms.max()),
        )
    record["seconds"] = progress.seconds + time.perf_counter() - t0
    return record


def train_and_evaluate(
    config: TrainConfig, workdir: str | os.PathLike, mesh: Mesh | None = None
) -> TrainResult:
    """Train ``Net`` on ``config.data``, evaluating after every epoch; write ``workdir``.

    Data-parallel over ``mesh`` (default ``jaxnet.parallel.make_mesh()``: every device of every
    process; start the processes with ``jaxnet.parallel.initialize_distributed`` first): params
    and optimizer state replicated, each global batch of ``config.batch_size`` split over the
    devices (it must split evenly), each process taking only its rows. On one device the arrays
    are not sharded at all (the results are the same bits as before data parallelism). Every
    process runs this function alike; the primary one alone prints and writes ``metrics.jsonl``
    and ``curves.png``; orbax writes each checkpoint once.

    Writes ``metrics.jsonl`` (one record per epoch: ``epoch``, ``step``, ``train_loss``,
    ``train_accuracy``, ``val_loss``, ``val_accuracy``, ``seconds``), ``curves.png`` and
    ``checkpoints/`` (``last``: full state every epoch; ``best``: params with the lowest
    validation loss). ``config.resume`` continues the run in ``workdir`` exactly: a run killed
    at any point and resumed ends with the same params, bit for bit (on CPU), as one never
    stopped. SIGINT/SIGTERM save a mid-epoch checkpoint and return ``status="interrupted"``.

    Raises:
      ValueError: a batch size that does not split over the devices (before anything is
        written).
      jaxnet.data.DataError: unusable data (before anything is written).
      CheckpointError: a foreign, corrupt or incompatible checkpoint folder; or checkpoints in
        ``workdir`` while neither ``resume`` nor ``overwrite`` is set.
      NonFiniteLossError: a NaN/inf loss; the last good checkpoint stays as it was.
    """
    from jaxnet import parallel, report

    workdir = Path(workdir)
    mesh = parallel.make_mesh() if mesh is None else mesh
    per_device = parallel.check_batch_size(config.batch_size, mesh)
    primary = parallel.is_primary()
    sharded = mesh.devices.size > 1
    data_mesh = mesh if sharded else None
    console = Console(highlight=False, quiet=not primary)
    ds = data.load_data(
        config.data,
        config.num_classes,
        config.label_rule,
        config.val_fraction,
        config.split_seed,
        config.limit,
    )
    steps_per_epoch = data.num_batches(len(ds.x_train), config.batch_size)
    if config.epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {config.epochs}.")
    criterion = make_criterion(config.loss)
    net = Net(num_classes=ds.num_classes, weight_init=config.weight_init)  # type: ignore[arg-type]
    tx = make_optimizer(
        config.optimizer,
        config.lr,
        config.optimizer_kwargs,
        config.schedule,
        config.schedule_kwargs,
        steps_per_epoch=steps_per_epoch,
        epochs=config.epochs,
    )
    data_meta = {
        "mean": ds.mean,
        "std": ds.std,
        "num_train": len(ds.x_train),
        "num_val": len(ds.x_val),
        "num_classes": ds.num_classes,
        "description": ds.description,
    }

    console.print(
        f"mesh: {parallel.describe_mesh(mesh)}"
        + (f"; batch {config.batch_size} = {per_device} per device" if sharded else "")
    )
    key = jax.random.key(config.seed)
    # The state's structure, without computing it: a resumed run overwrites every leaf.
    state = jax.eval_shape(lambda: create_train_state(key, net, tx))
    fresh = True
    ckpts = checkpoint.Checkpoints(workdir / "checkpoints")
    history: list[dict[str, Any]] = []
    next_epoch, partial = 1, None
    best: dict[str, Any] = {"epoch": 0, "val_loss": None}
    last_saved: int | None = None  # the step of the newest complete checkpoint
    status = "finished"
    with ckpts:
        # Every process decides from the same folder before any of them changes it.
        exists, never_completed = ckpts.exists(), ckpts.never_completed()
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"jaxnet-train-start:{ckpts.directory}")
        if config.resume and exists and never_completed:
            console.print(
                f"no complete checkpoint in {workdir} (stopped during its first "
                "epoch); starting a new run"
            )
            ckpts.clear()
        elif config.resume and exists:
            target = serialization.to_state_dict(state)
            if sharded:  # restored straight onto the mesh, replicated, in every process
                target = parallel.abstract_like(target, mesh)
            restored, meta = ckpts.restore_last(target)
            _check_resumable(meta.get("config", {}), config)
            if meta.get("data") != data_meta:
                raise CheckpointError(
                    "cannot resume: the data differs from the run's in the workdir "
                    f"(checkpoint {meta.get('data')}, now {data_meta})."
                )
            state = serialization.from_state_dict(state, restored)
            fresh = False
            last_saved = int(state.step)
            history = list(meta["history"])
            next_epoch = int(meta["epoch"])
            partial = EpochProgress(**meta["partial"]) if meta.get("partial") else None
            best = dict(meta["best"])
            status = meta.get("status", "running")
            console.print(
                f"resuming {workdir} at epoch {next_epoch}"
                + (f", batch {partial.batches_done + 1}" if partial else "")
                + f" (step {int(state.step)})"
            )
        elif exists:
            if not config.overwrite:
                raise CheckpointError(
                    f"{ckpts.directory} already holds checkpoints; pass --resume to continue "
                    "that run, --overwrite to start afresh, or choose another --workdir."
                )
            ckpts.clear()
            for name in ("metrics.jsonl", "curves.png"):
                if primary:
                    (workdir / name).unlink(missing_ok=True)
        elif config.resume:
            console.print(f"nothing to resume in {workdir}; starting a new run")
        if fresh:
            state = create_train_state(key, net, tx, params=_init_params(net, key))
            if sharded:  # every process made the same values from the same key
                state = parallel.replicate(state, mesh)
        workdir.mkdir(parents=True, exist_ok=True)
        console.print(f"data: {ds.description}")

        def meta_for(epoch: int, progress: EpochProgress | None, run_status: str) -> dict:
            return {
                "config": config_to_json(config),
                "data": data_meta,
                "epoch": epoch,
                "partial": dataclasses.asdict(progress) if progress else None,
                "history": history,
                "best": best,
                "status": run_status,
            }

        flag = _StopFlag()
        stop = flag if jax.process_count() == 1 else _agreed(flag)
        probe = None
        if config.per_example_grad_norms:
            n_probe = min(config.per_example_grad_norms, len(ds.x_train))
            probe = (ds.x_train[:n_probe], ds.y_train[:n_probe])
        stopped_early = status == "early-stopped"
        status = "running"
        epoch = next_epoch
        bar = _progress_bar(config.progress and primary, console)
        try:
            with _catch_stop_signals(flag), bar:
                while epoch <= config.epochs and not stopped_early and not stop():
                    task = bar.add_task(
                        "",
                        total=steps_per_epoch,
                        epoch=epoch,
                        epochs=config.epochs,
                        loss=float("nan"),
                        sps=0.0,
                        completed=partial.batches_done if partial else 0,
                    )

                    def on_step(p: EpochProgress, loss: float, task: Any = task) -> None:
                        bar.update(
                            task,
                            completed=p.batches_done,
                            loss=p.loss,
                            sps=p.count / max(p.seconds, 1e-9),
                        )

                    try:
                        state, progress, done = train_epoch(
                            state,
                            ds.x_train,
                            ds.y_train,
                            batch_size=config.batch_size,
                            seed=config.seed,
                            epoch=epoch,
                            criterion=criterion,
                            progress=partial,
                            should_stop=stop,
                            on_step=on_step,
                            mesh=data_mesh,
                        )
                    except NonFiniteLossError as e:
                        kept = (
                            f"the last good checkpoint (step {last_saved}) is kept in "
                            f"{ckpts.directory}"
                            if last_saved is not None
                            else "no epoch had finished, so no checkpoint was written"
                        )
                        raise NonFiniteLossError(
                            f"{e}; {kept}. Lower --lr, or check the data."
                        ) from None
                    partial = None
                    if not done:  # SIGINT/SIGTERM mid-epoch: save where we are, and return
                        ckpts.save_last(
                            int(state.step),
                            serialization.to_state_dict(state),
                            meta_for(epoch, progress, "running"),
                        )
                        last_saved = int(state.step)
                        status = "interrupted"
                        break
                    record = _epoch_record(
                        state, ds, config, criterion, epoch, progress, probe, data_mesh
                    )
                    history.append(record)
                    if best["val_loss"] is None or record["val_loss"] < best["val_loss"]:
                        best = {"epoch": epoch, "val_loss": record["val_loss"]}
                        ckpts.save_best(epoch, state.params, meta_for(epoch + 1, None, "running"))
                    stopped_early = (
                        config.early_stopping is not None
                        and epoch - best["epoch"] >= config.early_stopping
                    )
                    run_status = (
                        "early-stopped"
                        if stopped_early
                        else ("finished" if epoch == config.epochs else "running")
                    )
                    ckpts.save_last(
                        int(state.step),
                        serialization.to_state_dict(state),
                        meta_for(epoch + 1, None, run_status),
                    )
                    last_saved = int(state.step)
                    if primary:
                        report.write_metrics(history, workdir / "metrics.jsonl")
                    bar.console.print(_epoch_line(record))
                    if stopped_early:
                        bar.console.print(
                            f"early stopping: val loss has not improved for "
                            f"{config.early_stopping} epochs (best epoch {best['epoch']})"
                        )
                    epoch += 1
            if status != "interrupted":
                if stopped_early:
                    status = "early-stopped"
                elif epoch <= config.epochs:  # a signal came between two epochs
                    status = "interrupted"
                else:
                    status = "finished"
        finally:
            if history and primary:
                report.plot_curves(
                    history,
                    report.diagnose(history),
                    workdir / "curves.png",
                    title=f"jaxnet train: {ds.description}",
                )
    diagnosis = report.diagnose(history)
    if status == "interrupted":
        console.print(
            f"interrupted by {flag.signal or 'a signal'} at step {int(state.step)}: checkpoint "
            f"saved in {ckpts.directory}; continue with --resume"
        )
    else:
        console.print(f"diagnosis: {diagnosis.text}")
    return TrainResult(
        state=state,
        status=status,
        history=history,
        diagnosis=diagnosis,
        best_epoch=diagnosis.best_epoch,
        signal=flag.signal,
    )


def _epoch_line(r: Mapping[str, Any]) -> str:
    line = (
        f"epoch {r['epoch']:>3}: train loss {r['train_loss']:.4f} acc {r['train_accuracy']:.2%}"
        f" | val loss {r['val_loss']:.4f} acc {r['val_accuracy']:.2%} | {r['seconds']:.1f} s"
    )
    if "grad_norm_mean" in r:
        line += (
            f" | per-example grad norm mean {r['grad_norm_mean']:.3g} max {r['grad_norm_max']:.3g}"
        )
    return line


def _progress_bar(enabled: bool, console: Console) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    return Progress(
        TextColumn("epoch {task.fields[epoch]}/{task.fields[epochs]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[sps]:,.0f} samples/s"),
        TimeElapsedColumn(),
        console=console,
        disable=not enabled,
    )


# ---------------------------------------------------------------------------------------------
# Trained params in and out of a workdir
# ---------------------------------------------------------------------------------------------


def _abstract_params(num_classes: int) -> Any:
    net = Net(num_classes=num_classes)
    x = jax.ShapeDtypeStruct((1, 32, 32, 1), jnp.float32)
    return jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros(x.shape, x.dtype)))[
        "params"
    ]


def load_params(
    workdir: str | os.PathLike, which: str = "best"
) -> tuple[Any, TrainConfig, dict[str, Any]]:
    """``(params, config, meta)`` of the ``best`` (lowest val loss) or ``last`` checkpoint."""
    with checkpoint.Checkpoints(Path(workdir) / "checkpoints") as ckpts:
        _, meta = ckpts.read_meta(which)
        config = TrainConfig(**meta["config"])
        params, meta = ckpts.restore_params(_abstract_params(config.num_classes), which)
    return params, config, meta


def import_params(
    weights: str | os.PathLike,
    workdir: str | os.PathLike,
    config: TrainConfig | None = None,
    overwrite: bool = False,
) -> Any:
    """Read a PyTorch ``state_dict`` (``.pt``/``.safetensors``) into ``workdir``'s ``best``
    checkpoint, for ``jaxnet export``/``features``; ``config`` names the data it belongs to."""
    from jaxnet.convert import params_from_torch

    params = params_from_torch(weights)
    num_classes = int(params["fc3"]["bias"].shape[0])
    config = dataclasses.replace(config or TrainConfig(), num_classes=num_classes, epochs=0)
    with checkpoint.Checkpoints(Path(workdir) / "checkpoints") as ckpts:
        if ckpts.exists():
            if not overwrite:
                raise CheckpointError(
                    f"{ckpts.directory} already holds checkpoints; pass --overwrite to replace "
                    "them or choose another --workdir."
                )
            ckpts.clear()
        ckpts.save_best(0, params, {"config": config_to_json(config), "source": str(weights)})
    return params
