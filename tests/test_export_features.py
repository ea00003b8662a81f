"""`jaxnet export`/`import` through PyTorch's Net, and `jaxnet features`."""

from __future__ import annotations

from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import SMALL

from jaxnet import Net, nhwc_to_nchw
from jaxnet.cli import main
from jaxnet.data import load_data
from jaxnet.features import conv_activations
from jaxnet.train import load_params

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def val_data():
    return load_data(limit=SMALL.limit)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_export_gives_torch_the_same_predictions_and_imports_back(
    reference_run, val_data, tmp_path: Path, suffix: str, capsys
):
    from jaxnet.torch_reference import TorchNet

    workdir, _ = reference_run
    out = tmp_path / f"net{suffix}"
    assert main(["export", str(out), "--workdir", str(workdir)]) == 0
    assert "inputs are (x - " in capsys.readouterr().out
    if suffix == ".pt":
        state_dict = torch.load(out, weights_only=True)
    else:
        from safetensors.torch import load_file

        state_dict = load_file(out)
    net32 = TorchNet(num_classes=2)
    net32.load_state_dict(state_dict)  # strict: every key and shape must match
    net64 = TorchNet(num_classes=2).double()
    net64.load_state_dict({k: v.double() for k, v in state_dict.items()})

    params, _, _ = load_params(workdir, "best")
    x = val_data.x_val
    ours = np.asarray(Net().apply({"params": params}, x), np.float64)
    # The transposed view of a C=1 batch has strides torch reads as channels_last, which the
    # tutorial's x.view(...) rejects; clone into the standard NCHW strides.
    x_torch = torch.from_numpy(nhwc_to_nchw(x)).clone(memory_format=torch.contiguous_format)
    with torch.no_grad():
        theirs32 = net32(x_torch).numpy().astype(np.float64)
        exact = net64(x_torch.double()).numpy()
    np.testing.assert_array_equal(ours.argmax(1), theirs32.argmax(1))
    # Both float32 implementations sit at the float32 noise floor around the float64 result.
    floor = np.abs(theirs32 - exact).max()
    assert np.abs(ours - exact).max() <= 10 * floor + 1e-6, (np.abs(ours - exact).max(), floor)

    # Import reads the file back into a workdir: the same bits as the trained params.
    again = tmp_path / "imported"
    assert main(["import", str(out), "--workdir", str(again)]) == 0
    imported, config, _ = load_params(again, "best")
    assert config.num_classes == 2
    for a, b in zip(jax.tree.leaves(imported), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert main(["import", str(out), "--workdir", str(again)]) == 1  # no silent overwrite


def test_export_of_a_missing_run_is_a_clear_error(tmp_path: Path, capsys):
    assert main(["export", str(tmp_path / "x.pt"), "--workdir", str(tmp_path / "none")]) == 1
    assert "no checkpoints at" in capsys.readouterr().err


def test_features_png_and_activations(reference_run, val_data, tmp_path: Path):
    workdir, _ = reference_run
    out = tmp_path / "features.png"
    assert main(["features", "--workdir", str(workdir), "--index", "3", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    params, _, _ = load_params(workdir)
    x = val_data.x_val[3:4]
    acts = conv_activations(params, x)
    assert acts["conv1"].shape == (1, 30, 30, 6) and acts["conv2"].shape == (1, 28, 28, 16)
    conv = {"kernel_size": (3, 3), "padding": "VALID"}
    c1 = jax.nn.relu(nn.Conv(6, **conv).apply({"params": params["conv1"]}, x))
    c2 = jax.nn.relu(nn.Conv(16, **conv).apply({"params": params["conv2"]}, c1))
    np.testing.assert_allclose(acts["conv1"], c1, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(acts["conv2"], c2, rtol=1e-5, atol=1e-5)
