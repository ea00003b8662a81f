"""jaxnet.model: the Flax Net's structure, parameter count, PyTorch-like initialisation,
``init_params``/``abstract_params``, ``summary``, and that it checks its input."""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnet
from jaxnet.model import abstract_params, init_params
from jaxnet.torch_reference import TorchNet

SHAPES = {
    "conv1": {"kernel": (3, 3, 1, 6), "bias": (6,)},
    "conv2": {"kernel": (3, 3, 6, 16), "bias": (16,)},
    "fc1": {"kernel": (12544, 512), "bias": (512,)},
    "fc2": {"kernel": (512, 64), "bias": (64,)},
    "fc3": {"kernel": (64, 2), "bias": (2,)},
}


def test_shapes_and_parameter_count(net, params0):
    assert jax.tree.map(jnp.shape, params0) == SHAPES
    assert sum(p.size for p in jax.tree.leaves(params0)) == 6_456_942
    apply = jax.jit(net.apply)
    for n in (1, 5):
        out = apply({"params": params0}, jnp.ones((n, 32, 32, 1)))
        assert out.shape == (n, 2) and out.dtype == jnp.float32
    assert sum(p.numel() for p in TorchNet().parameters()) == 6_456_942


def test_abstract_params_computes_nothing_and_matches(net, params0):
    abstract = abstract_params(net)
    assert all(isinstance(s, jax.ShapeDtypeStruct) for s in jax.tree.leaves(abstract))
    assert jax.tree.map(lambda s: s.shape, abstract) == SHAPES
    assert jax.tree.map(lambda s: s.dtype, abstract) == jax.tree.map(lambda p: p.dtype, params0)
    ten = abstract_params(jaxnet.Net(num_classes=10))
    assert ten["fc3"]["kernel"].shape == (64, 10) and ten["fc3"]["bias"].shape == (10,)
    with pytest.raises(ValueError, match="NCHW"):  # init checks its input too (traced only)
        jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, 1, 32, 32)))


def test_num_classes():
    ten = jaxnet.Net(num_classes=10)
    # The init traced, not run (a second Net's init costs seconds to compile); the values are
    # checked for 2 classes above and the 10-class forward pass against torch in test_convert.
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract_params(ten))
    assert ten.apply({"params": params}, jnp.zeros((3, 32, 32, 1))).shape == (3, 10)


def test_init_params_same_seed_same_bits(net):
    a = init_params(net, jax.random.key(7))
    compiled = init_params._cache_size()
    b = init_params(jaxnet.Net(), jax.random.key(7))  # an equal Net: the same compiled init
    c = init_params(net, jax.random.key(8))
    assert init_params._cache_size() == compiled
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    assert all(np.array_equal(x, y) for x, y in pairs)
    assert not np.array_equal(a["fc1"]["kernel"], c["fc1"]["kernel"])


@pytest.mark.parametrize("partitionable", [True, False])
def test_torch_kernel_init_is_variance_scalings_bits(partitionable):
    """The flat draw gives Flax's variance_scaling(1/3, fan_in, uniform) bit for bit (so a
    seed's initial params do not depend on which one computes them), jitted as in
    init_params and eagerly, for every kernel shape, in both of jax's threefry modes."""
    import flax.linen as nn

    from jaxnet.model import torch_kernel_init

    flax_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
    shapes = [layer["kernel"] for layer in SHAPES.values()] + [(64, 10)]
    with jax.threefry_partitionable(partitionable):
        for shape in shapes:
            for dtype in (jnp.float32, jnp.bfloat16):
                key = jax.random.key(len(shape) + shape[-1])
                ours = jax.jit(torch_kernel_init, static_argnums=(1, 2))(key, shape, dtype)
                theirs = jax.jit(flax_init, static_argnums=(1, 2))(key, shape, dtype)
                assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
                np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
                eager = torch_kernel_init(key, shape, dtype)
                np.testing.assert_array_equal(np.asarray(eager), np.asarray(theirs))


FAN_IN = {"conv1": 9, "conv2": 54, "fc1": 12544, "fc2": 512, "fc3": 64}


def test_torch_style_init_matches_torch_distribution(params0):
    """Every kernel and bias ~ U(+-1/sqrt(fan_in)), like a fresh torch Net drawn in this test."""
    params = params0
    torch_params = jaxnet.params_from_torch(TorchNet().state_dict())
    for layer, fan_in in FAN_IN.items():
        bound = 1 / math.sqrt(fan_in)
        for name in ("kernel", "bias"):
            ours = np.asarray(params[layer][name])
            theirs = np.asarray(torch_params[layer][name])
            assert np.abs(ours).max() <= bound
            assert np.abs(theirs).max() <= bound
            if ours.size >= 500:  # enough draws for the moments to be sharp
                uniform_std = bound / math.sqrt(3)
                assert ours.std() == pytest.approx(uniform_std, rel=0.06)
                assert theirs.std() == pytest.approx(uniform_std, rel=0.06)
                assert abs(ours.mean()) < 0.1 * uniform_std


def test_flax_init_option():
    # An "rbg" key compiles faster than the default threefry; the initialisers are the same.
    params = init_params(jaxnet.Net(weight_init="flax"), jax.random.key(0, impl="rbg"))
    assert all(not np.any(params[layer]["bias"]) for layer in FAN_IN)  # Flax: zero biases
    # lecun_normal: std 1/sqrt(fan_in), unbounded by the torch uniform limit
    assert np.asarray(params["fc1"]["kernel"]).std() == pytest.approx(1 / math.sqrt(12544), 0.05)
    with pytest.raises(ValueError, match="weight_init"):
        init_params(jaxnet.Net(weight_init="kaiming"), jax.random.key(0))


def test_summary_returns_the_table_without_a_warning():
    """No warning at all, and so not JAX's "shape requires ndarray or scalar arguments, got
    <class 'function'>" deprecation (an error in a coming JAX), which a ``Net`` method
    returning functions made ``tabulate`` raise."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        text = jaxnet.summary()
        ten = jaxnet.summary(jaxnet.Net(num_classes=10), batch_size=4)
    assert [str(w.message) for w in caught] == []
    assert isinstance(text, str)
    for layer in FAN_IN:
        assert layer in text
    assert "6,456,942" in text
    assert "float32[4,32,32,1]" in ten and "float32[4,10]" in ten


@pytest.mark.parametrize(
    ("x", "error", "hint"),
    [
        (np.zeros((2, 1, 32, 32), np.float32), ValueError, "nchw_to_nhwc"),
        (np.zeros((2, 28, 28, 1), np.float32), ValueError, "Pad"),
        (np.zeros((2, 1, 28, 28), np.float32), ValueError, "28x28"),
        (np.zeros((32, 32, 1), np.float32), ValueError, r"x\[None\]"),
        (np.zeros((2, 32, 32, 3), np.float32), ValueError, r"\(N, 32, 32, 1\)"),
        (np.zeros((2, 32, 32, 1), np.uint8), TypeError, "astype"),
        (np.zeros((2, 32, 32, 1), np.int32), TypeError, "floating"),
        (np.zeros((2, 32, 32, 1), bool), TypeError, "floating"),
    ],
)
def test_net_rejects_bad_images_with_the_fix(net, params0, x, error, hint):
    params = {"params": params0}
    with pytest.raises(error, match=hint):
        net.apply(params, x)
    with pytest.raises(error, match=hint):  # static checks also hold under jit
        jax.jit(net.apply)(params, x)
