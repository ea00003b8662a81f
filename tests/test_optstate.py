"""jaxnet.optstate: a run trained in torch and continued in jaxnet equals torch's own
uninterrupted run, and jaxnet's state exported back is torch's own state at that step (float64:
to round-off; float32: within torch's own float32 noise floor), with PyTorch run in the same
test on a fixed gradient stream over the tutorial Net's real parameter shapes; and every
refusal names its fix."""

from __future__ import annotations

import copy
import functools

import jax
import numpy as np
import optax
import pytest

from jaxnet import optim, schedules
from jaxnet.convert import (
    WeightFileError,
    params_from_torch,
    params_to_torch,
    torch_state_dict_shapes,
)
from jaxnet.errors import ConfigError
from jaxnet.optstate import (
    opt_state_from_torch,
    opt_state_to_torch,
    torch_param_names,
    torch_scheduler_state,
)
from jaxnet.torch_reference import torch_default_dtype

torch = pytest.importorskip("torch")

K, M = 1, 1  # torch steps before the crossing, jaxnet steps after it
NAMES = list(torch_state_dict_shapes())


@functools.cache
def gradient_stream() -> tuple[dict[str, np.ndarray], ...]:
    """Three gradients in torch's layout (float32 values, exact in float64): exact zeros (dead
    units), and a first step much larger than the rest (AMSGrad keeps its maximum)."""
    rng = np.random.default_rng(0)
    out = []
    for k in range(3):
        g = {n: rng.standard_normal(s, dtype=np.float32) * 1e-2 for n, s in _shapes()}
        g["fc2.weight"][:8] = 0.0
        if k == 0:
            g["fc3.bias"] *= 50.0
        out.append(g)
    return tuple(out)


def _shapes():
    return torch_state_dict_shapes().items()


@functools.cache
def jax_gradients(dtype) -> tuple:
    """``gradient_stream()`` in jaxnet's layout (``convert``'s transforms), as ``dtype``."""
    return tuple(params_from_torch(g, dtype=dtype) for g in gradient_stream())


@functools.cache
def initial_weights() -> dict[str, np.ndarray]:
    from jaxnet.torch_reference import make_torch_net

    return {k: v.numpy() for k, v in make_torch_net(0).state_dict().items()}


# ---------------------------------------------------------------------------------------------
# The two frameworks' steps
# ---------------------------------------------------------------------------------------------


def torch_optimizer(spec, dtype, weights):
    """``torch.optim.<cls>(params, **spec.options)`` and its scheduler over the Net's
    parameters in ``TorchNet.parameters()`` order, from ``weights`` (torch layout)."""
    ps = [torch.nn.Parameter(torch.from_numpy(np.array(weights[n])).to(dtype)) for n in NAMES]
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.options.items()}
    opt = getattr(torch.optim, optim.TORCH_CLASSES[spec.name])(ps, **options)
    sched = None
    if spec.schedule is not None:
        cls = getattr(torch.optim.lr_scheduler, schedules.TORCH_CLASSES[spec.schedule])
        sched = cls(opt, **spec.schedule_options)
    return ps, opt, sched


def torch_steps(run, grads) -> dict[str, np.ndarray]:
    """Steps of ``run = (params, optimizer, scheduler)``; the weights after them (float64)."""
    ps, opt, sched = run
    for g in grads:
        for n, p in zip(NAMES, ps, strict=True):
            p.grad = torch.from_numpy(g[n]).to(p.dtype)
        opt.step()
        if sched is not None:
            sched.step()
    return {n: p.detach().double().numpy().copy() for n, p in zip(NAMES, ps, strict=True)}


@functools.cache
def jitted_update(tx):
    """One compiled step per transform: ``(params, state, grads) -> (params, state)``."""

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step)


def jax_steps(tx, params, state, grads):
    for g in grads:
        params, state = jitted_update(tx)(params, state, g)
    return params, state


def as_torch(params) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float64) for k, v in params_to_torch(params, as_numpy=True).items()}


def rel(a, b) -> float:
    """max over tensors of max|a - b| / max|b| (0 where both are 0)."""
    out = 0.0
    for n in b:
        x, y = np.asarray(a[n], np.float64), np.asarray(b[n], np.float64)
        scale = np.max(np.abs(y))
        out = max(out, float(np.max(np.abs(x - y)) / scale) if scale else float(np.any(x != y)))
    return out


def state_rel(ours: dict, theirs: dict) -> float:
    """Two torch optimizer state_dicts: the same entries, tensors to ``rel``, param_groups
    equal (apart from torch's kernel choices)."""
    assert set(ours["state"]) == set(theirs["state"])
    worst = 0.0
    for i, entry in theirs["state"].items():
        assert set(ours["state"][i]) == set(entry), (i, set(ours["state"][i]), set(entry))
        assert all(ours["state"][i][k].dtype == v.dtype for k, v in entry.items()), i
        worst = max(worst, rel(ours["state"][i], entry))
    skip = {"foreach", "fused", "differentiable", "capturable"}
    a, b = (
        {k: v for k, v in sd["param_groups"][0].items() if k not in skip} for sd in (ours, theirs)
    )
    assert a == b
    return worst


@functools.cache
def crossing(name: str, dtype) -> tuple[float, float]:
    """torch K steps -> jaxnet M steps, against torch's own K+M (one gradient stream).

    Returns ``(forward, back)``: the weights' distance from torch's, and the exported state's
    (``opt_state_to_torch``) from torch's own state_dict.
    """
    spec = SPECS[name]
    tdtype = torch.float64 if dtype == np.float64 else torch.float32
    grads = gradient_stream()
    with torch_default_dtype(tdtype):
        run = torch_optimizer(spec, tdtype, initial_weights())
        weights = torch_steps(run, grads[:K])
        saved = copy.deepcopy(run[1].state_dict())
        uninterrupted = torch_steps(run, grads[K : K + M])
        theirs = run[1].state_dict()

        tx = optim.transform(spec)
        params = params_from_torch(weights, dtype=dtype)
        state = opt_state_from_torch(saved, spec, params, step=K)
        params, state = jax_steps(tx, params, state, jax_gradients(dtype)[K : K + M])
        exported = opt_state_to_torch(state, spec, params, step=K + M)
        # Equal to torch's own state_dict (entries, dtypes, values, param_group): what a torch
        # optimizer loads from it is what it holds itself (test_continuation_float32 loads one).
        return rel(as_torch(params), uninterrupted), state_rel(exported, theirs)


SPECS = {
    # Every optimizer, and every optax state the crossing maps: dampened momentum (torch's
    # first-step rule) with a schedule's count (torch's SGD records none: step=); Adam's
    # moments and AMSGrad maximum with OneCycleLR's injected beta1; RMSprop's averages and
    # momentum trace; NAdam's mu_product (one scalar in jaxnet, one per parameter in torch).
    "sgd-dampening-step_lr": optim.resolve(
        "sgd",
        {"lr": 0.1, "momentum": 0.9, "dampening": 0.5, "weight_decay": 1e-2},
        "step_lr",
        {"step_size": 1, "gamma": 0.5},
    ),
    "adam-amsgrad-one_cycle": optim.resolve(
        "adam",
        {"lr": 2e-3, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 1e-2, "amsgrad": True},
        "one_cycle_lr",
        {"total_steps": 10},
    ),
    "rmsprop-centered-momentum": optim.resolve(
        "rmsprop", {"lr": 1e-2, "centered": True, "momentum": 0.9, "weight_decay": 1e-2}
    ),
    "nadam-decoupled": optim.resolve(
        "nadam", {"lr": 1e-2, "weight_decay": 1e-2, "decoupled_weight_decay": True}
    ),
    "adagrad-lr_decay": optim.resolve(
        "adagrad", {"lr": 1e-2, "lr_decay": 0.1, "initial_accumulator_value": 0.1}
    ),
    "adamax": optim.resolve("adamax", {"lr": 1e-2, "weight_decay": 1e-2}),
    "radam": optim.resolve("radam", {"lr": 1e-2, "betas": (0.9, 0.5)}),
    "adadelta": optim.resolve("adadelta", {"lr": 1.0, "rho": 0.8, "weight_decay": 1e-2}),
}


@pytest.mark.parametrize("name", SPECS)
def test_crossing_float64(name: str, x64) -> None:
    """torch K -> jaxnet M equals torch's K+M steps, and jaxnet's state exported after them
    is torch's own, to float64 round-off."""
    forward, back = crossing(name, np.float64)
    print(f"{name} float64 K={K} M={M}: torch->jaxnet {forward:.2g}, jaxnet->torch {back:.2g}")
    assert forward <= 1e-12 and back <= 1e-12


def test_continuation_float32() -> None:
    """float32, both ways and literally: torch 1 step -> jaxnet 1 -> torch 1 stays within
    torch's own float32 round-off of the float64 run (at most 2x torch float32's distance
    from it, plus one float32 ulp)."""
    spec = SPECS["adam-amsgrad-one_cycle"]
    grads = gradient_stream()
    run = torch_optimizer(spec, torch.float32, initial_weights())
    weights = torch_steps(run, grads[:1])
    saved = copy.deepcopy(run[1].state_dict())
    t32 = [torch_steps(run, grads[1:2]), torch_steps(run, grads[2:])]
    with torch_default_dtype(torch.float64):
        run = torch_optimizer(spec, torch.float64, initial_weights())
        t64 = [torch_steps(run, grads[:2]), torch_steps(run, grads[2:])]

    tx = optim.transform(spec)
    params = params_from_torch(weights)
    state = opt_state_from_torch(saved, spec, params)
    params, state = jax_steps(tx, params, state, jax_gradients(np.float32)[1:2])
    run = torch_optimizer(spec, torch.float32, as_torch(params))
    run[1].load_state_dict(opt_state_to_torch(state, spec, params))
    run[2].load_state_dict(torch_scheduler_state(spec, 2))
    crossed = [as_torch(params), torch_steps(run, grads[2:])]
    eps = float(np.finfo(np.float32).eps)
    for ours, theirs, exact in zip(crossed, t32, t64, strict=True):
        print(f"float32: crossing {rel(ours, exact):.2g}, torch {rel(theirs, exact):.2g}")
        assert rel(ours, exact) <= 2 * rel(theirs, exact) + eps


# ---------------------------------------------------------------------------------------------
# The parameter order, the first step, and the refusals
# ---------------------------------------------------------------------------------------------


def torch_state(name: str, options: dict, steps: int = 1, **sched) -> dict:
    """``state_dict()`` of ``torch.optim.<name>`` over the Net after ``steps`` float32 steps."""
    spec = optim.resolve(name, options, **sched)
    run = torch_optimizer(spec, torch.float32, initial_weights())
    torch_steps(run, gradient_stream()[:steps])
    return run[1].state_dict()


def test_param_order_is_torchs(params0) -> None:
    from jaxnet.torch_reference import TorchNet

    assert torch_param_names(params0) == [n for n, _ in TorchNet().named_parameters()]


def test_no_buffer_yet(params0) -> None:
    """Before the first step: torch's empty state is jaxnet's fresh state (count 0: SGD's
    first step copies the gradient, undamped), and back; Adagrad's initial sums cross too."""
    for name, options in [("sgd", {"momentum": 0.9, "dampening": 0.5}), ("adagrad", {})]:
        spec = optim.resolve(name, options)
        theirs = torch_state(name, options, steps=0)
        fresh = optim.transform(spec).init(params0)
        ours = opt_state_from_torch(theirs, spec, params0)
        assert jax.tree.structure(ours) == jax.tree.structure(fresh)
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(fresh), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert state_rel(opt_state_to_torch(fresh, spec, params0), theirs) == 0.0
    assert opt_state_to_torch(fresh, spec, params0)["state"][0]["sum"].shape == (6, 1, 3, 3)


def test_round_trip_is_exact(params0) -> None:
    spec = optim.resolve("adam", {"amsgrad": True})
    theirs = torch_state("adam", {"amsgrad": True})
    ours = opt_state_to_torch(opt_state_from_torch(theirs, spec, params0), spec, params0)
    assert state_rel(ours, theirs) == 0.0


def test_refuses_another_optimizer(params0) -> None:
    theirs = torch_state("adam", {})
    with pytest.raises(
        WeightFileError,
        match=r"not one of a torch.optim.SGD.*lack dampening, "
        r"momentum, nesterov.*torch.optim.Adam",
    ):
        opt_state_from_torch(theirs, optim.resolve("sgd", {}), params0)
    with pytest.raises(WeightFileError, match=r"decoupled_weight_decay=False \(jaxnet's: True\)"):
        opt_state_from_torch(theirs, optim.resolve("adamw", {"weight_decay": 0.0}), params0)


def test_refuses_other_hyperparameters(params0) -> None:
    theirs = torch_state("sgd", {"momentum": 0.8})
    with pytest.raises(WeightFileError, match=r"momentum=0.8 \(jaxnet's: 0.9\).*resolve"):
        opt_state_from_torch(theirs, optim.resolve("sgd", {"momentum": 0.9}), params0)


def test_refuses_missing_entries_and_shapes(params0) -> None:
    theirs = torch_state("adam", {})
    broken = copy.deepcopy(theirs)
    del broken["state"][3]["exp_avg_sq"]
    with pytest.raises(WeightFileError, match=r"conv2\.bias: lacks exp_avg_sq"):
        opt_state_from_torch(broken, optim.resolve("adam", {}), params0)
    wide = copy.deepcopy(theirs)
    wide["state"][9]["exp_avg"] = torch.zeros(3)
    with pytest.raises(
        WeightFileError, match=r"(?s)'exp_avg'.*fc3.bias: got \(3,\), expected \(2,\)"
    ):
        opt_state_from_torch(wide, optim.resolve("adam", {}), params0)
    split = copy.deepcopy(theirs)
    split["param_groups"] = [
        {**split["param_groups"][0], "params": list(range(5))},
        {**split["param_groups"][0], "params": list(range(5, 10))},
    ]
    with pytest.raises(WeightFileError, match="2 param_groups"):
        opt_state_from_torch(split, optim.resolve("adam", {}), params0)


def test_refuses_what_it_cannot_know(params0) -> None:
    spec = optim.resolve("sgd", {}, "step_lr", {"step_size": 2})
    theirs = torch_state("sgd", {}, schedule="step_lr", schedule_options={"step_size": 2})
    with pytest.raises(ConfigError, match="pass step="):
        opt_state_from_torch(theirs, spec, params0)
    assert opt_state_from_torch(theirs, spec, params0, step=1)[-1].count == 1
    with pytest.raises(ConfigError, match="OptimizerSpec"):
        opt_state_from_torch(theirs, optim.transform(spec), params0)
    rms = optim.resolve("rmsprop", {})
    with pytest.raises(ConfigError, match="pass step="):
        opt_state_to_torch(optim.transform(rms).init(params0), rms, params0)
    with pytest.raises(ConfigError, match="structure of 'adam'"):
        opt_state_to_torch(optim.transform(rms).init(params0), optim.resolve("adam", {}), params0)


def test_reduce_lr_on_plateau_crosses(params0) -> None:
    """ReduceLROnPlateau's state (lr, best, counters) crosses with the torch scheduler's
    state_dict, and both frameworks then reduce the lr on the same metrics alike."""
    spec = optim.resolve("sgd", {"lr": 0.1}, "reduce_lr_on_plateau", {"patience": 0, "factor": 0.5})
    run = torch_optimizer(spec, torch.float32, initial_weights())
    torch_steps((*run[:2], None), gradient_stream()[:1])  # stepped per epoch, on a metric
    for metric in (1.0, 2.0):  # the second epoch is worse: lr 0.1 -> 0.05
        run[2].step(metric)
    theirs, sched = run[1].state_dict(), run[2].state_dict()
    with pytest.raises(ConfigError, match="scheduler_state="):
        opt_state_from_torch(theirs, spec, params0)
    state = opt_state_from_torch(theirs, spec, params0, scheduler_state=sched)
    plateau = optim.plateau_of(state[1])
    assert (plateau.lr, plateau.best, plateau.last_epoch) == (0.05, 1.0, 2)

    state = optim.plateau_step(optim.transform(spec), state, 3.0)  # worse again: 0.025
    run[2].step(3.0)
    fresh = torch_optimizer(spec, torch.float32, initial_weights())
    fresh[1].load_state_dict(opt_state_to_torch(state, spec, params0))
    fresh[2].load_state_dict(torch_scheduler_state(spec, 1, state))
    assert fresh[1].param_groups[0]["lr"] == run[1].param_groups[0]["lr"] == 0.025
    assert fresh[2].state_dict() == run[2].state_dict()
    other = {**sched, "factor": 0.1}
    with pytest.raises(WeightFileError, match=r"factor=0\.1.*--sched-opt"):
        opt_state_from_torch(theirs, spec, params0, scheduler_state=other)
