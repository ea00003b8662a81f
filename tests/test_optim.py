"""jaxnet.optim against torch.optim on fixed gradient streams (``jaxnet.optim_reference``), with
PyTorch run in the same test: in float64 to 1e-12 relative after 100 steps (equal semantics
agree to ~1e-15 there), and in float32 against torch's own float32-vs-float64 difference (the
noise floor)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import background_result, in_background

from jaxnet import optim, schedules

torch = pytest.importorskip("torch")
from jaxnet import optim_reference as ref  # noqa: E402  (needs torch)

STEPS = 30


def worst_ratio(ours, t32, t64) -> float:
    """max over steps and tensors of max|ours - f64| / (max|torch32 - f64| + 1 ulp)."""
    worst = 0.0
    for a, b, c in zip(ours, t32, t64, strict=True):
        for n in c:
            ulp = np.finfo(np.float32).eps * np.max(np.abs(c[n]))
            worst = max(worst, np.max(np.abs(a[n] - c[n])) / (np.max(np.abs(b[n] - c[n])) + ulp))
    return worst


def check(spec: optim.OptimizerSpec, tx=None, limit: float = 4.0, ours=None) -> float:
    """float32: jaxnet (``ours``, or a run of ``tx``, or of the spec's transform) within
    ``limit`` x torch float32's own distance from torch float64, over ``STEPS`` steps."""
    t32 = ref.run_torch(spec, STEPS, torch.float32)
    t64 = ref.run_torch(spec, STEPS, torch.float64)
    if ours is None:
        ours = ref.run_jax(tx if tx is not None else optim.transform(spec), STEPS, jnp.float32)
    ratio = worst_ratio(ours, t32, t64)
    assert ratio <= limit, f"{spec}: {ratio:.3g} x torch's float32 round-off"
    return ratio


# The background jobs' transforms are built here, at collection, in the main thread:
# optim.transform looks its factory up in optim.OPTIMIZERS, which tests patch
# (monkeypatch.setitem) while a job may still be running.
with jax.enable_x64(True):
    _F64_TXS = [optim.transform(ref.case_spec(c)) for c in ref.CASES]


@in_background("float64_runs", in_process=True)
def _float64_runs(_: Path) -> dict[str, list]:
    """jaxnet's float64 trajectories of every case, compiled as one program (cheaper), while
    other tests run."""
    with jax.enable_x64(True):
        runs = ref.run_jax_many(_F64_TXS, 100, jnp.float64)
    return {ref.case_id(c): r for c, r in zip(ref.CASES, runs, strict=True)}


@pytest.fixture(scope="module")
def float64_runs(request) -> dict[str, list]:
    return background_result(request, "float64_runs")


@pytest.mark.parametrize("case", ref.CASES, ids=[ref.case_id(c) for c in ref.CASES])
def test_float64_equals_torch_after_100_steps(case, float64_runs) -> None:
    """Every optimizer and option, with and without schedules: float64 semantics are torch's
    to 1e-12 relative (docs/optimizers.md). Where rounding alone moves torch's own two
    implementations (for-loop, foreach) further apart, chaotic dynamics amplify any 1-ulp
    difference: there jaxnet must stay within 10x of torch's own distance."""
    spec = ref.case_spec(case)
    ours = float64_runs[ref.case_id(case)]
    theirs = ref.run_torch(spec, 100, torch.float64)
    diff = ref.max_relative_difference(ours, theirs)
    if diff > 1e-12:
        floor = ref.max_relative_difference(
            ref.run_torch(spec, 100, torch.float64, foreach=True), theirs
        )
        assert diff <= 10 * floor and floor > 1e-12, f"{diff:.3g} (torch's own: {floor:.3g})"


def test_float64_has_no_float32_intermediate(x64) -> None:
    """The state and updates stay float64 (a float32 bias correction cost Adam 6e-8)."""
    spec = optim.resolve("nadam", {"lr": 0.01}, "one_cycle_lr", {"max_lr": 0.01, "total_steps": 5})
    tx = optim.transform(spec)
    params = {"w": jnp.ones(3, jnp.float64)}
    updates, state = jax.jit(lambda p: tx.update(p, tx.init(p), p))(params)
    leaves = [x for x in jax.tree.leaves((updates, state)) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert leaves and all(x.dtype == jnp.float64 for x in leaves)


F32_CASES = [
    c
    for c in ref.CASES
    if c[0] in ("adagrad", "adamax", "nadam", "radam", "adadelta")
    and (len(c[1]) > 2 or c[2] == "one_cycle_lr")  # the cases with the most options set
    # NAdam's L2 decay on the dead units is chaotic: torch's own two float64 implementations
    # (for-loop, foreach) end 4.5e-7 apart; no float32 floor is meaningful there.
    and not (c[0] == "nadam" and "weight_decay" in c[1] and "decoupled_weight_decay" not in c[1])
]


F32_OLD = [
    ("sgd", {"lr": 0.1}),
    ("sgd", {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-2}),
    ("sgd", {"lr": 0.1, "momentum": 0.9, "dampening": 0.5}),
    ("adam", {"lr": 0.01, "amsgrad": True, "weight_decay": 1e-2}),
    ("adam", {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6, "maximize": True}),
    ("adamw", {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True}),
    ("rmsprop", {"lr": 0.01, "centered": True, "momentum": 0.9, "weight_decay": 1e-2}),
    ("rmsprop", {"lr": 0.01, "alpha": 0.9, "eps": 1e-6, "maximize": True}),
]


def _f32_specs() -> dict[str, optim.OptimizerSpec]:
    specs = {ref.case_id(c): ref.case_spec(c) for c in F32_CASES}
    return specs | {f"{n}-{k}": optim.resolve(n, k) for n, k in F32_OLD}


_F32_TXS = {name: optim.transform(spec) for name, spec in _f32_specs().items()}  # as _F64_TXS


@in_background("float32_runs", in_process=True)
def _float32_runs(_: Path) -> dict[str, list]:
    """jaxnet's float32 trajectories of ``F32_CASES`` and ``F32_OLD``, compiled as one
    program, while other tests run."""
    runs = ref.run_jax_many(list(_F32_TXS.values()), STEPS, jnp.float32)
    return dict(zip(_F32_TXS, runs, strict=True))


@pytest.fixture(scope="module")
def float32_runs(request) -> dict[str, list]:
    return background_result(request, "float32_runs")


@pytest.mark.parametrize("case", F32_CASES, ids=[ref.case_id(c) for c in F32_CASES])
def test_float32_within_torchs_round_off(case, float32_runs) -> None:
    check(ref.case_spec(case), ours=float32_runs[ref.case_id(case)])


@pytest.mark.parametrize("name,kwargs", F32_OLD, ids=[f"{n}-{k}" for n, k in F32_OLD])
def test_optimizer_matches_torch(name, kwargs, float32_runs) -> None:
    check(optim.resolve(name, kwargs), ours=float32_runs[f"{name}-{kwargs}"])


def test_defaults_are_torchs() -> None:
    import inspect

    assert set(optim.TORCH_CLASSES) == set(optim.OPTIMIZERS)
    for name, cls in optim.TORCH_CLASSES.items():
        ours = inspect.signature(optim.OPTIMIZERS[name]).parameters
        theirs = inspect.signature(getattr(torch.optim, cls)).parameters
        for arg, p in ours.items():
            assert arg in theirs, (name, arg)
            assert p.default == theirs[arg].default, (name, arg)


def test_optax_amsgrad_is_not_torchs() -> None:
    """The custom AMSGrad is needed: optax's maximum of the bias-corrected moment differs."""
    spec = optim.resolve("adam", {"lr": 0.01, "amsgrad": True})
    tx = optax.chain(optax.scale_by_amsgrad(), optax.scale_by_learning_rate(0.01))
    with pytest.raises(AssertionError):
        check(spec, tx=tx, limit=100.0)


def test_float32_bias_correction_is_not_torchs() -> None:
    """optax.adam's float32 bias correction (1 - 0.999f**t) is off by 1.3e-5 relative:
    visible far above float32 round-off; the float64-accurate one used here is not."""
    spec = optim.resolve("adam", {"lr": 0.1})
    with pytest.raises(AssertionError):
        check(spec, tx=optax.adam(0.1))
    check(spec)


def test_radam_rho_is_exact_in_float32() -> None:
    """RAdam's rho_t cancels two numbers near 2000 in its direct form (float32: ~1e-4 off);
    the form used is within a few float32 ulps of the float64 value at every step."""
    for b2 in (0.999, 0.99, 0.9):
        t = np.arange(1, 3000, dtype=np.float64)
        rho_inf = 2 / (1 - b2) - 1
        want = rho_inf - 2 * t * b2**t / (1 - b2**t)
        ours = np.asarray(optim._radam_rho(b2, jnp.asarray(t, jnp.float32)), np.float64)
        np.testing.assert_allclose(ours, want, rtol=8 * np.finfo(np.float32).eps, atol=0)


@pytest.mark.parametrize("cls", ["sgd", "adam", "rmsprop"])  # the others: F32_CASES
def test_one_cycle_cycles_momentum_or_beta1(cls) -> None:
    kwargs = {"lr": 0.1, "momentum": 0.9} if cls in ("sgd", "rmsprop") else {"lr": 0.01}
    check(optim.resolve(cls, kwargs, "one_cycle_lr", {"total_steps": STEPS}))


def test_one_cycle_needs_momentum_or_beta1_like_torch() -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    msg = "optimizer must support momentum or beta1 with `cycle_momentum` option enabled"
    with pytest.raises(ValueError, match=msg):
        torch.optim.lr_scheduler.OneCycleLR(torch.optim.Adagrad([p]), 0.1, total_steps=5)
    with pytest.raises(ValueError, match=msg):
        optim.build("adagrad", {"lr": 0.1}, "one_cycle_lr", {"total_steps": 5})
    optim.build("adagrad", {"lr": 0.1}, "one_cycle_lr", {"total_steps": 5, "cycle_momentum": False})


def _torch_error(name: str, kwargs: dict) -> str:
    cls = getattr(torch.optim, optim.TORCH_CLASSES[name])
    with pytest.raises(ValueError) as info:
        cls([torch.nn.Parameter(torch.zeros(2))], **kwargs)
    return str(info.value)


BAD = [
    ("adam", {"lr": -1.0}),
    ("adam", {"betas": (1.0, 0.999)}),
    ("adam", {"betas": (0.9, -0.1)}),
    ("adam", {"eps": -1e-8}),
    ("adamw", {"weight_decay": -1.0}),
    ("rmsprop", {"alpha": -0.5}),
    ("rmsprop", {"momentum": -0.1}),
    ("sgd", {"lr": -1.0}),
    ("sgd", {"momentum": -0.1}),
    ("sgd", {"weight_decay": -1.0}),
    ("adagrad", {"lr": -0.1}),
    ("adagrad", {"lr_decay": -0.1}),
    ("adagrad", {"weight_decay": -0.1}),
    ("adagrad", {"initial_accumulator_value": -0.1}),
    ("adagrad", {"eps": -0.1}),
    ("adamax", {"lr": -0.1}),
    ("adamax", {"eps": -0.1}),
    ("adamax", {"betas": (1.0, 0.9)}),
    ("adamax", {"betas": (0.9, 1.5)}),
    ("adamax", {"weight_decay": -0.1}),
    ("nadam", {"betas": (-0.1, 0.9)}),
    ("nadam", {"momentum_decay": -0.1}),
    ("nadam", {"weight_decay": -0.1}),
    ("radam", {"betas": (0.9, 1.0)}),
    ("radam", {"eps": -0.1}),
    ("radam", {"weight_decay": -0.1}),
    ("adadelta", {"lr": -0.1}),
    ("adadelta", {"rho": 1.5}),
    ("adadelta", {"rho": -0.5}),
    ("adadelta", {"eps": -0.1}),
    ("adadelta", {"weight_decay": -0.1}),
]


@pytest.mark.parametrize("name,kwargs", BAD, ids=[f"{n}-{k}" for n, k in BAD])
def test_bad_arguments_raise_torchs_error(name, kwargs) -> None:
    """torch.optim's message, triggered on both sides, then what to give instead."""
    from jaxnet.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        optim.OPTIMIZERS[name](**kwargs)
    theirs = _torch_error(name, kwargs)
    assert str(info.value).startswith(theirs + "; give a value "), (str(info.value), theirs)


# ---------------------------------------------------------------------------------------------
# build / resolve: names to a transform, the one place for defaults and checks
# ---------------------------------------------------------------------------------------------


def _updates(tx: optax.GradientTransformation, steps: int, grad: float = 1.0) -> list[float]:
    """The update of a single weight at each of ``steps`` steps of a constant gradient."""
    params = {"w": np.zeros(1, np.float32)}
    state, out = tx.init(params), []
    for _ in range(steps):
        updates, state = tx.update({"w": np.full(1, grad, np.float32)}, state, params)
        params = optax.apply_updates(params, updates)
        out.append(float(updates["w"][0]))
    return out


def test_registry_and_defaults() -> None:
    assert set(optim.OPTIMIZERS) == {
        "sgd",
        "adam",
        "adamw",
        "rmsprop",
        "adagrad",
        "adamax",
        "nadam",
        "radam",
        "adadelta",
    }
    assert optim.DEFAULTS == {"sgd": {"momentum": 0.9}}
    spec = optim.resolve("sgd", {"lr": 0.1})
    assert spec == optim.OptimizerSpec("sgd", {"momentum": 0.9, "lr": 0.1})
    assert spec.schedule is None and spec.schedule_every == 1
    assert optim.resolve("adam", {"lr": 0.1}).options == {"lr": 0.1}  # torch's own defaults
    # Given hyperparameters override sgd's default momentum 0.9 one by one, not all at once.
    dampened = optim.build("sgd", {"lr": 1.0, "dampening": 0.5})
    assert _updates(dampened, 2)[1] == pytest.approx(-(0.9 * 1 + 0.5 * 1))  # torch's buf
    # And momentum=0 turns it off: plain SGD.
    assert _updates(optim.build("sgd", {"lr": 1.0, "momentum": 0.0}), 2) == [-1.0, -1.0]


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (
            ("nope", {}),
            {},
            r"unknown optimizer 'nope'; choose one of sgd, adam, adamw, rmsprop, adagrad",
        ),
        (
            ("sgd", {"betas": (0.9, 0.99)}),
            {},
            r"optimizer 'sgd' takes no betas; its arguments are lr, momentum",
        ),
        (("sgd", {}, "cosine"), {}, r"unknown schedule 'cosine'; choose one of step_lr"),
        (("sgd", {}, "step_lr", {"step_size": 1, "gama": 0.5}), {}, "takes no gama"),
        (("sgd", {}, "step_lr", {}), {}, r"schedule 'step_lr' needs step_size \(e.g. step_size="),
        (("sgd", {}, "step_lr", {"step_size": 1}), {"steps_per_epoch": 0}, "positive int"),
        (
            ("sgd", {"lr": 0.1}, "one_cycle_lr", {"total_steps": 10}),
            {"run_steps": 11},
            r"total_steps=10 but the run takes 11 steps",
        ),
        (
            ("sgd", {"lr": 0.1}, "one_cycle_lr"),
            {"steps_per_epoch": 4, "epochs": 2, "run_steps": 9},
            r"total_steps=8 but the run takes 9 steps",
        ),
    ],
)
def test_unknown_names_and_arguments_are_config_errors(args, kwargs, message) -> None:
    from jaxnet.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        optim.resolve(*args, **kwargs)
    with pytest.raises(ValueError, match=message):  # build too; ConfigError is a ValueError
        optim.build(*args, **kwargs)


def test_one_cycle_without_a_length_is_refused() -> None:
    # Neither total_steps nor epochs: torch's OneCycleLR refuses it, and so does build.
    with pytest.raises(ValueError, match="total_steps"):
        optim.build("sgd", {"lr": 0.1}, "one_cycle_lr")


def test_one_cycle_rule_fills_max_lr_and_length() -> None:
    spec = optim.resolve(
        "sgd", {"lr": 0.1}, "one_cycle_lr", {}, steps_per_epoch=4, epochs=3, run_steps=12
    )
    assert spec.schedule_options == {"max_lr": 0.1, "epochs": 3, "steps_per_epoch": 4}
    assert spec.schedule_every == 1  # stepped every batch, as torch requires
    # What is given wins: total_steps instead of epochs x steps_per_epoch, its own max_lr.
    given = optim.resolve(
        "sgd", {"lr": 0.1}, "one_cycle_lr", {"max_lr": 0.5, "total_steps": 20}, epochs=3
    )
    assert given.schedule_options == {"max_lr": 0.5, "total_steps": 20}
    # A per-epoch schedule is stepped every steps_per_epoch optimizer steps.
    per_epoch = optim.resolve("adam", {}, "step_lr", {"step_size": 1}, steps_per_epoch=4)
    assert per_epoch.schedule_every == 4 and per_epoch.schedule_options == {"step_size": 1}


@pytest.mark.parametrize(
    ("schedule", "sched_kwargs", "torch_name"),
    [
        ("step_lr", {"step_size": 1, "gamma": 0.5}, "StepLR"),
        ("cosine_annealing_lr", {"T_max": 2}, "CosineAnnealingLR"),
        ("one_cycle_lr", {"cycle_momentum": False}, "OneCycleLR"),
    ],
)
def test_built_schedule_steps_like_torch(schedule, sched_kwargs, torch_name) -> None:
    """build's schedules: per epoch (torch's scheduler.step() after each epoch), and
    one_cycle_lr per batch with max_lr/epochs/steps_per_epoch taken from the run."""
    lr, epochs, per_epoch = 0.1, 3, 4
    tx = optim.build(
        "sgd",
        {"lr": lr, "momentum": 0.0},
        schedule,
        sched_kwargs,
        steps_per_epoch=per_epoch,
        epochs=epochs,
    )
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=lr, momentum=0.0)
    if schedule == "one_cycle_lr":
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=lr, epochs=epochs, steps_per_epoch=per_epoch, cycle_momentum=False
        )
    else:
        sched = getattr(torch.optim.lr_scheduler, torch_name)(opt, **sched_kwargs)
    ours = iter(_updates(tx, epochs * per_epoch))
    for epoch in range(epochs):
        for _ in range(per_epoch):
            expected = opt.param_groups[0]["lr"]
            assert -next(ours) == pytest.approx(expected, rel=1e-6), (epoch, expected)
            opt.step()
            if schedule == "one_cycle_lr":
                sched.step()
        if schedule != "one_cycle_lr":
            sched.step()


# ---------------------------------------------------------------------------------------------
# reduce_lr_on_plateau: the lr in the optimizer state, stepped on a metric once per epoch
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sgd", "adam", "adagrad"])
def test_plateau_run_equals_torch(name) -> None:
    """10 epochs of 5 steps, ReduceLROnPlateau stepped on a metric after each epoch: the
    trajectory is torch's (float32 round-off), the state's lr torch's exactly."""
    options, sched = {"lr": 0.1}, {"patience": 1, "factor": 0.5, "cooldown": 1}
    metrics = [1.0, 0.9, 0.9, 0.95, 0.9, 0.9, 0.8, 0.85, 0.86, 0.9]
    spec = optim.resolve(name, options, "reduce_lr_on_plateau", sched, steps_per_epoch=5)
    tx = optim.transform(spec)
    grads = ref.gradient_stream(50)
    params = {n: jnp.asarray(v, jnp.float32) for n, v in ref.initial_params().items()}
    state = tx.init(params)
    step = jax.jit(tx.update)
    tparams = [
        torch.nn.Parameter(torch.from_numpy(v).float()) for v in ref.initial_params().values()
    ]
    topt = getattr(torch.optim, optim.TORCH_CLASSES[name])(tparams, **spec.options)
    tsched = torch.optim.lr_scheduler.ReduceLROnPlateau(topt, **sched)
    for k, g in enumerate(grads):
        updates, state = step({n: jnp.asarray(v, jnp.float32) for n, v in g.items()}, state, params)
        params = optax.apply_updates(params, updates)
        for p, v in zip(tparams, g.values(), strict=True):
            p.grad = torch.from_numpy(v).float()
        topt.step()
        if (k + 1) % 5 == 0:
            tsched.step(metrics[k // 5])
            state = optim.plateau_step(tx, state, metrics[k // 5])
            assert optim.plateau_of(state[1]).lr == topt.param_groups[0]["lr"]
    assert optim.plateau_of(state[1]).lr < 0.1  # the case reduces the lr
    for n, theirs in zip(ref.initial_params(), tparams, strict=True):
        np.testing.assert_allclose(params[n], theirs.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_plateau_state_round_trips_exactly() -> None:
    """The scheduler's float64 lr/best survive a float32 world and a checkpoint's
    to/from_state_dict bit for bit (so a resumed run reduces the lr as the unbroken one)."""
    from flax import serialization

    tx = optim.build("adam", {"lr": 0.1}, "reduce_lr_on_plateau", {"factor": 0.3, "patience": 0})
    state = tx.init({"w": jnp.zeros(3)})
    for m in (0.123456789012345678, 0.2, 0.3):
        state = optim.plateau_step(tx, state, m)
    restored = serialization.from_state_dict(state, serialization.to_state_dict(state))
    want = schedules.Plateau(0.1 * 0.3 * 0.3, 0.123456789012345678, 3, 0, 0)
    assert optim.plateau_of(restored[1]) == want
    assert restored[1].lr.dtype == jnp.float32 and float(restored[1].lr) == np.float32(want.lr)
    # Any other transform's state passes through unchanged.
    plain = optim.build("adam", {"lr": 0.1})
    plain_state = plain.init({"w": jnp.zeros(3)})
    assert optim.plateau_step(plain, plain_state, 1.0) is plain_state


@pytest.mark.parametrize(
    ("schedule", "options"),
    [
        (None, {}),
        ("exponential_lr", {"gamma": 0.7}),
        ("one_cycle_lr", {"max_lr": 0.1, "total_steps": 9}),
    ],
)
@pytest.mark.parametrize("float64", [False, True])
def test_lr_at_is_torchs_lr_before_each_step(schedule, options, float64):
    """``optim.lr_at(spec, count)``: what torch's ``param_groups[0]["lr"]`` is when the update
    after ``count`` updates is made (an epoch of 3 steps; per-epoch schedules step after it).
    The schedules compute in JAX's default float: float32 round-off, or float64's with x64."""
    spec = optim.resolve("sgd", {"lr": 0.05}, schedule, options, steps_per_epoch=3, epochs=3)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.05)
    if schedule == "one_cycle_lr":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, **options)
    elif schedule == "exponential_lr":
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, **options)
    for count in range(9):
        with jax.enable_x64(float64):
            lr = optim.lr_at(spec, count)
        want = opt.param_groups[0]["lr"]
        # float32: a few roundings of the schedule's arithmetic (4 ulp).
        assert lr == pytest.approx(want, rel=1e-15 if float64 else 4 * np.finfo(np.float32).eps)
        opt.step()
        if schedule is not None and (count + 1) % spec.schedule_every == 0:
            sched.step()
