"""jaxnet.schedules against torch.optim.lr_scheduler, stepped over 3 epochs in the same test."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnet import schedules

torch = pytest.importorskip("torch")

EPOCHS = 3
BASE_LR = 0.1


def torch_values(make_sched, steps_per_epoch: int, optimizer: str = "sgd", per_epoch=True):
    """lr (and momentum/beta1) that torch's optimizer uses at each of 3 epochs' steps."""
    p = torch.nn.Parameter(torch.zeros(1))
    if optimizer == "sgd":
        opt = torch.optim.SGD([p], lr=BASE_LR, momentum=0.9)
    else:
        opt = torch.optim.Adam([p], lr=BASE_LR)
    sched = make_sched(opt)
    lrs, moms = [], []
    for k in range(EPOCHS * steps_per_epoch):
        g = opt.param_groups[0]
        lrs.append(g["lr"])
        moms.append(g["betas"][0] if "betas" in g else g["momentum"])
        opt.step()
        if not per_epoch or (k + 1) % steps_per_epoch == 0:
            sched.step()
    return np.array(lrs), np.array(moms)


def jax_values(schedule, n: int) -> np.ndarray:
    return np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(n)))


def assert_close(ours: np.ndarray, theirs: np.ndarray, scale: float) -> None:
    # float32 evaluation of torch's float64 values: a few float32 ulps of the value, plus
    # float32 round-off of the cosine near its zero (relative to the schedule's scale).
    np.testing.assert_allclose(ours, theirs, rtol=2e-6, atol=2e-7 * scale)


S = torch.optim.lr_scheduler
CASES = {
    "step_lr": (
        lambda o: S.StepLR(o, step_size=2, gamma=0.5),
        lambda spe: schedules.step_lr(BASE_LR, 2, 0.5, steps_per_epoch=spe),
    ),
    "multi_step_lr": (
        lambda o: S.MultiStepLR(o, milestones=[1, 2, 2, 20], gamma=0.3),
        lambda spe: schedules.multi_step_lr(BASE_LR, [1, 2, 2, 20], 0.3, steps_per_epoch=spe),
    ),
    "exponential_lr": (
        lambda o: S.ExponentialLR(o, gamma=0.9),
        lambda spe: schedules.exponential_lr(BASE_LR, 0.9, steps_per_epoch=spe),
    ),
    # T_max well below the run length: torch's cosine goes back up past T_max.
    "cosine_annealing_lr": (
        lambda o: S.CosineAnnealingLR(o, T_max=7, eta_min=1e-3),
        lambda spe: schedules.cosine_annealing_lr(BASE_LR, 7, 1e-3, steps_per_epoch=spe),
    ),
    "linear_lr": (
        lambda o: S.LinearLR(o, start_factor=0.1, end_factor=1.0, total_iters=9),
        lambda spe: schedules.linear_lr(BASE_LR, 0.1, 1.0, 9, steps_per_epoch=spe),
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("steps_per_epoch,per_epoch", [(10, False), (10, True)])
def test_schedule_matches_torch(name: str, steps_per_epoch: int, per_epoch: bool) -> None:
    make_torch, make_ours = CASES[name]
    want, _ = torch_values(make_torch, steps_per_epoch, per_epoch=per_epoch)
    ours = jax_values(make_ours(steps_per_epoch if per_epoch else 1), len(want))
    assert len(set(np.round(want, 12))) > 1, "the case must exercise the schedule"
    assert_close(ours, want, BASE_LR)


def test_cosine_oscillates_past_t_max_like_torch() -> None:
    want, _ = torch_values(lambda o: S.CosineAnnealingLR(o, T_max=5), 1, per_epoch=False)
    ours = jax_values(schedules.cosine_annealing_lr(BASE_LR, 5), 3)
    assert_close(ours, want, BASE_LR)
    long_want, _ = torch_values(lambda o: S.CosineAnnealingLR(o, T_max=5), 10, per_epoch=False)
    long = jax_values(schedules.cosine_annealing_lr(BASE_LR, 5), len(long_want))
    assert_close(long, long_want, BASE_LR)
    assert long[10] == pytest.approx(BASE_LR)  # back at the top after 2 * T_max


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"anneal_strategy": "linear", "pct_start": 0.25},
        {"three_phase": True, "base_momentum": 0.8, "max_momentum": 0.9},
    ],
)
def test_one_cycle_matches_torch_with_momentum(optimizer: str, kwargs: dict) -> None:
    steps_per_epoch = 10
    T = EPOCHS * steps_per_epoch
    want_lr, want_mom = torch_values(
        lambda o: S.OneCycleLR(
            o, max_lr=1.0, epochs=EPOCHS, steps_per_epoch=steps_per_epoch, **kwargs
        ),
        steps_per_epoch,
        optimizer=optimizer,
        per_epoch=False,
    )
    ours = schedules.one_cycle_lr(1.0, epochs=EPOCHS, steps_per_epoch=steps_per_epoch, **kwargs)
    assert_close(jax_values(ours.lr, T), want_lr, 1.0)
    assert_close(jax_values(ours.momentum, T), want_mom, 1.0)
    # torch refuses to step past total_steps; ours turns to NaN there, never a silent value.
    assert np.isnan(jax_values(ours.lr, T + 2)[-1])


def test_one_cycle_without_momentum_cycling() -> None:
    assert schedules.one_cycle_lr(0.1, total_steps=10, cycle_momentum=False).momentum is None


@pytest.mark.parametrize(
    "call",
    [
        lambda: schedules.step_lr(0.1, 0),
        lambda: schedules.exponential_lr(0.1, 0.9, steps_per_epoch=0),
        lambda: schedules.linear_lr(0.1, start_factor=0.0),
        lambda: schedules.cosine_annealing_lr(0.1, 0),
        lambda: schedules.one_cycle_lr(0.1),
        lambda: schedules.one_cycle_lr(0.1, total_steps=10, pct_start=1),
        lambda: schedules.one_cycle_lr(0.1, total_steps=10, anneal_strategy="exp"),
    ],
)
def test_bad_arguments_raise(call) -> None:
    with pytest.raises(ValueError):
        call()


@pytest.mark.parametrize("name", sorted(CASES))
def test_schedule_is_float64_under_x64(name: str, x64) -> None:
    """Under x64 a schedule computes in float64 (no float32 constant): torch's float64 lr."""
    make_torch, make_ours = CASES[name]
    want, _ = torch_values(make_torch, 10, per_epoch=True)
    ours = jax.jit(jax.vmap(make_ours(10)))(jnp.arange(len(want)))
    assert ours.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(ours), want, rtol=1e-14, atol=1e-16)


def test_one_cycle_is_float64_under_x64(x64) -> None:
    steps_per_epoch, kwargs = 10, {"three_phase": True}
    want_lr, want_mom = torch_values(
        lambda o: S.OneCycleLR(
            o, max_lr=1.0, epochs=EPOCHS, steps_per_epoch=steps_per_epoch, **kwargs
        ),
        steps_per_epoch,
        per_epoch=False,
    )
    ours = schedules.one_cycle_lr(1.0, epochs=EPOCHS, steps_per_epoch=steps_per_epoch, **kwargs)
    n = EPOCHS * steps_per_epoch
    np.testing.assert_allclose(jax_values(ours.lr, n), want_lr, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(jax_values(ours.momentum, n), want_mom, rtol=1e-14, atol=1e-15)


# ---------------------------------------------------------------------------------------------
# ReduceLROnPlateau: metric sequences replayed on torch's scheduler and on ours
# ---------------------------------------------------------------------------------------------


def torch_plateau_lrs(lr: float, metrics, **kwargs) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = S.ReduceLROnPlateau(opt, **kwargs)
    out = []
    for m in metrics:
        sched.step(m)
        out.append(opt.param_groups[0]["lr"])
    return out


def random_metrics(rng: np.random.Generator, n: int, mode: str) -> list[float]:
    """Plateaus, exact ties, steps just inside and just outside the threshold, and NaN."""
    values, current = [], 1.0
    for _ in range(n):
        r = rng.random()
        if r < 0.3:
            pass  # an exact tie with the last value
        elif r < 0.45:
            current = current * (1 - 1e-4) if mode == "min" else current * (1 + 1e-4)
        elif r < 0.5:
            current = current - 1e-4 if mode == "min" else current + 1e-4
        elif r < 0.52:
            values.append(float("nan"))
            continue
        else:
            current = current * float(rng.uniform(0.9, 1.1))
        values.append(current)
    return values


def plateau_kwargs(rng: np.random.Generator) -> dict:
    return {
        "mode": str(rng.choice(["min", "max"])),
        "factor": float(rng.choice([0.1, 0.5, 0.3])),
        "patience": int(rng.integers(0, 4)),
        "threshold": float(rng.choice([1e-4, 0.0, 0.05])),
        "threshold_mode": str(rng.choice(["rel", "abs"])),
        "cooldown": int(rng.integers(0, 3)),
        "min_lr": float(rng.choice([0.0, 1e-3])),
        "eps": float(rng.choice([1e-8, 1e-3])),
    }


def test_plateau_equals_torch_on_random_metric_sequences() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        kwargs = plateau_kwargs(rng)
        metrics = random_metrics(rng, 40, kwargs["mode"])
        rule = schedules.reduce_lr_on_plateau(0.1, **kwargs)
        assert rule.replay(0.1, metrics) == torch_plateau_lrs(0.1, metrics, **kwargs), kwargs


def test_plateau_state_matches_torchs() -> None:
    kwargs = {"patience": 1, "cooldown": 2, "threshold": 0.0}
    metrics = [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.5]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = S.ReduceLROnPlateau(opt, **kwargs)
    rule = schedules.reduce_lr_on_plateau(0.1, **kwargs)
    state = rule.init(0.1)
    for m in metrics:
        sched.step(m)
        state = rule.step(state, m)
        assert state == schedules.Plateau(
            opt.param_groups[0]["lr"],
            sched.best,
            sched.last_epoch,
            sched.num_bad_epochs,
            sched.cooldown_counter,
        )


@pytest.mark.parametrize("kwargs", [{"factor": 1.0}, {"mode": "avg"}, {"threshold_mode": "pct"}])
def test_plateau_rejects_what_torch_rejects(kwargs) -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError) as theirs:
        S.ReduceLROnPlateau(opt, **kwargs)
    with pytest.raises(ValueError) as ours:
        schedules.reduce_lr_on_plateau(0.1, **kwargs)
    assert str(ours.value).startswith(str(theirs.value))  # then what to give instead
