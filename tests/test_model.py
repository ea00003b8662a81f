"""The Flax Net: structure, parameter count, PyTorch-like initialisation, input checks."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnet
from jaxnet.torch_reference import TorchNet


def test_shapes_and_parameter_count(net):
    variables = net.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))
    params = variables["params"]
    assert sorted(params) == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    assert sum(p.size for p in jax.tree.leaves(params)) == 6_456_942
    assert params["conv1"]["kernel"].shape == (3, 3, 1, 6)
    assert params["conv2"]["kernel"].shape == (3, 3, 6, 16)
    assert params["fc1"]["kernel"].shape == (12544, 512)
    assert params["fc3"]["kernel"].shape == (64, 2)
    for n in (1, 5):
        out = net.apply(variables, jnp.ones((n, 32, 32, 1)))
        assert out.shape == (n, 2) and out.dtype == jnp.float32
    assert sum(p.numel() for p in TorchNet().parameters()) == 6_456_942


def test_num_classes(net):
    ten = jaxnet.Net(num_classes=10)
    variables = ten.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))
    assert ten.apply(variables, jnp.zeros((3, 32, 32, 1))).shape == (3, 10)


def test_same_seed_same_bits(net):
    a = net.init(jax.random.key(7), jnp.zeros((1, 32, 32, 1)))
    b = net.init(jax.random.key(7), jnp.zeros((1, 32, 32, 1)))
    c = net.init(jax.random.key(8), jnp.zeros((1, 32, 32, 1)))
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    assert all(np.array_equal(x, y) for x, y in pairs)
    assert not np.array_equal(a["params"]["fc1"]["kernel"], c["params"]["fc1"]["kernel"])


FAN_IN = {"conv1": 9, "conv2": 54, "fc1": 12544, "fc2": 512, "fc3": 64}


def test_torch_style_init_matches_torch_distribution(net):
    """Every kernel and bias ~ U(+-1/sqrt(fan_in)), like a fresh torch Net drawn in this test."""
    params = net.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))["params"]
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
    net = jaxnet.Net(weight_init="flax")
    params = net.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))["params"]
    assert all(not np.any(params[layer]["bias"]) for layer in FAN_IN)  # Flax: zero biases
    # lecun_normal: std 1/sqrt(fan_in), unbounded by the torch uniform limit
    assert np.asarray(params["fc1"]["kernel"]).std() == pytest.approx(1 / math.sqrt(12544), 0.05)
    with pytest.raises(ValueError, match="weight_init"):
        jaxnet.Net(weight_init="kaiming").init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))


def test_summary_lists_layers_and_count():
    text = jaxnet.summary()
    for layer in FAN_IN:
        assert layer in text
    assert "6,456,942" in text


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
def test_bad_images_are_rejected_with_the_fix(net, x, error, hint):
    params = net.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))
    with pytest.raises(error, match=hint):
        net.apply(params, x)
    with pytest.raises(error, match=hint):  # static checks also hold under jit
        jax.jit(net.apply)(params, x)
