"""What the loss and accuracy curves say: an over-/under-fitting diagnosis and ``curves.png``."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jaxnet.io import atomic_write, save_figure

__all__ = ["Diagnosis", "diagnose", "plot_curves", "write_metrics"]

History = Sequence[Mapping[str, Any]]
"""One record per epoch: ``epoch``, ``train_loss``, ``train_accuracy``, ``val_loss``,
``val_accuracy`` (accuracies in [0, 1])."""

# A validation loss counts as "rising" when it ends this much (relative) above its minimum;
# smaller wiggles are noise of the mini-batch order.
RISE = 0.10
# Train accuracy below this at the end means the network has not even fitted its training data.
UNDERFIT_ACCURACY = 0.90
# Train loss down by more than this (relative) over the last two epochs: not converged yet.
STILL_FALLING = 0.25


@dataclass(frozen=True)
class Diagnosis:
    """``kind``: ``"over-fitting"``, ``"under-fitting"``, ``"still improving"``, ``"good fit"``
    or ``"too short"``;
    ``best_epoch`` has the lowest validation loss; ``text`` is the sentence to print."""

    kind: str
    best_epoch: int
    text: str


def diagnose(history: History) -> Diagnosis:
    """Read over- or under-fitting off the per-epoch curves.

    * over-fitting: the validation loss ended more than 10% above its minimum while the
      training loss kept falling ("val loss rising since epoch 7 while train loss falls:
      over-fitting; best epoch 6");
    * under-fitting: training accuracy below 90% at the end (train longer, raise the learning
      rate);
    * still improving: the best validation loss is the last one and the training loss fell by
      more than 25% over the last two epochs (not converged; more epochs may help);
    * otherwise a good fit, at the best epoch.
    """
    if not history:
        return Diagnosis("too short", 0, "no epoch finished: nothing to diagnose")
    val = [float(r["val_loss"]) for r in history]
    train = [float(r["train_loss"]) for r in history]
    epochs = [int(r["epoch"]) for r in history]
    b = min(range(len(val)), key=val.__getitem__)
    best = epochs[b]
    last = history[-1]
    tail = (
        f"train acc {last['train_accuracy']:.1%}, val acc {last['val_accuracy']:.1%}; "
        f"best epoch {best} (val loss {val[b]:.4f}, val acc {history[b]['val_accuracy']:.1%})"
    )
    if b < len(val) - 1 and val[-1] > val[b] * (1 + RISE) and train[-1] < train[b]:
        return Diagnosis(
            "over-fitting",
            best,
            f"val loss rising since epoch {epochs[b + 1]} while train loss falls: over-fitting; "
            f"best epoch {best} (val loss {val[b]:.4f}, val acc {history[b]['val_accuracy']:.1%}). "
            "Keep the best params, stop earlier (--early-stopping) or get more data.",
        )
    if float(last["train_accuracy"]) < UNDERFIT_ACCURACY:
        return Diagnosis(
            "under-fitting",
            best,
            f"train accuracy only {last['train_accuracy']:.1%} at epoch {epochs[-1]}: "
            f"under-fitting; train longer (--epochs) or raise --lr; {tail}",
        )
    if len(train) >= 3 and b == len(val) - 1 and train[-1] < train[-3] * (1 - STILL_FALLING):
        return Diagnosis(
            "still improving",
            best,
            f"val loss lowest at the last epoch and train loss still falling "
            f"({(train[-1] - train[-3]) / train[-3]:+.0%} over 2 epochs): no over-fitting yet, "
            f"more epochs may still help; {tail}",
        )
    return Diagnosis("good fit", best, f"val loss flat near its minimum: good fit; {tail}")


def write_metrics(history: History, path: str | os.PathLike) -> None:
    """``metrics.jsonl``: one JSON object per epoch, rewritten whole (atomically)."""
    text = "".join(json.dumps(dict(r), sort_keys=False) + "\n" for r in history)

    def write(tmp: str) -> None:
        Path(tmp).write_text(text)

    atomic_write(path, write)


def plot_curves(
    history: History, diagnosis: Diagnosis, path: str | os.PathLike, title: str = ""
) -> None:
    """``curves.png``: loss and accuracy vs epoch, train and validation, with the diagnosis."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, key, label in ((ax_loss, "loss", "loss"), (ax_acc, "accuracy", "accuracy")):
        ax.plot(epochs, [r[f"train_{key}"] for r in history], "o-", label=f"train {label}")
        ax.plot(epochs, [r[f"val_{key}"] for r in history], "s-", label=f"val {label}")
        if diagnosis.best_epoch:
            ax.axvline(diagnosis.best_epoch, color="grey", ls=":", label="best epoch")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    ax_loss.set_yscale("log")
    fig.suptitle(_wrap(title or "jaxnet train", 110), fontsize=10)
    fig.text(0.5, 0.01, _wrap(diagnosis.text, 120), ha="center", va="bottom", fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 0.93))

    save_figure(fig, path, dpi=90)


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))
