"""jaxnet.examples.data_parallel, in this process: its data and its params files.

Its runs on 8 host devices and as 2 processes are in test_parallel.py (they need subprocesses).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxnet import Net
from jaxnet.examples.data_parallel import read_params_npz, synthetic_dataset, write_params_npz
from jaxnet.model import abstract_params


def test_params_npz_roundtrip_and_mismatch(tmp_path):
    net = Net()
    params = jax.tree.map(
        lambda s: np.arange(np.prod(s.shape), dtype=s.dtype).reshape(s.shape), abstract_params(net)
    )
    path = tmp_path / "p.npz"
    write_params_npz(path, params)
    back = read_params_npz(path, net)
    jax.tree.map(np.testing.assert_array_equal, back, params)
    assert not list(tmp_path.glob("*.tmp.npz"))
    assert [p.name for p in tmp_path.iterdir()] == ["p.npz"]
    with pytest.raises(ValueError, match=r"no array \['fc3'\]\['bias'\] of shape \(3,\)"):
        read_params_npz(path, Net(num_classes=3))


def test_synthetic_dataset_is_deterministic_and_prefix_stable():
    x, y = synthetic_dataset(12, num_classes=3, seed=4)
    assert x.shape == (12, 32, 32, 1) and x.dtype == np.float32
    assert y.shape == (12,) and y.dtype == np.int32 and set(np.unique(y)) <= {0, 1, 2}
    x5, y5 = synthetic_dataset(5, num_classes=3, seed=4)
    np.testing.assert_array_equal(x5, x[:5])  # the first n do not depend on num_examples
    np.testing.assert_array_equal(y5, y[:5])
    x64, _ = synthetic_dataset(5, num_classes=3, seed=4, dtype=np.float64)
    assert x64.dtype == np.float64
    np.testing.assert_array_equal(x64, x5)  # rounded to float32 first, then cast
    assert not np.array_equal(synthetic_dataset(5, seed=5)[0], synthetic_dataset(5, seed=4)[0])
