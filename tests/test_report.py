"""jaxnet.report: the over-/under-fitting diagnosis, metrics.jsonl and curves.png."""

from __future__ import annotations

import json

from jaxnet.report import diagnose, plot_curves, write_metrics


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
        "val loss rising since epoch 7 while train loss falls: over-fitting; best epoch 6"
    )
    under = diagnose(_history([1, 0.9, 0.8], [1, 0.9, 0.85], acc=0.6))
    assert under.kind == "under-fitting" and "train accuracy only 60.0%" in under.text
    still = diagnose(_history([1, 0.5, 0.2], [1, 0.5, 0.2]))
    assert still.kind == "still improving" and "-80% over 2 epochs" in still.text
    good = diagnose(_history([1, 0.2, 0.1, 0.09], [1, 0.2, 0.12, 0.121]))
    assert good.kind == "good fit" and good.best_epoch == 3
    empty = diagnose([])
    assert empty.kind == "too short" and empty.best_epoch == 0


def test_metrics_and_curves_files(tmp_path):
    history = _history([1, 0.5], [1, 0.6])
    write_metrics(history, tmp_path / "metrics.jsonl")
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == history
    plot_curves(history, diagnose(history), tmp_path / "curves.png", title="t")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "metrics.jsonl"]
