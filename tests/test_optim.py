"""jaxnet.optim against torch.optim on the same gradient stream, judged against torch's own
float32-vs-float64 difference (the noise floor), with PyTorch run in the same test."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxnet import optim, schedules

torch = pytest.importorskip("torch")

STEPS = 30
SHAPES = {"w": (40, 30), "b": (30,)}
TORCH = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "rmsprop": "RMSprop"}


def gradient_stream(seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Random gradients with the patterns that separate implementations: exact zeros (dead
    units), a nearly constant block (centered RMSprop's v - a**2 cancels), and a first step
    much larger than the rest (AMSGrad's maximum stays the first step's)."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(STEPS):
        g = {n: (rng.standard_normal(s) * 1e-2).astype(np.float32) for n, s in SHAPES.items()}
        g["w"][:5] = 0.0
        g["w"][5:10] = np.float32(3e-3 if k % 2 else 3.1e-3)
        if k == 0:
            g["b"] *= 50.0
        out.append(g)
    return out


def initial_params(seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: (rng.standard_normal(s) * 0.1).astype(np.float32) for n, s in SHAPES.items()}


def run_torch(name, kwargs, dtype, sched=None):
    p0, grads = initial_params(), gradient_stream()
    params = {n: torch.nn.Parameter(torch.from_numpy(v).to(dtype)) for n, v in p0.items()}
    opt = getattr(torch.optim, TORCH[name])(list(params.values()), **kwargs)
    scheduler = sched(opt) if sched else None
    traj = []
    for g in grads:
        for n, p in params.items():
            p.grad = torch.from_numpy(g[n]).to(dtype)
        opt.step()
        if scheduler:
            scheduler.step()
        traj.append({n: p.detach().double().numpy().copy() for n, p in params.items()})
    return traj


def run_jax(tx: optax.GradientTransformation):
    params = {n: jnp.asarray(v) for n, v in initial_params().items()}
    state = tx.init(params)

    @jax.jit
    def step(params, state, g):
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    traj = []
    for g in gradient_stream():
        params, state = step(params, state, {n: jnp.asarray(v) for n, v in g.items()})
        traj.append({n: np.asarray(v, np.float64) for n, v in params.items()})
    return traj


def worst_ratio(ours, t32, t64) -> float:
    """max over steps and tensors of max|ours - f64| / (max|torch32 - f64| + 1 ulp)."""
    worst = 0.0
    for a, b, c in zip(ours, t32, t64, strict=True):
        for n in c:
            ulp = np.finfo(np.float32).eps * np.max(np.abs(c[n]))
            worst = max(worst, np.max(np.abs(a[n] - c[n])) / (np.max(np.abs(b[n] - c[n])) + ulp))
    return worst


def check(name, kwargs, tx=None, sched=None, limit=4.0) -> float:
    t32 = run_torch(name, kwargs, torch.float32, sched)
    t64 = run_torch(name, kwargs, torch.float64, sched)
    ours = run_jax(tx if tx is not None else optim.OPTIMIZERS[name](**kwargs))
    ratio = worst_ratio(ours, t32, t64)
    assert ratio <= limit, f"{name}{kwargs}: {ratio:.3g} x torch's float32 round-off"
    return ratio


CONFIGS = [
    ("sgd", {"lr": 0.1}),
    ("sgd", {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-2}),
    ("sgd", {"lr": 0.1, "momentum": 0.9, "dampening": 0.5}),
    ("sgd", {"lr": 0.1, "momentum": 0.9, "maximize": True}),
    ("adam", {"lr": 0.01}),
    ("adam", {"lr": 0.01, "amsgrad": True, "weight_decay": 1e-2}),
    ("adam", {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6, "maximize": True}),
    ("adamw", {"lr": 0.01}),
    ("adamw", {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True}),
    ("rmsprop", {"lr": 0.01}),
    ("rmsprop", {"lr": 0.01, "centered": True, "momentum": 0.9, "weight_decay": 1e-2}),
    ("rmsprop", {"lr": 0.01, "alpha": 0.9, "eps": 1e-6, "maximize": True}),
]


@pytest.mark.parametrize("name,kwargs", CONFIGS, ids=[f"{n}-{k}" for n, k in CONFIGS])
def test_optimizer_matches_torch(name, kwargs) -> None:
    check(name, kwargs)


def test_defaults_are_torchs() -> None:
    import inspect

    for name, cls in TORCH.items():
        ours = inspect.signature(optim.OPTIMIZERS[name]).parameters
        theirs = inspect.signature(getattr(torch.optim, cls)).parameters
        for arg, p in ours.items():
            if arg in theirs:
                assert p.default == theirs[arg].default, (name, arg)


def test_optax_amsgrad_is_not_torchs() -> None:
    """The custom AMSGrad is needed: optax's maximum of the bias-corrected moment differs."""
    kwargs = {"lr": 0.01, "amsgrad": True}
    tx = optax.chain(optax.scale_by_amsgrad(), optax.scale_by_learning_rate(0.01))
    with pytest.raises(AssertionError):
        check("adam", kwargs, tx=tx, limit=100.0)
    check("adam", kwargs)


def test_float32_bias_correction_is_not_torchs() -> None:
    """optax.adam's float32 bias correction (1 - 0.999f**t) is off by 1.3e-5 relative:
    visible far above float32 round-off; the float64-accurate one used here is not."""
    with pytest.raises(AssertionError):  # measured: 28x torch's round-off (ours: 1.5x)
        check("adam", {"lr": 0.1}, tx=optax.adam(0.1))
    check("adam", {"lr": 0.1})


def test_one_cycle_momentum_and_beta1_cycling() -> None:
    def torch_sched(opt):
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=STEPS)

    cycle = schedules.one_cycle_lr(0.1, total_steps=STEPS)
    check(
        "sgd",
        {"lr": 0.1, "momentum": 0.9},
        sched=torch_sched,
        tx=optim.sgd(lr=cycle.lr, momentum=cycle.momentum),
    )
    check(
        "adam",
        {"lr": 0.1},
        sched=torch_sched,
        tx=optim.adam(lr=cycle.lr, betas=(cycle.momentum, 0.999)),
    )
    check(
        "rmsprop",
        {"lr": 0.1, "momentum": 0.9},
        sched=torch_sched,
        tx=optim.rmsprop(lr=cycle.lr, momentum=cycle.momentum),
    )


def test_lr_schedule_plugs_into_adamw() -> None:
    def torch_sched(opt):
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=7)

    check(
        "adamw",
        {"lr": 0.01},
        sched=torch_sched,
        tx=optim.adamw(lr=schedules.cosine_annealing_lr(0.01, 7)),
    )


@pytest.mark.parametrize(
    "call",
    [
        lambda: optim.adam(lr=-1.0),
        lambda: optim.adam(betas=(1.0, 0.999)),
        lambda: optim.adam(betas=(0.9, -0.1)),
        lambda: optim.adam(eps=-1e-8),
        lambda: optim.adamw(weight_decay=-1.0),
        lambda: optim.rmsprop(alpha=-0.5),
        lambda: optim.rmsprop(momentum=-0.1),
        lambda: optim.sgd(nesterov=True),
        lambda: optim.sgd(momentum=0.9, dampening=0.1, nesterov=True),
    ],
)
def test_bad_arguments_raise_like_torch(call) -> None:
    with pytest.raises(ValueError):
        call()
