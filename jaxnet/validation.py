"""Cross-framework validator: is a jaxnet training run the PyTorch training run?

``validate(...)`` (and ``jaxnet validate``) starts jaxnet and the PyTorch reference ``Net`` from
the same weights, feeds both the same stream of batches with the same loss, optimizer and
schedule, and records at every step how far apart the outputs, the loss, every gradient and
every parameter are. A third run, PyTorch in float64 from the same start, measures the
**noise floor**: how far float32 arithmetic alone moves a run from the exact one.

What "equal" means (the verdict):

* the first step, taken from identical parameters, agrees to float32 round-off: for the
  outputs, the loss, every gradient, and the optimizer's update (applied by torch to
  jaxnet's gradients, see ``_first_step_check``),
  ``max|jax - torch64| <= step_factor * (max|torch32 - torch64| + 1 ulp)`` per tensor (the
  float32 round-off of that very computation, measured, plus one ulp at its scale);
* the whole trajectory stays within the noise floor: at every step the relative L2 distance
  of all parameters from the float64 run, ``|jax - torch64| / |torch64|``, is at most
  ``drift_factor`` times torch float32's own distance ``|torch32 - torch64| / |torch64|``.

Max-abs differences are recorded too but do not judge whole runs: after a few Adam steps they
are dominated by weights whose gradient is near ``eps``, where float32 rounding alone moves
the update by up to ~lr.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import math
import platform
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnet import losses, optim, schedules
from jaxnet.convert import PathLike, nhwc_to_nchw, params_from_torch, params_to_torch
from jaxnet.io import atomic_write, save_figure
from jaxnet.model import Net
from jaxnet.train import TrainState, loss_fn

__all__ = [
    "CRITERIA",
    "DEFAULT_DRIFT_FACTOR",
    "DEFAULT_STEP_FACTOR",
    "Criterion",
    "DataStream",
    "Report",
    "criterion",
    "parse_options",
    "random_stream",
    "validate",
]

DEFAULT_DRIFT_FACTOR = 4.0
"""A run fails when its drift from float64 exceeds this many times torch float32's own."""
DEFAULT_STEP_FACTOR = 4.0
"""The first step fails when it differs from float64 by more than this many times torch
float32's round-off of the same quantity (plus one ulp)."""

_F32_EPS = float(np.finfo(np.float32).eps)  # 2**-23
_TINY = 2.0**-24  # the smallest relative distance float32 can resolve

_TORCH_OPTIMIZERS = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "rmsprop": "RMSprop"}
_TORCH_SCHEDULERS = {
    "step_lr": "StepLR",
    "multi_step_lr": "MultiStepLR",
    "exponential_lr": "ExponentialLR",
    "cosine_annealing_lr": "CosineAnnealingLR",
    "linear_lr": "LinearLR",
    "one_cycle_lr": "OneCycleLR",
}

# ---------------------------------------------------------------------------------------------
# Losses on Net's logits, in both frameworks
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Criterion:
    """A loss on ``Net``'s logits, the same in both frameworks.

    Attributes:
      name: one of ``CRITERIA``.
      options: the loss' keyword arguments (torch.nn.functional's names).
      jax: ``(logits (N, C), targets) -> scalar``; hashable by value, so ``jit`` compiles it
        once per loss configuration.
      torch: the same loss on torch tensors.
      targets: ``(labels (N,) int, num_classes) -> targets`` as this loss takes them: class
        indices, one-hot floats (l1/mse) or probabilities (kl_div).
    """

    name: str
    options: Mapping[str, Any]
    jax: Callable[[jax.Array, jax.Array], jax.Array]
    torch: Callable[[Any, Any], Any]
    targets: Callable[[np.ndarray, int], np.ndarray]


def _one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.eye(num_classes, dtype=np.float32)[labels]


def _soft(labels: np.ndarray, num_classes: int) -> np.ndarray:
    # Probabilities with no zero entry, so kl_div's target*log(target) term is exercised.
    return (0.9 * _one_hot(labels, num_classes) + 0.1 / num_classes).astype(np.float32)


def _class_indices(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return labels.astype(np.int64)


def _kl_targets(log_target: bool) -> Callable[[np.ndarray, int], np.ndarray]:
    def targets(labels: np.ndarray, num_classes: int) -> np.ndarray:
        p = _soft(labels, num_classes)
        return np.log(p) if log_target else p

    return targets


def _hashable(value: Any) -> Any:
    if isinstance(value, list | tuple | np.ndarray):
        return tuple(_hashable(v) for v in np.asarray(value).tolist())
    return value


@dataclasses.dataclass(frozen=True)
class _JaxLoss:
    """``jaxnet.losses.<name>`` on Net's logits with fixed options; hashable by value, so a
    jitted step that takes it as a static argument compiles once per loss configuration."""

    name: str
    options: tuple[tuple[str, Any], ...]

    def __call__(self, logits: jax.Array, targets: jax.Array) -> jax.Array:
        opts = dict(self.options)
        if self.name == "kl_div":  # kl_div takes log-probabilities
            return losses.kl_div(jax.nn.log_softmax(logits, axis=-1), targets, **opts)
        if opts.get("weight") is not None:
            opts["weight"] = jnp.asarray(opts["weight"], jnp.float32)
        return losses.LOSSES[self.name](logits, targets, **opts)


@dataclasses.dataclass(frozen=True)
class _TorchLoss:
    """The same loss with ``torch.nn.functional``."""

    name: str
    options: tuple[tuple[str, Any], ...]

    def __call__(self, logits: Any, targets: Any) -> Any:
        import torch
        import torch.nn.functional as F

        opts = dict(self.options)
        if self.name == "kl_div":
            return F.kl_div(F.log_softmax(logits, dim=-1), targets, **opts)
        if opts.get("weight") is not None:  # torch wants class weights in the logits' dtype
            opts["weight"] = torch.as_tensor(
                opts["weight"], dtype=logits.dtype, device=logits.device
            )
        fn = {"l1": F.l1_loss, "mse": F.mse_loss, "cross_entropy": F.cross_entropy}[self.name]
        return fn(logits, targets, **opts)


_DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {"kl_div": {"reduction": "batchmean"}}

CRITERIA: dict[str, Callable[[Mapping[str, Any]], Callable[[np.ndarray, int], np.ndarray]]] = {
    "l1": lambda o: _one_hot,
    "mse": lambda o: _one_hot,
    "cross_entropy": lambda o: _class_indices,
    "kl_div": lambda o: _kl_targets(bool(o.get("log_target", False))),
}
"""The named losses on Net's logits, each with the targets it is trained against: l1 and mse
against one-hot targets, cross_entropy against class indices, kl_div of
``log_softmax(logits)`` against smoothed one-hot probabilities (``reduction="batchmean"``
unless given; torch's default ``"mean"`` is not the KL divergence)."""


def criterion(name: str, **options: Any) -> Criterion:
    """The named loss (see ``CRITERIA``) with ``torch.nn.functional``'s options."""
    if name not in CRITERIA:
        raise ValueError(f"Unknown loss {name!r}; choose one of {sorted(CRITERIA)}.")
    if options.get("reduction") == "none":
        raise ValueError(f"{name}: reduction='none' gives no scalar loss to train on.")
    options = {**_DEFAULT_OPTIONS.get(name, {}), **options}
    frozen = tuple(sorted((k, _hashable(v)) for k, v in options.items()))
    return Criterion(
        name, options, _JaxLoss(name, frozen), _TorchLoss(name, frozen), CRITERIA[name](options)
    )


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

DataStream = Callable[[int], tuple[np.ndarray, np.ndarray]]
"""``step -> (images, labels)``: images NHWC float32 ``(B, 32, 32, 1)``, labels int ``(B,)``
in ``[0, num_classes)``. The same step must give the same batch (both frameworks read it)."""


def random_stream(seed: int, batch_size: int, num_classes: int) -> DataStream:
    """Standard-normal images (like the tutorial's ``torch.randn``) and uniform labels.

    Batch ``k`` is drawn from ``fold_in(key(seed), k)``: any step can be read in any order.
    """
    if batch_size < 1 or num_classes < 1:
        raise ValueError(
            f"batch_size and num_classes must be positive, got {batch_size}, {num_classes}."
        )
    key = jax.random.fold_in(jax.random.key(seed), 0x5EED)

    @jax.jit
    def draw(step: jax.Array) -> tuple[jax.Array, jax.Array]:
        kx, ky = jax.random.split(jax.random.fold_in(key, step))
        x = jax.random.normal(kx, (batch_size, 32, 32, 1), jnp.float32)
        return x, jax.random.randint(ky, (batch_size,), 0, num_classes)

    def stream(step: int) -> tuple[np.ndarray, np.ndarray]:
        x, y = draw(step)
        return np.asarray(x), np.asarray(y)

    return stream


def dataset_stream(source: str, batch_size: int, seed: int, num_classes: int = 2) -> DataStream:
    """Training batches of a ``jaxnet.data`` set (``"digits"``, a ``.npz``, an MNIST folder),
    shuffled per epoch exactly as ``jaxnet train`` shuffles them (``epoch_permutation``)."""
    from jaxnet import data

    ds = data.load_data(source, num_classes=num_classes)
    per_epoch = data.num_batches(len(ds.x_train), batch_size)

    def stream(step: int) -> tuple[np.ndarray, np.ndarray]:
        epoch, i = divmod(step, per_epoch)
        order = data.epoch_permutation(seed, epoch, len(ds.x_train))
        idx = order[i * batch_size : (i + 1) * batch_size]
        return ds.x_train[idx], ds.y_train[idx]

    return stream


# ---------------------------------------------------------------------------------------------
# Optimizer and schedule, in both frameworks, from one spec
# ---------------------------------------------------------------------------------------------


def _check_config(
    optimizer: str,
    schedule: str | None,
    sched_options: Mapping[str, Any],
    steps: int,
    steps_per_epoch: int,
) -> None:
    if optimizer not in optim.OPTIMIZERS:
        raise ValueError(
            f"Unknown optimizer {optimizer!r}; choose one of {sorted(optim.OPTIMIZERS)}."
        )
    if schedule is not None and schedule not in schedules.SCHEDULES:
        raise ValueError(
            f"Unknown schedule {schedule!r}; choose one of {sorted(schedules.SCHEDULES)}."
        )
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}.")
    if not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be a positive int, got {steps_per_epoch!r}.")
    if schedule == "one_cycle_lr":
        total = sched_options.get("total_steps")
        if total is None and "epochs" in sched_options and "steps_per_epoch" in sched_options:
            total = sched_options["epochs"] * sched_options["steps_per_epoch"]
        if total is not None and total < steps:
            raise ValueError(
                f"one_cycle_lr has total_steps={total} but the run takes {steps} steps; "
                "torch refuses to step past total_steps: raise total_steps or lower steps."
            )


class _TorchRun:
    """One PyTorch run: net, optimizer and scheduler, in one dtype."""

    def __init__(
        self,
        net: Any,
        optimizer: str,
        options: Mapping[str, Any],
        schedule: str | None,
        sched_options: Mapping[str, Any],
        steps_per_epoch: int,
        criterion: Criterion,
    ) -> None:
        import torch

        self.net = net
        self.dtype = next(net.parameters()).dtype
        self.device = next(net.parameters()).device
        opt_options = dict(options)
        if isinstance(opt_options.get("betas"), list):
            opt_options["betas"] = tuple(opt_options["betas"])
        cls = getattr(torch.optim, _TORCH_OPTIMIZERS[optimizer])
        self.opt = None
        if self.dtype == torch.float64 and not ({"fused", "foreach"} & set(opt_options)):
            # The float64 reference may use torch's fused/foreach kernels: the same algorithm,
            # 2-7x faster on 6.46 M parameters; their float64 rounding (~1e-16) is invisible
            # next to float32's noise floor (~1e-7 and up). The float32 run keeps the default.
            for fast in ({"fused": True}, {"foreach": True}):
                try:
                    self.opt = cls(net.parameters(), **opt_options, **fast)
                    break
                except (RuntimeError, TypeError, ValueError):
                    continue
        if self.opt is None:
            self.opt = cls(net.parameters(), **opt_options)
        self.sched = None
        self.per_step = True
        if schedule is not None:
            sched_cls = getattr(torch.optim.lr_scheduler, _TORCH_SCHEDULERS[schedule])
            self.sched = sched_cls(self.opt, **sched_options)
            self.per_step = schedule == "one_cycle_lr"
        self.steps_per_epoch = steps_per_epoch
        self.criterion = criterion
        self.count = 0

    def apply(self, grads: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One optimizer step with the given gradients (torch layout); the new parameters."""
        import torch

        for k, p in self.net.named_parameters():
            p.grad = torch.from_numpy(np.asarray(grads[k])).to(self.device, self.dtype)
        self.opt.step()
        return {k: p.detach().cpu().numpy() for k, p in self.net.named_parameters()}

    def step(self, images_nhwc: np.ndarray, targets: np.ndarray) -> dict[str, Any]:
        import torch

        x = torch.from_numpy(nhwc_to_nchw(images_nhwc).copy()).to(self.device, self.dtype)
        t = torch.from_numpy(targets).to(self.device)
        if t.is_floating_point():
            t = t.to(self.dtype)
        lr = float(self.opt.param_groups[0]["lr"])
        self.opt.zero_grad(set_to_none=True)
        out = self.net(x)
        loss = self.criterion.torch(out, t)
        loss.backward()
        # With zero_grad(set_to_none=True) each step's grads are fresh tensors: no copy needed.
        grads = {k: p.grad.detach().cpu().numpy() for k, p in self.net.named_parameters()}
        self.opt.step()
        self.count += 1
        if self.sched is not None and (self.per_step or self.count % self.steps_per_epoch == 0):
            self.sched.step()
        params = {k: p.detach().cpu().numpy() for k, p in self.net.named_parameters()}
        return {
            "lr": lr,
            "loss": float(loss.item()),
            "outputs": out.detach().cpu().numpy(),
            "grads": grads,
            "params": params,
        }


@functools.partial(jax.jit, static_argnames=("num_classes", "criterion"))
def _jax_grads(
    params: Any, images: jax.Array, targets: jax.Array, *, num_classes: int, criterion: _JaxLoss
) -> tuple[jax.Array, jax.Array, Any]:
    """``loss, logits, grads``: the first half of ``jaxnet.train_step`` (``value_and_grad`` of
    ``jaxnet.loss_fn``). Module-level and keyed on hashable statics, so the expensive compile
    (the convolutions' backward) happens once per loss configuration, not once per run."""
    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, Net(num_classes=num_classes).apply, (images, targets), criterion
    )
    return loss, logits, grads


def _apply_gradients(state: TrainState, grads: Any) -> TrainState:
    """The second half of ``jaxnet.train_step``."""
    return state.apply_gradients(grads=grads)


# ---------------------------------------------------------------------------------------------
# Comparing
# ---------------------------------------------------------------------------------------------

_PAIRS = (("jax", "torch32"), ("jax", "torch64"), ("torch32", "torch64"))


def _diff(a: Any, b: Any, scale: float) -> dict[str, float]:
    """max|a - b| and that relative to ``scale`` = max|reference| (elementwise ratios explode
    where the reference is ~0)."""
    d = float(np.max(np.abs(np.subtract(a, b, dtype=np.float64))))
    return {"max_abs": d, "max_rel": _ratio(d, scale), "scale": scale}


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def _compare_group(
    group: Mapping[str, Mapping[str, np.ndarray]], scratch: dict[str, np.ndarray]
) -> dict[str, dict[str, Any]]:
    """Per-tensor max abs/rel and the overall relative L2 distance for each pair of runs.

    Differences against the float64 run are taken in float64 (in a reused scratch buffer: this
    runs on 6.4 M values three times per step); jax vs torch float32 in float32, whose
    difference of nearby float32 values is exact or off by half an ulp of the difference.
    """
    ref = group["torch64"]
    keys = list(ref)
    scales = {k: float(np.max(np.abs(ref[k]))) for k in keys}
    norm = math.sqrt(sum(float(np.dot(ref[k].ravel(), ref[k].ravel())) for k in keys))
    out = {}
    for pa, pb in _PAIRS:
        leaves, total = {}, 0.0
        for k in keys:
            a, b = group[pa][k], group[pb][k]
            if a.dtype == b.dtype == np.float32:
                d = np.abs(a - b).ravel()
                total += float(np.dot(d, d))  # float32 accumulation suffices for a norm
            else:
                d = scratch.setdefault(k, np.empty(a.shape, np.float64)).ravel()
                np.subtract(a.ravel(), b.ravel(), out=d)
                np.abs(d, out=d)
                total += float(np.dot(d, d))
            m = float(np.max(d)) if d.size else 0.0
            leaves[k] = {"max_abs": m, "max_rel": _ratio(m, scales[k]), "scale": scales[k]}
        out[f"{pa}_vs_{pb}"] = {
            "leaves": leaves,
            "max_abs": max(v["max_abs"] for v in leaves.values()),
            "max_rel": max(v["max_rel"] for v in leaves.values()),
            "rel_l2": _ratio(math.sqrt(total), norm),
        }
    return out


def _compare(
    runs: Mapping[str, Mapping[str, Any]], scratch: dict[str, np.ndarray]
) -> dict[str, Any]:
    """Differences of the three runs, pair by pair; relative figures are relative to the
    float64 run (max_rel: to its max |value| per tensor; rel_l2: to its L2 norm)."""
    rec: dict[str, Any] = {"loss": {r: runs[r]["loss"] for r in runs}}
    groups = {
        g: _compare_group({r: runs[r][g] for r in runs}, scratch) for g in ("grads", "params")
    }
    ref_out = runs["torch64"]["outputs"]
    out_scale = float(np.max(np.abs(ref_out)))
    out_norm = float(np.linalg.norm(ref_out))
    for pa, pb in _PAIRS:
        key = f"{pa}_vs_{pb}"
        a, b = runs[pa], runs[pb]
        entry: dict[str, Any] = {
            "loss": _diff(a["loss"], b["loss"], abs(runs["torch64"]["loss"])),
            "outputs": _diff(a["outputs"], b["outputs"], out_scale),
            "outputs_rel_l2": _ratio(
                float(np.linalg.norm(np.subtract(a["outputs"], b["outputs"], dtype=np.float64))),
                out_norm,
            ),
        }
        for g in ("grads", "params"):
            grp = groups[g][key]
            entry[g] = grp["leaves"]
            entry[f"{g}_max_abs"] = grp["max_abs"]
            entry[f"{g}_max_rel"] = grp["max_rel"]
            entry[f"{g}_rel_l2"] = grp["rel_l2"]
        rec[key] = entry
    return rec


def _first_step_check(rec: Mapping[str, Any]) -> tuple[float, str]:
    """Worst ratio of jax's error to torch float32's round-off (plus one ulp), and where.

    Outputs, loss and gradients are compared as computed from the identical start. The
    update is compared given jaxnet's own gradients (``rec["update"]``): Adam/RMSprop divide
    by ``sqrt(v) + eps``, so a gradient near ``eps`` turns its own round-off into ~lr/100 of
    update, in torch as much as in jaxnet, and which weights those are is a lottery. Judging
    the optimizer on the same gradients keeps the check at round-off.
    """
    ours, floor = rec["jax_vs_torch64"], rec["torch32_vs_torch64"]
    items = [("loss", ours["loss"], floor["loss"]), ("outputs", ours["outputs"], floor["outputs"])]
    items += [(f"grads[{k}]", ours["grads"][k], floor["grads"][k]) for k in ours["grads"]]
    upd = rec["update"]
    items += [
        (f"update[{k}]", upd["jax_vs_torch64"][k], upd["torch32_vs_torch64"][k])
        for k in upd["jax_vs_torch64"]
    ]
    worst, where = 0.0, ""
    for name, o, f in items:
        allowed = f["max_abs"] + _F32_EPS * f["scale"]
        ratio = o["max_abs"] / allowed if allowed > 0 else (0.0 if o["max_abs"] == 0 else math.inf)
        if ratio > worst:
            worst, where = ratio, name
    return worst, where


def _update_check(
    jax_params: Mapping[str, np.ndarray],
    jax_grads: Mapping[str, np.ndarray],
    make_run: Callable[[Any], _TorchRun],
) -> dict[str, dict[str, dict[str, float]]]:
    """torch's optimizer (float32 and float64) applied to jaxnet's first gradients, from the
    same start: per tensor, max|jax - torch64| and torch's own max|torch32 - torch64|."""
    import torch

    new = {
        name: make_run(dtype).apply(jax_grads)
        for name, dtype in (("torch32", torch.float32), ("torch64", torch.float64))
    }
    ref = new["torch64"]
    out: dict[str, dict[str, dict[str, float]]] = {"jax_vs_torch64": {}, "torch32_vs_torch64": {}}
    for k in ref:
        scale = float(np.max(np.abs(ref[k])))
        out["jax_vs_torch64"][k] = _diff(jax_params[k], ref[k], scale)
        out["torch32_vs_torch64"][k] = _diff(new["torch32"][k], ref[k], scale)
    return out


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Report:
    """A validation run: its configuration, the per-step record and the verdict.

    ``records[k]`` is step ``k + 1``: the lr used, the three losses, and for each pair of runs
    (``jax_vs_torch32``, ``jax_vs_torch64``, ``torch32_vs_torch64``) the max abs / max rel
    difference of the outputs, the loss, every gradient and every parameter after the step,
    plus relative L2 distances of all outputs, gradients and parameters.
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
        return 0 if self.passed else 1

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
        from rich import box
        from rich.console import Console
        from rich.table import Table

        console = console or Console()
        if not console.is_terminal:  # a pipe or file: wide enough for the table
            console.width = max(console.width, 104)
        c = self.config
        sched = f", {c['schedule']}({_fmt_opts(c['schedule_options'])})" if c["schedule"] else ""
        title = (
            f"jaxnet vs PyTorch: {c['loss']}({_fmt_opts(c['loss_options'])}), "
            f"{c['optimizer']}({_fmt_opts(c['optimizer_options'])}){sched}, "
            f"{c['steps']} steps x batch {c['batch_size']}, seed {c['seed']}"
        )
        t = Table(
            title=title,
            title_justify="left",
            header_style="bold",
            box=box.SIMPLE_HEAD,
            padding=(0, 1),
            pad_edge=False,
        )
        for col in (
            "step",
            "lr",
            "loss",
            "Δloss",
            "Δout",
            "Δgrad",
            "Δparam",
            "drift",
            "floor",
            "ratio",
        ):
            t.add_column(col, justify="right", no_wrap=True)
        by_step = {r["step"]: i for i, r in enumerate(self.records)}
        last = self.records[-1]["step"]
        shown = sorted({1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000, last} & set(by_step))
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
                f"{drift[i] / max(floor[i], _TINY):.2f}",
            )
        console.print(t)
        console.print(
            "Δ: max |jaxnet - PyTorch float32| (outputs, loss, all gradients, all parameters). "
            "drift: |θ_jax - θ_f64| / |θ_f64| over all parameters; floor: the same for PyTorch "
            "float32 (float32 noise alone); ratio = drift / floor.",
            style="dim",
            markup=False,
        )
        for line in self.verdict_lines():
            style = (
                "bold green"
                if "OK" in line[-3:] or "equal to PyTorch within" in line
                else ("bold red")
            )
            console.print(line, style=style, markup=False)
        console.print(f"{self.seconds:.1f} s", style="dim")

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
                    c["drift_factor"] * np.maximum(floor, _TINY),
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


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op thread count for the run (restored after); ``None`` leaves it."""
    import torch

    if n is None:
        yield
        return
    if n < 1:
        raise ValueError(f"torch_threads must be positive, got {n}.")
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@contextlib.contextmanager
def _float32_arithmetic(torch_device: Any) -> Iterator[None]:
    """float32 matmuls and convolutions in both frameworks, on GPU too.

    On GPUs JAX may use TF32/bf16 passes for float32 dots and convolutions unless
    ``jax_default_matmul_precision`` says "float32"; torch uses TF32 for cuDNN convolutions by
    default (and for matmuls when allowed). Both are set here for the run and restored after.
    """
    import torch

    with jax.default_matmul_precision("float32"):
        if getattr(torch_device, "type", str(torch_device)) != "cuda":
            yield
            return
        saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _pick_device(device: str) -> Any:
    import torch

    if device == "auto":
        on_gpu = jax.default_backend() in ("gpu", "cuda", "rocm") and torch.cuda.is_available()
        device = "cuda" if on_gpu else "cpu"
    return torch.device(device)


def validate(
    *,
    steps: int = 100,
    batch_size: int = 32,
    seed: int = 0,
    num_classes: int = 2,
    weights: PathLike | None = None,
    loss: str = "cross_entropy",
    loss_options: Mapping[str, Any] | None = None,
    optimizer: str = "sgd",
    optimizer_options: Mapping[str, Any] | None = None,
    schedule: str | None = None,
    schedule_options: Mapping[str, Any] | None = None,
    steps_per_epoch: int = 1,
    data: DataStream | None = None,
    drift_factor: float = DEFAULT_DRIFT_FACTOR,
    step_factor: float = DEFAULT_STEP_FACTOR,
    device: str = "auto",
    torch_threads: int | None = None,
    record_every: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> Report:
    """Train jaxnet and PyTorch (float32, and float64 as the reference) side by side; compare.

    Args:
      steps, batch_size: the run's length and batch size.
      seed: the PyTorch ``Net``'s initialisation (``torch.manual_seed``) and the random data.
      num_classes: outputs of the net (read off ``weights`` when given).
      weights: start from this ``.pt``/``.safetensors`` state_dict instead of a fresh ``Net``.
      loss, loss_options: a name of ``CRITERIA`` and its ``torch.nn.functional`` options.
      optimizer, optimizer_options: ``sgd``/``adam``/``adamw``/``rmsprop`` and the arguments
        of the ``torch.optim`` class (the same names in jaxnet), e.g. ``{"lr": 0.01}``.
      schedule, schedule_options: a name of ``jaxnet.schedules.SCHEDULES`` and the arguments
        of the torch scheduler (``one_cycle_lr`` replaces the optimizer's lr and cycles its
        momentum/beta1 as torch's OneCycleLR does).
      steps_per_epoch: 1 steps the schedule every batch; n every n batches (per-epoch
        scheduling). OneCycleLR always steps per batch.
      data: the batch stream; ``random_stream(seed, batch_size, num_classes)`` by default.
      drift_factor, step_factor: the verdict's limits (see the module docstring).
      device: the torch device (``"auto"``: CUDA when JAX runs on a GPU, else CPU).
      torch_threads: torch's CPU threads during the run (``None``: torch's default). On a
        CPU shared with other processes, 1 avoids oversubscription (10x slower steps).
      record_every: compare (and record) every n-th step, plus the first and the last; the
        comparisons cost about as much as the three training steps.
      progress: called as ``progress(step, steps)`` after every step.

    Returns:
      A ``Report``; ``report.exit_code`` is 0 when the run is equal within float32 noise.
    """
    import torch

    from jaxnet.torch_reference import TorchNet, make_torch_net

    t0 = time.perf_counter()
    loss_options = dict(loss_options or {})
    optimizer_options = dict(optimizer_options or {})
    schedule_options = dict(schedule_options or {})
    _check_config(optimizer, schedule, schedule_options, steps, steps_per_epoch)
    if not isinstance(record_every, int) or record_every < 1:
        raise ValueError(f"record_every must be a positive int, got {record_every!r}.")
    crit = criterion(loss, **loss_options)
    torch_device = _pick_device(device)

    if weights is not None:
        start = params_to_torch(params_from_torch(weights), as_numpy=True)
        num_classes = start["fc3.weight"].shape[0]
        net32 = TorchNet(num_classes)
        net32.load_state_dict({k: torch.from_numpy(v) for k, v in start.items()})
    else:
        net32 = make_torch_net(seed, num_classes)
    net32 = net32.to(torch_device)
    net64 = copy.deepcopy(net32).to(torch.float64)  # the same start, exactly
    start = copy.deepcopy(net32)
    data_desc = (
        "random: standard-normal images, uniform labels"
        if data is None
        else (getattr(data, "__name__", type(data).__name__))
    )
    if data is None:
        data = random_stream(seed, batch_size, num_classes)

    params = params_from_torch({k: v.cpu() for k, v in net32.state_dict().items()})
    tx = optim.build(optimizer, optimizer_options, schedule, schedule_options, steps_per_epoch)
    state = TrainState.create(apply_fn=Net(num_classes=num_classes).apply, params=params, tx=tx)
    apply_gradients = jax.jit(_apply_gradients)  # per run: the optimizer is part of the state
    runs = {
        name: _TorchRun(
            net, optimizer, optimizer_options, schedule, schedule_options, steps_per_epoch, crit
        )
        for name, net in (("torch32", net32), ("torch64", net64))
    }

    records: list[dict[str, Any]] = []
    scratch: dict[str, np.ndarray] = {}
    finite = True
    with _float32_arithmetic(torch_device), _torch_threads(torch_threads):
        for k in range(steps):
            images, labels = data(k)
            _check_batch(images, labels, num_classes, k)
            targets = crit.targets(np.asarray(labels), num_classes)
            out = {name: run.step(images, targets) for name, run in runs.items()}
            jax_targets = targets.astype(np.int32) if targets.dtype.kind == "i" else targets
            j_loss, j_logits, j_grads = _jax_grads(
                state.params, images, jax_targets, num_classes=num_classes, criterion=crit.jax
            )
            state = apply_gradients(state, j_grads)
            last = k == steps - 1
            if k == 0 or (k + 1) % record_every == 0 or last:
                out["jax"] = {
                    "loss": float(j_loss),
                    "outputs": np.asarray(j_logits),
                    "grads": params_to_torch(j_grads, as_numpy=True),
                    "params": params_to_torch(state.params, as_numpy=True),
                }
                rec = {"step": k + 1, "lr": out["torch32"]["lr"], **_compare(out, scratch)}
                if k == 0:
                    rec["update"] = _update_check(
                        out["jax"]["params"],
                        out["jax"]["grads"],
                        lambda dtype: _TorchRun(
                            copy.deepcopy(start).to(dtype),
                            optimizer,
                            optimizer_options,
                            schedule,
                            schedule_options,
                            steps_per_epoch,
                            crit,
                        ),
                    )
                records.append(rec)
                finite &= all(
                    np.isfinite(out[r]["loss"])
                    and all(np.all(np.isfinite(v)) for v in out[r]["params"].values())
                    for r in out
                )
            else:  # between recorded steps only the losses are checked (cheap)
                finite &= bool(
                    np.isfinite([float(j_loss)] + [o["loss"] for o in out.values()]).all()
                )
            if progress is not None:
                progress(k + 1, steps)
            if not finite:
                break

    first_ratio, first_where = _first_step_check(records[0])
    drift = np.array([r["jax_vs_torch64"]["params_rel_l2"] for r in records])
    floor = np.array([r["torch32_vs_torch64"]["params_rel_l2"] for r in records])
    ratios = drift / np.maximum(floor, _TINY)
    worst = int(np.nanargmax(ratios)) if np.any(np.isfinite(ratios)) else 0
    worst_step = int(records[worst]["step"])
    config = {
        "steps": steps,
        "batch_size": batch_size,
        "seed": seed,
        "num_classes": num_classes,
        "weights": None if weights is None else str(weights),
        "loss": loss,
        "loss_options": dict(crit.options),
        "optimizer": optimizer,
        "optimizer_options": optimizer_options,
        "schedule": schedule,
        "schedule_options": schedule_options,
        "steps_per_epoch": steps_per_epoch,
        "record_every": record_every,
        "data": data_desc,
        "drift_factor": drift_factor,
        "step_factor": step_factor,
        "device": f"jax {jax.default_backend()} / torch {torch_device.type}",
        "matmul_precision": "float32 (jax_default_matmul_precision; torch TF32 off)",
        "versions": {
            "jax": jax.__version__,
            "torch": torch.__version__,
            "optax": optax.__version__,
            "python": platform.python_version(),
        },
    }
    return Report(
        config=config,
        records=records,
        first_step_ratio=first_ratio,
        first_step_worst=first_where,
        drift_ratio=float(ratios[worst]),
        drift_worst_step=worst_step,
        finite=bool(finite),
        seconds=time.perf_counter() - t0,
    )


def _check_batch(images: Any, labels: Any, num_classes: int, step: int) -> None:
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 4 or images.shape[1:] != (32, 32, 1) or images.dtype != np.float32:
        raise ValueError(
            f"data stream, step {step}: images must be float32 NHWC (B, 32, 32, 1), got "
            f"{images.dtype} {images.shape}."
        )
    if labels.shape != images.shape[:1] or labels.dtype.kind not in "iu":
        raise ValueError(
            f"data stream, step {step}: labels must be integers of shape {images.shape[:1]}, "
            f"got {labels.dtype} {labels.shape}."
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"data stream, step {step}: labels must lie in [0, {num_classes}), found "
            f"{labels.min()}..{labels.max()}; set num_classes to match the data."
        )


def parse_options(items: Sequence[str] | None) -> dict[str, Any]:
    """``["lr=0.01", "betas=0.9,0.999", "nesterov=true"]`` -> ``{"lr": 0.01, ...}``.

    Values are Python literals (numbers, tuples, lists, ``None``); ``true``/``false`` in any
    case are accepted; anything else stays a string (``reduction=none`` is ``"none"``).
    """
    import ast

    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"option {item!r} is not KEY=VALUE (e.g. lr=0.01).")
        # "none" stays a string: it is a value of torch's reduction=.
        text = {"true": "True", "false": "False"}.get(raw.strip().lower(), raw.strip())
        try:
            out[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[key] = raw.strip()
    return out
