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

# Deterministic: the same examples on every run and machine.
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)
RTOL, ATOL = 2e-5, 1e-6  # float32 on both sides; see the note on each assertion

shapes = st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple)
reductions = st.sampled_from(["none", "mean", "sum"])


def _jitted(loss, **options):
    """``loss`` with its options fixed, jitted: one compilation per example instead of one per
    operation and shape (eagerly, every new shape compiles each operation on its own). The
    eager path and its concrete-label checks are tested below."""
    return jax.jit(lambda *arrays: loss(*arrays, **options))


def _close(ours, theirs):
    theirs = theirs.detach().numpy()
    ours = np.asarray(ours)
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, rtol=RTOL, atol=ATOL, equal_nan=True)


@SETTINGS
@given(shape=shapes, reduction=reductions, seed=st.integers(0, 2**31 - 1))
def test_l1_and_mse(shape, reduction, seed):
    rng = np.random.default_rng(seed)
    a, b = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    _close(losses.l1_loss(a, b, reduction=reduction), F.l1_loss(ta, tb, reduction=reduction))
    _close(losses.mse_loss(a, b, reduction=reduction), F.mse_loss(ta, tb, reduction=reduction))


@st.composite
def cross_entropy_cases(draw):
    n = draw(st.integers(1, 6))
    c = draw(st.integers(2, 6))
    extra = draw(st.sampled_from([(), (), (3,), (2, 2)]))
    unbatched = draw(st.booleans()) and not extra
    shape = (c,) if unbatched else (n, c, *extra)
    probs = draw(st.booleans())
    weighted = draw(st.booleans())
    ignore_index = draw(st.sampled_from([-100, 0, c - 1]))
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


@SETTINGS
@given(case=cross_entropy_cases())
def test_cross_entropy(case):
    rng = np.random.default_rng(case["seed"])
    shape = case["shape"]
    c = shape[0] if len(shape) == 1 else shape[1]
    logits = (3 * rng.standard_normal(shape)).astype(np.float32)
    weight = rng.uniform(0.1, 2.0, c).astype(np.float32) if case["weighted"] else None
    kwargs = {"reduction": case["reduction"], "label_smoothing": case["label_smoothing"]}
    if case["probs"]:
        z = rng.standard_normal(shape)
        class_axis = 0 if len(shape) == 1 else 1
        target = np.exp(z) / np.exp(z).sum(axis=class_axis, keepdims=True)
        target = target.astype(np.float32)
    else:
        index_shape = shape[:1] + shape[2:] if len(shape) > 1 else ()
        target = rng.integers(0, c, index_shape).astype(np.int64)
        flat = target.reshape(-1)
        flat[: case["n_ignored"]] = case["ignore_index"]
        target = flat.reshape(index_shape)
        kwargs["ignore_index"] = case["ignore_index"]
    ours = _jitted(losses.cross_entropy, **kwargs)(logits, target, weight)
    theirs = F.cross_entropy(
        torch.from_numpy(logits),
        torch.from_numpy(np.asarray(target)),
        weight=None if weight is None else torch.from_numpy(weight),
        **kwargs,
    )
    _close(ours, theirs)


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
    inp = np.log(rng.dirichlet(np.ones(shape[-1]), size=shape[:-1])).astype(np.float32)
    target = rng.dirichlet(np.ones(shape[-1]), size=shape[:-1]).astype(np.float32)
    if with_zeros and not log_target:
        target.reshape(-1)[::2] = 0.0  # torch: a zero target contributes exactly 0
    if log_target:
        target = np.log(target)
    ours = _jitted(losses.kl_div, reduction=reduction, log_target=log_target)(inp, target)
    with pytest.warns(UserWarning) if reduction == "mean" else _nothing():
        theirs = F.kl_div(
            torch.from_numpy(inp),
            torch.from_numpy(target),
            reduction=reduction,
            log_target=log_target,
        )
    _close(ours, theirs)


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
