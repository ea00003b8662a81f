"""``Report``: a validation run's configuration, per-step record and verdict, with its printed,
JSON and plotted forms."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxnet.convert import PathLike
from jaxnet.errors import EXIT_OK, EXIT_RUN_FAILED
from jaxnet.io import atomic_write, save_figure
from jaxnet.validation.compare import TINY

__all__ = ["Report"]

_SHOWN_STEPS = {1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000}
_COLUMNS = ("step", "lr", "loss", "Δloss", "Δout", "Δgrad", "Δparam", "drift", "floor", "ratio")
_LEGEND = (
    "Δ: max |jaxnet - PyTorch float32| (outputs, loss, all gradients, all parameters). "
    "drift: |θ_jax - θ_f64| / |θ_f64| over all parameters; floor: the same for PyTorch "
    "float32 (float32 noise alone); ratio = drift / floor."
)


@dataclasses.dataclass
class Report:
    """A validation run: its configuration, the per-step record and the verdict.

    ``records[k]`` is the k-th recorded step: its number, the lr used, the three losses, and
    for each pair of runs (``jax_vs_torch32``, ``jax_vs_torch64``, ``torch32_vs_torch64``) the
    max abs / max rel difference of the outputs, the loss, every gradient and every parameter
    after the step, plus relative L2 distances of all outputs, gradients and parameters.
    """

    config: dict[str, Any]
    records: list[dict[str, Any]]
    first_step_ratio: float
    first_step_worst: str
    drift_ratio: float
    drift_worst_step: int
    finite: bool
    seconds: float

    @property
    def first_step_ok(self) -> bool:
        return self.finite and self.first_step_ratio <= self.config["step_factor"]

    @property
    def drift_ok(self) -> bool:
        return self.finite and self.drift_ratio <= self.config["drift_factor"]

    @property
    def passed(self) -> bool:
        return self.first_step_ok and self.drift_ok

    @property
    def exit_code(self) -> int:
        """0 when equal to PyTorch within float32 noise, 1 otherwise."""
        return EXIT_OK if self.passed else EXIT_RUN_FAILED

    def drift(self) -> np.ndarray:
        """Per step: relative L2 distance of jaxnet's parameters from the float64 run."""
        return np.array([r["jax_vs_torch64"]["params_rel_l2"] for r in self.records])

    def noise_floor(self) -> np.ndarray:
        """Per step: relative L2 distance of torch float32's parameters from the float64 run."""
        return np.array([r["torch32_vs_torch64"]["params_rel_l2"] for r in self.records])

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "verdict": {
                "passed": self.passed,
                "finite": self.finite,
                "first_step_ratio": self.first_step_ratio,
                "first_step_worst": self.first_step_worst,
                "first_step_ok": self.first_step_ok,
                "drift_ratio": self.drift_ratio,
                "drift_worst_step": self.drift_worst_step,
                "drift_ok": self.drift_ok,
            },
            "seconds": self.seconds,
            "steps": self.records,
        }

    def verdict_lines(self) -> list[str]:
        c = self.config
        lines = []
        if not self.finite:
            lines.append("NaN or infinite values appeared in a run: not comparable.")
        lines.append(
            f"first step (identical params): worst error / float32 round-off = "
            f"{self.first_step_ratio:.3g} ({self.first_step_worst}), limit {c['step_factor']:g}"
            f" -> {'OK' if self.first_step_ok else 'FAIL'}"
        )
        lines.append(
            f"trajectory: max over steps of drift / noise floor = {self.drift_ratio:.3g} "
            f"(step {self.drift_worst_step}), limit {c['drift_factor']:g} -> "
            f"{'OK' if self.drift_ok else 'FAIL'}"
        )
        lines.append(
            "VERDICT: equal to PyTorch within float32 noise"
            if self.passed
            else "VERDICT: NOT equal to PyTorch beyond float32 noise"
        )
        return lines

    def print(self, console: Any = None) -> None:
        """A compact rich table of selected steps and the verdict."""
        from rich.console import Console

        console = console or Console()
        if not console.is_terminal:  # a pipe or file: wide enough for the table
            console.width = max(console.width, 104)
        console.print(self._table())
        console.print(_LEGEND, style="dim", markup=False)
        for line in self.verdict_lines():
            ok = "OK" in line[-3:] or "equal to PyTorch within" in line
            console.print(line, style="bold green" if ok else "bold red", markup=False)
        console.print(f"{self.seconds:.1f} s", style="dim")

    def _title(self) -> str:
        c = self.config
        sched = f", {c['schedule']}({_fmt_opts(c['schedule_options'])})" if c["schedule"] else ""
        return (
            f"jaxnet vs PyTorch: {c['loss']}({_fmt_opts(c['loss_options'])}), "
            f"{c['optimizer']}({_fmt_opts(c['optimizer_options'])}){sched}, "
            f"{c['steps']} steps x batch {c['batch_size']}, seed {c['seed']}"
        )

    def _table(self) -> Any:
        """The rich table of the steps 1, 2, 3, 5, 10, ... and the last that were recorded."""
        from rich import box
        from rich.table import Table

        t = Table(
            title=self._title(),
            title_justify="left",
            header_style="bold",
            box=box.SIMPLE_HEAD,
            padding=(0, 1),
            pad_edge=False,
        )
        for col in _COLUMNS:
            t.add_column(col, justify="right", no_wrap=True)
        by_step = {r["step"]: i for i, r in enumerate(self.records)}
        shown = sorted((_SHOWN_STEPS | {self.records[-1]["step"]}) & set(by_step))
        drift, floor = self.drift(), self.noise_floor()
        for s in shown:
            i = by_step[s]
            r = self.records[i]
            jt = r["jax_vs_torch32"]
            t.add_row(
                str(s),
                f"{r['lr']:.3g}",
                f"{r['loss']['torch32']:.4f}",
                f"{jt['loss']['max_abs']:.1e}",
                f"{jt['outputs']['max_abs']:.1e}",
                f"{jt['grads_max_abs']:.1e}",
                f"{jt['params_max_abs']:.1e}",
                f"{drift[i]:.2e}",
                f"{floor[i]:.2e}",
                f"{drift[i] / max(floor[i], TINY):.2f}",
            )
        return t

    def save_json(self, path: PathLike) -> None:
        """The whole per-step record as JSON, written atomically."""
        text = json.dumps(self.to_dict(), indent=1, default=_json_default, allow_nan=True)
        atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))

    def plot(self, path: PathLike) -> None:
        """Drift vs noise floor per step (log scale), written atomically (PNG/PDF/SVG)."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        steps = np.array([r["step"] for r in self.records])
        c = self.config
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), constrained_layout=True)
        for ax, what, label in (
            (axes[0], "params", "parameters"),
            (axes[1], "outputs", "outputs (logits)"),
        ):
            get = lambda pair, w=what: np.array(  # noqa: E731
                [max(r[pair][f"{w}_rel_l2"], 1e-12) for r in self.records]
            )
            floor = get("torch32_vs_torch64")
            ax.semilogy(steps, get("jax_vs_torch64"), label="jaxnet f32 vs torch f64 (drift)")
            ax.semilogy(steps, floor, label="torch f32 vs torch f64 (noise floor)")
            ax.semilogy(steps, get("jax_vs_torch32"), ":", label="jaxnet f32 vs torch f32")
            if what == "params":
                ax.semilogy(
                    steps,
                    c["drift_factor"] * np.maximum(floor, TINY),
                    "k--",
                    lw=0.8,
                    label=f"limit: {c['drift_factor']:g} x floor",
                )
            ax.set_xlabel("step")
            ax.set_ylabel(f"relative L2 distance, {label}")
            ax.grid(True, which="major", alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle(
            f"{c['loss']} / {c['optimizer']}({_fmt_opts(c['optimizer_options'])}), batch "
            f"{c['batch_size']}, {c['device']}",
            fontsize=9,
        )
        save_figure(fig, path, dpi=80)


def _fmt_opts(opts: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in opts.items())


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
