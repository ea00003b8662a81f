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
    "float32 (float32 noise alone); ratio = drift / floor. A floor below float32's relative "
    f"resolution 2^-24 = {TINY:.2e} is marked * and the ratio divides by {TINY:.2e} instead."
)
_COLUMNS_F64 = ("step", "lr", "loss", "Δloss", "Δout", "Δgrad", "Δparam")
_LEGEND_F64 = (
    "Δ: jaxnet float64 vs PyTorch float64, relative: |Δloss| / |loss|, and the relative L2 "
    "distance |x_jax - x_torch| / |x_torch| of all outputs, all gradients, all parameters "
    "(the verdict's figures)."
)
_NAN = float("nan")
_VERDICT_FIELDS = (
    "first_step_ratio",
    "first_step_worst",
    "drift_ratio",
    "drift_worst_step",
    "float64_error",
    "float64_worst_step",
    "float64_worst",
)


@dataclasses.dataclass
class Report:
    """A validation run: its configuration, the per-step record and the verdict.

    ``records[k]`` is the k-th recorded step: its number, the lr used, the losses, and for
    each pair of runs (float32: ``jax_vs_torch32``, ``jax_vs_torch64``,
    ``torch32_vs_torch64``; float64: ``jax_vs_torch64``) the max abs / max rel difference of
    the outputs, the loss, every gradient and every parameter after the step, plus relative L2
    distances of all outputs, gradients and parameters.

    The verdict's figures: float32 (``config["precision"]``): ``first_step_*`` and
    ``drift_*``; float64: ``float64_*`` (the worst relative difference, its step and what).
    """

    config: dict[str, Any]
    records: list[dict[str, Any]]
    finite: bool
    seconds: float
    first_step_ratio: float = _NAN
    first_step_worst: str = ""
    drift_ratio: float = _NAN
    drift_worst_step: int = 0
    float64_error: float = _NAN
    float64_worst_step: int = 0
    float64_worst: str = ""

    @property
    def precision(self) -> str:
        return self.config.get("precision", "float32")

    @property
    def first_step_ok(self) -> bool:
        return self.finite and self.first_step_ratio <= self.config["step_factor"]

    @property
    def drift_ok(self) -> bool:
        return self.finite and self.drift_ratio <= self.config["drift_factor"]

    @property
    def float64_ok(self) -> bool:
        return self.finite and self.float64_error <= self.config["float64_tolerance"]

    @property
    def passed(self) -> bool:
        if self.precision == "float64":
            return self.float64_ok
        return self.first_step_ok and self.drift_ok

    @property
    def exit_code(self) -> int:
        """0 when equal to PyTorch within float32 noise (float64: round-off), 1 otherwise."""
        return EXIT_OK if self.passed else EXIT_RUN_FAILED

    def drift(self) -> np.ndarray:
        """Per step: relative L2 distance of jaxnet's parameters from the float64 run."""
        return np.array([r["jax_vs_torch64"]["params_rel_l2"] for r in self.records])

    def noise_floor(self) -> np.ndarray:
        """Per step: relative L2 distance of torch float32's parameters from the float64 run
        (NaN in a float64 check, which has no float32 run)."""
        return np.array(
            [r.get("torch32_vs_torch64", {}).get("params_rel_l2", _NAN) for r in self.records]
        )

    def to_dict(self) -> dict[str, Any]:
        if self.precision == "float64":
            verdict = {
                "float64_error": self.float64_error,
                "float64_worst_step": self.float64_worst_step,
                "float64_worst": self.float64_worst,
                "float64_ok": self.float64_ok,
            }
        else:
            verdict = {
                "first_step_ratio": self.first_step_ratio,
                "first_step_worst": self.first_step_worst,
                "first_step_ok": self.first_step_ok,
                "drift_ratio": self.drift_ratio,
                "drift_worst_step": self.drift_worst_step,
                "drift_ok": self.drift_ok,
            }
        return {
            "config": self.config,
            "verdict": {"passed": self.passed, "finite": self.finite, **verdict},
            "seconds": self.seconds,
            "steps": self.records,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Report:
        """The report ``to_dict`` (or ``save_json``, read back with ``json.load``) wrote."""
        verdict = {k: v for k, v in data["verdict"].items() if k in _VERDICT_FIELDS}
        return cls(
            config=dict(data["config"]),
            records=list(data["steps"]),
            finite=bool(data["verdict"]["finite"]),
            seconds=float(data["seconds"]),
            **verdict,
        )

    def verdict_lines(self) -> list[str]:
        """The checks, one line each ending in OK or FAIL, advice where a float32 run left
        the noise floor, and the verdict sentence."""
        lines = []
        if not self.finite:
            lines.append("NaN or infinite values appeared in a run: not comparable.")
        if self.precision == "float64":
            return lines + self._float64_lines()
        c = self.config
        lines.append(
            f"first step (identical params): worst error / float32 round-off = "
            f"{self.first_step_ratio:.3g} ({self.first_step_worst}), limit {c['step_factor']:g}"
            f" -> {_ok(self.first_step_ok)}"
        )
        lines.append(
            f"trajectory: max over steps of drift / noise floor = {self.drift_ratio:.3g} "
            f"(step {self.drift_worst_step}), limit {c['drift_factor']:g} -> "
            f"{_ok(self.drift_ok)}"
        )
        if self.finite and not self.drift_ok:
            lines.append(_LEFT_THE_FLOOR.format(step=self._first_step_beyond_floor()))
        lines.append(
            "VERDICT: PASS. jaxnet's run equals PyTorch's within float32 noise."
            if self.passed
            else "VERDICT: FAIL. jaxnet's run differs from PyTorch's by more than float32 "
            "noise explains (see the check marked FAIL)."
        )
        return lines

    def _float64_lines(self) -> list[str]:
        c = self.config
        return [
            f"float64, every recorded step: worst relative difference = "
            f"{self.float64_error:.3g} ({self.float64_worst}, step {self.float64_worst_step}), "
            f"limit {c['float64_tolerance']:g} -> {_ok(self.float64_ok)}",
            "VERDICT: PASS. jaxnet computes what PyTorch computes: in float64 the runs agree "
            "to round-off at every recorded step."
            if self.passed
            else "VERDICT: FAIL. In float64 jaxnet and PyTorch differ beyond round-off: a "
            "difference of semantics (or a float32 constant or intermediate inside jaxnet's "
            "float64 computation), not float32 noise.",
        ]

    def _first_step_beyond_floor(self) -> int:
        limit = self.config["drift_factor"]
        ratios = self.drift() / np.maximum(self.noise_floor(), TINY)
        beyond = [r["step"] for r, x in zip(self.records, ratios, strict=True) if not x <= limit]
        return int(beyond[0]) if beyond else self.drift_worst_step

    def print(self, console: Any = None) -> None:
        """A compact rich table of selected steps, its legend, the verdict and the time."""
        from rich.console import Console

        console = console or Console()
        if not console.is_terminal:  # a pipe or file: wide enough for the table
            console.width = max(console.width, 104)
        console.print(self._title(), style="bold", markup=False, soft_wrap=True)
        console.print(self._table())
        legend = _LEGEND_F64 if self.precision == "float64" else _LEGEND
        console.print(legend, style="dim", markup=False, soft_wrap=True)
        for line in self.verdict_lines():
            style = "bold red"
            if line.endswith("OK") or line.startswith("VERDICT: PASS"):
                style = "bold green"
            elif line.startswith(_LEFT_THE_FLOOR[:20]):
                style = "yellow"
            console.print(line, style=style, markup=False, soft_wrap=True)
        runs = 2 if self.precision == "float64" else 3
        console.print(
            f"time: {self.seconds:.1f} s wall for the whole validation (set-up, {runs} runs "
            f"of {self.config['steps']} steps, the comparisons)",
            style="dim",
            markup=False,
            soft_wrap=True,
        )

    def _title(self) -> str:
        c = self.config
        sched = f", {c['schedule']}({_fmt_opts(c['schedule_options'])})" if c["schedule"] else ""
        return (
            f"jaxnet vs PyTorch ({self.precision}): {c['loss']}({_fmt_opts(c['loss_options'])}), "
            f"{c['optimizer']}({_fmt_opts(c['optimizer_options'])}){sched}, "
            f"{c['steps']} steps x batch {c['batch_size']}, seed {c['seed']}"
        )

    def _table(self) -> Any:
        """The rich table of the steps 1, 2, 3, 5, 10, ... and the last that were recorded."""
        from rich import box
        from rich.table import Table

        t = Table(
            header_style="bold",
            box=box.SIMPLE_HEAD,
            padding=(0, 1),
            pad_edge=False,
        )
        float64 = self.precision == "float64"
        for col in _COLUMNS_F64 if float64 else _COLUMNS:
            t.add_column(col, justify="right", no_wrap=True)
        by_step = {r["step"]: i for i, r in enumerate(self.records)}
        shown = sorted((_SHOWN_STEPS | {self.records[-1]["step"]}) & set(by_step))
        row = self._row_float64 if float64 else self._row_float32
        for s in shown:
            t.add_row(*row(by_step[s]))
        return t

    def _row_float32(self, i: int) -> list[str]:
        r = self.records[i]
        jt = r["jax_vs_torch32"]
        drift = r["jax_vs_torch64"]["params_rel_l2"]
        floor = r["torch32_vs_torch64"]["params_rel_l2"]
        return [
            str(r["step"]),
            f"{r['lr']:.3g}",
            f"{r['loss']['torch32']:.4f}",
            f"{jt['loss']['max_abs']:.1e}",
            f"{jt['outputs']['max_abs']:.1e}",
            f"{jt['grads_max_abs']:.1e}",
            f"{jt['params_max_abs']:.1e}",
            f"{drift:.2e}",
            f"{floor:.2e}" + ("*" if floor < TINY else " "),
            f"{drift / max(floor, TINY):.2f}",
        ]

    def _row_float64(self, i: int) -> list[str]:
        r = self.records[i]
        d = r["jax_vs_torch64"]
        return [
            str(r["step"]),
            f"{r['lr']:.3g}",
            f"{r['loss']['torch64']:.4f}",
            f"{d['loss']['max_rel']:.1e}",
            f"{d['outputs_rel_l2']:.1e}",
            f"{d['grads_rel_l2']:.1e}",
            f"{d['params_rel_l2']:.1e}",
        ]

    def save_json(self, path: PathLike) -> None:
        """The whole per-step record as JSON, written atomically."""
        text = json.dumps(self.to_dict(), indent=1, default=_json_default, allow_nan=True)
        atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))

    def plot(self, path: PathLike) -> None:
        """Per step, log scale, written atomically (PNG/PDF/SVG): float32, drift vs noise floor
        (parameters and outputs); float64, the relative differences vs the tolerance."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        c = self.config
        if self.precision == "float64":
            fig, ax = plt.subplots(figsize=(8, 3.6), constrained_layout=True)
            self._plot_float64(ax)
        else:
            fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), constrained_layout=True)
            self._plot_float32(axes)
        loss = f"{c['loss']}({_fmt_opts(c['loss_options'])})"
        fig.suptitle(
            f"{loss} / {c['optimizer']}({_fmt_opts(c['optimizer_options'])})\n"
            f"batch {c['batch_size']}, {self.precision}, {c['device']}",
            fontsize=8,
        )
        save_figure(fig, path, dpi=80)

    def _plot_float32(self, axes: Any) -> None:
        steps = np.array([r["step"] for r in self.records])
        limit = self.config["drift_factor"]
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
                clamped = np.maximum(floor, TINY)
                ax.semilogy(
                    steps, limit * clamped, "k--", lw=0.8, label=f"limit: {limit:g} x floor"
                )
            ax.set_xlabel("step")
            ax.set_ylabel(f"relative L2 distance, {label}")
            ax.grid(True, which="major", alpha=0.3)
        axes[0].legend(fontsize=7)

    def _plot_float64(self, ax: Any) -> None:
        steps = np.array([r["step"] for r in self.records])
        tiny = 1e-18  # exact agreement (0) drawn at the bottom of the log axis
        for key, label, style in (
            ("params_rel_l2", "parameters", "-"),
            ("grads_rel_l2", "gradients", "-"),
            ("outputs_rel_l2", "outputs (logits)", ":"),
        ):
            values = [max(r["jax_vs_torch64"][key], tiny) for r in self.records]
            ax.semilogy(steps, values, style, label=label)
        tol = self.config["float64_tolerance"]
        ax.axhline(tol, color="k", ls="--", lw=0.8, label=f"limit {tol:g}")
        ax.axhline(2.0**-52, color="gray", ls=":", lw=0.8, label="float64 ulp (2^-52)")
        ax.set_xlabel("step")
        ax.set_ylabel("relative L2 distance\njaxnet f64 vs torch f64")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7)


_LEFT_THE_FLOOR = (
    "The run left the float32 noise floor at step {step}. A float32 rounding event (a ReLU "
    "pre-activation or an Adam denominator near eps rounding one way in one framework and the "
    "other way in the other) can do that to an equal implementation: rerun with --precision "
    "float64 and the same options (jaxnet.validate(precision='float64')), where equal "
    "semantics agree to round-off and only a real difference fails."
)


def _ok(ok: bool) -> str:
    return "OK" if ok else "FAIL"


def _fmt_opts(opts: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in opts.items())


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
