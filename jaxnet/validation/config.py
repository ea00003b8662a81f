"""``ValidateConfig``: everything that defines a ``jaxnet validate`` run, and its checks."""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping
from typing import Any

from jaxnet.convert import PathLike
from jaxnet.errors import ConfigError
from jaxnet.validation.streams import DataStream

__all__ = [
    "DEFAULT_DRIFT_FACTOR",
    "DEFAULT_FLOAT64_TOLERANCE",
    "DEFAULT_STEP_FACTOR",
    "PRECISIONS",
    "ValidateConfig",
]

DEFAULT_DRIFT_FACTOR = 4.0
"""A run fails when its drift from float64 exceeds this many times torch float32's own."""
DEFAULT_STEP_FACTOR = 4.0
"""The first step fails when it differs from float64 by more than this many times torch
float32's round-off of the same quantity (plus one ulp)."""
DEFAULT_FLOAT64_TOLERANCE = 1e-12
"""``precision="float64"``: the largest relative difference between jaxnet and PyTorch, both
in float64, allowed at any recorded step (the loss's, and the relative L2 distances of all
outputs, gradients and parameters). About 4500 float64 ulps (2**-52 = 2.2e-16): room for
round-off to grow over hundreds of training steps, yet five orders of magnitude below what a
single float32 constant or intermediate leaves in a float64 computation (~1e-7, float32's
resolution), and below any real difference of semantics."""
PRECISIONS = ("float32", "float64")
"""``float32``: jaxnet float32 judged against PyTorch float32's noise floor; ``float64``:
jaxnet float64 against PyTorch float64, to float64 round-off."""


@dataclasses.dataclass(frozen=True)
class ValidateConfig:
    """Everything that defines a validation run (``jaxnet validate --help`` names each).

    Attributes:
      steps, batch_size: the run's length and batch size.
      seed: the PyTorch ``Net``'s initialisation (``torch.manual_seed``) and the data's order.
      num_classes: outputs of the net (read off ``weights`` when given).
      weights: start from this ``.pt``/``.safetensors`` state_dict instead of a fresh ``Net``.
      loss, loss_options: a name of ``jaxnet.criteria.CRITERIA`` and its
        ``torch.nn.functional`` options: the very criterion ``jaxnet train --loss`` trains.
      optimizer, optimizer_options: a name of ``jaxnet.optim.OPTIMIZERS`` and the arguments of
        the ``torch.optim`` class (the same names in jaxnet), e.g. ``{"lr": 0.01}``; the
        defaults of ``jaxnet.optim.DEFAULTS`` apply (SGD: momentum 0.9), as in training.
      schedule, schedule_options: a name of ``jaxnet.schedules.SCHEDULES`` and the arguments
        of the torch scheduler (``one_cycle_lr`` replaces the optimizer's lr and cycles its
        momentum/beta1 as torch's OneCycleLR does).
      steps_per_epoch: 1 steps the schedule every batch; n every n batches (per-epoch
        scheduling). OneCycleLR always steps per batch.
      data: the batches: ``None`` or ``"random"`` (standard-normal images, uniform labels,
        ``random_stream``), a ``jaxnet.data`` source (``"digits"``, a ``.npz``, an MNIST folder:
        ``jaxnet train``'s shuffled training batches, ``dataset_stream``), or a ``DataStream``.
      precision: ``"float32"`` (jaxnet and PyTorch in float32, judged against PyTorch
        float32's own distance from a float64 run) or ``"float64"`` (jaxnet float64 against
        PyTorch float64, judged to float64 round-off: a proof of semantics that float32's
        rounding events cannot blur); see ``jaxnet.validation``.
      drift_factor, step_factor: the float32 verdict's limits (see ``jaxnet.validation``).
      float64_tolerance: the float64 verdict's limit on the relative difference at any step.
      device: the torch device (``"auto"``: CUDA when JAX runs on a GPU, else CPU).
      torch_threads: torch's CPU threads during the run (``None``: torch's default). On a
        CPU shared with other processes, 1 avoids oversubscription (10x slower steps).
      record_every: compare (and record) every n-th step, plus the first and the last; the
        comparisons cost about as much as the three training steps.
    """

    steps: int = 100
    batch_size: int = 32
    seed: int = 0
    num_classes: int = 2
    weights: PathLike | None = None
    loss: str = "cross_entropy"
    loss_options: Mapping[str, Any] | None = None
    optimizer: str = "sgd"
    optimizer_options: Mapping[str, Any] | None = None
    schedule: str | None = None
    schedule_options: Mapping[str, Any] | None = None
    steps_per_epoch: int = 1
    data: str | DataStream | None = None
    precision: str = "float32"
    drift_factor: float = DEFAULT_DRIFT_FACTOR
    step_factor: float = DEFAULT_STEP_FACTOR
    float64_tolerance: float = DEFAULT_FLOAT64_TOLERANCE
    device: str = "auto"
    torch_threads: int | None = None
    record_every: int = 1

    def check(self) -> None:
        """Raise ``ConfigError`` for a value no run can use (names are checked by the
        criteria and optimizer registries when the run is set up)."""
        for name in ("steps", "batch_size", "num_classes", "steps_per_epoch", "record_every"):
            _positive_int(name, getattr(self, name))
        if self.torch_threads is not None:
            _positive_int("torch_threads", self.torch_threads)
        if not isinstance(self.seed, numbers.Integral) or isinstance(self.seed, bool):
            raise ConfigError(f"seed must be an int, got {self.seed!r}.")
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}."
            )
        for name in ("drift_factor", "step_factor", "float64_tolerance"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not value > 0:
                raise ConfigError(f"{name} must be a positive number, got {value!r}.")
        for name in ("loss_options", "optimizer_options", "schedule_options"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Mapping):
                raise ConfigError(f"{name} must be a mapping of names to values, got {value!r}.")
        if not (self.data is None or isinstance(self.data, str) or callable(self.data)):
            raise ConfigError(
                "data must be None (random batches), a data source ('digits', a .npz file, an "
                f"MNIST folder) or a callable step -> (images, labels); got {self.data!r}."
            )
        if not isinstance(self.device, str):
            raise ConfigError(f"device must be a str ('auto', 'cpu', 'cuda'), got {self.device!r}.")


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive int, got {value!r}.")


FIELDS = tuple(f.name for f in dataclasses.fields(ValidateConfig))
"""The field names, in order: ``validate``'s keyword arguments."""


def make_config(config: ValidateConfig | None, fields: Mapping[str, Any]) -> ValidateConfig:
    """``config`` (or the defaults) with ``fields`` replaced, checked; unknown names raise
    ``ConfigError``."""
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise ConfigError(
            f"validate takes no {', '.join(unknown)}; its settings are {', '.join(FIELDS)}."
        )
    if config is None:
        config = ValidateConfig()
    elif not isinstance(config, ValidateConfig):
        raise ConfigError(f"validate's config must be a ValidateConfig, got {config!r}.")
    config = dataclasses.replace(config, **fields)
    config.check()
    return config
