"""jaxnet.criteria: the one named-loss registry that train, validate, the CLI and the tests share.

Every entry's JAX loss equals its torch loss (values and gradients, in float64), and its torch
loss equals the formula the docs give for the name, written out here independently.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CRITERIA

from jaxnet import losses
from jaxnet.criteria import CRITERIA as REGISTRY
from jaxnet.criteria import Criterion, criterion, ignored_label
from jaxnet.errors import ConfigError, JaxnetError

N, C = 7, 4


def _one_hot(labels: torch.Tensor) -> torch.Tensor:
    return F.one_hot(labels, C).double()


# What each name means, in plain torch (independent of the registry's own torch side).
FORMULAS = {
    "cross_entropy": lambda z, y: F.cross_entropy(z, y),
    "mse": lambda z, y: F.mse_loss(z, _one_hot(y)),
    "l1": lambda z, y: F.l1_loss(z, _one_hot(y)),
    "kl_div": lambda z, y: F.kl_div(F.log_softmax(z, -1), _one_hot(y), reduction="batchmean"),
    "kl_div_smoothed": lambda z, y: F.kl_div(
        F.log_softmax(z, -1), 0.9 * _one_hot(y) + 0.1 / C, reduction="batchmean"
    ),
}

# Every name at its defaults, and each with options that change the computation.
CASES = [(name, {}) for name in CRITERIA] + [
    ("cross_entropy", {"label_smoothing": 0.2}),
    ("cross_entropy", {"weight": [0.5, 1.0, 2.0, 0.25], "ignore_index": 3}),
    ("cross_entropy", {"reduction": "sum"}),
    ("mse", {"reduction": "sum"}),
    ("l1", {"reduction": "sum"}),
    ("kl_div", {"reduction": "sum"}),
    ("kl_div_smoothed", {"log_target": True}),
    ("kl_div_smoothed", {"reduction": "mean"}),
]


def _logits_and_labels(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = 2 * rng.standard_normal((N, C))
    labels = rng.integers(0, C, N)
    labels[1] = C - 1  # so that ignore_index=3 has something to ignore
    return logits, labels


def test_every_name_has_a_formula_here():
    assert sorted(FORMULAS) == CRITERIA == sorted(REGISTRY)


@pytest.mark.parametrize("name", CRITERIA)
def test_torch_side_is_the_documented_formula(name):
    logits, labels = _logits_and_labels(0)
    z, y = torch.from_numpy(logits), torch.from_numpy(labels)
    torch.testing.assert_close(
        criterion(name).torch(z, y), FORMULAS[name](z, y), rtol=1e-12, atol=1e-14
    )


def _torch_loss(crit, z, y):
    """``crit.torch``; torch warns that kl_div's "mean" is not the KL divergence: expected."""
    if crit.spec.log_softmax and dict(crit.options).get("reduction") == "mean":
        with pytest.warns(UserWarning, match="batchmean"):
            return crit.torch(z, y)
    return crit.torch(z, y)


@pytest.mark.parametrize(("name", "options"), CASES, ids=[f"{n}-{o}" for n, o in CASES])
def test_jax_loss_and_gradient_equal_torch(name, options):
    crit = criterion(name, **options)
    logits, labels = _logits_and_labels(1)
    z = torch.from_numpy(logits).requires_grad_(True)
    y = torch.from_numpy(labels)
    want = _torch_loss(crit, z, y)
    want.backward()
    with jax.enable_x64(True):
        loss, grad = jax.value_and_grad(crit)(jnp.asarray(logits), jnp.asarray(labels))
        assert loss.dtype == jnp.float64
        np.testing.assert_allclose(float(loss), want.item(), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(np.asarray(grad), z.grad.numpy(), rtol=1e-10, atol=1e-14)
    # float32 too (how training runs): equal to torch's float32 to round-off.
    got32 = crit(jnp.asarray(logits, jnp.float32), jnp.asarray(labels, jnp.int32))
    assert got32.dtype == jnp.float32
    want32 = _torch_loss(crit, torch.from_numpy(logits.astype(np.float32)), y)
    assert float(got32) == pytest.approx(float(want32), rel=1e-5, abs=1e-6)


def test_criteria_are_hashable_values_and_compile_once():
    a, b = criterion("cross_entropy", weight=[1.0, 2.0]), criterion("cross_entropy", weight=(1, 2))
    assert a == b and hash(a) == hash(b)  # lists and arrays become tuples
    assert criterion("kl_div") != criterion("kl_div_smoothed")
    assert dict(criterion("kl_div").options) == {"reduction": "batchmean"}  # the spec default
    assert isinstance(a, Criterion) and a.spec is REGISTRY["cross_entropy"]

    @functools.partial(jax.jit, static_argnames="crit")
    def loss(logits, labels, crit):
        return crit(logits, labels)

    logits, labels = jnp.zeros((3, 2)), jnp.array([0, 1, 1])
    loss(logits, labels, criterion("mse"))
    size = loss._cache_size()
    loss(logits + 1, labels, criterion("mse"))  # a new, equal Criterion: no recompilation
    assert loss._cache_size() == size
    loss(logits, labels, criterion("l1"))
    assert loss._cache_size() == size + 1


def test_ignored_label():
    assert ignored_label(criterion("cross_entropy")) == -100
    assert ignored_label(criterion("cross_entropy", ignore_index=5)) == 5
    for name in ("mse", "l1", "kl_div", "kl_div_smoothed"):
        assert ignored_label(criterion(name)) is None
    # Plain callables: losses.cross_entropy skips torch's default; partials their own.
    ce5 = functools.partial(losses.cross_entropy, ignore_index=5)
    assert ignored_label(losses.cross_entropy) == -100
    assert ignored_label(ce5) == 5
    assert ignored_label(functools.partial(ce5, label_smoothing=0.1)) == 5
    assert ignored_label(losses.mse_loss) is None
    assert ignored_label(lambda z, t: z.sum()) is None


def test_ignore_index_is_skipped_like_torch():
    crit = criterion("cross_entropy")
    logits, labels = _logits_and_labels(2)
    labels[[0, 4]] = -100
    want = crit.torch(torch.from_numpy(logits), torch.from_numpy(labels))
    with jax.enable_x64(True):
        got = crit(jnp.asarray(logits), jnp.asarray(labels))
    np.testing.assert_allclose(float(got), float(want), rtol=1e-12)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("nope", {}, r"unknown loss 'nope'; choose one of cross_entropy, kl_div"),
        ("mse", {"weight": [1.0]}, r"loss 'mse' takes no option weight; its options are reduction"),
        ("cross_entropy", {"reduction": "none"}, "no scalar loss"),
        ("kl_div", {"log_target": True}, "kl_div_smoothed"),
    ],
)
def test_bad_names_and_options_are_config_errors(name, options, message):
    with pytest.raises(ConfigError, match=message) as info:
        criterion(name, **options)
    assert isinstance(info.value, ValueError) and isinstance(info.value, JaxnetError)
    assert info.value.exit_code == 2
