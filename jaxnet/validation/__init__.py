"""Cross-framework validator: is a jaxnet training run the PyTorch training run?

``validate(...)`` (and ``jaxnet validate``) starts jaxnet and the PyTorch reference ``Net`` from
the same weights, feeds both the same stream of batches with the same criterion
(``jaxnet.criteria``), optimizer and schedule (one ``jaxnet.optim.resolve`` spec for both), and
records at every step how far apart the outputs, the loss, every gradient and every parameter
are. jaxnet's side is training's own ``jaxnet.step.compute_grads`` and ``apply_gradients``. A
third run, PyTorch in float64 from the same start, measures the **noise floor**: how far
float32 arithmetic alone moves a run from the exact one.

What "equal" means (the verdict):

* the first step, taken from identical parameters, agrees to float32 round-off: for the
  outputs, the loss, every gradient, and the optimizer's update (applied by torch to
  jaxnet's gradients, see ``compare._first_step_check``),
  ``max|jax - torch64| <= step_factor * (max|torch32 - torch64| + 1 ulp)`` per tensor (the
  float32 round-off of that very computation, measured, plus one ulp at its scale);
* the whole trajectory stays within the noise floor: at every recorded step the relative L2
  distance of all parameters from the float64 run, ``|jax - torch64| / |torch64|``, is at most
  ``drift_factor`` times torch float32's own distance ``|torch32 - torch64| / |torch64|``.

Max-abs differences are recorded too but do not judge whole runs: after a few Adam steps they
are dominated by weights whose gradient is near ``eps``, where float32 rounding alone moves
the update by up to ~lr.

A float32 trajectory can leave the floor by chance: one ReLU pre-activation or one Adam
denominator near ``eps`` rounds one way in one framework and the other way in the other, and
from then on the runs differ by more than round-off. ``precision="float64"``
(``jaxnet validate --precision float64``) tells such an event from a real difference: it runs
jaxnet in float64 (``jax_enable_x64``) against PyTorch float64 from the same weights and
batches, where equal semantics agree to round-off, and requires at every recorded step that
the loss (relative) and the relative L2 distances of all outputs, all gradients and all
parameters stay within ``float64_tolerance`` (default 1e-12; see ``compare.float64_check``).

The package: ``config`` (``ValidateConfig``), ``streams`` (the batches), ``harness`` (the three
runs), ``compare`` (the maths), ``report`` (``Report``).
"""

from __future__ import annotations

import copy
import dataclasses
import platform
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

from jaxnet import optim
from jaxnet.convert import params_from_torch, params_to_torch
from jaxnet.criteria import Criterion, criterion
from jaxnet.optim import OptimizerSpec
from jaxnet.validation.compare import (
    _compare,
    _first_step_check,
    _update_check,
    drift_check,
    float64_check,
)
from jaxnet.validation.config import (
    DEFAULT_DRIFT_FACTOR,
    DEFAULT_FLOAT64_TOLERANCE,
    DEFAULT_STEP_FACTOR,
    PRECISIONS,
    ValidateConfig,
    make_config,
)
from jaxnet.validation.harness import (
    JaxRun,
    TorchRun,
    exact_arithmetic,
    jax_params,
    pick_device,
    torch_threads,
)
from jaxnet.validation.report import Report
from jaxnet.validation.streams import (
    DataStream,
    check_batch,
    dataset_stream,
    make_stream,
    random_stream,
)

__all__ = [
    "DEFAULT_DRIFT_FACTOR",
    "DEFAULT_FLOAT64_TOLERANCE",
    "DEFAULT_STEP_FACTOR",
    "PRECISIONS",
    "DataStream",
    "Report",
    "ValidateConfig",
    "dataset_stream",
    "random_stream",
    "validate",
]


def validate(
    config: ValidateConfig | None = None,
    /,
    *,
    progress: Callable[[int, int], None] | None = None,
    **fields: Any,
) -> Report:
    """Train jaxnet and PyTorch (float32, and float64 as the reference) side by side; compare.

    ``validate(ValidateConfig(steps=50, optimizer="adam"))``, or the same settings as keywords:
    ``validate(steps=50, optimizer="adam")``; keywords given with a config replace its fields
    (see ``ValidateConfig`` for each). ``progress`` is called as ``progress(step, steps)``
    after every step. With ``precision="float64"`` jaxnet runs in float64 against PyTorch
    float64 only.

    Returns a ``Report``; ``report.exit_code`` is 0 when the run is equal within float32 noise
    (float64: to float64 round-off). Raises ``ConfigError`` for an unknown setting or a value
    no run can use (and the loaders' ``WeightFileError``/``DataError`` for unusable weights or
    data).
    """
    t0 = time.perf_counter()
    config = make_config(config, fields)
    device = pick_device(config.device)
    with exact_arithmetic(device, config.precision), torch_threads(config.torch_threads):
        run = _setup(config, device)
        every, last = config.record_every, config.steps - 1
        for k in range(config.steps):
            _step(run, k, record=k == 0 or (k + 1) % every == 0 or k == last)
            run.end_epoch_if_due(k)
            if progress is not None:
                progress(k + 1, config.steps)
            if not run.finite:
                break
    return Report(
        config=_config_dict(config, run),
        records=run.records,
        finite=run.finite,
        seconds=time.perf_counter() - t0,
        **_verdict_figures(config, run.records),
    )


def _verdict_figures(config: ValidateConfig, records: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``Report`` fields that judge the run: float32's first step and drift, or float64's
    worst relative difference."""
    if config.precision == "float64":
        error, step, where = float64_check(records)
        return {"float64_error": error, "float64_worst_step": step, "float64_worst": where}
    first_ratio, first_where = _first_step_check(records[0])
    drift_ratio, drift_step = drift_check(records)
    return {
        "first_step_ratio": first_ratio,
        "first_step_worst": first_where,
        "drift_ratio": drift_ratio,
        "drift_worst_step": drift_step,
    }


@dataclasses.dataclass
class _Run:
    """A validation run in progress: the three runs, what feeds them, and the record so far."""

    criterion: Criterion
    spec: OptimizerSpec
    device: Any
    start: Any  # the torch Net (float32) every run starts from
    jax: JaxRun
    torch: dict[str, TorchRun]
    stream: DataStream
    data: str
    records: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    scratch: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    finite: bool = True
    epoch_losses: list[float] = dataclasses.field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return int(self.start.fc3.out_features)

    def end_epoch_if_due(self, k: int) -> None:
        """After step ``k`` ending an epoch (``spec.schedule_every`` steps), step a
        ``reduce_lr_on_plateau`` schedule in every run on one metric: PyTorch float64's mean
        training loss over the epoch, so that all runs take the same lr decisions."""
        if self.spec.schedule != "reduce_lr_on_plateau" or (k + 1) % self.spec.schedule_every:
            return
        metric = float(np.mean(self.epoch_losses))
        self.epoch_losses.clear()
        for r in (self.jax, *self.torch.values()):
            r.end_epoch(metric)

    def fresh_torch_run(self, dtype: Any) -> TorchRun:
        """A PyTorch run from the start, in ``dtype`` (for the first update's check)."""
        return TorchRun(copy.deepcopy(self.start).to(dtype), self.spec, self.criterion)


def _setup(config: ValidateConfig, device: Any) -> _Run:
    """Check the names, then build the runs from the same start, criterion and spec: jaxnet,
    PyTorch float32 and float64; or, for ``precision="float64"``, jaxnet and PyTorch in
    float64 (inside ``exact_arithmetic``, which enables JAX's float64)."""
    import torch

    crit = criterion(config.loss, **(config.loss_options or {}))
    spec = optim.resolve(
        config.optimizer,
        config.optimizer_options,
        config.schedule,
        config.schedule_options,
        steps_per_epoch=config.steps_per_epoch,
        run_steps=config.steps,
    )
    tx = optim.transform(spec)  # ConfigError for values torch refuses, with torch's message
    start = _start_net(config).to(device)
    num_classes = int(start.fc3.out_features)
    stream, data = make_stream(config.data, config.batch_size, config.seed, num_classes)
    float32 = config.precision == "float32"
    runs = {"torch64": TorchRun(copy.deepcopy(start).to(torch.float64), spec, crit, fast=float32)}
    jax_dtype = np.float64
    if float32:
        runs["torch32"] = TorchRun(copy.deepcopy(start), spec, crit)
        jax_dtype = np.float32
    jax_run = JaxRun(jax_params(start, jax_dtype), num_classes, tx, crit)
    return _Run(crit, spec, device, start, jax_run, runs, stream, data)


def _start_net(config: ValidateConfig) -> Any:
    """The torch ``Net`` all runs start from: ``config.weights``, or a fresh one from the seed."""
    import torch

    from jaxnet.torch_reference import TorchNet, make_torch_net

    if config.weights is None:
        return make_torch_net(config.seed, config.num_classes)
    state = params_to_torch(params_from_torch(config.weights), as_numpy=True)
    net = TorchNet(state["fc3.weight"].shape[0])
    net.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    return net


def _step(run: _Run, k: int, record: bool) -> None:
    """Step ``k`` of the three runs on one batch; compare them when ``record``."""
    images, labels = run.stream(k)
    check_batch(images, labels, run.num_classes, k)
    images, labels = np.asarray(images), np.asarray(labels)
    out = {name: r.step(images, labels) for name, r in run.torch.items()}
    run.epoch_losses.append(out["torch64"]["loss"])
    loss, logits, grads = run.jax.step(images, labels)
    if not record:  # between recorded steps only the losses are checked (cheap)
        losses = [float(loss)] + [o["loss"] for o in out.values()]
        run.finite &= bool(np.isfinite(losses).all())
        return
    out["jax"] = run.jax.record(loss, logits, grads)
    rec = {"step": k + 1, "lr": out["torch64"]["lr"], **_compare(out, run.scratch)}
    if k == 0 and "torch32" in out:  # float32: the first update on jaxnet's own gradients
        jax_out = out["jax"]
        rec["update"] = _update_check(jax_out["params"], jax_out["grads"], run.fresh_torch_run)
    run.records.append(rec)
    run.finite &= all(
        np.isfinite(o["loss"]) and all(np.all(np.isfinite(v)) for v in o["params"].values())
        for o in out.values()
    )


def _config_dict(config: ValidateConfig, run: _Run) -> dict[str, Any]:
    """The report's ``config``: every ``ValidateConfig`` field as the run used it (the
    criterion's and optimizer's resolved options, defaults included), plus the platform."""
    import torch

    resolved = {
        "loss_options": dict(run.criterion.options),
        "optimizer_options": {**(config.optimizer_options or {}), **run.spec.options},
        "schedule_options": {**(config.schedule_options or {}), **run.spec.schedule_options},
    }
    return {
        **{f.name: getattr(config, f.name) for f in dataclasses.fields(config)},
        **resolved,
        "num_classes": run.num_classes,
        "weights": None if config.weights is None else str(config.weights),
        "data": run.data,
        "device": f"jax {jax.default_backend()} / torch {run.device.type}",
        "matmul_precision": (
            "float64 (jax_enable_x64, matmul precision highest)"
            if config.precision == "float64"
            else "float32 (jax_default_matmul_precision; torch TF32 off)"
        ),
        "versions": {
            "jax": jax.__version__,
            "torch": torch.__version__,
            "optax": optax.__version__,
            "python": platform.python_version(),
        },
    }
