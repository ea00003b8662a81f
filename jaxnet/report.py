"""What the loss and accuracy curves say: an over-/under-fitting diagnosis and ``curves.png``."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jaxnet.io import atomic_write, save_figure

__all__ = ["PATIENCE", "RISE", "Diagnosis", "diagnose", "plot_curves", "write_metrics"]

History = Sequence[Mapping[str, Any]]
"""One record per epoch: ``epoch``, ``train_loss``, ``train_accuracy``, ``val_loss``,
``val_accuracy`` (accuracies in [0, 1])."""

# A validation loss counts as "risen" when it is this much (relative) above its minimum;
# smaller wiggles are noise of the mini-batch order.
RISE = 0.10
# Over-fitting is called only after this many epochs past the best one, whose mean validation
# loss and last one are both risen: one noisy epoch is not evidence.
PATIENCE = 3
# Train accuracy below this at the end means the network has not even fitted its training data.
UNDERFIT_ACCURACY = 0.90
# Train loss down by more than this (relative) over the last two epochs: not converged yet.
STILL_FALLING = 0.25


@dataclass(frozen=True)
class Diagnosis:
    """``kind``: ``"over-fitting"``, ``"rising"`` (the validation loss has risen for fewer than
    ``PATIENCE`` epochs: not yet evidence), ``"under-fitting"``, ``"still improving"``,
    ``"good fit"`` or ``"too short"``;
    ``best_epoch`` has the lowest validation loss; ``text`` is the sentence to print."""

    kind: str
    best_epoch: int
    text: str


def _risen(val: Sequence[float], b: int) -> bool:
    return val[-1] > val[b] * (1 + RISE)


def _above(values: Sequence[float], best: float) -> str:
    """How far the mean of ``values`` lies above ``best``, e.g. ``"+40%"``."""
    return f"{sum(values) / len(values) / best - 1:+.0%}"


def _over_fitting(val: Sequence[float], train: Sequence[float], b: int) -> bool:
    """``PATIENCE`` or more epochs after the best one, their mean and the last validation loss
    risen more than ``RISE`` above the best, while the training loss fell."""
    after = val[b + 1 :]
    window = sum(after) / max(len(after), 1)
    return (
        len(after) >= PATIENCE
        and window > val[b] * (1 + RISE)
        and _risen(val, b)
        and train[-1] < train[b]
    )


def diagnose(history: History) -> Diagnosis:
    """Read over- or under-fitting off the per-epoch curves.

    * over-fitting: ``PATIENCE`` (3) or more epochs after the best validation loss, and both
      their mean and the last validation loss more than 10% above the best, while the
      training loss kept falling ("val loss above its best for the 3 epochs after epoch 5
      (their mean +40%, the last +18%) while train loss falls: over-fitting; best epoch 5");
    * rising: the last validation loss is 10% above the best, but fewer than ``PATIENCE``
      epochs have passed: a noisy epoch or the start of over-fitting; more epochs tell;
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
    best, last, n_after = epochs[b], history[-1], len(val) - 1 - b
    at_best = f"best epoch {best} (val loss {val[b]:.4f}, val acc {history[b]['val_accuracy']:.1%})"
    tail = f"train acc {last['train_accuracy']:.1%}, val acc {last['val_accuracy']:.1%}; {at_best}"
    if _over_fitting(val, train, b):
        return Diagnosis(
            "over-fitting",
            best,
            f"val loss above its best for the {n_after} epochs after epoch {best} (their mean "
            f"{_above(val[b + 1 :], val[b])}, the last {_above(val[-1:], val[b])}) while train "
            f"loss falls: over-fitting; {at_best}. Keep the best params, stop earlier "
            "(--early-stopping) or get more data.",
        )
    if float(last["train_accuracy"]) < UNDERFIT_ACCURACY:
        return Diagnosis(
            "under-fitting",
            best,
            f"train accuracy only {last['train_accuracy']:.1%} at epoch {epochs[-1]}: "
            f"under-fitting; train longer (--epochs) or raise --lr; {tail}",
        )
    if 0 < n_after < PATIENCE and _risen(val, b):
        return Diagnosis(
            "rising",
            best,
            f"val loss above its best for {n_after} epoch(s) after epoch {best}: too soon to "
            f"call over-fitting (that takes {PATIENCE} epochs); more epochs tell a noisy epoch "
            f"from over-fitting; {tail}",
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
    """``metrics.jsonl``: one JSON object per epoch, rewritten whole (atomically). Only valid
    JSON: a NaN or infinite value is written as ``null``."""

    def valid(v: Any) -> Any:
        return None if isinstance(v, float) and not math.isfinite(v) else v

    text = "".join(
        json.dumps({k: valid(v) for k, v in r.items()}, allow_nan=False) + "\n" for r in history
    )

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
    from matplotlib.ticker import FuncFormatter, MaxNLocator, PercentFormatter

    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4.6))
    for ax, key in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        scale = 100.0 if key == "accuracy" else 1.0
        for split, marker in (("train", "o-"), ("val", "s-")):
            values = [r[f"{split}_{key}"] * scale for r in history]
            ax.plot(epochs, values, marker, label=f"{split} {key}")
        if diagnosis.best_epoch:
            ax.axvline(diagnosis.best_epoch, color="grey", ls=":", label="best epoch")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.grid(alpha=0.3)
        ax.legend()
    ax_loss.set_ylabel("loss (log scale)")
    ax_loss.set_yscale("log")
    # Plain decimals (0.05, 0.1, 0.2) rather than powers of ten on the log axis.
    ax_loss.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax_loss.yaxis.set_minor_formatter(FuncFormatter(_minor_label))
    ax_loss.tick_params(axis="y", which="minor", labelsize=7)
    ax_acc.set_ylabel("accuracy")
    ax_acc.yaxis.set_major_formatter(PercentFormatter(100.0))
    fig.suptitle(_wrap(title or "jaxnet train", 110), fontsize=10)
    text = _wrap(diagnosis.text, 120)
    fig.text(0.5, 0.01, text, ha="center", va="bottom", fontsize=9)
    fig.tight_layout(rect=(0, 0.015 + 0.04 * (text.count("\n") + 1), 1, 0.93))

    save_figure(fig, path, dpi=90)


def _minor_label(value: float, _: Any) -> str:
    """Labels at 2x, 3x and 5x a power of ten only: every minor tick labelled is a crowd."""
    import math

    lead = round(value / 10 ** math.floor(math.log10(value))) if value > 0 else 0
    return f"{value:g}" if lead in (2, 3, 5) else ""


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))
