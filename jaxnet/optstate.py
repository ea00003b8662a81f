"""Optimizer state that crosses frameworks: a ``torch.optim`` ``state_dict`` as the optax state
of ``jaxnet.optim.transform(spec)``, and back, so that a run trained k steps in one framework
continues in the other exactly as it would have continued in the first.

What moves:

* per-parameter buffers (``_BUFFERS``: momentum buffers, moments, AMSGrad maxima, averages,
  Adagrad's sums; NAdam's ``mu_product``, one scalar here, one per parameter in torch), laid
  out by ``jaxnet.convert``'s mapping table, the same transforms as the weights (a buffer is
  built from gradients, and every layout transform there is a permutation);
* the step count: torch's per-parameter ``step`` (every optimizer but SGD) becomes every
  ``count`` of the optax state (bias corrections, SGD's first-step rule, the schedule's
  position, OneCycleLR's momentum cycling). ``torch.optim.SGD`` keeps no step count, and the
  optax states of RMSprop and Adadelta none: pass ``step=`` where it is needed;
* torch's "no buffer yet" first step: SGD's ``momentum_buffer`` is absent until the first step
  and its first step copies the gradient, undamped. jaxnet's dampened momentum keeps that rule
  behind ``count == 0``; ``optax.trace`` (dampening 0) starts from zeros, which is the same
  arithmetic (``momentum * 0 + g = g``).

The hyperparameters are not converted but checked: the torch ``param_groups[0]`` must equal the
group that ``torch.optim.<cls>(**spec.options)`` (and its scheduler, replayed to the step count)
holds, so a state never continues under different settings than the run that wrote it.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnet import optim, schedules
from jaxnet.convert import (
    WeightFileError,
    params_from_torch,
    params_to_torch,
    torch_state_dict_shapes,
)
from jaxnet.errors import ConfigError

__all__ = [
    "opt_state_from_torch",
    "opt_state_to_torch",
    "torch_param_names",
    "torch_scheduler_state",
]

_BUFFERS: dict[type, dict[str, str]] = {
    optax.TraceState: {"trace": "momentum_buffer"},
    optim.DampenedMomentumState: {"buf": "momentum_buffer"},
    optim.ScaleByTorchAdamState: {
        "mu": "exp_avg",
        "nu": "exp_avg_sq",
        "nu_max": "max_exp_avg_sq",
    },
    optax.ScaleByRmsState: {"nu": "square_avg"},
    optax.ScaleByRStdDevState: {"mu": "grad_avg", "nu": "square_avg"},
    optim.ScaleByTorchAdagradState: {"sum": "sum"},
    optim.ScaleByTorchAdamaxState: {"mu": "exp_avg", "nu": "exp_inf"},
    optim.ScaleByTorchNAdamState: {"mu": "exp_avg", "nu": "exp_avg_sq"},
    optax.ScaleByAdamState: {"mu": "exp_avg", "nu": "exp_avg_sq"},  # RAdam
    optax.ScaleByAdaDeltaState: {"e_g": "square_avg", "e_x": "acc_delta"},
}
"""Per optax state type: which field holds which ``torch.optim`` per-parameter state entry.
Every field named ``count`` holds the number of steps taken (torch's ``step``)."""

_SCALARS: dict[type, dict[str, str]] = {
    optim.ScaleByTorchNAdamState: {"mu_product": "mu_product"},
}
"""Per optax state type: a scalar field that torch keeps once per parameter, all equal."""

_PLATEAU = "reduce_lr_on_plateau"
"""The one schedule driven by a metric: its state (``optim.PlateauLrState``) crosses with the
torch scheduler's ``state_dict()``, and its lr is the param_group's."""

_STEPLESS = frozenset({"sgd"})
"""The optimizers whose torch state has no per-parameter ``step`` (every other one has)."""

_IMPLEMENTATION = frozenset(
    {"params", "param_names", "foreach", "fused", "differentiable", "capturable"}
)
"""``param_groups`` entries that choose torch's kernels, not the arithmetic: not compared."""


# ---------------------------------------------------------------------------------------------
# Parameters: torch's order, jaxnet's tree
# ---------------------------------------------------------------------------------------------


def torch_param_names(params: Any) -> list[str]:
    """The tutorial ``Net``'s parameter names in ``TorchNet.parameters()`` order: the order of
    a torch optimizer's ``param_groups[0]["params"]`` ids (the ``state_dict``'s key order)."""
    return list(torch_state_dict_shapes(_num_classes(params)))


def _dtype(params: Any) -> Any:
    return jax.tree.leaves(params)[0].dtype


def _num_classes(params: Any) -> int:
    try:
        if set(params) == {"params"}:
            params = params["params"]
        return int(params["fc3"]["kernel"].shape[-1])
    except (KeyError, TypeError, AttributeError, IndexError) as e:
        raise WeightFileError(
            "params are not jaxnet.Net params (no fc3 kernel): pass variables['params'] of "
            "the Net, e.g. TrainState.params."
        ) from e


def _to_jax_tree(
    by_name: Mapping[str, Any], key: str, params: Any
) -> dict[str, dict[str, jax.Array]]:
    """One torch state entry (``{param name: tensor}``) as a tree shaped like ``params``."""
    try:
        return params_from_torch(by_name, num_classes=_num_classes(params), dtype=_dtype(params))
    except WeightFileError as e:
        raise WeightFileError(
            f"torch optimizer state {key!r} is not shaped like the params: pass the state of "
            f"the optimizer that trained these weights (same num_classes). {e}"
        ) from e


# ---------------------------------------------------------------------------------------------
# Walking an optax state
# ---------------------------------------------------------------------------------------------


def _is_state(node: Any) -> bool:
    return isinstance(node, tuple) and hasattr(node, "_fields")


def _unmapped(owner: Any, spec: optim.OptimizerSpec) -> ConfigError:
    what = "" if owner is None else f" (its optax state {type(owner).__name__})"
    return ConfigError(
        f"optimizer {spec.name!r} with schedule {spec.schedule!r}{what} has no torch.optim "
        f"state mapping in jaxnet.optstate; optimizer state crosses frameworks for "
        f"{', '.join(optim.TORCH_CLASSES)}. Convert the weights alone "
        "(jaxnet.params_from_torch) and start the optimizer afresh."
    )


def _leaf(node: Any, owner: Any, spec: Any) -> Any:
    """A leaf outside every mapped entry: a scalar (an injected hyperparameter, recomputed at
    every step) passes; an array this module does not know is refused, never left at zeros."""
    if jnp.ndim(node) > 0:
        raise _unmapped(owner, spec)
    return node


@dataclasses.dataclass
class _Entries:
    """What an optax state holds for torch: per-parameter trees and scalars by torch key, and
    every step count."""

    trees: dict[str, Any] = dataclasses.field(default_factory=dict)
    scalars: dict[str, Any] = dataclasses.field(default_factory=dict)
    counts: list[int] = dataclasses.field(default_factory=list)


def _fill(node: Any, entries: _Entries, spec: Any, owner: Any = None) -> Any:
    """``node`` (a template optax state) with every mapped field replaced by ``entries``'
    value for its torch key (where there is one) and every ``count`` by ``entries.counts[0]``."""
    if isinstance(node, optim.PlateauLrState):
        return node  # set from the torch scheduler's state by _with_plateau
    if _is_state(node):
        trees, scalars = _BUFFERS.get(type(node), {}), _SCALARS.get(type(node), {})
        values = {}
        for field in node._fields:
            value = getattr(node, field)
            if field in trees and value is not None:
                values[field] = entries.trees.get(trees[field], value)
            elif field in scalars:
                found = entries.scalars.get(scalars[field], value)
                values[field] = jnp.asarray(found, value.dtype)
            elif field == "count":
                values[field] = jnp.asarray(entries.counts[0], jnp.asarray(value).dtype)
            else:
                values[field] = _fill(value, entries, spec, node)
        return type(node)(**values)
    if isinstance(node, tuple):
        return tuple(_fill(x, entries, spec, owner) for x in node)
    if isinstance(node, Mapping):
        return {k: _fill(v, entries, spec, owner) for k, v in node.items()}
    return node if node is None else _leaf(node, owner, spec)


def _collect(node: Any, entries: _Entries, spec: Any, owner: Any = None) -> _Entries:
    """``entries`` with the mapped fields and every ``count`` of an optax state added."""
    if isinstance(node, optim.PlateauLrState):
        return entries  # read by plateau_of
    if _is_state(node):
        trees, scalars = _BUFFERS.get(type(node), {}), _SCALARS.get(type(node), {})
        for field in node._fields:
            value = getattr(node, field)
            if field in trees and value is not None:
                entries.trees[trees[field]] = value
            elif field in scalars:
                entries.scalars[scalars[field]] = value
            elif field == "count":
                entries.counts.append(int(value))
            else:
                _collect(value, entries, spec, node)
    elif isinstance(node, tuple | list):
        for x in node:
            _collect(x, entries, spec, owner)
    elif isinstance(node, Mapping):
        for v in node.values():
            _collect(v, entries, spec, owner)
    elif node is not None:
        _leaf(node, owner, spec)
    return entries


# ---------------------------------------------------------------------------------------------
# torch's side: the param_group a spec gives, replayed to a step
# ---------------------------------------------------------------------------------------------


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is a dev dependency
        raise ConfigError(
            "Moving optimizer state to or from PyTorch needs PyTorch (pip install torch==2.13.0)."
        ) from e
    return torch


def _check_spec(spec: Any) -> optim.OptimizerSpec:
    if not isinstance(spec, optim.OptimizerSpec):
        raise ConfigError(
            f"expected a jaxnet.optim.OptimizerSpec, got a {type(spec).__name__}: a bare optax "
            "transform does not say torch's hyperparameters. Pass "
            "jaxnet.optim.resolve(name, options, schedule, schedule_options), the spec that "
            "jaxnet.optim.transform turns into the transform."
        )
    if spec.name not in optim.TORCH_CLASSES:
        raise _unmapped(None, spec)
    return spec


def _torch_replay(spec: optim.OptimizerSpec, steps: int) -> tuple[Any, Any]:
    with warnings.catch_warnings():
        # torch's scheduler warnings (a deprecated argument, an lr read outside step()) say
        # nothing about the state replayed here.
        warnings.simplefilter("ignore", UserWarning)
        return _replay(spec, steps)


def _replay(spec: optim.OptimizerSpec, steps: int) -> tuple[Any, Any]:
    """A one-parameter ``torch.optim.<cls>(**spec.options)`` and its scheduler, the scheduler
    stepped as ``steps`` optimizer steps would step it (no parameter ever has a gradient, so
    only the param_group moves)."""
    torch = _import_torch()
    options = dict(spec.options)
    if isinstance(options.get("betas"), list):
        options["betas"] = tuple(options["betas"])
    opt = getattr(torch.optim, optim.TORCH_CLASSES[spec.name])(
        [torch.nn.Parameter(torch.zeros(1))], **options
    )
    if spec.schedule is None:
        return opt, None
    sched_cls = getattr(torch.optim.lr_scheduler, schedules.TORCH_CLASSES[spec.schedule])
    sched = sched_cls(opt, **spec.schedule_options)
    if spec.schedule == _PLATEAU:
        return opt, sched  # stepped on a metric, not by steps: its state comes from the run's
    for i in range(steps):
        opt.step()  # a no-op (no gradients) that tells the scheduler the optimizer stepped
        if (i + 1) % spec.schedule_every == 0:
            sched.step()
    return opt, sched


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    try:
        x, y = float(a), float(b)
    except (TypeError, ValueError):
        return a == b
    return x == y or math.isclose(x, y, rel_tol=1e-12, abs_tol=0.0)


def _looks_like(group: Mapping[str, Any]) -> str:
    """The jaxnet optimizer whose torch arguments a param_group has, the most specific one
    (the most arguments) where several fit (for the error message)."""
    fits = {
        cls: len(inspect.signature(optim.OPTIMIZERS[name]).parameters)
        for name, cls in optim.TORCH_CLASSES.items()
        if set(inspect.signature(optim.OPTIMIZERS[name]).parameters) <= set(group)
    }
    if not fits:
        return ""
    most = max(fits.values())
    names = [f"torch.optim.{cls}" for cls, n in fits.items() if n == most]
    return f" (its keys are those of {' or '.join(names)})"


def _wanted_group(spec: optim.OptimizerSpec, steps: int) -> dict[str, Any]:
    opt, _ = _torch_replay(spec, steps)
    return {k: v for k, v in opt.param_groups[0].items() if k not in _IMPLEMENTATION}


def _check_kind(group: Mapping[str, Any], spec: optim.OptimizerSpec) -> None:
    """``group`` must be one of ``spec``'s torch optimizer (and scheduler): its keys."""
    missing = sorted(set(_wanted_group(spec, 0)) - set(group))
    if missing:
        raise WeightFileError(
            f"the optimizer state_dict is not one of a torch.optim.{optim.TORCH_CLASSES[spec.name]}"
            + ("" if spec.schedule is None else f" with {schedules.TORCH_CLASSES[spec.schedule]}")
            + f": its param_groups lack {', '.join(missing)}{_looks_like(group)}. Build the "
            "jaxnet optimizer that wrote it (jaxnet.optim.resolve(name, options, schedule))."
        )


def _check_values(group: Mapping[str, Any], spec: optim.OptimizerSpec, steps: int) -> None:
    """``group`` must hold the hyperparameters ``spec`` gives torch after ``steps`` steps."""
    want = _wanted_group(spec, steps)
    if spec.schedule == _PLATEAU:
        del want["lr"]  # the scheduler's, checked with its state (_plateau_from_torch)
    wrong = [
        f"{k}={group[k]!r} (jaxnet's: {v!r})" for k, v in want.items() if not _same(group[k], v)
    ]
    if wrong:
        raise WeightFileError(
            f"the torch.optim.{optim.TORCH_CLASSES[spec.name]} state_dict has other "
            f"hyperparameters than the jaxnet optimizer at step {steps}: {'; '.join(wrong)}. "
            "Resolve the jaxnet optimizer with the torch run's values (jaxnet.optim.resolve("
            "name, options, ...)), or pass the state_dict of the run that used these."
        )


_PLATEAU_RULE = ("factor", "patience", "cooldown", "eps", "mode", "threshold", "threshold_mode")
"""The ``ReduceLROnPlateau`` arguments a scheduler ``state_dict()`` records (and ``min_lrs``)."""


def _plateau_from_torch(
    sched_state: Any, group: Mapping[str, Any], spec: optim.OptimizerSpec, dtype: Any
) -> optim.PlateauLrState:
    """The jaxnet plateau state of a torch ``ReduceLROnPlateau.state_dict()`` whose optimizer's
    lr is ``group["lr"]``; its arguments must be ``spec``'s."""
    if not isinstance(sched_state, Mapping):
        raise ConfigError(
            "reduce_lr_on_plateau keeps its state in the torch scheduler: pass "
            "scheduler_state=scheduler.state_dict() (a checkpoint's 'scheduler_state_dict')."
        )
    _, sched = _torch_replay(spec, 0)
    want = sched.state_dict()
    keys = [*_PLATEAU_RULE, "min_lrs", "best", "last_epoch", "num_bad_epochs", "cooldown_counter"]
    missing = [k for k in keys if k not in sched_state]
    wrong = [
        k
        for k in (*_PLATEAU_RULE, "min_lrs")
        if k in sched_state and not _same(sched_state[k], want[k])
    ]
    problems = ([f"it lacks {', '.join(missing)}"] if missing else []) + [
        f"{k}={sched_state[k]!r}" for k in wrong
    ]
    if problems:
        raise WeightFileError(
            "the scheduler state_dict is not one of torch's ReduceLROnPlateau with the jaxnet "
            f"schedule's arguments ({', '.join(f'{k}={want[k]!r}' for k in _PLATEAU_RULE)}): "
            f"{'; '.join(problems)}. Pass the run's own scheduler.state_dict(), or its "
            "arguments as the jaxnet schedule's (--sched-opt)."
        )
    plateau = schedules.Plateau(
        lr=float(group["lr"]),
        best=float(sched_state["best"]),
        last_epoch=int(sched_state["last_epoch"]),
        num_bad_epochs=int(sched_state["num_bad_epochs"]),
        cooldown_counter=int(sched_state["cooldown_counter"]),
    )
    return optim.plateau_state(plateau, dtype)  # optim's one encoding of the plateau state


# ---------------------------------------------------------------------------------------------
# torch -> jaxnet
# ---------------------------------------------------------------------------------------------


def _one_group(state_dict: Any, n: int) -> tuple[Mapping[str, Any], list[Any]]:
    """The single param_group (jaxnet has one set of hyperparameters) and its param ids."""
    if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
        raise WeightFileError(
            "expected a torch optimizer state_dict ({'state': ..., 'param_groups': [...]}); "
            "pass optimizer.state_dict(), or checkpoint['optimizer_state_dict'] of a tutorial "
            "checkpoint."
        )
    groups = state_dict["param_groups"]
    if len(groups) != 1:
        raise WeightFileError(
            f"the optimizer state_dict has {len(groups)} param_groups; jaxnet trains every "
            "parameter with one set of hyperparameters. Continue the run in torch, or merge "
            "the groups there (one group with net.parameters())."
        )
    ids = list(groups[0].get("params", []))
    if len(ids) != n:
        raise WeightFileError(
            f"the optimizer's param group has {len(ids)} parameters; the tutorial's Net has "
            f"{n}. Build the torch optimizer over net.parameters(), in their order."
        )
    return groups[0], ids


def _per_param(
    state: Mapping[Any, Any], ids: list[Any], names: list[str], keys: set[str]
) -> dict[str, dict[str, Any]]:
    """``{torch key: {param name: value}}``; every parameter has all ``keys`` or none has any
    (a fresh optimizer)."""
    entries = [dict(state.get(i, {})) for i in ids]
    if not any(entries):
        return {}
    out: dict[str, dict[str, Any]] = {k: {} for k in keys}
    for name, entry in zip(names, entries, strict=True):
        found = {k for k, v in entry.items() if v is not None}
        if found != keys:
            lacks, extra = sorted(keys - found), sorted(found - keys)
            raise WeightFileError(
                f"torch optimizer state of {name}: "
                + (f"lacks {', '.join(lacks)}; " if lacks else "")
                + (f"has unexpected {', '.join(extra)}; " if extra else "")
                + f"(expected {', '.join(sorted(keys))}). Pass the state_dict of the torch "
                "optimizer the jaxnet spec describes, after its steps on every parameter."
            )
        for k in keys:
            out[k][name] = entry[k]
    return out


def _steps(per_param: Mapping[str, Mapping[str, Any]], step: int | None, spec: Any) -> int:
    """The number of steps taken: torch's ``step`` entries (which must agree), or ``step``."""
    recorded = {float(v) for v in per_param.get("step", {}).values()}
    if len(recorded) > 1:
        raise WeightFileError(
            f"the parameters' torch 'step' counts differ ({sorted(recorded)}); jaxnet steps "
            "every parameter together. Use a state_dict where every parameter was stepped."
        )
    if recorded:
        taken = int(recorded.pop())
        if step is not None and step != taken:
            raise ConfigError(
                f"step={step} but the torch state_dict records {taken} steps; drop step=."
            )
        return taken
    if step is not None:
        if not isinstance(step, int) or step < 0:
            raise ConfigError(f"step must be a non-negative int, got {step!r}.")
        if step == 0 and per_param:
            raise ConfigError("step=0 but the torch state has buffers: pass the steps taken.")
        return step
    if spec.schedule not in (None, _PLATEAU):
        raise ConfigError(
            f"torch.optim.{optim.TORCH_CLASSES[spec.name]} does not record its step count, and "
            f"the schedule {spec.schedule!r} needs it: pass step=<optimizer steps taken> "
            "(a tutorial checkpoint: epoch x batches per epoch)."
        )
    return 1 if per_param else 0


def opt_state_from_torch(
    torch_state_dict: Mapping[str, Any],
    spec: optim.OptimizerSpec,
    params: Any,
    *,
    step: int | None = None,
    scheduler_state: Mapping[str, Any] | None = None,
) -> optax.OptState:
    """A ``torch.optim`` optimizer's ``state_dict`` as the optax state of
    ``jaxnet.optim.transform(spec)`` for ``params``.

    Args:
      torch_state_dict: ``optimizer.state_dict()`` of a ``torch.optim`` optimizer over the
        tutorial ``TorchNet``'s ``parameters()``, one param group (a tutorial checkpoint's
        ``"optimizer_state_dict"``); values ``torch.Tensor`` or numpy arrays.
      spec: the resolved jaxnet optimizer (``jaxnet.optim.resolve``), the same optimizer,
        hyperparameters and schedule as the torch run.
      params: ``jaxnet.Net`` params (conv kernels HWIO, fc kernels ``(in, out)``); the buffers
        take their dtype.
      step: optimizer steps taken, for optimizers that do not record it (SGD) when a schedule
        needs it; checked against torch's ``step`` where torch records one.
      scheduler_state: ``scheduler.state_dict()`` of torch's ``ReduceLROnPlateau``, for a
        ``reduce_lr_on_plateau`` spec (the other schedules' position is the step count).

    Returns:
      ``tx.init(params)``'s structure with torch's buffers and step count: ``tx.update`` then
      takes step ``k + 1`` exactly as ``optimizer.step()`` would.

    Raises:
      ConfigError: a spec that is not an ``OptimizerSpec`` or has no torch counterpart, a
        missing or contradicting ``step``.
      WeightFileError: a state_dict of another optimizer or hyperparameters, several param
        groups, missing or unexpected entries, wrong shapes (each naming the fix).
    """
    spec = _check_spec(spec)
    names = torch_param_names(params)
    group, ids = _one_group(torch_state_dict, len(names))
    _check_kind(group, spec)
    template = optim.transform(spec).init(params)
    wanted = _collect(template, _Entries(), spec)
    keys = set(wanted.trees) | set(wanted.scalars) | _step_key(spec)
    per_param = _per_param(torch_state_dict["state"], ids, names, keys)
    steps = _steps(per_param, step, spec)
    _check_values(group, spec, steps)
    found = _Entries(counts=[steps])
    if per_param:
        found.trees = {k: _to_jax_tree(per_param[k], k, params) for k in wanted.trees}
        found.scalars = {k: _one_scalar(per_param[k], k) for k in wanted.scalars}
    state = _fill(template, found, spec)
    if spec.schedule != _PLATEAU:
        return state
    return state[0], _plateau_from_torch(scheduler_state, group, spec, state[1].lr.dtype)


def _step_key(spec: optim.OptimizerSpec) -> set[str]:
    return set() if spec.name in _STEPLESS else {"step"}


def _one_scalar(by_name: Mapping[str, Any], key: str) -> float:
    """A scalar torch keeps once per parameter (NAdam's ``mu_product``): all equal."""
    values = {float(v) for v in by_name.values()}
    if len(values) != 1:
        raise WeightFileError(
            f"torch optimizer state {key!r} differs between parameters ({sorted(values)}); "
            "jaxnet keeps one for all. Use a state_dict where every parameter was stepped."
        )
    return values.pop()


# ---------------------------------------------------------------------------------------------
# jaxnet -> torch
# ---------------------------------------------------------------------------------------------


def _count(counts: list[int], step: int | None, spec: optim.OptimizerSpec) -> int:
    """The steps an optax state has taken: its counts (which agree), else ``step``."""
    if len(set(counts)) > 1:
        raise ConfigError(f"the optax state's step counts differ ({sorted(set(counts))}).")
    if counts:
        if step is not None and step != counts[0]:
            raise ConfigError(f"step={step} but the optax state counts {counts[0]}; drop step=.")
        return counts[0]
    if step is not None:
        if not isinstance(step, int) or step < 0:
            raise ConfigError(f"step must be a non-negative int, got {step!r}.")
        return step
    if spec.name in _STEPLESS:
        return 1  # SGD's plain momentum: torch records no step, and the buffer is the same
    raise ConfigError(
        f"the {spec.name!r} optax state keeps no step count, and torch.optim."
        f"{optim.TORCH_CLASSES[spec.name]} records one: pass step=<optimizer steps taken> "
        "(TrainState.step)."
    )


def _check_structure(opt_state: Any, template: Any, spec: optim.OptimizerSpec) -> None:
    if jax.tree.structure(template) != jax.tree.structure(opt_state):
        raise ConfigError(
            f"the optimizer state does not have the structure of {spec.name!r} with options "
            f"{dict(spec.options)} and schedule {spec.schedule!r}; pass the spec the state "
            "was trained with."
        )


def _torch_state(entries: _Entries, steps: int, names: list[str], spec: Any) -> dict[int, Any]:
    """``optimizer.state_dict()["state"]``: per parameter index, torch's entries."""
    torch = _import_torch()
    # torch keeps step counts and per-parameter scalars in its default dtype's scalar type.
    scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    state: dict[int, dict[str, Any]] = {i: {} for i in range(len(names))}
    for key, tree in entries.trees.items():
        arrays = params_to_torch(tree, as_numpy=True)
        for i, name in enumerate(names):
            state[i][key] = torch.from_numpy(np.array(arrays[name]))
    for key, value in entries.scalars.items():
        for i in state:
            state[i][key] = torch.tensor(float(value), dtype=scalar)
    for key in _step_key(spec):
        for i in state:
            state[i][key] = torch.tensor(float(steps), dtype=scalar)
    return state


def opt_state_to_torch(
    opt_state: optax.OptState,
    spec: optim.OptimizerSpec,
    params: Any,
    *,
    step: int | None = None,
) -> dict[str, Any]:
    """The optax state of ``jaxnet.optim.transform(spec)`` as a ``torch.optim`` ``state_dict``.

    Args:
      opt_state: the optimizer state (``TrainState.opt_state``) for ``params``.
      spec: the resolved jaxnet optimizer it belongs to (``jaxnet.optim.resolve``).
      params: ``jaxnet.Net`` params, for the structure and the parameter order.
      step: optimizer steps taken (``TrainState.step``), checked against the state's counts;
        needed where the state keeps none and torch records one (RMSprop, Adadelta).

    Returns:
      ``{"state": {i: {...}}, "param_groups": [{..., "params": [0, ..., 9]}]}`` in
      ``TorchNet.parameters()`` order, which ``torch.optim.<cls>(net.parameters(),
      **spec.options).load_state_dict`` accepts; its next ``step()`` is jaxnet's next step.
      The param_group is what torch's optimizer and scheduler hold after the steps taken
      (``lr`` where the schedule is, ``initial_lr``); the scheduler's own state is
      ``torch_scheduler_state(spec, steps)``. Before the first step the state is what a fresh
      torch optimizer holds: nothing (torch's "no buffer yet"), Adagrad's initial sums.

    Raises:
      ConfigError: a spec that is not an ``OptimizerSpec``, has no torch counterpart or does
        not match the state's structure.
    """
    spec = _check_spec(spec)
    _check_structure(opt_state, optim.transform(spec).init(params), spec)
    entries = _collect(opt_state, _Entries(), spec)
    steps = _count(entries.counts, step, spec)
    names = torch_param_names(params)
    opt, _ = _torch_replay(spec, steps)
    fresh = steps == 0 and not opt.state  # torch fills a fresh state at its first step
    state = {} if fresh else _torch_state(entries, steps, names, spec)
    group = {**opt.param_groups[0], "params": list(range(len(names)))}
    if spec.schedule == _PLATEAU:
        group["lr"] = optim.plateau_of(opt_state[1]).lr
    return {"state": state, "param_groups": [group]}


def torch_scheduler_state(
    spec: optim.OptimizerSpec, steps: int, opt_state: optax.OptState | None = None
) -> dict[str, Any] | None:
    """``scheduler.state_dict()`` of the torch scheduler of ``spec`` after ``steps`` optimizer
    steps (``None`` without a schedule): what ``scheduler.load_state_dict`` takes to continue
    the schedule where jaxnet's count is. ``reduce_lr_on_plateau`` needs the ``opt_state``
    (its state is the run's metrics', not a function of the steps)."""
    _, sched = _torch_replay(_check_spec(spec), steps)
    if sched is None:
        return None
    if spec.schedule == _PLATEAU:
        if opt_state is None:
            raise ConfigError(
                "reduce_lr_on_plateau's torch state comes from the run: pass opt_state."
            )
        plateau = optim.plateau_of(opt_state[1])
        sched.best, sched.last_epoch = plateau.best, plateau.last_epoch
        sched.num_bad_epochs, sched.cooldown_counter = (
            plateau.num_bad_epochs,
            plateau.cooldown_counter,
        )
        sched._last_lr = [plateau.lr]  # what get_last_lr() reports: the lr torch steps with
    return sched.state_dict()
