"""``torch.optim.lr_scheduler``'s schedules as optax schedules ``count -> value``.

Each function takes the scheduler's arguments under torch's names, after the optimizer's base
learning rate ``lr`` (torch reads it off the optimizer). The returned schedule is evaluated by
the optimizer at every step ``count = 0, 1, ...``:

* per step (``steps_per_epoch=1``, the default) it equals torch's ``scheduler.step()`` called
  after every ``optimizer.step()``: step ``k`` uses the value at ``last_epoch = k``;
* per epoch (``steps_per_epoch=n``) it equals ``scheduler.step()`` after every ``n`` optimizer
  steps: step ``k`` uses ``last_epoch = k // n``.

torch computes most of these recursively (``lr_t = lr_{t-1} * factor``); here each is the
closed form of the same recursion, evaluated in float32, or in float64 under
``jax_enable_x64``. The two agree to round-off of that dtype (checked against torch's
schedulers in ``tests/test_schedules.py``). Pass a schedule as any jaxnet optimizer's ``lr``.

``reduce_lr_on_plateau`` is the exception: driven by a metric, not by the step count, it is a
host-side ``Plateau`` state stepped once per epoch (``jaxnet.optim.plateau_step`` keeps it in
the optimizer state).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxnet.errors import ConfigError

__all__ = [
    "OneCycle",
    "Plateau",
    "ReduceLROnPlateau",
    "SCHEDULES",
    "TORCH_CLASSES",
    "cosine_annealing_lr",
    "exponential_lr",
    "linear_lr",
    "multi_step_lr",
    "one_cycle_lr",
    "reduce_lr_on_plateau",
    "step_lr",
]


def _check_steps_per_epoch(steps_per_epoch: int) -> None:
    if not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
        raise ConfigError(
            f"steps_per_epoch must be a positive int (1 = step the schedule every batch), "
            f"got {steps_per_epoch!r}."
        )


def _epoch(count: jax.Array, steps_per_epoch: int) -> jax.Array:
    return jnp.asarray(count, jnp.int32) // steps_per_epoch


def _float() -> jnp.dtype:
    """The dtype schedules compute in: float64 under ``jax_enable_x64``, else float32 (the
    optimizer casts the value to the parameters' dtype)."""
    return jax.dtypes.canonicalize_dtype(jnp.float64)


def step_lr(
    lr: float, step_size: int, gamma: float = 0.1, *, steps_per_epoch: int = 1
) -> optax.Schedule:
    """``StepLR``: ``lr * gamma ** (epoch // step_size)``."""
    _check_steps_per_epoch(steps_per_epoch)
    if not isinstance(step_size, int) or step_size < 1:
        raise ConfigError(f"step_lr: step_size must be a positive int, got {step_size!r}.")

    def schedule(count: jax.Array) -> jax.Array:
        e = _epoch(count, steps_per_epoch) // step_size
        return lr * jnp.asarray(gamma, _float()) ** e.astype(_float())

    return schedule


def multi_step_lr(
    lr: float, milestones: Sequence[int], gamma: float = 0.1, *, steps_per_epoch: int = 1
) -> optax.Schedule:
    """``MultiStepLR``: ``lr * gamma ** (number of milestones <= epoch)``.

    A milestone listed twice multiplies by ``gamma`` twice, as torch's ``Counter`` does.
    """
    _check_steps_per_epoch(steps_per_epoch)
    ms = sorted(int(m) for m in milestones)
    table = jnp.asarray(ms if ms else [2**31 - 1], jnp.int32)

    def schedule(count: jax.Array) -> jax.Array:
        e = _epoch(count, steps_per_epoch)
        passed = jnp.sum(table <= e) if ms else jnp.int32(0)  # bisect_right(ms, epoch)
        return lr * jnp.asarray(gamma, _float()) ** passed.astype(_float())

    return schedule


def exponential_lr(lr: float, gamma: float, *, steps_per_epoch: int = 1) -> optax.Schedule:
    """``ExponentialLR``: ``lr * gamma ** epoch``."""
    _check_steps_per_epoch(steps_per_epoch)

    def schedule(count: jax.Array) -> jax.Array:
        e = _epoch(count, steps_per_epoch).astype(_float())
        return lr * jnp.asarray(gamma, _float()) ** e

    return schedule


def cosine_annealing_lr(
    lr: float, T_max: int, eta_min: float = 0.0, *, steps_per_epoch: int = 1
) -> optax.Schedule:
    """``CosineAnnealingLR``: ``eta_min + (lr - eta_min) * (1 + cos(pi * epoch / T_max)) / 2``.

    torch's recursive form is this closed form at every epoch, also past ``T_max``, where it
    keeps oscillating with period ``2 * T_max`` (back up to ``lr``); ``optax.cosine_decay``
    instead stays at its minimum.
    """
    _check_steps_per_epoch(steps_per_epoch)
    if T_max <= 0:
        raise ConfigError(f"cosine_annealing_lr: T_max must be positive, got {T_max!r}.")

    def schedule(count: jax.Array) -> jax.Array:
        # Reduce modulo the period in integers first, so the cosine's argument stays small.
        e = _epoch(count, steps_per_epoch) % (2 * T_max)
        cos = jnp.cos(jnp.asarray(math.pi, _float()) * e.astype(_float()) / T_max)
        return eta_min + (lr - eta_min) * (1.0 + cos) / 2.0

    return schedule


def linear_lr(
    lr: float,
    start_factor: float = 1.0 / 3,
    end_factor: float = 1.0,
    total_iters: int = 5,
    *,
    steps_per_epoch: int = 1,
) -> optax.Schedule:
    """``LinearLR`` (warm-up): ``lr * factor``, the factor going linearly from ``start_factor``
    at epoch 0 to ``end_factor`` at ``total_iters``, then constant."""
    _check_steps_per_epoch(steps_per_epoch)
    if start_factor > 1.0 or start_factor <= 0:
        raise ConfigError(
            "Starting multiplicative factor expected to be greater than 0 and less or equal to 1."
        )
    if end_factor > 1.0 or end_factor < 0:
        raise ConfigError("Ending multiplicative factor expected to be between 0 and 1.")

    def schedule(count: jax.Array) -> jax.Array:
        e = jnp.minimum(_epoch(count, steps_per_epoch), total_iters).astype(_float())
        frac = e / total_iters if total_iters > 0 else jnp.asarray(1.0, _float())
        return lr * (start_factor + (end_factor - start_factor) * frac)

    return schedule


class OneCycle(NamedTuple):
    """OneCycleLR's two schedules: pass ``lr`` as the optimizer's ``lr`` and ``momentum`` as
    SGD's/RMSprop's ``momentum`` or as Adam's ``betas[0]`` (``None`` without cycling)."""

    lr: optax.Schedule
    momentum: optax.Schedule | None


def _one_cycle_length(
    total_steps: int | None, epochs: int | None, steps_per_epoch: int | None
) -> int:
    """OneCycleLR's ``T``, with torch's argument checks."""
    if total_steps is not None:
        if not isinstance(total_steps, int) or total_steps <= 0:
            raise ConfigError(f"Expected positive integer total_steps, but got {total_steps}")
        return total_steps
    if epochs is not None and steps_per_epoch is not None:
        if not isinstance(epochs, int) or epochs <= 0:
            raise ConfigError(f"Expected positive integer epochs, but got {epochs}")
        if not isinstance(steps_per_epoch, int) or steps_per_epoch <= 0:
            raise ConfigError(
                f"Expected positive integer steps_per_epoch, but got {steps_per_epoch}"
            )
        return epochs * steps_per_epoch
    raise ConfigError("You must define either total_steps OR (epochs AND steps_per_epoch)")


def _one_cycle_phases(
    T: int,
    pct_start: float,
    initial_lr: float,
    max_lr: float,
    min_lr: float,
    base_momentum: float,
    max_momentum: float,
    three_phase: bool,
) -> list[tuple[float, float, float, float, float]]:
    """torch's OneCycleLR phase table: ``(end_step, start_lr, end_lr, start_momentum,
    end_momentum)`` per phase."""
    if three_phase:
        return [
            (float(pct_start * T) - 1, initial_lr, max_lr, max_momentum, base_momentum),
            (float(2 * pct_start * T) - 2, max_lr, initial_lr, base_momentum, max_momentum),
            (T - 1, initial_lr, min_lr, max_momentum, max_momentum),
        ]
    return [
        (float(pct_start * T) - 1, initial_lr, max_lr, max_momentum, base_momentum),
        (T - 1, max_lr, min_lr, base_momentum, max_momentum),
    ]


def _one_cycle_schedule(
    T: int,
    phases: list[tuple[float, float, float, float, float]],
    which: int,
    anneal_strategy: str,
) -> optax.Schedule:
    """OneCycleLR's lr (``which=1``) or momentum (``which=3``) over ``phases``."""

    def anneal(start: float, end: float, pct: jax.Array) -> jax.Array:
        if anneal_strategy == "cos":
            return end + (start - end) / 2.0 * (jnp.cos(jnp.asarray(math.pi, pct.dtype) * pct) + 1)
        return (end - start) * pct + start

    def schedule(count: jax.Array) -> jax.Array:
        step = jnp.asarray(count, jnp.int32).astype(_float())
        value = jnp.asarray(jnp.nan, _float())
        # torch takes the first phase with step <= end_step (the last one otherwise): fill
        # from the last phase backwards so that earlier phases win.
        start_steps = [0.0] + [p[0] for p in phases[:-1]]
        for i in reversed(range(len(phases))):
            end_step = phases[i][0]
            pct = (step - start_steps[i]) / (end_step - start_steps[i])
            v = anneal(phases[i][which], phases[i][which + 1], pct)
            value = v if i == len(phases) - 1 else jnp.where(step <= end_step, v, value)
        return jnp.where(step <= T, value, jnp.nan)

    return schedule


def one_cycle_lr(
    max_lr: float,
    total_steps: int | None = None,
    epochs: int | None = None,
    steps_per_epoch: int | None = None,
    pct_start: float = 0.3,
    anneal_strategy: Literal["cos", "linear"] = "cos",
    cycle_momentum: bool = True,
    base_momentum: float = 0.85,
    max_momentum: float = 0.95,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    three_phase: bool = False,
) -> OneCycle:
    """``OneCycleLR``, always stepped per batch, with torch's phase boundaries.

    Phases (``T = total_steps``, or ``epochs * steps_per_epoch``): the learning rate goes from
    ``max_lr / div_factor`` up to ``max_lr`` at step ``pct_start * T - 1``, then down to
    ``max_lr / div_factor / final_div_factor`` at step ``T - 1`` (three-phase: back to the
    initial lr at ``2 * pct_start * T - 2`` first). The momentum (or beta1) runs the other
    way between ``max_momentum`` and ``base_momentum``. (optax's ``cosine_onecycle_schedule``
    puts the boundaries at ``int(pct_start * T)`` and ``T`` and has no momentum.)

    torch raises when stepped more than ``T`` times; the schedules here return NaN there.
    """
    T = _one_cycle_length(total_steps, epochs, steps_per_epoch)
    if not isinstance(pct_start, float) or not 0 <= pct_start <= 1:
        raise ConfigError(f"Expected float between 0 and 1 pct_start, but got {pct_start}")
    if anneal_strategy not in ("cos", "linear"):
        raise ConfigError(
            f"anneal_strategy must be one of 'cos' or 'linear', instead got {anneal_strategy}"
        )
    initial_lr = max_lr / div_factor
    # (end_step, start_lr, end_lr, start_momentum, end_momentum), exactly torch's table.
    phases = _one_cycle_phases(
        T,
        pct_start,
        initial_lr,
        max_lr,
        initial_lr / final_div_factor,
        base_momentum,
        max_momentum,
        three_phase,
    )

    def make(which: int) -> optax.Schedule:
        return _one_cycle_schedule(T, phases, which, anneal_strategy)

    return OneCycle(lr=make(1), momentum=make(3) if cycle_momentum else None)


class Plateau(NamedTuple):
    """``ReduceLROnPlateau``'s state, in Python floats as torch keeps it: the ``lr`` it sets,
    the ``best`` metric so far, ``last_epoch`` (``step`` calls), ``num_bad_epochs`` and
    ``cooldown_counter``."""

    lr: float
    best: float
    last_epoch: int = 0
    num_bad_epochs: int = 0
    cooldown_counter: int = 0


@dataclasses.dataclass(frozen=True)
class ReduceLROnPlateau:
    """``torch.optim.lr_scheduler.ReduceLROnPlateau``'s rule (one parameter group): ``init``
    its state, ``step`` it on a metric. Pure functions of Python floats, the same arithmetic
    as torch's, so the lrs are torch's bit for bit. Made by ``reduce_lr_on_plateau``."""

    mode: str = "min"
    factor: float = 0.1
    patience: int = 10
    threshold: float = 1e-4
    threshold_mode: str = "rel"
    cooldown: int = 0
    min_lr: float = 0.0
    eps: float = 1e-8

    def init(self, lr: float) -> Plateau:
        """The state before the first ``step``: ``best`` is the worst value of ``mode``."""
        return Plateau(lr=float(lr), best=math.inf if self.mode == "min" else -math.inf)

    def is_better(self, a: float, best: float) -> bool:
        """torch's ``_is_better``: better than ``best`` by more than ``threshold``."""
        if self.mode == "min" and self.threshold_mode == "rel":
            return a < best * (1.0 - self.threshold)
        if self.mode == "min":
            return a < best - self.threshold
        if self.threshold_mode == "rel":
            return a > best * (self.threshold + 1.0)
        return a > best + self.threshold

    def step(self, state: Plateau, metric: float) -> Plateau:
        """One ``scheduler.step(metric)``: after ``patience`` epochs without improvement (and
        outside ``cooldown``), ``lr = max(lr * factor, min_lr)`` unless that changes it by
        ``eps`` or less. A NaN metric counts as no improvement, as in torch."""
        current = float(metric)
        lr, best, bad, cooldown = (
            state.lr,
            state.best,
            state.num_bad_epochs + 1,
            state.cooldown_counter,
        )
        if self.is_better(current, best):
            best, bad = current, 0
        if cooldown > 0:
            cooldown, bad = cooldown - 1, 0
        if bad > self.patience:
            new_lr = max(lr * self.factor, self.min_lr)
            if lr - new_lr > self.eps:
                lr = new_lr
            cooldown, bad = self.cooldown, 0
        return Plateau(lr, best, state.last_epoch + 1, bad, cooldown)

    def replay(self, lr: float, metrics: Sequence[float]) -> list[float]:
        """The lr after each ``step`` over ``metrics``, from base ``lr``: what torch's scheduler
        sets for the epoch after each metric."""
        state, out = self.init(lr), []
        for m in metrics:
            state = self.step(state, m)
            out.append(state.lr)
        return out


def reduce_lr_on_plateau(
    lr: float,
    mode: Literal["min", "max"] = "min",
    factor: float = 0.1,
    patience: int = 10,
    threshold: float = 1e-4,
    threshold_mode: Literal["rel", "abs"] = "rel",
    cooldown: int = 0,
    min_lr: float = 0.0,
    eps: float = 1e-8,
) -> ReduceLROnPlateau:
    """``ReduceLROnPlateau`` with torch's arguments, defaults and checks (``lr`` is only
    checked: the rule starts from the optimizer's lr). ``jaxnet train --schedule
    reduce_lr_on_plateau`` steps it once per epoch on the validation loss."""
    del lr
    if factor >= 1.0:
        raise ConfigError("Factor should be < 1.0.")
    if mode not in {"min", "max"}:
        raise ConfigError("mode " + str(mode) + " is unknown! Give 'min' or 'max'.")
    if threshold_mode not in {"rel", "abs"}:
        raise ConfigError(
            "threshold mode " + str(threshold_mode) + " is unknown! Give 'rel' or 'abs'."
        )
    return ReduceLROnPlateau(
        mode, factor, patience, threshold, threshold_mode, cooldown, min_lr, eps
    )


SCHEDULES = {
    "step_lr": step_lr,
    "multi_step_lr": multi_step_lr,
    "exponential_lr": exponential_lr,
    "cosine_annealing_lr": cosine_annealing_lr,
    "linear_lr": linear_lr,
    "one_cycle_lr": one_cycle_lr,
    "reduce_lr_on_plateau": reduce_lr_on_plateau,
}
"""The schedules by name (torch's class name in snake case)."""

TORCH_CLASSES = {
    "step_lr": "StepLR",
    "multi_step_lr": "MultiStepLR",
    "exponential_lr": "ExponentialLR",
    "cosine_annealing_lr": "CosineAnnealingLR",
    "linear_lr": "LinearLR",
    "one_cycle_lr": "OneCycleLR",
    "reduce_lr_on_plateau": "ReduceLROnPlateau",
}
"""The ``torch.optim.lr_scheduler`` class of each of ``SCHEDULES``."""
