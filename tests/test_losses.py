"""jaxnet.losses against torch.nn.functional over many random shapes and options."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxnet import losses
from jaxnet.errors import ConfigError, JaxnetError
from jaxnet.losses import LossDtypeError

# Deterministic: the same examples on every run and machine. Each example compiles its own
# shapes, so the count is kept small; the corners are listed explicitly below.
SETTINGS = settings(max_examples=15, deadline=None, derandomize=True)
# float64 on both sides: the same formula agrees to a few ulps; sums over <= 200 terms and a
# log_softmax stay far below 1e-12 relative.
F64_RTOL, F64_ATOL = 1e-12, 1e-14

shapes = st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple)
reductions = st.sampled_from(["none", "mean", "sum"])


@SETTINGS
@given(shape=shapes, reduction=reductions, seed=st.integers(0, 2**31 - 1))
def test_l1_and_mse(shape, reduction, seed):
    rng = np.random.default_rng(seed)
    a, b = (rng.standard_normal(shape) for _ in range(2))
    for ours, theirs in ((losses.l1_loss, F.l1_loss), (losses.mse_loss, F.mse_loss)):
        assert_f64_equal(*value_and_grad_f64(ours, (a, b), theirs, reduction=reduction))


@st.composite
def cross_entropy_cases(draw):
    n = draw(st.integers(1, 6))
    c = draw(st.integers(2, 6))
    extra = draw(st.sampled_from([(), (), (3,), (2, 2)]))
    unbatched = draw(st.booleans()) and not extra
    shape = (c,) if unbatched else (n, c, *extra)
    probs = draw(st.booleans())
    weighted = draw(st.booleans())
    # Probability targets take only a negative ignore_index (torch raises otherwise).
    ignore_index = -100 if probs else draw(st.sampled_from([-100, 0, c - 1]))
    n_ignored = draw(st.integers(0, 2))
    return {
        "shape": shape,
        "probs": probs,
        "weighted": weighted,
        "ignore_index": ignore_index,
        "n_ignored": n_ignored,
        "reduction": draw(reductions),
        "label_smoothing": draw(st.sampled_from([0.0, 0.0, 0.1, 0.37, 1.0])),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def _ce_arrays(case):
    """Float64 logits, the target (indices with some ignored, or probabilities), the weight."""
    rng = np.random.default_rng(case["seed"])
    shape = case["shape"]
    c = shape[0] if len(shape) == 1 else shape[1]
    logits = 3 * rng.standard_normal(shape)
    weight = rng.uniform(0.1, 2.0, c) if case["weighted"] else None
    if case["probs"]:
        z = rng.standard_normal(shape)
        class_axis = 0 if len(shape) == 1 else 1
        return logits, np.exp(z) / np.exp(z).sum(axis=class_axis, keepdims=True), weight
    index_shape = shape[:1] + shape[2:] if len(shape) > 1 else ()
    target = rng.integers(0, c, index_shape).astype(np.int64)
    flat = target.reshape(-1)
    flat[: case["n_ignored"]] = case["ignore_index"]
    return logits, flat.reshape(index_shape), weight


def value_and_grad_f64(loss, arrays, torch_loss, seed=0, **options):
    """The loss and its gradient with respect to the first array, in float64, in jaxnet and in
    torch; a non-scalar loss (``reduction="none"``) is pulled back along a fixed random
    cotangent of its shape, so every element's gradient counts."""
    first, *rest = arrays
    t_first = torch.tensor(first, dtype=torch.float64, requires_grad=True)
    t_rest = [None if a is None else torch.from_numpy(np.asarray(a)) for a in rest]
    want = torch_loss(t_first, *t_rest, **options)
    cot = np.random.default_rng(seed).standard_normal(tuple(want.shape))
    want.backward(torch.from_numpy(cot))

    @jax.jit
    def value_and_pullback(x, cot, *r):
        got, vjp = jax.vjp(lambda x: loss(x, *r, **options), x)
        return got, vjp(cot)[0]

    with jax.enable_x64(True):  # one compilation: value and gradient together
        got, grad = value_and_pullback(jnp.asarray(first), jnp.asarray(cot), *rest)
        assert got.dtype == grad.dtype == jnp.float64
    assert got.shape == tuple(want.shape)
    return (np.asarray(got), np.asarray(grad)), (want.detach().numpy(), t_first.grad.numpy())


def assert_f64_equal(ours, theirs):
    """Float64 values and gradients agree to round-off (NaN where torch has NaN)."""
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b, rtol=F64_RTOL, atol=F64_ATOL, equal_nan=True)


@SETTINGS
@given(case=cross_entropy_cases())
def test_cross_entropy(case):
    logits, target, weight = _ce_arrays(case)
    kwargs = {"reduction": case["reduction"], "label_smoothing": case["label_smoothing"]}
    if not case["probs"]:
        kwargs["ignore_index"] = case["ignore_index"]
    assert_f64_equal(
        *value_and_grad_f64(
            losses.cross_entropy, (logits, target, weight), F.cross_entropy, **kwargs
        )
    )


@SETTINGS
@given(
    shape=shapes,
    reduction=st.sampled_from(["none", "mean", "sum", "batchmean"]),
    log_target=st.booleans(),
    with_zeros=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_kl_div(shape, reduction, log_target, with_zeros, seed):
    rng = np.random.default_rng(seed)
    inp = np.log(rng.dirichlet(np.ones(shape[-1]), size=shape[:-1]))
    target = rng.dirichlet(np.ones(shape[-1]), size=shape[:-1])
    if with_zeros and not log_target:
        target.reshape(-1)[::2] = 0.0  # torch: a zero target contributes exactly 0
    if log_target:
        target = np.log(target)
    with pytest.warns(UserWarning) if reduction == "mean" else _nothing():
        results = value_and_grad_f64(
            losses.kl_div, (inp, target), F.kl_div, reduction=reduction, log_target=log_target
        )
    assert_f64_equal(*results)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_losses_jit_and_grad():
    logits = jnp.array([[1.0, -2.0], [0.5, 0.25]])
    labels = jnp.array([1, 0])
    g = jax.jit(jax.grad(lambda z: losses.cross_entropy(z, labels, label_smoothing=0.1)))(logits)
    t = torch.tensor(np.asarray(logits), requires_grad=True)
    F.cross_entropy(t, torch.tensor([1, 0]), label_smoothing=0.1).backward()
    np.testing.assert_allclose(np.asarray(g), t.grad.numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bad", [2, 5, -1, -101])
def test_out_of_range_labels_raise(bad):
    logits = np.zeros((3, 2), np.float32)
    labels = np.array([0, bad, 1])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        losses.cross_entropy(logits, labels)
    # Traced labels cannot raise at trace time: the loss becomes NaN instead of garbage.
    assert np.isnan(jax.jit(losses.cross_entropy)(logits, labels))
    # For contrast: torch refuses it too.
    with pytest.raises((IndexError, RuntimeError)):
        F.cross_entropy(torch.zeros(3, 2), torch.tensor([0, bad, 1]))


def test_ignore_index_is_not_out_of_range():
    logits = np.zeros((3, 2), np.float32)
    assert np.isfinite(losses.cross_entropy(logits, np.array([0, -100, 1])))
    assert np.isfinite(jax.jit(losses.cross_entropy)(logits, np.array([0, -100, 1])))


def _probs(shape, axis=1, seed=5):
    z = np.random.default_rng(seed).standard_normal(shape)
    return np.exp(z) / np.exp(z).sum(axis=axis, keepdims=True)


def _indices(shape, c, ignored=(), ignore_index=-100, seed=6):
    t = np.random.default_rng(seed).integers(0, c, shape)
    t.reshape(-1)[list(ignored)] = ignore_index
    return t


W3 = np.array([0.5, 2.0, 1.25])
ALL_IGNORED = np.full(4, -100)
# name: (logits shape, target, weight, options). Each is compared with F.cross_entropy in
# float64, value and gradient, at run time.
CORNERS = {
    "all ignored": ((4, 3), ALL_IGNORED, None, {}),
    "all ignored, weight and smoothing": ((4, 3), ALL_IGNORED, W3, {"label_smoothing": 0.2}),
    "all ignored, sum": ((4, 3), ALL_IGNORED, None, {"reduction": "sum"}),
    "all ignored, none": ((4, 3), ALL_IGNORED, W3, {"reduction": "none"}),
    "all ignored, ignore_index 1": ((4, 3), np.ones(4, int), None, {"ignore_index": 1}),
    "unbatched, ignored": ((3,), np.array(-100), None, {"label_smoothing": 0.1}),
    "all ignored, K-dim": ((2, 3, 2), np.full((2, 2), -100), W3, {}),
    # Zero total weight with kept targets: torch's NaN gradient on kept rows, 0 on ignored ones.
    "zero total weight": ((4, 3), np.array([0, 0, -100, 0]), np.array([0.0, 1, 1]), {}),
    "K-dim (N, C, d1)": ((2, 3, 5), _indices((2, 5), 3, (1, 7)), W3, {"label_smoothing": 0.1}),
    "K-dim (N, C, d1, d2, d3), none": (
        (2, 3, 2, 3, 2),
        _indices((2, 2, 3, 2), 3, (0, 5), ignore_index=2),
        W3,
        {"reduction": "none", "ignore_index": 2, "label_smoothing": 0.3},
    ),
    "K-dim probabilities, weight, smoothing": (
        (2, 3, 4, 2),
        _probs((2, 3, 4, 2)),
        W3,
        {"label_smoothing": 0.25},
    ),
    "probabilities, weight": ((5, 3), _probs((5, 3)), W3, {}),
    "probabilities, weight, sum": ((5, 3), _probs((5, 3)), W3, {"reduction": "sum"}),
    "probabilities, weight, none": ((5, 3), _probs((5, 3)), W3, {"reduction": "none"}),
    "probabilities, negative ignore_index": ((5, 3), _probs((5, 3)), None, {"ignore_index": -1}),
    "unbatched probabilities, weight": ((3,), _probs((3,), axis=0), W3, {"reduction": "none"}),
    "empty batch": ((0, 3), np.zeros(0, int), None, {}),
    "empty batch, probabilities": ((0, 3), np.zeros((0, 3)), None, {"label_smoothing": 0.1}),
}


@pytest.mark.parametrize("name", list(CORNERS))
def test_cross_entropy_corners_equal_torch_in_float64(name):
    shape, target, weight, options = CORNERS[name]
    logits = 2 * np.random.default_rng(4).standard_normal(shape)
    ours, theirs = value_and_grad_f64(
        losses.cross_entropy, (logits, target, weight), F.cross_entropy, **options
    )
    assert_f64_equal(ours, theirs)
    if name.startswith("all ignored") and options.get("reduction", "mean") == "mean":
        # One such batch must not poison the parameters: NaN loss, but zero gradients.
        assert np.isnan(ours[0]) and np.all(ours[1] == 0)


def _torch_message(call):
    """The first line of the error torch raises for ``call`` (it must raise)."""
    with pytest.raises((RuntimeError, ValueError, TypeError, IndexError)) as info:
        call()
    return str(info.value).splitlines()[0]


def _z(*shape):
    return np.zeros(shape)


# (jaxnet's call, torch's call on the same arguments, the part of torch's message ours repeats,
# the error class). Ours add what to do about it.
TORCH_CHECKS = {
    "reduction": (
        lambda f, a: f.cross_entropy(a(_z(4, 3)), a(_z(4).astype(int)), reduction="avg"),
        "avg is not a valid value for reduction",
        ConfigError,
    ),
    "reduction of mse_loss": (
        lambda f, a: f.mse_loss(a(_z(4)), a(_z(4)), reduction="avg"),
        "avg is not a valid value for reduction",
        ConfigError,
    ),
    "reduction of kl_div": (
        lambda f, a: f.kl_div(a(_z(4)), a(_z(4)), reduction="batch"),
        "batch is not a valid value for reduction",
        ConfigError,
    ),
    "label_smoothing": (
        lambda f, a: f.cross_entropy(a(_z(4, 3)), a(_z(4).astype(int)), label_smoothing=1.5),
        "label_smoothing must be between 0.0 and 1.0. Got: 1.5",
        ConfigError,
    ),
    "ignore_index with probabilities": (
        lambda f, a: f.cross_entropy(a(_z(4, 3)), a(_probs((4, 3))), ignore_index=0),
        "ignore_index is not supported for floating point target",
        ConfigError,
    ),
    "weight size": (
        lambda f, a: f.cross_entropy(a(_z(4, 3)), a(_z(4).astype(int)), weight=a(np.ones(2))),
        "weight tensor should be defined either for all 3 classes or no classes but got "
        "weight tensor of shape: [2]",
        ConfigError,
    ),
    "weight size, probabilities": (
        lambda f, a: f.cross_entropy(a(_z(4, 3)), a(_probs((4, 3))), weight=a(np.ones((3, 1)))),
        "weight tensor should be defined either for all 3 classes or no classes but got "
        "weight tensor of shape: [3, 1]",
        ConfigError,
    ),
    "batch size": (
        lambda f, a: f.cross_entropy(a(_z(4, 3)), a(_z(3).astype(int))),
        "Expected input batch_size (4) to match target batch_size (3)",
        ConfigError,
    ),
    "batch size, K-dim": (
        lambda f, a: f.cross_entropy(a(_z(2, 3, 4)), a(_z(3, 4).astype(int))),
        "Expected input batch_size (2) to match target batch_size (3)",
        ConfigError,
    ),
    "multi-target": (
        lambda f, a: f.cross_entropy(a(_z(4, 3)), a(_z(4, 1).astype(int))),
        "0D or 1D target tensor expected, multi-target not supported",
        ConfigError,
    ),
    "K-dim target size": (
        lambda f, a: f.cross_entropy(a(_z(2, 3, 4, 5, 6)), a(_z(2, 4).astype(int))),
        "Expected target size [2, 4, 5, 6], got [2, 4]",
        ConfigError,
    ),
    "integer probabilities": (
        lambda f, a: f.cross_entropy(a(_z(4, 3)), a(_z(4, 3).astype(int))),
        "Expected floating point type for target with class probabilities, got",
        LossDtypeError,
    ),
}


@pytest.mark.parametrize("name", list(TORCH_CHECKS))
def test_argument_checks_repeat_torchs_message(name):
    call, message, error = TORCH_CHECKS[name]
    assert message in _torch_message(lambda: call(F, torch.from_numpy))
    with pytest.raises(error) as info:
        call(losses, np.asarray)
    assert message in str(info.value)
    assert isinstance(info.value, JaxnetError) and info.value.exit_code == 2


@pytest.mark.parametrize(
    ("call", "error", "hint"),
    [
        (lambda: losses.l1_loss(np.zeros((2, 2)), np.zeros((2,))), ValueError, "differs"),
        (lambda: losses.mse_loss(np.zeros((2, 2)), np.zeros((2, 2), int)), TypeError, "float"),
        (lambda: losses.l1_loss(np.zeros(2), np.zeros(2), reduction="avg"), ValueError, "one of"),
        (
            lambda: losses.cross_entropy(np.zeros((4, 2)), np.zeros((4,), np.float32)),
            TypeError,
            "astype",
        ),
        (
            lambda: losses.cross_entropy(np.zeros((4, 2)), np.zeros((4, 1), int)),
            ValueError,
            r"class indices of shape \(4,\)",
        ),
        (
            lambda: losses.cross_entropy(np.zeros((4, 2)), np.zeros(4, int), weight=np.ones(3)),
            ValueError,
            "weight",
        ),
        (
            lambda: losses.cross_entropy(np.zeros((4, 2), int), np.zeros(4, int)),
            TypeError,
            "input must be floating",
        ),
        (
            lambda: losses.kl_div(np.zeros((4, 2)), np.zeros((4, 2)), reduction="batch"),
            ValueError,
            "batchmean",
        ),
    ],
)
def test_bad_targets_name_the_problem(call, error, hint):
    with pytest.raises(error, match=hint):
        call()
