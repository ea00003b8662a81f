"""jaxnet's optimizers and ``torch.optim`` run side by side on one fixed gradient stream: the
reference that ``tests/test_optim.py`` and ``scripts/float64_table.py`` check against.

Importing this module needs PyTorch; ``import jaxnet`` does not import it. Small tensors and a
precomputed gradient stream keep every run cheap: what differs between the two runs can only be
the optimizer (and its schedule), never the model or the data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

from jaxnet import optim, schedules
from jaxnet.torch_reference import torch_default_dtype

__all__ = [
    "CASES",
    "SHAPES",
    "case_id",
    "case_spec",
    "gradient_stream",
    "initial_params",
    "max_relative_difference",
    "run_jax",
    "run_jax_many",
    "run_torch",
]

SHAPES = {"w": (40, 30), "b": (30,)}
"""The parameters of the stream: a matrix and a vector."""

Trajectory = list[dict[str, np.ndarray]]
"""The parameters after each step, as float64 numpy arrays."""

_EPOCH = 10  # optimizer steps per scheduler.step() for the per-epoch schedules below

CASES: list[tuple[str, dict[str, Any], str | None, dict[str, Any], int]] = [
    # (optimizer, its options, schedule, the scheduler's options, steps per scheduler.step())
    ("sgd", {"lr": 0.1, "momentum": 0.0}, None, {}, 1),
    ("sgd", {"lr": 0.1, "momentum": 0.9}, None, {}, 1),
    ("sgd", {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-2}, None, {}, 1),
    ("sgd", {"lr": 0.1, "momentum": 0.9, "dampening": 0.5, "maximize": True}, None, {}, 1),
    ("adam", {"lr": 0.01}, None, {}, 1),
    ("adam", {"lr": 0.01, "amsgrad": True, "weight_decay": 1e-2}, None, {}, 1),
    ("adam", {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6, "maximize": True}, None, {}, 1),
    ("adam", {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True}, None, {}, 1),
    ("adamw", {"lr": 0.01}, None, {}, 1),
    ("adamw", {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True}, None, {}, 1),
    ("rmsprop", {"lr": 0.01}, None, {}, 1),
    ("rmsprop", {"lr": 0.01, "centered": True, "momentum": 0.9, "weight_decay": 1e-2}, None, {}, 1),
    ("rmsprop", {"lr": 0.01, "alpha": 0.9, "eps": 1e-6, "maximize": True}, None, {}, 1),
    ("adagrad", {"lr": 0.1}, None, {}, 1),
    (
        "adagrad",
        {"lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.1, "weight_decay": 1e-2},
        None,
        {},
        1,
    ),
    ("adagrad", {"lr": 0.1, "eps": 1e-6, "maximize": True}, None, {}, 1),
    ("adamax", {"lr": 0.01}, None, {}, 1),
    ("adamax", {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 1e-2}, None, {}, 1),
    ("nadam", {"lr": 0.01}, None, {}, 1),
    ("nadam", {"lr": 0.01, "weight_decay": 1e-2, "momentum_decay": 0.01}, None, {}, 1),
    ("nadam", {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True}, None, {}, 1),
    ("nadam", {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6, "maximize": True}, None, {}, 1),
    ("radam", {"lr": 0.01}, None, {}, 1),
    ("radam", {"lr": 0.01, "betas": (0.9, 0.99), "weight_decay": 1e-2}, None, {}, 1),
    ("radam", {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True}, None, {}, 1),
    ("radam", {"lr": 0.01, "betas": (0.8, 0.5), "eps": 1e-6, "maximize": True}, None, {}, 1),
    ("adadelta", {"lr": 1.0}, None, {}, 1),
    ("adadelta", {"rho": 0.5, "eps": 1e-4, "weight_decay": 1e-2, "maximize": True}, None, {}, 1),
    ("sgd", {"lr": 0.1, "momentum": 0.9}, "step_lr", {"step_size": 2, "gamma": 0.5}, _EPOCH),
    ("sgd", {"lr": 0.1, "momentum": 0.9}, "one_cycle_lr", {"max_lr": 0.1, "total_steps": 100}, 1),
    ("adam", {"lr": 0.01}, "cosine_annealing_lr", {"T_max": 7, "eta_min": 1e-3}, 1),
    ("adamw", {"lr": 0.01}, "one_cycle_lr", {"max_lr": 0.01, "total_steps": 100}, 1),
    ("rmsprop", {"lr": 0.01, "momentum": 0.9}, "exponential_lr", {"gamma": 0.97}, 1),
    ("adagrad", {"lr": 0.1}, "multi_step_lr", {"milestones": [2, 5, 5]}, _EPOCH),
    ("adamax", {"lr": 0.01}, "linear_lr", {"start_factor": 0.1, "total_iters": 30}, 1),
    (
        "nadam",
        {"lr": 0.01},
        "one_cycle_lr",
        {"max_lr": 0.01, "total_steps": 100, "three_phase": True, "anneal_strategy": "linear"},
        1,
    ),
    ("radam", {"lr": 0.01}, "one_cycle_lr", {"max_lr": 0.01, "total_steps": 100}, 1),
    ("adadelta", {"lr": 1.0}, "cosine_annealing_lr", {"T_max": 3}, _EPOCH),
]
"""Every optimizer with each of its options (and every schedule) at least once: the float64
cases of ``tests/test_optim.py`` and the rows of ``docs/optimizers.md``'s table."""


def case_spec(
    case: tuple[str, dict[str, Any], str | None, dict[str, Any], int],
) -> optim.OptimizerSpec:
    """The resolved ``OptimizerSpec`` of one of ``CASES``."""
    name, options, schedule, schedule_options, every = case
    spec = optim.resolve(name, options, schedule, schedule_options, steps_per_epoch=every)
    return spec


def case_id(case: tuple[str, dict[str, Any], str | None, dict[str, Any], int]) -> str:
    """A short readable name of one of ``CASES``."""
    name, options, schedule, schedule_options, every = case
    opts = ",".join(f"{k}={v}" for k, v in options.items() if k != "lr")
    out = f"{name}({opts})"
    if schedule is not None:
        sched = ",".join(f"{k}={v}" for k, v in schedule_options.items() if k != "max_lr")
        out += f"+{schedule}({sched})" + (f"/{every}" if every > 1 else "")
    return out


def gradient_stream(steps: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``steps`` float64 gradients with the patterns that separate implementations: exact zeros
    (dead units), a nearly constant block (centered RMSprop's ``v - a**2`` cancels), and a
    first step much larger than the rest (AMSGrad's maximum stays the first step's)."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(steps):
        g = {n: rng.standard_normal(s) * 1e-2 for n, s in SHAPES.items()}
        g["w"][:5] = 0.0
        g["w"][5:10] = 3e-3 if k % 2 else 3.1e-3
        if k == 0:
            g["b"] *= 50.0
        out.append(g)
    return out


def initial_params(seed: int = 1) -> dict[str, np.ndarray]:
    """float64 starting parameters of ``SHAPES``."""
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s) * 0.1 for n, s in SHAPES.items()}


def _torch_scheduler(opt: torch.optim.Optimizer, spec: optim.OptimizerSpec):
    if spec.schedule is None:
        return None
    cls = getattr(torch.optim.lr_scheduler, schedules.TORCH_CLASSES[spec.schedule])
    return cls(opt, **spec.schedule_options)


def run_torch(
    spec: optim.OptimizerSpec, steps: int, dtype: torch.dtype, *, foreach: bool = False
) -> Trajectory:
    """``torch.optim`` (and its scheduler, stepped every ``spec.schedule_every`` steps) on
    ``gradient_stream(steps)`` in ``dtype`` (float32 or float64). ``foreach=True`` takes
    torch's other implementation (one kernel over all tensors; the for-loop one is the CPU
    default): the same semantics with other roundings, so the two measure how far rounding
    alone carries a trajectory (far, where the dynamics are chaotic)."""
    with torch_default_dtype(dtype):
        params = {
            n: torch.nn.Parameter(torch.from_numpy(v).to(dtype))
            for n, v in initial_params().items()
        }
        cls = getattr(torch.optim, optim.TORCH_CLASSES[spec.name])
        opt = cls(list(params.values()), **spec.options, foreach=foreach)
        scheduler = _torch_scheduler(opt, spec)
        traj = []
        for k, g in enumerate(gradient_stream(steps)):
            for n, p in params.items():
                p.grad = torch.from_numpy(g[n]).to(dtype)
            opt.step()
            if scheduler is not None and (k + 1) % spec.schedule_every == 0:
                scheduler.step()
            traj.append({n: p.detach().double().numpy().copy() for n, p in params.items()})
    return traj


def run_jax(tx: optax.GradientTransformation, steps: int, dtype: jnp.dtype) -> Trajectory:
    """``tx`` on ``gradient_stream(steps)`` in ``dtype``, all steps in one jitted
    ``lax.scan``. float64 needs ``jax.enable_x64``."""
    return run_jax_many([tx], steps, dtype)[0]


def run_jax_many(
    txs: Sequence[optax.GradientTransformation], steps: int, dtype: jnp.dtype
) -> list[Trajectory]:
    """``run_jax`` of each of ``txs``, compiled as one program: one compilation for all is
    ~2.5x cheaper than one each."""
    params = {n: jnp.asarray(v, dtype) for n, v in initial_params().items()}
    grads = gradient_stream(steps)
    stacked = {n: jnp.asarray(np.stack([g[n] for g in grads]), dtype) for n in SHAPES}
    if dtype == jnp.float64 and stacked["w"].dtype != jnp.float64:
        raise RuntimeError("run_jax in float64 needs jax_enable_x64 (with jax.enable_x64(True)).")

    def run(tx: optax.GradientTransformation, p: Any, gs: Any) -> Any:
        def step(carry, g):
            q, state = carry
            updates, state = tx.update(g, state, q)
            q = optax.apply_updates(q, updates)
            return (q, state), q

        return jax.lax.scan(step, (p, tx.init(p)), gs)[1]

    runs = jax.jit(lambda p, gs: [run(tx, p, gs) for tx in txs])(params, stacked)
    out = []
    for traj in runs:
        traj = {n: np.asarray(v, np.float64) for n, v in traj.items()}
        out.append([{n: traj[n][k] for n in SHAPES} for k in range(steps)])
    return out


def max_relative_difference(ours: Trajectory, theirs: Trajectory) -> float:
    """max over steps and tensors of ``max|ours - theirs| / max|theirs|``."""
    worst = 0.0
    for a, b in zip(ours, theirs, strict=True):
        for n in b:
            worst = max(worst, float(np.max(np.abs(a[n] - b[n])) / np.max(np.abs(b[n]))))
    return worst
