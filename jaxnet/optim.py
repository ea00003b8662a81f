"""``torch.optim`` optimizers as optax ``GradientTransformation``s, with torch's semantics,
argument names and defaults. Built from optax pieces; a custom transform only where optax has
no equivalent, each saying which torch behaviour it reproduces. Every computation is in the
parameters' dtype: under ``jax_enable_x64`` with float64 parameters, torch float64's numbers.

State layout (what ``torch.optim``'s ``state_dict`` maps to). Each optimizer is an
``optax.chain``; its state is a tuple with one entry per part, in this order, parts that are
off being absent:

* ``maximize``: ``EmptyState()``; L2 ``weight_decay``: ``EmptyState()``;
* the direction: the optimizer's own state (below); with a scheduled ``momentum``/``betas[0]``
  (OneCycleLR) wrapped as ``InjectHyperparamsState(count, hyperparams, inner_state)``;
* decoupled weight decay (AdamW, ``decoupled_weight_decay=True``): ``EmptyState()``;
* the lr: ``EmptyState()`` for a constant, ``ScaleByScheduleState(count)`` for a schedule.

Directions, with torch's names: SGD: ``TraceState(trace=momentum_buffer)`` (zeros before the
first step equal torch's "no buffer yet"), ``DampenedMomentumState(count, buf)`` with
dampening, none without momentum. Adam/AdamW: ``ScaleByTorchAdamState(count=step,
mu=exp_avg, nu=exp_avg_sq, nu_max=max_exp_avg_sq or None)``. RMSprop:
``ScaleByRmsState(nu=square_avg)`` or, centered, ``ScaleByRStdDevState(mu=grad_avg,
nu=square_avg)``, then ``TraceState(trace=momentum_buffer)`` with momentum. Adagrad:
``ScaleByTorchAdagradState(count=step, sum)``. Adamax: ``ScaleByTorchAdamaxState(count=step,
mu=exp_avg, nu=exp_inf)``. NAdam: ``ScaleByTorchNAdamState(count=step, mu_product,
mu=exp_avg, nu=exp_avg_sq)``. RAdam: ``optax.ScaleByAdamState(count=step, mu=exp_avg,
nu=exp_avg_sq)``. Adadelta: ``optax.ScaleByAdaDeltaState(e_g=square_avg, e_x=acc_delta)``
(torch's step count is unused by its update). ``reduce_lr_on_plateau``: ``(chain state,
PlateauLrState)``.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnet import schedules
from jaxnet.errors import ConfigError

__all__ = [
    "DEFAULTS",
    "OPTIMIZERS",
    "TORCH_CLASSES",
    "OptimizerSpec",
    "PlateauLrState",
    "PlateauTransformation",
    "ScalarOrSchedule",
    "ScaleByTorchAdagradState",
    "ScaleByTorchAdamState",
    "ScaleByTorchAdamaxState",
    "ScaleByTorchNAdamState",
    "adadelta",
    "adagrad",
    "adam",
    "adamax",
    "adamw",
    "build",
    "lr_at",
    "nadam",
    "plateau_of",
    "plateau_state",
    "plateau_step",
    "radam",
    "resolve",
    "rmsprop",
    "scale_by_torch_adagrad",
    "scale_by_torch_adam",
    "scale_by_torch_adamax",
    "scale_by_torch_nadam",
    "scale_by_torch_radam",
    "sgd",
    "torch_dampened_momentum",
    "transform",
    "with_plateau_lr",
]

ScalarOrSchedule = float | optax.Schedule
"""A constant, or an optax schedule ``count -> value`` evaluated at every step (count from 0)."""


def _with_schedules(
    factory: Callable[..., optax.GradientTransformation],
    static_args: tuple[str, ...] = (),
    **hyperparams: Any,
) -> optax.GradientTransformation:
    """``factory(**hyperparams)``; when a hyperparameter is a schedule, wrapped by
    ``optax.inject_hyperparams`` so that step ``k`` uses ``schedule(k)``, as torch's schedulers
    set ``param_group[name]`` before step ``k`` (used for OneCycleLR's momentum/beta1 cycling).
    """
    if any(callable(v) for k, v in hyperparams.items() if k not in static_args):
        return optax.inject_hyperparams(factory, static_args=static_args)(**hyperparams)
    return factory(**hyperparams)


def _check_lr(lr: ScalarOrSchedule) -> None:
    if not callable(lr) and not lr >= 0.0:
        raise ConfigError(f"Invalid learning rate: {lr}; give a value >= 0.")


def _check_range(name: str, value: Any, low: float, high: float | None = None) -> None:
    """torch's argument checks (``0 <= value`` or ``0 <= value < high``) with torch's message,
    then what to give instead; schedules pass."""
    if callable(value):
        return
    if not low <= value or (high is not None and not value < high):
        want = f">= {low:g}" if high is None else f"in [{low:g}, {high:g})"
        raise ConfigError(f"Invalid {name}: {value}; give a value {want}.")


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

    ``lr`` and ``momentum`` may be optax schedules ``step -> value`` (``momentum`` for
    ``jaxnet.schedules.one_cycle_lr``'s cycling). Raises ``ValueError`` for the combinations
    torch rejects (negative values; nesterov without momentum or with dampening).
    """
    _check_lr(lr)
    _check_range("momentum value", momentum, 0.0)
    _check_range("weight_decay value", weight_decay, 0.0)
    if nesterov and ((not callable(momentum) and momentum <= 0) or dampening != 0):
        raise ConfigError("Nesterov momentum requires a momentum and zero dampening")

    parts: list[optax.GradientTransformation] = []
    if maximize:
        parts.append(optax.scale(-1.0))
    if weight_decay != 0:
        parts.append(optax.add_decayed_weights(weight_decay))
    if momentum != 0:
        if dampening == 0:
            parts.append(
                _with_schedules(optax.trace, ("nesterov",), decay=momentum, nesterov=nesterov)
            )
        else:
            parts.append(
                _with_schedules(
                    torch_dampened_momentum,
                    ("nesterov",),
                    momentum=momentum,
                    dampening=dampening,
                    nesterov=nesterov,
                )
            )
    parts.append(optax.scale_by_learning_rate(lr))
    return optax.chain(*parts)


class ScaleByTorchAdamState(NamedTuple):
    """torch.optim.Adam's per-parameter state: ``step``, ``exp_avg``, ``exp_avg_sq`` and
    ``max_exp_avg_sq`` (AMSGrad only; ``None`` otherwise)."""

    count: jax.Array
    mu: Any
    nu: Any
    nu_max: Any


def _torch_bias_correction(beta: Any, count: jax.Array, dtype: Any) -> jax.Array:
    """``1 - beta**count`` in ``dtype`` (the parameters'), as exact as torch's float64 Python
    float rounded to ``dtype``.

    optax computes ``1 - beta**count`` in float32 from ``beta`` rounded to float32: for
    ``beta2 = 0.999`` that is 0.99900001 and ``1 - beta2`` is off by 1.3e-5 relative, which
    moves every early Adam update by ~6e-6 relative, far above float32 round-off. Here
    ``log(beta)`` is taken in float64 (Python) for constant betas and the power is formed as
    ``-expm1(count * log(beta))`` in ``dtype``, which loses nothing to cancellation: in float64
    it agrees with torch's ``1 - beta**step`` to a few ulps.
    """
    t = count.astype(dtype)
    if isinstance(beta, int | float):
        log_beta = math.log(beta) if beta > 0 else -math.inf
        return -jnp.expm1(t * jnp.asarray(log_beta, dtype))
    # A scheduled beta1 (OneCycleLR), injected in the parameters' dtype.
    return 1.0 - jnp.asarray(beta, dtype) ** t


def scale_by_torch_adam(
    b1: Any = 0.9, b2: float = 0.999, eps: float = 1e-8, amsgrad: bool = False
) -> optax.GradientTransformation:
    """The direction of ``torch.optim.Adam``'s step, before the learning rate.

    With ``m``, ``v`` the running moments (``m = b1*m + (1-b1)*g``, ``v = b2*v + (1-b2)*g**2``)
    at step ``t`` (from 1)::

        v_used = max(v_used, v) if amsgrad else v
        out = (m / (1 - b1**t)) / (sqrt(v_used) / sqrt(1 - b2**t) + eps)

    A custom transform because optax differs from torch in two ways this reproduces:

    * torch's AMSGrad keeps the maximum of the *raw* second moment and divides it by the
      *current* bias correction; ``optax.scale_by_amsgrad`` keeps the maximum of the
      bias-corrected moment, which differs whenever the maximum is an earlier step's;
    * torch's bias corrections are float64 Python floats (see ``_torch_bias_correction``).

    ``eps`` is outside the square root (optax ``eps_root=0``). ``b1`` may be a scalar array
    (injected by ``optax.inject_hyperparams`` for OneCycleLR's beta1 cycling).
    """

    def init_fn(params: Any) -> ScaleByTorchAdamState:
        zeros = optax.tree.zeros_like(params)
        return ScaleByTorchAdamState(
            count=jnp.zeros([], jnp.int32),
            mu=zeros,
            nu=optax.tree.zeros_like(params),
            nu_max=optax.tree.zeros_like(params) if amsgrad else None,
        )

    def update_fn(updates: Any, state: ScaleByTorchAdamState, params: Any = None):
        del params
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
        count = optax.safe_increment(state.count)
        nu_max = jax.tree.map(jnp.maximum, state.nu_max, nu) if amsgrad else None

        def direction(m: jax.Array, v: jax.Array) -> jax.Array:
            bc1 = _torch_bias_correction(b1, count, m.dtype)
            bc2_sqrt = jnp.sqrt(_torch_bias_correction(b2, count, m.dtype))
            return (m / bc1) / (jnp.sqrt(v) / bc2_sqrt + eps)

        out = jax.tree.map(direction, mu, nu_max if amsgrad else nu)
        return out, ScaleByTorchAdamState(count=count, mu=mu, nu=nu, nu_max=nu_max)

    return optax.GradientTransformation(init_fn, update_fn)


def adam(
    lr: ScalarOrSchedule = 1e-3,
    betas: tuple[ScalarOrSchedule, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    *,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
) -> optax.GradientTransformation:
    """``torch.optim.Adam``.

    Per parameter ``p`` with gradient ``g`` at step ``t`` (from 1)::

        g = -g                                     if maximize
        g = g + weight_decay * p                   (L2, unless decoupled_weight_decay)
        p = p * (1 - lr * weight_decay)            (if decoupled_weight_decay: AdamW)
        m = b1 * m + (1 - b1) * g;  v = b2 * v + (1 - b2) * g**2
        v_max = max(v_max, v)                      if amsgrad (raw v, see scale_by_torch_adam)
        p = p - lr / (1 - b1**t) * m / (sqrt(v or v_max) / sqrt(1 - b2**t) + eps)

    ``lr`` and ``betas[0]`` may be schedules (``betas[0]`` for OneCycleLR's beta1 cycling).
    Raises ``ValueError`` where torch does (negative lr/eps/weight_decay, betas outside [0, 1)).
    """
    b1, b2 = betas
    _check_lr(lr)
    _check_range("epsilon value", eps, 0.0)
    _check_range("beta parameter at index 0", b1, 0.0, 1.0)
    _check_range("beta parameter at index 1", b2, 0.0, 1.0)
    _check_range("weight_decay value", weight_decay, 0.0)
    if callable(b2):
        raise ConfigError("adam: betas[1] cannot be a schedule (torch's OneCycleLR cycles beta1).")

    parts: list[optax.GradientTransformation] = []
    if maximize:
        parts.append(optax.scale(-1.0))
    if weight_decay != 0 and not decoupled_weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay))
    parts.append(
        _with_schedules(
            scale_by_torch_adam, ("b2", "eps", "amsgrad"), b1=b1, b2=b2, eps=eps, amsgrad=amsgrad
        )
    )
    if weight_decay != 0 and decoupled_weight_decay:
        # torch: p *= 1 - lr * wd before the Adam step; optax: update -= lr * wd * p. Same sum.
        parts.append(optax.add_decayed_weights(weight_decay))
    parts.append(optax.scale_by_learning_rate(lr))
    return optax.chain(*parts)


def adamw(
    lr: ScalarOrSchedule = 1e-3,
    betas: tuple[ScalarOrSchedule, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    amsgrad: bool = False,
    *,
    maximize: bool = False,
) -> optax.GradientTransformation:
    """``torch.optim.AdamW``: ``adam`` with decoupled weight decay ``p *= 1 - lr * wd``.

    torch's default ``weight_decay`` is 1e-2 (``optax.adamw``'s is 1e-4).
    """
    return adam(
        lr,
        betas,
        eps,
        weight_decay,
        amsgrad,
        maximize=maximize,
        decoupled_weight_decay=True,
    )


def rmsprop(
    lr: ScalarOrSchedule = 1e-2,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum: ScalarOrSchedule = 0.0,
    centered: bool = False,
    *,
    maximize: bool = False,
) -> optax.GradientTransformation:
    """``torch.optim.RMSprop``.

    Per parameter ``p`` with gradient ``g``::

        g = -g                                  if maximize
        g = g + weight_decay * p
        v = alpha * v + (1 - alpha) * g**2      (v starts at 0)
        a = alpha * a + (1 - alpha) * g         (centered only)
        d = sqrt(v - a**2 if centered else v) + eps   (eps outside the square root)
        buf = momentum * buf + g / d; p = p - lr * buf   if momentum (or a schedule)
        p = p - lr * g / d                               otherwise

    Built from optax's ``scale_by_rms``/``scale_by_stddev`` (``initial_scale=0``,
    ``eps_in_sqrt=False``) and ``trace``. ``lr`` and ``momentum`` may be schedules.
    """
    _check_lr(lr)
    _check_range("epsilon value", eps, 0.0)
    _check_range("momentum value", momentum, 0.0)
    _check_range("weight_decay value", weight_decay, 0.0)
    _check_range("alpha value", alpha, 0.0)

    parts: list[optax.GradientTransformation] = []
    if maximize:
        parts.append(optax.scale(-1.0))
    if weight_decay != 0:
        parts.append(optax.add_decayed_weights(weight_decay))
    scale = optax.scale_by_stddev if centered else optax.scale_by_rms
    parts.append(scale(decay=alpha, eps=eps, initial_scale=0.0, eps_in_sqrt=False))
    if callable(momentum) or momentum > 0:
        parts.append(_with_schedules(optax.trace, ("nesterov",), decay=momentum, nesterov=False))
    parts.append(optax.scale_by_learning_rate(lr))
    return optax.chain(*parts)


def _torch_chain(
    direction: optax.GradientTransformation,
    lr: ScalarOrSchedule,
    weight_decay: float,
    maximize: bool,
    decoupled_weight_decay: bool = False,
) -> optax.GradientTransformation:
    """torch's order around an optimizer's ``direction``: negate (``maximize``), L2 decay
    ``g + wd * p`` (or, decoupled, ``p *= 1 - lr * wd``, which is ``-lr * (d + wd * p)`` as an
    update), then ``-lr`` times the result."""
    parts: list[optax.GradientTransformation] = []
    if maximize:
        parts.append(optax.scale(-1.0))
    if weight_decay != 0 and not decoupled_weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay))
    parts.append(direction)
    if weight_decay != 0 and decoupled_weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay))
    parts.append(optax.scale_by_learning_rate(lr))
    return optax.chain(*parts)


def _check_betas(lr: ScalarOrSchedule, betas: tuple[Any, Any], eps: float, wd: float) -> None:
    """Adam-family checks, in torch's order and words."""
    _check_lr(lr)
    _check_range("epsilon value", eps, 0.0)
    _check_range("beta parameter at index 0", betas[0], 0.0, 1.0)
    _check_range("beta parameter at index 1", betas[1], 0.0, 1.0)
    _check_range("weight_decay value", wd, 0.0)
    if callable(betas[1]):
        raise ConfigError("betas[1] cannot be a schedule (torch's OneCycleLR cycles beta1 only).")


class ScaleByTorchAdagradState(NamedTuple):
    """torch.optim.Adagrad's state: ``count`` (torch's ``step``) and ``sum`` (torch's ``sum``,
    per parameter, starting at ``initial_accumulator_value``)."""

    count: jax.Array
    sum: Any


def scale_by_torch_adagrad(
    lr_decay: float = 0.0, initial_accumulator_value: float = 0.0, eps: float = 1e-10
) -> optax.GradientTransformation:
    """The direction of ``torch.optim.Adagrad``'s step at step ``t`` (from 1)::

        sum = sum + g**2
        out = g / (sqrt(sum) + eps) / (1 + (t - 1) * lr_decay)

    A custom transform: ``optax.scale_by_rss`` puts ``eps`` inside the square root and has no
    ``lr_decay``.
    """

    def init_fn(params: Any) -> ScaleByTorchAdagradState:
        return ScaleByTorchAdagradState(
            count=jnp.zeros([], jnp.int32),
            sum=jax.tree.map(lambda p: jnp.full_like(p, initial_accumulator_value), params),
        )

    def update_fn(updates: Any, state: ScaleByTorchAdagradState, params: Any = None):
        del params
        count = optax.safe_increment(state.count)
        sums = jax.tree.map(lambda g, s: s + g * g, updates, state.sum)

        def direction(g: jax.Array, s: jax.Array) -> jax.Array:
            decay = 1.0 + (count - 1).astype(g.dtype) * lr_decay
            return g / (jnp.sqrt(s) + eps) / decay

        out = jax.tree.map(direction, updates, sums)
        return out, ScaleByTorchAdagradState(count=count, sum=sums)

    return optax.GradientTransformation(init_fn, update_fn)


def adagrad(
    lr: ScalarOrSchedule = 1e-2,
    lr_decay: float = 0.0,
    weight_decay: float = 0.0,
    initial_accumulator_value: float = 0.0,
    eps: float = 1e-10,
    *,
    maximize: bool = False,
) -> optax.GradientTransformation:
    """``torch.optim.Adagrad``.

    Per parameter ``p`` with gradient ``g`` at step ``t`` (from 1)::

        g = -g                                  if maximize
        g = g + weight_decay * p
        sum = sum + g**2                        (sum starts at initial_accumulator_value)
        p = p - lr / (1 + (t - 1) * lr_decay) * g / (sqrt(sum) + eps)

    State: ``(ScaleByTorchAdagradState(count, sum), ...)`` inside the chain of
    ``_torch_chain`` (negate/decay parts only when used, ``ScaleByLearningRate`` last).
    """
    _check_lr(lr)
    _check_range("lr_decay value", lr_decay, 0.0)
    _check_range("weight_decay value", weight_decay, 0.0)
    _check_range("initial_accumulator_value value", initial_accumulator_value, 0.0)
    _check_range("epsilon value", eps, 0.0)
    direction = scale_by_torch_adagrad(lr_decay, initial_accumulator_value, eps)
    return _torch_chain(direction, lr, weight_decay, maximize)


class ScaleByTorchAdamaxState(NamedTuple):
    """torch.optim.Adamax's state: ``count`` (``step``), ``mu`` (``exp_avg``) and ``nu``
    (``exp_inf``), per parameter."""

    count: jax.Array
    mu: Any
    nu: Any


def scale_by_torch_adamax(
    b1: Any = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> optax.GradientTransformation:
    """The direction of ``torch.optim.Adamax``'s step at step ``t`` (from 1)::

        m = b1 * m + (1 - b1) * g
        u = max(b2 * u, |g| + eps)
        out = m / u / (1 - b1**t)

    optax's moment updates (``update_moment``, ``update_infinity_moment``); custom only for
    the bias correction in the parameters' dtype (``_torch_bias_correction``).
    """

    def init_fn(params: Any) -> ScaleByTorchAdamaxState:
        zeros = optax.tree.zeros_like
        return ScaleByTorchAdamaxState(jnp.zeros([], jnp.int32), zeros(params), zeros(params))

    def update_fn(updates: Any, state: ScaleByTorchAdamaxState, params: Any = None):
        del params
        count = optax.safe_increment(state.count)
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        nu = optax.tree.update_infinity_moment(updates, state.nu, b2, eps)
        out = jax.tree.map(lambda m, u: m / u / _torch_bias_correction(b1, count, m.dtype), mu, nu)
        return out, ScaleByTorchAdamaxState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def adamax(
    lr: ScalarOrSchedule = 2e-3,
    betas: tuple[ScalarOrSchedule, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    maximize: bool = False,
) -> optax.GradientTransformation:
    """``torch.optim.Adamax``.

    Per parameter ``p`` with gradient ``g`` at step ``t`` (from 1)::

        g = -g                                  if maximize
        g = g + weight_decay * p
        m = b1 * m + (1 - b1) * g;  u = max(b2 * u, |g| + eps)
        p = p - lr / (1 - b1**t) * m / u

    ``betas[0]`` may be a schedule (OneCycleLR). State: ``ScaleByTorchAdamaxState``.
    """
    _check_betas(lr, betas, eps, weight_decay)
    direction = _with_schedules(
        scale_by_torch_adamax, ("b2", "eps"), b1=betas[0], b2=betas[1], eps=eps
    )
    return _torch_chain(direction, lr, weight_decay, maximize)


class ScaleByTorchNAdamState(NamedTuple):
    """torch.optim.NAdam's state: ``count`` (``step``), ``mu_product`` (a scalar in the
    parameters' widest dtype: torch keeps one per parameter, all equal, in torch's default
    dtype), ``mu`` (``exp_avg``) and ``nu`` (``exp_avg_sq``)."""

    count: jax.Array
    mu_product: jax.Array
    mu: Any
    nu: Any


def _nadam_mu(b1: Any, t: jax.Array, momentum_decay: float) -> jax.Array:
    """NAdam's momentum cache ``b1 * (1 - 0.5 * 0.96**(t * momentum_decay))`` in ``t``'s dtype."""
    return b1 * (1.0 - 0.5 * jnp.exp(t * momentum_decay * math.log(0.96)))


def scale_by_torch_nadam(
    b1: Any = 0.9, b2: float = 0.999, eps: float = 1e-8, momentum_decay: float = 4e-3
) -> optax.GradientTransformation:
    """The direction of ``torch.optim.NAdam``'s step at step ``t`` (from 1)::

        mu_t = b1 * (1 - 0.5 * 0.96**(t * momentum_decay));  prod_t = mu_1 * ... * mu_t
        m = b1 * m + (1 - b1) * g;  v = b2 * v + (1 - b2) * g**2
        d = sqrt(v / (1 - b2**t)) + eps
        out = (1 - mu_t) / (1 - prod_t) * g / d + mu_{t+1} / (1 - prod_t * mu_{t+1}) * m / d

    A custom transform: ``optax.nadam`` has no momentum decay (its ``mu_t`` is ``b1``).
    """

    def init_fn(params: Any) -> ScaleByTorchNAdamState:
        dtype = optax.tree.dtype(params, "highest")
        zeros = optax.tree.zeros_like
        return ScaleByTorchNAdamState(
            jnp.zeros([], jnp.int32), jnp.ones([], dtype), zeros(params), zeros(params)
        )

    def update_fn(updates: Any, state: ScaleByTorchNAdamState, params: Any = None):
        del params
        count = optax.safe_increment(state.count)
        t = count.astype(state.mu_product.dtype)
        mu_t, mu_next = _nadam_mu(b1, t, momentum_decay), _nadam_mu(b1, t + 1, momentum_decay)
        prod = state.mu_product * mu_t
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)

        def direction(g: jax.Array, m: jax.Array, v: jax.Array) -> jax.Array:
            d = jnp.sqrt(v / _torch_bias_correction(b2, count, v.dtype)) + eps
            c_g = ((1.0 - mu_t) / (1.0 - prod)).astype(g.dtype)
            c_m = (mu_next / (1.0 - prod * mu_next)).astype(g.dtype)
            return c_g * (g / d) + c_m * (m / d)

        out = jax.tree.map(direction, updates, mu, nu)
        return out, ScaleByTorchNAdamState(count=count, mu_product=prod, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def nadam(
    lr: ScalarOrSchedule = 2e-3,
    betas: tuple[ScalarOrSchedule, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum_decay: float = 4e-3,
    decoupled_weight_decay: bool = False,
    *,
    maximize: bool = False,
) -> optax.GradientTransformation:
    """``torch.optim.NAdam``.

    Per parameter ``p`` with gradient ``g`` at step ``t`` (from 1)::

        g = -g                                  if maximize
        g = g + weight_decay * p                (L2, unless decoupled_weight_decay)
        p = p * (1 - lr * weight_decay)         (if decoupled_weight_decay: NAdamW)
        p = p - lr * out                        (out: see scale_by_torch_nadam)

    ``betas[0]`` may be a schedule (OneCycleLR). State: ``ScaleByTorchNAdamState``.
    """
    _check_betas(lr, betas, eps, weight_decay)
    _check_range("momentum_decay value", momentum_decay, 0.0)
    direction = _with_schedules(
        scale_by_torch_nadam,
        ("b2", "eps", "momentum_decay"),
        b1=betas[0],
        b2=betas[1],
        eps=eps,
        momentum_decay=momentum_decay,
    )
    return _torch_chain(direction, lr, weight_decay, maximize, decoupled_weight_decay)


def _one_minus_z_over_expm1(z: jax.Array) -> jax.Array:
    """``1 - z / expm1(z)`` for ``z > 0`` without cancellation: below 1 as
    ``z**2 * phi(z) / expm1(z)`` with ``phi(z) = (expm1(z) - z) / z**2`` by its Taylor series;
    above 1 directly (``z / expm1(z) < 0.59`` there: nothing cancels, and an overflowing
    ``expm1`` gives 1)."""
    small, large = jnp.minimum(z, 1.0), jnp.maximum(z, 1.0)
    phi = jnp.zeros_like(z)
    for k in reversed(range(18)):  # Horner: the sum of small**k / (k + 2)!
        phi = phi * small + 1.0 / math.factorial(k + 2)
    return jnp.where(
        z < 1.0, small * small * phi / jnp.expm1(small), 1.0 - large / jnp.expm1(large)
    )


def _radam_rho(b2: float, t: jax.Array) -> jax.Array:
    """RAdam's ``rho_t = rho_inf - 2 t b2**t / (1 - b2**t)``, ``rho_inf = 2 / (1 - b2) - 1``.

    Written as ``K + (2 / L) * (1 - z / expm1(z))`` with ``L = -log(b2)``, ``z = t L`` and
    ``K = rho_inf - 2 / L`` taken in float64: the direct form subtracts two numbers near
    ``rho_inf`` (~2000 for b2 = 0.999), which in float32 leaves ``rho_t`` ~1e-4 off and the
    rectification ``r_t`` with it; this form keeps ``rho_t`` to a few ulps in any dtype.
    """
    log_b2 = -math.log(b2)
    k = (2.0 / (1.0 - b2) - 1.0) - 2.0 / log_b2
    return k + (2.0 / log_b2) * _one_minus_z_over_expm1(t * log_b2)


def scale_by_torch_radam(
    b1: Any = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> optax.GradientTransformation:
    """The direction of ``torch.optim.RAdam``'s step at step ``t`` (from 1)::

        m = b1 * m + (1 - b1) * g;  v = b2 * v + (1 - b2) * g**2
        rho_inf = 2 / (1 - b2) - 1;  rho_t = rho_inf - 2 t b2**t / (1 - b2**t)
        r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))
        out = m / (1 - b1**t) * r_t * sqrt(1 - b2**t) / (sqrt(v) + eps)   if rho_t > 5
        out = m / (1 - b1**t)                                              otherwise

    A custom transform: ``optax.scale_by_radam`` puts ``eps`` after the bias correction
    (``sqrt(v / (1 - b2**t)) + eps``) and switches at ``rho_t >= 5``. State:
    ``optax.ScaleByAdamState(count, mu, nu)``.
    """
    rho_inf = 2.0 / (1.0 - b2) - 1.0

    def update_fn(updates: Any, state: optax.ScaleByAdamState, params: Any = None):
        del params
        count = optax.safe_increment(state.count)
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)

        def direction(m: jax.Array, v: jax.Array) -> jax.Array:
            m_hat = m / _torch_bias_correction(b1, count, m.dtype)
            if rho_inf <= 5.0:  # b2 <= 2/3: rho_t < rho_inf never exceeds 5
                return m_hat
            rho = _radam_rho(b2, count.astype(m.dtype))
            rect = jnp.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
            bc2_sqrt = jnp.sqrt(_torch_bias_correction(b2, count, m.dtype))
            adaptive = bc2_sqrt / (jnp.sqrt(v) + eps)
            return jnp.where(rho > 5.0, m_hat * adaptive * rect, m_hat)

        out = jax.tree.map(direction, mu, nu)
        return out, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    def init_fn(params: Any) -> optax.ScaleByAdamState:
        zeros = optax.tree.zeros_like
        return optax.ScaleByAdamState(jnp.zeros([], jnp.int32), zeros(params), zeros(params))

    return optax.GradientTransformation(init_fn, update_fn)


def radam(
    lr: ScalarOrSchedule = 1e-3,
    betas: tuple[ScalarOrSchedule, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    *,
    maximize: bool = False,
) -> optax.GradientTransformation:
    """``torch.optim.RAdam``.

    Per parameter ``p`` with gradient ``g`` at step ``t`` (from 1)::

        g = -g                                  if maximize
        g = g + weight_decay * p                (L2, unless decoupled_weight_decay)
        p = p * (1 - lr * weight_decay)         (if decoupled_weight_decay)
        p = p - lr * out                        (out: see scale_by_torch_radam)

    ``betas[0]`` may be a schedule (OneCycleLR). State: ``optax.ScaleByAdamState``.
    """
    _check_betas(lr, betas, eps, weight_decay)
    direction = _with_schedules(
        scale_by_torch_radam, ("b2", "eps"), b1=betas[0], b2=betas[1], eps=eps
    )
    return _torch_chain(direction, lr, weight_decay, maximize, decoupled_weight_decay)


def adadelta(
    lr: ScalarOrSchedule = 1.0,
    rho: float = 0.9,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    *,
    maximize: bool = False,
) -> optax.GradientTransformation:
    """``torch.optim.Adadelta``.

    Per parameter ``p`` with gradient ``g``::

        g = -g                                  if maximize
        g = g + weight_decay * p
        v = rho * v + (1 - rho) * g**2          (v, u start at 0)
        d = sqrt(u + eps) / sqrt(v + eps) * g
        u = rho * u + (1 - rho) * d**2
        p = p - lr * d

    ``optax.scale_by_adadelta`` is exactly this (state ``ScaleByAdaDeltaState(e_g=v, e_x=u)``);
    torch's default ``lr`` is 1.0.
    """
    _check_lr(lr)
    if not callable(rho) and not 0.0 <= rho <= 1.0:
        raise ConfigError(f"Invalid rho value: {rho}; give a value in [0, 1].")
    _check_range("epsilon value", eps, 0.0)
    _check_range("weight_decay value", weight_decay, 0.0)
    direction = optax.scale_by_adadelta(rho=rho, eps=eps)
    return _torch_chain(direction, lr, weight_decay, maximize)


OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "sgd": sgd,
    "adam": adam,
    "adamw": adamw,
    "rmsprop": rmsprop,
    "adagrad": adagrad,
    "adamax": adamax,
    "nadam": nadam,
    "radam": radam,
    "adadelta": adadelta,
}
"""jaxnet's optimizers by name; each takes ``torch.optim``'s arguments under the same names."""

TORCH_CLASSES: Mapping[str, str] = {
    "sgd": "SGD",
    "adam": "Adam",
    "adamw": "AdamW",
    "rmsprop": "RMSprop",
    "adagrad": "Adagrad",
    "adamax": "Adamax",
    "nadam": "NAdam",
    "radam": "RAdam",
    "adadelta": "Adadelta",
}
"""The ``torch.optim`` class of each of ``OPTIMIZERS``: ``getattr(torch.optim,
TORCH_CLASSES[name])`` takes the same arguments (``OptimizerSpec.options``)."""


DEFAULTS: Mapping[str, Mapping[str, Any]] = {"sgd": {"momentum": 0.9}}
"""jaxnet's defaults where they differ from torch's, applied by ``build``/``resolve`` (so by
``jaxnet train`` and ``jaxnet validate`` alike): SGD with momentum 0.9, the training job's
optimizer. The constructors above keep torch's own defaults."""


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """A checked optimizer and schedule: what ``build`` turns into an optax transform and the
    validator into ``torch.optim`` objects, so both frameworks get the same arguments.

    Attributes:
      name: a key of ``OPTIMIZERS``.
      options: the optimizer's arguments, ``DEFAULTS`` filled in (torch's names).
      schedule: a key of ``jaxnet.schedules.SCHEDULES``, or None.
      schedule_options: the torch scheduler's arguments (``one_cycle_lr``: ``max_lr`` and
        ``epochs``/``steps_per_epoch`` filled in).
      schedule_every: optimizer steps per ``scheduler.step()`` (1: every batch).
    """

    name: str
    options: Mapping[str, Any]
    schedule: str | None = None
    schedule_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    schedule_every: int = 1


def _check_names(kind: str, fn: Callable[..., Any], given: Mapping[str, Any], skip: tuple) -> None:
    params = {k: p for k, p in inspect.signature(fn).parameters.items() if k not in skip}
    unknown = sorted(set(given) - set(params))
    if unknown:
        raise ConfigError(
            f"{kind} takes no {', '.join(unknown)}; its arguments are {', '.join(params)}."
        )
    missing = [k for k, p in params.items() if p.default is p.empty and k not in given]
    if missing:
        raise ConfigError(f"{kind} needs {', '.join(missing)} (e.g. {missing[0]}=...).")
    for k, value in given.items():
        want = _expected_kind(params[k])
        if want is not None and not callable(value) and not _is_kind(value, want):
            raise ConfigError(f"{kind}: {k} must be {want}, got {value!r}.")


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _expected_kind(param: inspect.Parameter) -> str | None:
    """What an argument must be, read off its default (or, without one, its annotation)."""
    default, annotation = param.default, str(param.annotation)
    if isinstance(default, bool) or annotation == "bool":
        return "true or false"
    if _is_number(default) or annotation in ("int", "float"):
        return "a number"
    if isinstance(default, tuple) or annotation.startswith("Sequence"):
        return "a list of numbers"
    return None


def _is_kind(value: Any, want: str) -> bool:
    if want == "true or false":
        return isinstance(value, bool) or (isinstance(value, int) and value in (0, 1))
    if want == "a number":
        return _is_number(value)
    return isinstance(value, list | tuple) and all(_is_number(v) or callable(v) for v in value)


def _one_cycle_options(
    options: dict[str, Any], lr: Any, steps_per_epoch: int, epochs: int | None
) -> dict[str, Any]:
    """torch's OneCycleLR needs ``max_lr`` and a length: the optimizer's lr, and ``epochs`` x
    ``steps_per_epoch`` of the run, unless ``total_steps`` or its own are given."""
    if lr is not None:
        options.setdefault("max_lr", lr)
    if "total_steps" not in options and epochs is not None:
        options.setdefault("epochs", epochs)
        options.setdefault("steps_per_epoch", steps_per_epoch)
    return options


def resolve(
    name: str,
    options: Mapping[str, Any] | None = None,
    schedule: str | None = None,
    schedule_options: Mapping[str, Any] | None = None,
    *,
    steps_per_epoch: int = 1,
    epochs: int | None = None,
    run_steps: int | None = None,
) -> OptimizerSpec:
    """Check an optimizer and schedule by name and fill in the defaults (see ``build``).

    Raises ``ConfigError`` (a ``ValueError``) for an unknown optimizer, schedule or argument,
    and for a ``one_cycle_lr`` shorter than ``run_steps`` (torch refuses to step past it).
    """
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}.")
    merged = {**DEFAULTS.get(name, {}), **(options or {})}
    _check_names(f"optimizer {name!r}", OPTIMIZERS[name], merged, ())
    if schedule is None:
        return OptimizerSpec(name, merged)
    if schedule not in schedules.SCHEDULES:
        raise ConfigError(
            f"unknown schedule {schedule!r}; choose one of {', '.join(schedules.SCHEDULES)}."
        )
    sched = dict(schedule_options or {})
    if not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
        raise ConfigError(f"steps_per_epoch must be a positive int, got {steps_per_epoch!r}.")
    if schedule != "one_cycle_lr":
        skip = ("lr", "steps_per_epoch")
        _check_names(f"schedule {schedule!r}", schedules.SCHEDULES[schedule], sched, skip)
        return OptimizerSpec(name, merged, schedule, sched, steps_per_epoch)
    sched = _one_cycle_options(sched, merged.get("lr"), steps_per_epoch, epochs)
    _check_names("schedule 'one_cycle_lr'", schedules.one_cycle_lr, sched, ())
    total = sched.get("total_steps")
    if total is None and "epochs" in sched and "steps_per_epoch" in sched:
        total = sched["epochs"] * sched["steps_per_epoch"]
    if total is None:
        raise ConfigError(
            "one_cycle_lr needs its length: total_steps=N, or epochs=E and steps_per_epoch=S."
        )
    if run_steps is not None and total < run_steps:
        raise ConfigError(
            f"one_cycle_lr has total_steps={total} but the run takes {run_steps} steps; torch "
            "refuses to step past total_steps: raise total_steps or shorten the run."
        )
    return OptimizerSpec(name, merged, schedule, sched, 1)


class PlateauLrState(NamedTuple):
    """The lr of a ``reduce_lr_on_plateau`` run, inside the optimizer state (so checkpointed
    with it): ``lr``, the value the steps use (a scalar in the parameters' widest dtype), and
    the scheduler's ``schedules.Plateau`` exactly, whatever jax's precision: its float64
    ``lr`` and ``best`` as bit patterns ``uint32 (2,)`` (``lr_bits``, ``best_bits``) and its
    counters ``int32 (3,)``: ``last_epoch, num_bad_epochs, cooldown_counter``."""

    lr: jax.Array
    lr_bits: jax.Array
    best_bits: jax.Array
    counters: jax.Array


class PlateauTransformation(NamedTuple):
    """An optax transform whose lr a ``schedules.ReduceLROnPlateau`` ``rule`` sets: step it
    with ``plateau_step`` once per epoch. ``init``/``update`` as in any transform."""

    init: optax.TransformInitFn
    update: optax.TransformUpdateFn
    rule: schedules.ReduceLROnPlateau


def _f64_bits(x: float) -> np.ndarray:
    return np.array([x], np.float64).view(np.uint32)


def plateau_state(plateau: schedules.Plateau, dtype: Any) -> PlateauLrState:
    """The ``PlateauLrState`` holding ``plateau`` exactly (its float64 values also as bits),
    its lr in ``dtype``: the inverse of ``plateau_of``."""
    return PlateauLrState(
        lr=jnp.asarray(plateau.lr, dtype),
        lr_bits=jnp.asarray(_f64_bits(plateau.lr)),
        best_bits=jnp.asarray(_f64_bits(plateau.best)),
        counters=jnp.asarray(
            [plateau.last_epoch, plateau.num_bad_epochs, plateau.cooldown_counter], jnp.int32
        ),
    )


def _host(x: Any) -> np.ndarray:
    """A replicated array's value on this host (any of its shards is all of it)."""
    return np.asarray(x.addressable_data(0) if isinstance(x, jax.Array) else x)


def plateau_of(state: PlateauLrState) -> schedules.Plateau:
    """The ``schedules.Plateau`` held in ``state``, exactly."""
    last_epoch, bad, cooldown = (int(c) for c in _host(state.counters))
    lr = float(_host(state.lr_bits).astype(np.uint32).view(np.float64)[0])
    best = float(_host(state.best_bits).astype(np.uint32).view(np.float64)[0])
    return schedules.Plateau(lr, best, last_epoch, bad, cooldown)


def with_plateau_lr(
    inner: optax.GradientTransformation, rule: schedules.ReduceLROnPlateau, lr: float
) -> PlateauTransformation:
    """``inner`` (built with ``lr=1.0``: every torch optimizer's update is linear in its lr)
    times the lr of ``rule``, starting at ``lr``. State: ``(inner_state, PlateauLrState)``."""

    def init_fn(params: Any) -> tuple[Any, PlateauLrState]:
        dtype = optax.tree.dtype(params, "highest")
        return inner.init(params), plateau_state(rule.init(lr), dtype)

    def update_fn(updates: Any, state: tuple[Any, PlateauLrState], params: Any = None):
        updates, inner_state = inner.update(updates, state[0], params)
        updates = jax.tree.map(lambda u: u * state[1].lr.astype(u.dtype), updates)
        return updates, (inner_state, state[1])

    return PlateauTransformation(init_fn, update_fn, rule)


def plateau_step(tx: Any, opt_state: Any, metric: float) -> Any:
    """``scheduler.step(metric)`` of a ``reduce_lr_on_plateau`` transform ``tx`` on its
    ``opt_state``: the new state (its arrays placed as the old ones were). Any other
    transform's state is returned unchanged, so a training loop may call it every epoch."""
    if not isinstance(tx, PlateauTransformation):
        return opt_state
    inner_state, old = opt_state
    new = plateau_state(tx.rule.step(plateau_of(old), metric), old.lr.dtype)
    placed = jax.tree.map(
        lambda n, o: jax.device_put(n, o.sharding) if isinstance(o, jax.Array) else n, new, old
    )
    return inner_state, placed


def _one_cycle_kwargs(
    spec: OptimizerSpec, kwargs: dict[str, Any], params: Mapping[str, inspect.Parameter]
) -> dict[str, Any]:
    """OneCycleLR drives the lr, and (``cycle_momentum``) ``betas[0]`` or ``momentum``."""
    cycle = schedules.one_cycle_lr(**spec.schedule_options)
    kwargs["lr"] = cycle.lr
    if cycle.momentum is None:
        return kwargs
    if "betas" in params:
        betas = kwargs.get("betas", params["betas"].default)
        kwargs["betas"] = (cycle.momentum, betas[1])
    elif "momentum" in params:
        kwargs["momentum"] = cycle.momentum
    else:
        raise ConfigError(
            "optimizer must support momentum or beta1 with `cycle_momentum` option enabled "
            f"({spec.name} has neither): pass cycle_momentum=false to one_cycle_lr."
        )
    return kwargs


def _base_lr(spec: OptimizerSpec) -> Any:
    """The optimizer's own lr: its option, else the factory's default (torch's)."""
    return spec.options.get("lr", inspect.signature(OPTIMIZERS[spec.name]).parameters["lr"].default)


def _lr_schedule(spec: OptimizerSpec) -> ScalarOrSchedule:
    """The lr of a spec whose schedule is not ``reduce_lr_on_plateau``: its schedule (a
    function of the update count, as optax takes it), or the constant lr."""
    if spec.schedule == "one_cycle_lr":
        return schedules.one_cycle_lr(**spec.schedule_options).lr
    if spec.schedule is not None:
        return schedules.SCHEDULES[spec.schedule](
            _base_lr(spec), **spec.schedule_options, steps_per_epoch=spec.schedule_every
        )
    return _base_lr(spec)


def lr_at(spec: OptimizerSpec, count: int, opt_state: Any = None) -> float:
    """The learning rate of the update made after ``count`` updates (``count`` = the state's
    ``step``: the lr the next step uses), as torch's ``optimizer.param_groups[0]["lr"]`` is
    then: the schedule at ``count``; for ``reduce_lr_on_plateau`` the lr held in
    ``opt_state``, which this needs then."""
    if spec.schedule == "reduce_lr_on_plateau":
        if opt_state is None:
            raise ValueError("reduce_lr_on_plateau keeps its lr in the optimizer state: pass it.")
        return plateau_of(opt_state[1]).lr
    lr = _lr_schedule(spec)
    return float(lr(count) if callable(lr) else lr)


def transform(spec: OptimizerSpec) -> optax.GradientTransformation | PlateauTransformation:
    """The optax transform of a resolved ``spec``: ``OPTIMIZERS[name](**options)``, its lr
    (and for ``one_cycle_lr`` its momentum or beta1) driven by the schedule; for
    ``reduce_lr_on_plateau`` a ``PlateauTransformation`` (see ``plateau_step``)."""
    factory = OPTIMIZERS[spec.name]
    kwargs = dict(spec.options)
    params = inspect.signature(factory).parameters
    base_lr = _base_lr(spec)
    if spec.schedule == "one_cycle_lr":
        kwargs = _one_cycle_kwargs(spec, kwargs, params)
    elif spec.schedule == "reduce_lr_on_plateau":
        _check_lr(base_lr)
        rule = schedules.reduce_lr_on_plateau(base_lr, **spec.schedule_options)
        return with_plateau_lr(factory(**{**kwargs, "lr": 1.0}), rule, base_lr)
    elif spec.schedule is not None:
        kwargs["lr"] = _lr_schedule(spec)
    return factory(**kwargs)


def build(
    name: str,
    options: Mapping[str, Any] | None = None,
    schedule: str | None = None,
    schedule_options: Mapping[str, Any] | None = None,
    steps_per_epoch: int = 1,
    *,
    epochs: int | None = None,
    run_steps: int | None = None,
) -> optax.GradientTransformation:
    """The optimizer ``name`` (``OPTIMIZERS``) with torch's arguments ``options``, its lr driven
    by the schedule ``schedule`` (``jaxnet.schedules.SCHEDULES``) with the torch scheduler's
    arguments ``schedule_options``: the one place that turns names into a transform.

    * ``DEFAULTS`` fill what ``options`` does not set (SGD: momentum 0.9).
    * ``steps_per_epoch`` n steps a schedule every n optimizer steps, like torch's
      ``scheduler.step()`` once per epoch; the base lr is ``options["lr"]`` (or the
      optimizer's default).
    * ``one_cycle_lr`` is stepped every batch, as torch requires; ``max_lr`` defaults to the
      lr, and its length to ``epochs`` x ``steps_per_epoch`` when ``epochs`` is given. Like
      torch's ``OneCycleLR(cycle_momentum=True)`` it cycles ``betas[0]`` where the optimizer
      has betas and ``momentum`` otherwise.

    Raises ``ConfigError`` (a ``ValueError``) for unknown names and arguments, and the
    optimizers' own torch-like ``ConfigError``s (also ``ValueError``s) for values torch refuses.
    """
    return transform(
        resolve(
            name,
            options,
            schedule,
            schedule_options,
            steps_per_epoch=steps_per_epoch,
            epochs=epochs,
            run_steps=run_steps,
        )
    )
