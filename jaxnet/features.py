"""The conv layers' activations for one input, drawn as a PNG grid (the tutorial's AlexNet
feature-map figure, for ``Net``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from jaxnet.config import load_dataset
from jaxnet.errors import ConfigError
from jaxnet.export import model_info
from jaxnet.inference import predict
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
    probabilities: np.ndarray | None = None,
    classes: str = "",
) -> None:
    """Write a PNG: the input ``(32, 32)`` and, with ``probabilities`` ``(C,)``, the predicted
    class and a bar per class on top; then one panel per channel of each layer (activations of
    one example, ``(H, W, C)``), all channels of a layer on one colour scale, with its colour
    bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 8
    rows_per = {k: -(-np.shape(a)[-1] // cols) for k, a in activations.items()}
    n_rows = 1 + sum(rows_per.values())
    fig, axes = plt.subplots(n_rows, cols, figsize=(cols * 1.3 + 0.8, n_rows * 1.45 + 0.3))
    for ax in axes.ravel():
        ax.axis("off")
    axes[0, 0].imshow(np.asarray(image).squeeze(), cmap="gray")
    axes[0, 0].set_title("input", fontsize=8)
    if probabilities is not None:
        _plot_probabilities(fig, axes[0, 2:], np.asarray(probabilities), classes)
    row = 1
    for name, act in activations.items():
        a = np.asarray(act)
        for c in range(a.shape[-1]):
            ax = axes[row + c // cols, c % cols]
            im = ax.imshow(a[..., c], cmap="viridis", vmin=0.0, vmax=max(float(a.max()), 1e-12))
            ax.set_title(f"{name}[{c}]", fontsize=7)
        bar = fig.colorbar(im, ax=list(axes[row : row + rows_per[name]].ravel()), pad=0.01)
        bar.set_label(f"{name} activation", fontsize=7)
        bar.ax.tick_params(labelsize=6)
        row += rows_per[name]
    fig.suptitle(title or "conv activations (after ReLU)", fontsize=10)

    save_figure(fig, path, dpi=80)


def _plot_probabilities(fig: Any, cells: Any, probabilities: np.ndarray, classes: str) -> None:
    """A bar chart of the class probabilities over the ``cells`` (a row of axes), the predicted
    class highlighted and named."""
    gs = cells[0].get_subplotspec().get_gridspec()
    first, last = cells[0].get_subplotspec(), cells[-1].get_subplotspec()
    ax = fig.add_subplot(gs[first.rowspan.start, first.colspan.start : last.colspan.stop])
    k = int(np.argmax(probabilities))
    colours = ["tab:orange" if i == k else "tab:blue" for i in range(len(probabilities))]
    ax.bar(range(len(probabilities)), probabilities, color=colours)
    ax.set_ylim(0, 1)
    ax.set_xticks(range(len(probabilities)))
    ax.set_ylabel("probability", fontsize=7)
    ax.tick_params(labelsize=6)
    named = f"\n{classes}" if classes else ""
    ax.set_title(f"predicted class {k} (p = {probabilities[k]:.3f}){named}", fontsize=8)


def draw_features(
    workdir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    which: str = "best",
    split: str = "val",
    index: int = 0,
) -> Path:
    """Draw the activations of example ``index`` of the run's ``split`` (``"val"`` or
    ``"train"``, the data the run in ``workdir`` was trained on) under its ``which`` params,
    with the predicted class and its probabilities (the classes named as the run's or the
    imported file's metadata names them); returns the PNG's path (default
    ``<workdir>/features.png``)."""
    params, c, meta = load_params(workdir, which)
    ds = load_dataset(c)
    info = model_info(c, meta.get("data") or {"mean": ds.mean, "std": ds.std})
    x, y = (ds.x_val, ds.y_val) if split == "val" else (ds.x_train, ds.y_train)
    if not 0 <= index < len(x):
        raise ConfigError(f"--index must lie in [0, {len(x)}) for the {split} split.")
    acts = conv_activations(params, x[index : index + 1])
    pred = predict(params, x[index : index + 1])
    path = Path(out) if out is not None else Path(workdir) / "features.png"
    title = f"{split} example {index} (true class {int(y[index])}): conv + ReLU"
    activations = {k: v[0] for k, v in acts.items()}
    plot_features(x[index], activations, path, title, pred.probabilities[0], info.classes)
    return path
