"""jaxnet.inference: the logits, probabilities and classes that ``jaxnet predict`` and serving
scripts get, against PyTorch's ``no_grad`` forward on the same weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxnet
from jaxnet import inference
from jaxnet.model import abstract_params


def test_predict_logits_equal_torch_forward(torch_net, images):
    params = jaxnet.params_from_torch(torch_net.state_dict())
    with torch.no_grad():
        ref = torch_net(images).double().numpy()
        floor = np.abs(torch_net.double()(images.double()).numpy() - ref).max()
    ours = np.asarray(inference.predict_logits(params, jaxnet.nchw_to_nhwc(images.numpy())))
    assert ours.shape == ref.shape and ours.dtype == np.float32
    # float32 against float32: a few ulps of the logits' scale, like torch's own round-off
    assert np.abs(ours - ref).max() <= 4 * (floor + np.finfo(np.float32).eps * np.abs(ref).max())


def test_predict_gives_probabilities_and_first_maximum_classes(params0):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 32, 32, 1), dtype=np.float32)
    out = inference.predict(params0, x)
    logits = np.asarray(jaxnet.Net().apply({"params": params0}, jnp.asarray(x)))
    np.testing.assert_allclose(out.logits, logits, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out.probabilities.sum(axis=-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(
        out.probabilities, np.asarray(jax.nn.softmax(logits, axis=-1)), rtol=1e-5, atol=1e-7
    )
    assert out.classes.dtype == np.int64
    np.testing.assert_array_equal(out.classes, logits.argmax(axis=-1))
    # ties go to the first maximum, as torch.argmax: all-zero params give equal logits
    zeros = jax.tree.map(jnp.zeros_like, params0)
    np.testing.assert_array_equal(inference.predict(zeros, x).classes, np.zeros(5, np.int64))


def test_the_class_count_comes_from_the_params():
    net10 = jaxnet.Net(num_classes=10)
    params = jax.tree.map(lambda s: jnp.full(s.shape, 0.01, s.dtype), abstract_params(net10))
    assert inference.predict_logits(params, np.zeros((2, 32, 32, 1), np.float32)).shape == (2, 10)


@pytest.mark.parametrize(
    ("images", "error"),
    [
        (np.zeros((2, 1, 32, 32), np.float32), ValueError),  # NCHW
        (np.zeros((32, 32, 1), np.float32), ValueError),  # no batch axis
        (np.zeros((2, 32, 32, 1), np.int32), TypeError),  # not floating
    ],
)
def test_bad_images_are_refused_with_the_fix(params0, images, error):
    with pytest.raises(error, match=r"\(N, 32, 32, 1\)|float"):
        inference.predict_logits(params0, images)
