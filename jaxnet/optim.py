"""``torch.optim`` optimizers as optax ``GradientTransformation``s, with torch's semantics,
argument names and defaults. Built from optax pieces; a custom transform only where optax has
no equivalent, each saying which torch behaviour it reproduces.
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
import optax

from jaxnet import schedules
from jaxnet.errors import ConfigError

__all__ = [
    "DEFAULTS",
    "OPTIMIZERS",
    "OptimizerSpec",
    "ScalarOrSchedule",
    "adam",
    "adamw",
    "build",
    "resolve",
    "rmsprop",
    "scale_by_torch_adam",
    "sgd",
    "torch_dampened_momentum",
    "transform",
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
        raise ConfigError(f"Invalid learning rate: {lr}")


def _check_range(name: str, value: Any, low: float, high: float | None = None) -> None:
    """torch's argument checks (``0 <= value`` or ``0 <= value < high``); schedules pass."""
    if callable(value):
        return
    if not low <= value or (high is not None and not value < high):
        raise ConfigError(f"Invalid {name}: {value}")


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


def _torch_bias_correction(beta: Any, count: jax.Array) -> jax.Array:
    """``1 - beta**count`` to float32 accuracy of torch's float64 Python-float value.

    optax computes ``1 - beta**count`` in float32 from ``beta`` rounded to float32: for
    ``beta2 = 0.999`` that is 0.99900001 and ``1 - beta2`` is off by 1.3e-5 relative, which
    moves every early Adam update by ~6e-6 relative, far above float32 round-off. Here
    ``log(beta)`` is taken in float64 (Python) for constant betas and the power is formed as
    ``-expm1(count * log(beta))``, which loses nothing to cancellation.
    """
    if isinstance(beta, int | float):
        log_beta = math.log(beta) if beta > 0 else -math.inf
        return -jnp.expm1(count.astype(jnp.float32) * jnp.float32(log_beta))
    beta = jnp.asarray(beta, jnp.float32)  # a scheduled beta1 (OneCycleLR) is float32 already
    return 1.0 - beta ** count.astype(jnp.float32)


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
        bc1 = _torch_bias_correction(b1, count)
        bc2_sqrt = jnp.sqrt(_torch_bias_correction(b2, count))
        out = jax.tree.map(
            lambda m, v: (m / bc1.astype(m.dtype)) / (jnp.sqrt(v) / bc2_sqrt.astype(v.dtype) + eps),
            mu,
            nu_max if amsgrad else nu,
        )
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


OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "sgd": sgd,
    "adam": adam,
    "adamw": adamw,
    "rmsprop": rmsprop,
}
"""jaxnet's optimizers by name; each takes ``torch.optim``'s arguments under the same names."""


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


def transform(spec: OptimizerSpec) -> optax.GradientTransformation:
    """The optax transform of a resolved ``spec``: ``OPTIMIZERS[name](**options)``, its lr
    (and for ``one_cycle_lr`` its momentum or beta1) driven by the schedule."""
    factory = OPTIMIZERS[spec.name]
    kwargs = dict(spec.options)
    params = inspect.signature(factory).parameters
    if spec.schedule == "one_cycle_lr":
        cycle = schedules.one_cycle_lr(**spec.schedule_options)
        kwargs["lr"] = cycle.lr
        if cycle.momentum is not None:
            if "betas" in params:
                betas = kwargs.get("betas", params["betas"].default)
                kwargs["betas"] = (cycle.momentum, betas[1])
            else:
                kwargs["momentum"] = cycle.momentum
    elif spec.schedule is not None:
        base_lr = kwargs.get("lr", params["lr"].default)
        kwargs["lr"] = schedules.SCHEDULES[spec.schedule](
            base_lr, **spec.schedule_options, steps_per_epoch=spec.schedule_every
        )
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
