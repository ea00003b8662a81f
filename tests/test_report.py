"""jaxnet.report: the over-/under-fitting diagnosis, metrics.jsonl and curves.png."""

from __future__ import annotations

import json

import numpy as np

from jaxnet import report
from jaxnet.report import PATIENCE, diagnose, plot_curves, write_metrics


def _history(train, val, acc=0.99):
    return [
        {"epoch": i + 1, "train_loss": t, "val_loss": v, "train_accuracy": acc, "val_accuracy": acc}
        for i, (t, v) in enumerate(zip(train, val, strict=True))
    ]


def test_diagnosis():
    over = diagnose(
        _history(
            [1, 0.5, 0.3, 0.2, 0.1, 0.05, 0.03, 0.02, 0.01],
            [1, 0.6, 0.4, 0.3, 0.25, 0.2, 0.22, 0.26, 0.3],
        )
    )
    assert over.kind == "over-fitting" and over.best_epoch == 6
    assert over.text.startswith(
        "val loss above its best for the 3 epochs after epoch 6 (their mean +30%, the last "
        "+50%) while train loss falls: over-fitting; best epoch 6"
    )
    under = diagnose(_history([1, 0.9, 0.8], [1, 0.9, 0.85], acc=0.6))
    assert under.kind == "under-fitting" and "train accuracy only 60.0%" in under.text
    still = diagnose(_history([1, 0.5, 0.2], [1, 0.5, 0.2]))
    assert still.kind == "still improving" and "-80% over 2 epochs" in still.text
    good = diagnose(_history([1, 0.2, 0.1, 0.09], [1, 0.2, 0.12, 0.121]))
    assert good.kind == "good fit" and good.best_epoch == 3
    empty = diagnose([])
    assert empty.kind == "too short" and empty.best_epoch == 0


def _noisy(trend, seed: int, noise: float = 0.04) -> list[float]:
    """A validation-loss curve: ``trend`` times log-normal noise of about ``noise``."""
    rng = np.random.default_rng(seed)
    return [float(v * np.exp(noise * rng.standard_normal())) for v in trend]


def test_one_noisy_bump_is_not_over_fitting_but_a_real_rise_is():
    """The diagnosis waits for evidence: a single bump after the best epoch (the issue's case:
    one rise, then a new best) is "rising" at most; a sustained rise is over-fitting."""
    epochs = 10
    train = [1.0 / (e + 1) for e in range(epochs)]  # always falling
    decay = [0.6 * 0.8**e + 0.05 for e in range(epochs)]
    for seed in range(20):  # noisy, falling curves: never over-fitting, whatever the noise
        assert diagnose(_history(train, _noisy(decay, seed))).kind != "over-fitting", seed
    bump = [*decay[:6], decay[5] * 1.5]  # one bad epoch right at the end
    d = diagnose(_history(train[:7], bump))
    assert d.kind == "rising" and d.best_epoch == 6, d
    assert f"that takes {PATIENCE} epochs" in d.text
    # ... and the epoch after it beats the best: no over-fitting was ever there.
    recovered = diagnose(_history(train[:8], [*bump, decay[5] * 0.9]))
    assert recovered.kind != "over-fitting" and recovered.best_epoch == 8
    # A bump, then back near the best for the rest: not over-fitting either.
    back = [*decay[:6], decay[5] * 1.6, decay[5] * 1.02, decay[5] * 1.01, decay[5] * 1.03]
    assert diagnose(_history(train, back)).kind != "over-fitting"
    # A sustained rise under the same noise is over-fitting, from the best epoch on.
    rise = [*decay[:5], *(decay[4] * (1 + 0.15 * k) for k in range(1, 6))]
    for seed in range(5):
        val = _noisy(rise, seed, noise=0.02)
        d = diagnose(_history(train, val))
        assert d.kind == "over-fitting" and d.best_epoch == int(np.argmin(val)) + 1, (seed, d)


def test_metrics_and_curves_files(tmp_path):
    history = _history([1, 0.5], [1, 0.6])
    write_metrics(history, tmp_path / "metrics.jsonl")
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == history
    plot_curves(history, diagnose(history), tmp_path / "curves.png", title="t")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "metrics.jsonl"]


def test_curves_have_whole_epoch_ticks_and_accuracy_in_percent(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(report, "save_figure", lambda fig, path, dpi: figures.append(fig))
    history = _history([1, 0.5, 0.4], [1, 0.6, 0.5], acc=0.875)
    plot_curves(history, diagnose(history), tmp_path / "curves.png")
    (fig,) = figures
    fig.canvas.draw()
    ax_loss, ax_acc = fig.axes
    for ax in (ax_loss, ax_acc):
        ticks = [t for t in ax.get_xticks() if 1 <= t <= 3]
        assert ticks == [1, 2, 3], ticks  # not 1.00, 1.25, 1.50, ...
    assert ax_acc.lines[0].get_ydata()[0] == 87.5  # percent, not a 0-1 fraction
    labels = [t.get_text() for t in ax_acc.get_yticklabels()]
    assert labels and all(text.endswith("%") for text in labels), labels
