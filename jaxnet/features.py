"""The conv layers' activations for one input, drawn as a PNG grid (the tutorial's AlexNet
feature-map figure, for ``Net``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from jaxnet import data
from jaxnet.errors import ConfigError
from jaxnet.io import save_figure
from jaxnet.model import Net
from jaxnet.workdir import load_params

__all__ = ["conv_activations", "draw_features", "plot_features"]


def conv_activations(params: Any, images: Any, num_classes: int | None = None) -> dict[str, Any]:
    """conv1 ``(N, 30, 30, 6)`` and conv2 ``(N, 28, 28, 16)`` activations of NHWC ``images``.

    Taken with Flax's ``capture_intermediates`` (only the two conv modules are captured).
    ``Conv3x3ReLU`` returns its output after the ReLU, so the maps are exactly what the next
    layer sees.
    """
    if num_classes is None:
        num_classes = int(params["fc3"]["bias"].shape[0])
    _, state = Net(num_classes=num_classes).apply(
        {"params": params},
        images,
        capture_intermediates=lambda module, method: module.name in ("conv1", "conv2"),
        mutable=["intermediates"],
    )
    inter = state["intermediates"]
    return {name: inter[name]["__call__"][0] for name in ("conv1", "conv2")}


def plot_features(
    image: np.ndarray,
    activations: dict[str, Any],
    path: str | os.PathLike,
    title: str = "",
) -> None:
    """Write a PNG: the input ``(32, 32)`` on top, then one panel per channel of each layer
    (activations of one example, ``(H, W, C)``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 8
    rows_per = {k: -(-np.shape(a)[-1] // cols) for k, a in activations.items()}
    n_rows = 1 + sum(rows_per.values())
    fig, axes = plt.subplots(n_rows, cols, figsize=(cols * 1.3, n_rows * 1.45))
    for ax in axes.ravel():
        ax.axis("off")
    axes[0, 0].imshow(np.asarray(image).squeeze(), cmap="gray")
    axes[0, 0].set_title("input", fontsize=8)
    row = 1
    for name, act in activations.items():
        a = np.asarray(act)
        for c in range(a.shape[-1]):
            ax = axes[row + c // cols, c % cols]
            ax.imshow(a[..., c], cmap="viridis")
            ax.set_title(f"{name}[{c}]", fontsize=7)
        row += rows_per[name]
    fig.suptitle(title or "conv activations (after ReLU)", fontsize=10)
    fig.tight_layout()

    save_figure(fig, path, dpi=80)


def draw_features(
    workdir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    which: str = "best",
    split: str = "val",
    index: int = 0,
) -> Path:
    """Draw the activations of example ``index`` of the run's ``split`` (``"val"`` or
    ``"train"``, the data the run in ``workdir`` was trained on) under its ``which`` params;
    returns the PNG's path (default ``<workdir>/features.png``)."""
    params, c, _ = load_params(workdir, which)
    ds = data.load_data(c.data, c.num_classes, c.label_rule, c.val_fraction, c.split_seed, c.limit)
    x, y = (ds.x_val, ds.y_val) if split == "val" else (ds.x_train, ds.y_train)
    if not 0 <= index < len(x):
        raise ConfigError(f"--index must lie in [0, {len(x)}) for the {split} split.")
    acts = conv_activations(params, x[index : index + 1])
    path = Path(out) if out is not None else Path(workdir) / "features.png"
    title = f"{split} example {index} (class {int(y[index])}): conv + ReLU"
    plot_features(x[index], {k: v[0] for k, v in acts.items()}, path, title)
    return path
