"""A jaxnet run as the PyTorch tutorials' checkpoint dict, and such a dict's optimizer state as
the start of a jaxnet run: what ``jaxnet export --format torch-checkpoint`` writes and what
``jaxnet import`` keeps for ``jaxnet train --resume``.

The dict is the one PyTorch's "saving and loading a general checkpoint" recipe writes::

    {"model_state_dict": net.state_dict(), "optimizer_state_dict": optimizer.state_dict(),
     "epoch": epoch, ...}

``"epoch"`` is the number of epochs completed. jaxnet adds ``"step"`` (optimizer steps taken),
``"scheduler_state_dict"`` (where the run has a schedule) and ``"jaxnet"`` (the optimizer spec,
so the file says how to build the optimizer that loads it).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import serialization

from jaxnet import data, optim
from jaxnet.config import TrainConfig, config_from_json, optimizer_spec
from jaxnet.convert import WeightFileError, params_to_torch
from jaxnet.errors import ConfigError
from jaxnet.io import atomic_write
from jaxnet.model import Net
from jaxnet.optstate import opt_state_from_torch, opt_state_to_torch, torch_scheduler_state
from jaxnet.step import TrainState, create_train_state
from jaxnet.workdir import checkpoints_of

__all__ = [
    "TORCH_OPTIMIZER_FILE",
    "keep_optimizer_state",
    "opt_state_of_checkpoint",
    "read_last_state",
    "resumed_state",
    "save_torch_checkpoint",
]

TORCH_OPTIMIZER_FILE = "torch_optimizer.pt"
"""Where ``jaxnet import`` keeps a checkpoint dict's optimizer state in a workdir, for the
first ``jaxnet train --resume`` to start from (``optimizer_state_dict``, and where the dict has
them ``scheduler_state_dict``, ``epoch`` and ``step``)."""


def _torch() -> Any:
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is a dev dependency
        raise ConfigError("PyTorch checkpoints need PyTorch: pip install torch==2.13.0.") from e
    return torch


def read_last_state(
    workdir: str | os.PathLike,
) -> tuple[TrainState, optim.OptimizerSpec, dict[str, Any]]:
    """``(state, spec, meta)`` of the newest ``last`` checkpoint in ``workdir``: the whole
    training state (params, optimizer state, step), read-only."""
    with checkpoints_of(workdir, read_only=True) as ckpts:
        _, meta = ckpts.read_meta("last")
        config = config_from_json(meta["config"])
        spec = optimizer_spec(config, int(meta["data"]["num_train"]))
        net = Net(num_classes=config.num_classes, weight_init=config.weight_init)  # type: ignore[arg-type]
        tx = optim.transform(spec)
        abstract = jax.eval_shape(lambda: create_train_state(jax.random.key(0), net, tx))
        restored, meta = ckpts.restore_last(serialization.to_state_dict(abstract))
    return serialization.from_state_dict(abstract, restored), spec, meta


def _spec_record(spec: optim.OptimizerSpec) -> dict[str, Any]:
    record = dataclasses.asdict(spec)
    record["options"] = {k: list(v) if isinstance(v, tuple) else v for k, v in spec.options.items()}
    return record


def save_torch_checkpoint(workdir: str | os.PathLike, out: str | os.PathLike) -> dict[str, Any]:
    """Write the ``last`` checkpoint of ``workdir`` to ``out`` (``.pt``, atomically) as the
    tutorials' checkpoint dict, which ``torch.load(out, weights_only=True)`` reads and
    ``net.load_state_dict``/``optimizer.load_state_dict`` (and ``scheduler.load_state_dict``)
    continue from exactly. Returns the dict written."""
    torch = _torch()
    out = Path(out)
    if out.suffix.lower() not in (".pt", ".pth"):
        raise ConfigError(f"{out}: a torch checkpoint is a .pt or .pth file; name it so.")
    state, spec, meta = read_last_state(workdir)
    step = int(state.step)
    ckpt: dict[str, Any] = {
        "model_state_dict": params_to_torch(state.params),
        "optimizer_state_dict": opt_state_to_torch(state.opt_state, spec, state.params, step=step),
        "epoch": int(meta["epoch"]) - 1,  # epochs completed (jaxnet's meta: the next one)
        "step": step,
        "jaxnet": {"optimizer": _spec_record(spec), "torch_class": optim.TORCH_CLASSES[spec.name]},
    }
    history = meta.get("history") or []
    if history:
        ckpt["loss"] = float(history[-1]["train_loss"])
    sched = torch_scheduler_state(spec, step, state.opt_state)
    if sched is not None:
        ckpt["scheduler_state_dict"] = sched
    atomic_write(out, lambda tmp: torch.save(ckpt, tmp))
    return ckpt


def opt_state_of_checkpoint(
    ckpt: Mapping[str, Any], spec: optim.OptimizerSpec, params: Any, steps_per_epoch: int
) -> tuple[Any, int]:
    """``(opt_state, step)`` from a tutorial checkpoint dict's ``optimizer_state_dict``, for
    ``params`` trained by ``spec``. The step is torch's own count where its optimizer keeps one,
    else the dict's ``"step"``, else ``"epoch"`` x ``steps_per_epoch`` (the tutorials' ``epoch``:
    epochs completed) where a schedule needs it."""
    sd = ckpt.get("optimizer_state_dict")
    if not isinstance(sd, Mapping):
        raise ConfigError("the checkpoint has no optimizer_state_dict to resume from.")
    recorded = {float(s["step"]) for s in sd.get("state", {}).values() if "step" in s}
    step = int(recorded.pop()) if len(recorded) == 1 else ckpt.get("step")
    if step is None and spec.schedule not in (None, "reduce_lr_on_plateau") and "epoch" in ckpt:
        step = int(ckpt["epoch"]) * steps_per_epoch
    try:
        sched = ckpt.get("scheduler_state_dict")
        opt_state = opt_state_from_torch(sd, spec, params, step=step, scheduler_state=sched)
        return opt_state, int(step or 0)
    except ConfigError as e:
        raise ConfigError(f"the checkpoint's optimizer state: {e}") from e


def keep_optimizer_state(ckpt: Mapping[str, Any], workdir: str | os.PathLike) -> bool:
    """Keep a checkpoint dict's optimizer state (with its ``epoch`` and ``step``) as
    ``<workdir>/torch_optimizer.pt``, atomically, after ``ckpt``'s weights were imported there;
    False when it has none (a kept state of weights imported before is then removed: it
    belonged to the checkpoint the import replaced)."""
    path = Path(workdir) / TORCH_OPTIMIZER_FILE
    if not isinstance(ckpt.get("optimizer_state_dict"), Mapping):
        path.unlink(missing_ok=True)
        return False
    torch = _torch()

    keys = ("optimizer_state_dict", "scheduler_state_dict", "epoch", "step")
    kept = {k: ckpt[k] for k in keys if k in ckpt}
    atomic_write(path, lambda tmp: torch.save(kept, tmp))
    return True


def resumed_state(
    workdir: str | os.PathLike, config: TrainConfig, num_train: int, state: TrainState
) -> TrainState | None:
    """``state`` with the optimizer state and step kept by ``keep_optimizer_state`` in
    ``workdir`` (None when there is none): how a run imported from a PyTorch checkpoint dict
    continues the torch run, its hyperparameters checked against ``config``'s."""
    path = Path(workdir) / TORCH_OPTIMIZER_FILE
    if not path.is_file():
        return None
    torch = _torch()

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightFileError(
            f"{path} (kept by jaxnet import) cannot be read ({str(e).splitlines()[0]}); import "
            "the checkpoint again with jaxnet import --overwrite."
        ) from e
    spec = optimizer_spec(config, num_train)
    steps_per_epoch = data.num_batches(num_train, config.batch_size)
    try:
        opt_state, step = opt_state_of_checkpoint(ckpt, spec, state.params, steps_per_epoch)
    except (ConfigError, WeightFileError) as e:
        raise type(e)(
            f"cannot continue the PyTorch run imported into {workdir}: {e} On the command line: "
            "--optimizer, --lr, --opt and --schedule/--sched-opt as the torch run had them."
        ) from e
    return state.replace(opt_state=opt_state, step=jnp.asarray(step, jnp.asarray(state.step).dtype))
