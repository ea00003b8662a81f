"""jaxnet.images: what Net takes, and the static checks that name the fix for anything else."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnet
from jaxnet.images import IMAGE_SIZE, IN_CHANNELS, check_nhwc_images

BAD = [
    (np.zeros((2, 1, 32, 32), np.float32), ValueError, "nchw_to_nhwc"),
    (np.zeros((2, 28, 28, 1), np.float32), ValueError, "Pad"),
    (np.zeros((2, 1, 28, 28), np.float32), ValueError, "28x28"),
    (np.zeros((32, 32, 1), np.float32), ValueError, r"x\[None\]"),
    (np.zeros((2, 32, 32, 3), np.float32), ValueError, r"\(N, 32, 32, 1\)"),
    (np.zeros((2, 32, 32), np.float32), ValueError, r"shape \(N, 32, 32, 1\), got shape"),
    (np.zeros((2, 32, 32, 1), np.uint8), TypeError, "astype"),
    (np.zeros((2, 32, 32, 1), np.int32), TypeError, "floating"),
    (np.zeros((2, 32, 32, 1), bool), TypeError, "floating"),
]


def test_constants():
    assert (IMAGE_SIZE, IN_CHANNELS) == (32, 1)
    assert jaxnet.check_nhwc_images is check_nhwc_images  # the public name


@pytest.mark.parametrize(("x", "error", "hint"), BAD)
def test_bad_images_are_rejected_with_the_fix(x, error, hint):
    with pytest.raises(error, match=hint):
        check_nhwc_images(x)
    with pytest.raises(error, match=hint):  # static checks: they also hold under jit
        jax.jit(check_nhwc_images)(jnp.asarray(x))


def test_good_images_pass():
    for dtype in (np.float32, np.float64, np.float16):
        check_nhwc_images(np.zeros((3, 32, 32, 1), dtype))
    check_nhwc_images(jax.ShapeDtypeStruct((0, 32, 32, 1), jnp.float32))


def test_torch_tensors_are_refused_naming_numpy():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"torch tensor; convert it with x\.detach\(\)\.cpu\(\)"):
        check_nhwc_images(torch.zeros(2, 32, 32, 1))
