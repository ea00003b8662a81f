"""``TrainConfig``: everything that defines a ``jaxnet train`` run, and its JSON form."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from jaxnet import data, optim
from jaxnet.errors import ConfigError

__all__ = [
    "RESUMABLE_CHANGES",
    "TrainConfig",
    "check_train_config",
    "config_from_json",
    "config_to_json",
    "optimizer_spec",
]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a ``jaxnet train`` run (``jaxnet train --help`` names each).

    The defaults are the README's default run: the digits, even vs odd, 8 epochs of
    ``SGD(lr=0.01, momentum=0.9)`` with batches of 32. ``loss`` names a
    ``jaxnet.criteria.CRITERIA`` entry; ``optimizer``/``schedule`` and their ``*_kwargs`` go
    through ``jaxnet.optim.build`` (torch's argument names).
    """

    data: str = "digits"
    num_classes: int = 2
    label_rule: str = "parity"
    limit: int | None = None
    val_fraction: float = 0.2
    split_seed: int = 0
    epochs: int = 8
    batch_size: int = 32
    eval_batch_size: int = 512
    loss: str = "cross_entropy"
    optimizer: str = "sgd"
    lr: float = 0.01
    optimizer_kwargs: Mapping[str, Any] | None = None
    schedule: str | None = None
    schedule_kwargs: Mapping[str, Any] | None = None
    seed: int = 0
    weight_init: str = "torch"
    early_stopping: int | None = None
    per_example_grad_norms: int = 0
    progress: bool = True
    resume: bool = False
    overwrite: bool = False


RESUMABLE_CHANGES = frozenset(
    {"epochs", "early_stopping", "progress", "resume", "overwrite", "eval_batch_size"}
)
"""The config fields a resumed run may change; every other one must equal the checkpoint's."""


def config_to_json(config: TrainConfig) -> dict[str, Any]:
    """``config`` as plain JSON values (the form checkpoints keep)."""
    d = dataclasses.asdict(config)
    for field in ("optimizer_kwargs", "schedule_kwargs"):
        value = getattr(config, field)
        d[field] = None if value is None else dict(value)
    return d


def config_from_json(d: Mapping[str, Any]) -> TrainConfig:
    """The ``TrainConfig`` a checkpoint recorded (fields this version does not know are
    dropped)."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in d.items() if k in known})


def check_train_config(config: TrainConfig) -> None:
    """Raise ``ConfigError`` naming the first value a run cannot use (the names, the data and
    the optimizer's arguments are checked where they are used)."""
    at_least = {
        "epochs": (config.epochs, 1),
        "batch_size": (config.batch_size, 1),
        "eval_batch_size": (config.eval_batch_size, 1),
        "limit": (config.limit, 1),
        "early_stopping": (config.early_stopping, 1),
        "per_example_grad_norms": (config.per_example_grad_norms, 0),
        "num_classes": (config.num_classes, 1),
    }
    for name, (value, low) in at_least.items():
        if value is not None and (not isinstance(value, int) or value < low):
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} must be an integer >= {low}, got {value!r}.")
    if not 0.0 < config.val_fraction < 1.0:
        raise ConfigError(f"val_fraction must lie in (0, 1), got {config.val_fraction!r}.")
    if not (isinstance(config.lr, int | float) and math.isfinite(config.lr) and config.lr >= 0):
        raise ConfigError(f"--lr must be a finite number >= 0, got {config.lr!r}.")
    if not isinstance(config.seed, int) or not 0 <= config.seed < 2**63:
        raise ConfigError(f"--seed must be an integer in [0, 2**63), got {config.seed!r}.")


def load_dataset(config: TrainConfig) -> data.Dataset:
    """The data a run of ``config`` trains on: its source, classes, split and normalisation."""
    return data.load_data(
        config.data,
        config.num_classes,
        config.label_rule,
        config.val_fraction,
        config.split_seed,
        config.limit,
    )


def optimizer_spec(config: TrainConfig, num_train: int) -> optim.OptimizerSpec:
    """The optimizer spec a training run of ``config`` uses with ``num_train`` training
    examples (the schedule's steps per epoch come from them): what ``jaxnet train`` builds
    its optax transform from, and what a torch checkpoint's optimizer state is read with."""
    return optim.resolve(
        config.optimizer,
        {"lr": config.lr, **(config.optimizer_kwargs or {})},
        config.schedule,
        config.schedule_kwargs,
        steps_per_epoch=data.num_batches(num_train, config.batch_size),
        epochs=config.epochs,
    )
