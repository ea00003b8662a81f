"""jaxnet.features: the conv layers' activations of a trained run, and their PNG."""

from __future__ import annotations

from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import SMALL

from jaxnet.data import load_data
from jaxnet.errors import ConfigError
from jaxnet.features import conv_activations, draw_features
from jaxnet.workdir import load_params


def test_activations_are_the_conv_layers_after_relu(reference_run):
    workdir, _ = reference_run
    params, _, _ = load_params(workdir)
    x = load_data(limit=SMALL.limit).x_val[3:4]
    acts = conv_activations(params, x)
    assert acts["conv1"].shape == (1, 30, 30, 6) and acts["conv2"].shape == (1, 28, 28, 16)
    conv = {"kernel_size": (3, 3), "padding": "VALID"}
    c1 = jax.nn.relu(nn.Conv(6, **conv).apply({"params": params["conv1"]}, x))
    c2 = jax.nn.relu(nn.Conv(16, **conv).apply({"params": params["conv2"]}, c1))
    np.testing.assert_allclose(acts["conv1"], c1, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(acts["conv2"], c2, rtol=1e-5, atol=1e-5)
    # After the ReLU: none negative, some exactly 0.
    for a in acts.values():
        assert float(np.min(a)) == 0.0


def test_draw_features_writes_a_png(reference_run, tmp_path: Path):
    workdir, _ = reference_run
    out = draw_features(workdir, tmp_path / "f.png", index=3)
    assert out == tmp_path / "f.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    train = draw_features(workdir, tmp_path / "t.png", which="last", split="train", index=0)
    assert train.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ConfigError, match=r"--index must lie in \[0, 32\) for the val split"):
        draw_features(workdir, tmp_path / "x.png", index=32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.png", "t.png"]


def test_features_png_shows_the_prediction_and_colour_bars(reference_run, tmp_path, monkeypatch):
    """The figure names the predicted class with its probability (``jaxnet.inference``'s), the
    classes as the run's metadata names them, and one colour bar per conv layer."""
    import jaxnet.features
    from jaxnet.export import run_info
    from jaxnet.inference import predict

    figures = []
    monkeypatch.setattr(jaxnet.features, "save_figure", lambda fig, path, dpi: figures.append(fig))
    workdir, _ = reference_run
    draw_features(workdir, tmp_path / "f.png", index=5)
    (fig,) = figures
    params, info = run_info(workdir)
    x = load_data(limit=SMALL.limit).x_val[5:6]
    p = predict(params, x)
    k = int(p.classes[0])
    titles = [ax.get_title() for ax in fig.axes]
    assert f"predicted class {k} (p = {p.probabilities[0, k]:.3f})\n{info.classes}" in titles
    bars = sorted(ax.get_ylabel() for ax in fig.axes if ax.get_ylabel().endswith("activation"))
    assert bars == ["conv1 activation", "conv2 activation"]
