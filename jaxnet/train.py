"""The training job: ``train_epoch``, ``evaluate`` and ``train_and_evaluate``, over the pure
steps of ``jaxnet.step`` (the structure of Flax's examples: small functions, a config).

``train_and_evaluate`` reads top-down: set up, start or resume, run the epochs, finish. The
run's changing state lives in one ``_Run`` dataclass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization
from jax.sharding import Mesh
from rich.console import Console

from jaxnet import data, losses, optim, parallel, report
from jaxnet.checkpoint import CheckpointError, Checkpoints
from jaxnet.config import (
    TrainConfig,
    check_train_config,
    config_to_json,
    load_dataset,
    optimizer_spec,
)
from jaxnet.criteria import Criterion, criterion
from jaxnet.errors import EXIT_RUN_FAILED, ConfigError, JaxnetError
from jaxnet.model import Net, abstract_params, init_params
from jaxnet.step import (
    Batch,
    TrainState,
    create_train_state,
    eval_step,
    loss_fn,
    per_example_grad_norms,
    train_step,
    train_step_donated,
    train_steps,
)
from jaxnet.torch_checkpoint import TORCH_OPTIMIZER_FILE, resumed_state
from jaxnet.workdir import (
    WorkdirError,
    check_resumable,
    checkpoints_of,
    import_params,
    load_params,
    locked,
)

__all__ = [
    "Batch",
    "EpochProgress",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "create_train_state",
    "eval_step",
    "evaluate",
    "import_params",
    "load_params",
    "loss_fn",
    "per_example_grad_norms",
    "train_and_evaluate",
    "train_epoch",
    "train_step",
    "train_step_donated",
    "train_steps",
]


class NonFiniteLossError(JaxnetError, FloatingPointError):
    """Training met a NaN or infinite loss; the message names the step and the last checkpoint."""

    exit_code = EXIT_RUN_FAILED


@dataclasses.dataclass
class EpochProgress:
    """Running sums of one epoch, enough to resume it mid-way with identical metrics."""

    batches_done: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    count: int = 0
    seconds: float = 0.0

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.count, 1)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.count, 1)


def train_epoch(
    state: TrainState,
    x: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int,
    seed: int,
    epoch: int,
    criterion: Criterion = losses.cross_entropy,
    progress: EpochProgress | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_step: Callable[[EpochProgress, float], None] | None = None,
    mesh: Mesh | None = None,
) -> tuple[TrainState, EpochProgress, bool]:
    """One pass over the shuffled training data ``x (N, 32, 32, 1)``, ``y (N,)``.

    The batches are ``jaxnet.data.batches(x, y, batch_size, seed=seed, epoch=epoch)``;
    ``progress`` (from an interrupted run) skips the batches already done and continues its sums.
    ``should_stop`` is polled after every step. ``on_step(progress, loss)`` is called after each.

    With a ``mesh`` (``jaxnet.parallel.make_mesh``), the steps are data-parallel: ``state`` must
    be replicated over it (``jaxnet.parallel.replicate``), each global batch of ``batch_size`` is
    split over the ``data`` axis, and each process takes only its own rows of it
    (``local_batch_indices`` + ``assemble_batch``). The same ``train_step`` runs; XLA's
    all-reduce averages the gradients. Without one, the batches are plain host arrays.

    Returns ``(state, progress, finished)``; ``finished`` is False when stopped early.

    Raises:
      NonFiniteLossError: naming the step, when a loss is NaN or infinite (``state`` then stays
        as it was before that step, inside the caller).
    """
    progress = dataclasses.replace(progress) if progress is not None else EpochProgress()
    steps = data.num_batches(len(x), batch_size)
    start = time.perf_counter() - progress.seconds
    rows = None if mesh is None else parallel.local_batch_indices(batch_size, mesh)
    for images, labels in data.batches(
        x, y, batch_size, seed=seed, epoch=epoch, start=progress.batches_done, rows=rows
    ):
        batch: Batch = (images, labels)
        if mesh is not None:
            batch = parallel.assemble_batch(batch, mesh)
        new_state, metrics = train_step(state, batch, criterion)
        loss = float(metrics["loss"])
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"the loss is {loss} at step {int(state.step) + 1} (epoch {epoch}, batch "
                f"{progress.batches_done + 1} of {steps}); training stopped"
            )
        state = new_state
        n = batch_size
        progress.batches_done += 1
        progress.loss_sum += loss * n
        progress.correct += round(float(metrics.get("accuracy", 0.0)) * n)
        progress.count += n
        progress.seconds = time.perf_counter() - start
        if on_step is not None:
            on_step(progress, loss)
        if should_stop is not None and should_stop() and progress.batches_done < steps:
            return state, progress, False
    return state, progress, True


def evaluate(
    state: TrainState,
    x: np.ndarray,
    y: np.ndarray,
    criterion: Criterion = losses.cross_entropy,
    batch_size: int = 512,
    mesh: Mesh | None = None,
) -> dict[str, float]:
    """``{"loss", "accuracy"}`` of ``state.params`` on all of ``x``, ``y`` (no update).

    Evaluated in batches of ``batch_size``; the batch means are weighted by the batch sizes,
    which gives the mean over all examples for the mean-reduced losses.

    With a ``mesh`` (``state`` replicated over it), each batch is sharded over the ``data`` axis
    (``batch_size`` rounded down to a multiple of the device count), each process taking only
    its rows. Of a last partial batch, the largest part that splits evenly is sharded too, and
    the few examples left (fewer than the devices) are evaluated by every process on its own
    copy of the params: no padding, so the metrics equal the single-device ones up to float32
    round-off.
    """
    if mesh is not None:
        devices = mesh.devices.size
        batch_size = max(batch_size // devices, 1) * devices
        local_state = None
    loss_sum, correct = 0.0, 0

    def add(m: Mapping[str, jax.Array], count: int) -> None:
        nonlocal loss_sum, correct
        loss_sum += float(m["loss"]) * count
        correct += round(float(m.get("accuracy", 0.0)) * count)

    for i in range(0, len(x), batch_size):
        images, labels = x[i : i + batch_size], y[i : i + batch_size]
        if mesh is None:
            add(eval_step(state, (images, labels), criterion), len(labels))
            continue
        even = len(labels) // devices * devices
        if even:
            rows = parallel.local_batch_indices(even, mesh)
            batch = parallel.assemble_batch((images[rows], labels[rows]), mesh)
            add(eval_step(state, batch, criterion), even)
        if even < len(labels):
            if local_state is None:
                local_state = parallel.local_copy(state)
            rest = (images[even:], labels[even:])
            add(eval_step(local_state, rest, criterion), len(labels) - even)
    n = max(len(x), 1)
    return {"loss": loss_sum / n, "accuracy": correct / n}


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What ``train_and_evaluate`` ends with.

    ``status``: ``"finished"``, ``"early-stopped"`` or ``"interrupted"`` (by SIGINT/SIGTERM,
    checkpoint saved; continue with ``resume=True``). ``history``: the ``metrics.jsonl`` records.
    """

    state: TrainState
    status: str
    history: list[dict[str, Any]]
    diagnosis: Any
    best_epoch: int
    signal: str | None = None


class _StopFlag:
    """Set by SIGINT/SIGTERM: the run finishes its current step, saves and returns."""

    def __init__(self) -> None:
        self.signal: str | None = None

    def __call__(self) -> bool:
        return self.signal is not None

    def handler(self, signum: int, frame: Any) -> None:
        del frame
        self.signal = signal.Signals(signum).name


def _agreed(flag: _StopFlag) -> Callable[[], bool]:
    """``flag``, agreed on by all processes: whether any of them got a signal. Every process
    polls it at the same points, so all stop after the same step and save together (orbax's
    save is collective); a signal to one process alone would otherwise leave the others
    waiting in the next step's all-reduce."""
    from jax.experimental import multihost_utils

    def stop() -> bool:
        votes = multihost_utils.process_allgather(np.asarray(flag(), np.int32))
        return bool(np.any(votes))

    return stop


@contextlib.contextmanager
def _catch_stop_signals(flag: _StopFlag) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = {s: signal.signal(s, flag.handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _epoch_record(
    state: TrainState,
    ds: data.Dataset,
    config: TrainConfig,
    criterion: Criterion,
    epoch: int,
    progress: EpochProgress,
    probe: Batch | None,
    mesh: Mesh | None = None,
) -> dict[str, Any]:
    """The ``metrics.jsonl`` record of a finished epoch: train sums, validation, grad norms."""
    t0 = time.perf_counter()
    val = evaluate(state, ds.x_val, ds.y_val, criterion, config.eval_batch_size, mesh)
    record: dict[str, Any] = {
        "epoch": epoch,
        "step": int(state.step),
        "train_loss": progress.loss,
        "train_accuracy": progress.accuracy,
        "val_loss": val["loss"],
        "val_accuracy": val["accuracy"],
    }
    if probe is not None:
        # A few examples: each process computes them on its own copy of the params.
        local = state if mesh is None else parallel.local_copy(state)
        norms = np.asarray(per_example_grad_norms(local, probe, criterion))
        record.update(
            grad_norm_mean=float(norms.mean()),
            grad_norm_median=float(np.median(norms)),
            grad_norm_max=float(norms.max()),
        )
    record["seconds"] = progress.seconds + time.perf_counter() - t0
    return record


# ---------------------------------------------------------------------------------------------
# The job, top-down: set up, start or resume, run the epochs, finish
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Run:
    """One training job: what is fixed for it, and the state that changes as it runs."""

    config: TrainConfig
    workdir: Path
    mesh: Mesh | None  # None on one device: nothing is sharded
    ds: data.Dataset
    criterion: Criterion
    ckpts: Checkpoints
    console: Console
    primary: bool
    data_meta: dict[str, Any]
    steps_per_epoch: int
    spec: optim.OptimizerSpec
    state: TrainState
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    epoch: int = 1
    partial: EpochProgress | None = None
    best: dict[str, Any] = dataclasses.field(default_factory=lambda: {"epoch": 0, "val_loss": None})
    last_saved: int | None = None  # the step of the newest complete checkpoint
    status: str = "running"

    def meta(self, epoch: int, progress: EpochProgress | None, status: str) -> dict[str, Any]:
        """The checkpoint's JSON: config, data, where the run stands, history, best epoch."""
        return {
            "config": config_to_json(self.config),
            "data": self.data_meta,
            "epoch": epoch,
            "partial": dataclasses.asdict(progress) if progress else None,
            "history": self.history,
            "best": self.best,
            "status": status,
        }

    def save_last(self, epoch: int, progress: EpochProgress | None, status: str) -> None:
        step = int(self.state.step)
        state_dict = serialization.to_state_dict(self.state)
        self.ckpts.save_last(step, state_dict, self.meta(epoch, progress, status))
        self.last_saved = step


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    """Whether every value of every array in ``tree`` is finite (one fused reduction; True
    for a tree without arrays, such as plain SGD's optimizer state)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)] or [True]))


def _check_finite_state(run: _Run, epoch: int) -> None:
    """Raise ``NonFiniteLossError`` when the params or the optimizer state are not all finite,
    before they become a checkpoint: the loss guard sees each step's loss before its update,
    so an update that overflows on an epoch's last step would otherwise be saved as ``last``
    (and ``best``), and an optimizer state that overflows (Adam's second moment) while the
    params stay finite would be resumed from."""
    trees = {"params": run.state.params, "optimizer state": run.state.opt_state}
    if bool(_all_finite(trees)):
        return
    bad = " and the ".join(name for name, tree in trees.items() if not bool(_all_finite(tree)))
    kept = (
        f"the last good checkpoint (step {run.last_saved}) is kept in {run.ckpts.directory}"
        if run.last_saved is not None
        else "no epoch had finished, so no checkpoint was written"
    )
    raise NonFiniteLossError(
        f"the {bad} hold NaN or infinite values after step {int(run.state.step)} (epoch "
        f"{epoch}); training stopped and they were not saved; {kept}. Lower --lr, or check "
        "the data."
    )


@functools.cache
def _net(num_classes: int, weight_init: str) -> Net:
    """One ``Net`` per configuration in a process: the jitted steps key their compiled code on
    the state's ``apply_fn``, and bound methods of two equal ``Net``s compare unequal."""
    return Net(num_classes=num_classes, weight_init=weight_init)  # type: ignore[arg-type]


@functools.cache
def _transform(spec_json: str) -> Any:
    """One optax transform per resolved optimizer spec in a process, for the same reason: a
    fresh transform is a fresh set of closures, and the steps would compile again."""
    spec = optim.OptimizerSpec(**json.loads(spec_json))
    return optim.transform(spec)


def _setup(config: TrainConfig, workdir: Path, mesh: Mesh) -> _Run:
    """Check the config and load the data (nothing written yet); the state is abstract."""
    check_train_config(config)
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"--workdir {workdir} is a file; give a folder (new or a run's).")
    per_device = parallel.check_batch_size(config.batch_size, mesh)
    crit = criterion(config.loss)
    primary = parallel.is_primary()
    # soft_wrap: lines are never hard-wrapped (a log file or a pipe gets whole lines).
    console = Console(highlight=False, soft_wrap=True, quiet=not primary)
    ds = load_dataset(config)
    steps_per_epoch = data.num_batches(len(ds.x_train), config.batch_size)
    net = _net(ds.num_classes, config.weight_init)
    spec = optimizer_spec(config, len(ds.x_train))
    tx = _transform(json.dumps(dataclasses.asdict(spec), sort_keys=True, default=repr))
    sharded = mesh.devices.size > 1
    console.print(
        f"mesh: {parallel.describe_mesh(mesh)}"
        + (f"; batch {config.batch_size} = {per_device} per device" if sharded else "")
    )
    key = jax.random.key(config.seed)
    data_meta = {
        "mean": ds.mean,
        "std": ds.std,
        "num_train": len(ds.x_train),
        "num_val": len(ds.x_val),
        "num_classes": ds.num_classes,
        "description": ds.description,
        "fingerprint": data.fingerprint(ds),
    }
    return _Run(
        config=config,
        workdir=workdir,
        mesh=mesh if sharded else None,
        ds=ds,
        criterion=crit,
        ckpts=checkpoints_of(workdir),
        console=console,
        primary=primary,
        data_meta=data_meta,
        steps_per_epoch=steps_per_epoch,
        spec=spec,
        # The state's structure, without computing it: a resumed run overwrites every leaf.
        state=jax.eval_shape(lambda: create_train_state(key, net, tx)),
    )


def _fresh_state(run: _Run, mesh: Mesh, params: Any = None) -> None:
    """A new state from ``config.seed``: the params initialised, or ``params`` (imported)."""
    key = jax.random.key(run.config.seed)
    net = _net(run.ds.num_classes, run.config.weight_init)
    params = init_params(net, key) if params is None else params
    run.state = create_train_state(key, net, run.state.tx, params=params)
    if run.mesh is not None:  # every process made the same values from the same key
        run.state = parallel.replicate(run.state, mesh)


def _resume(run: _Run, mesh: Mesh) -> None:
    """Restore the newest ``last`` checkpoint into ``run``, after checking its settings and
    data against the run's (a mismatch is named, and nothing is read or changed)."""
    _, meta = run.ckpts.read_meta("last")
    check_resumable(meta, run.config, run.data_meta)
    target = serialization.to_state_dict(run.state)
    if run.mesh is not None:  # restored straight onto the mesh, replicated, in every process
        target = parallel.abstract_like(target, mesh)
    restored, meta = run.ckpts.restore_last(target)
    run.state = serialization.from_state_dict(run.state, restored)
    run.last_saved = int(run.state.step)
    run.history = list(meta["history"])
    run.epoch = int(meta["epoch"])
    run.partial = EpochProgress(**meta["partial"]) if meta.get("partial") else None
    run.best = dict(meta["best"])
    run.status = meta.get("status", "running")
    run.console.print(
        f"resuming {run.workdir} at epoch {run.epoch}"
        + (f", batch {run.partial.batches_done + 1}" if run.partial else "")
        + f" (step {int(run.state.step)})"
    )


def _start_from_best(run: _Run, mesh: Mesh) -> None:
    """``--resume`` in a workdir with a ``best`` but no ``last`` checkpoint (``jaxnet import``,
    or a ``last/`` removed): a new run that starts from the ``best`` weights, which stay the
    best until an epoch's validation loss beats theirs. Nothing is deleted."""
    step, _ = run.ckpts.read_meta("best")
    target = abstract_params(_net(run.ds.num_classes, run.config.weight_init))
    params, _ = run.ckpts.restore_params(target, "best")
    _fresh_state(run, mesh, params)
    # A PyTorch checkpoint dict imported with its optimizer state continues that run.
    torch_run = resumed_state(run.workdir, run.config, len(run.ds.x_train), run.state)
    if torch_run is not None:
        run.state = torch_run if run.mesh is None else parallel.replicate(torch_run, mesh)
        kept = run.workdir / TORCH_OPTIMIZER_FILE
        run.console.print(
            f"continuing the PyTorch run's optimizer state from {kept} at step "
            f"{int(run.state.step)}"
        )
    ds, config = run.ds, run.config
    val = evaluate(run.state, ds.x_val, ds.y_val, run.criterion, config.eval_batch_size, run.mesh)
    if math.isfinite(val["loss"]):
        run.best = {"epoch": 0, "val_loss": val["loss"]}
    run.console.print(
        f"no last checkpoint in {run.ckpts.directory}: starting a new run from the weights in "
        f"{run.ckpts.directory / 'best' / str(step)} (val loss {val['loss']:.4f}); they stay "
        "the best until an epoch beats them"
    )


def _start_afresh(run: _Run) -> None:
    """``--overwrite``: delete the workdir's checkpoints (only jaxnet's: a foreign entry is
    refused, naming it), metrics and curves, and the optimizer state ``jaxnet import`` kept
    with the weights it imported (it belongs to those checkpoints: left behind, a later
    ``--resume`` from ``best`` would continue that torch run's optimizer state instead)."""
    run.ckpts.clear()
    if run.primary:
        for name in ("metrics.jsonl", "curves.png", TORCH_OPTIMIZER_FILE):
            (run.workdir / name).unlink(missing_ok=True)


def _start_or_resume(run: _Run, mesh: Mesh) -> None:
    """Resume the run in the workdir (or start from its imported ``best``), or clear it
    (``overwrite``) and start afresh. ``--resume`` never deletes anything."""
    ckpts, config = run.ckpts, run.config
    # Every process decides from the same folder before any of them changes it.
    exists, has_last, has_best = (
        ckpts.exists(),
        bool(ckpts.steps("last")),
        bool(ckpts.steps("best")),
    )
    foreign = ckpts.foreign()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"jaxnet-train-start:{ckpts.directory}")
    if config.resume and has_last:
        _resume(run, mesh)
    elif config.resume and has_best:
        _start_from_best(run, mesh)
    elif config.resume and foreign:
        raise CheckpointError(
            f"cannot resume: {ckpts.directory} holds no jaxnet checkpoint (found "
            f"{', '.join(foreign[:5])}). Point --workdir at a run of `jaxnet train`, or use a "
            "new --workdir."
        )
    elif config.resume:
        run.console.print(f"no complete checkpoint in {run.workdir}; starting a new run")
    elif exists:
        if not config.overwrite:
            raise CheckpointError(
                f"{ckpts.directory} already holds checkpoints; pass --resume to continue "
                "that run, --overwrite to start afresh, or choose another --workdir."
            )
        _start_afresh(run)
    if isinstance(jax.tree.leaves(run.state.params)[0], jax.ShapeDtypeStruct):  # still abstract
        _fresh_state(run, mesh)
    run.console.print(f"data: {run.ds.description}")


@contextlib.contextmanager
def _writer_lock(workdir: Path) -> Iterator[None]:
    """Hold ``workdir``'s writer lock (``jaxnet.workdir.locked``) for the run. In a
    multi-process run, process 0 holds it for all (they share the workdir) and every process
    learns whether it got it, so that all stop together when it did not."""
    if jax.process_count() == 1:
        with locked(workdir):
            yield
        return
    from jax.experimental import multihost_utils

    with contextlib.ExitStack() as stack:
        error: WorkdirError | None = None
        if jax.process_index() == 0:
            try:
                stack.enter_context(locked(workdir))
            except WorkdirError as e:
                error = e
        votes = multihost_utils.process_allgather(np.asarray(error is None, np.int32))
        if error is not None:
            raise error
        if not np.all(votes):
            raise WorkdirError(f"process 0 could not lock workdir {workdir}; see its message.")
        yield


def _train_one_epoch(run: _Run, stop: Callable[[], bool], bar: Any) -> EpochProgress | None:
    """Train epoch ``run.epoch``; its progress, or None when a signal stopped it mid-way
    (the mid-epoch checkpoint is then saved)."""
    task = bar.add_task(
        "",
        total=run.steps_per_epoch,
        epoch=run.epoch,
        epochs=run.config.epochs,
        loss=float("nan"),
        sps=0.0,
        completed=run.partial.batches_done if run.partial else 0,
    )

    def on_step(p: EpochProgress, loss: float) -> None:
        bar.update(task, completed=p.batches_done, loss=p.loss, sps=p.count / max(p.seconds, 1e-9))

    try:
        run.state, progress, done = train_epoch(
            run.state,
            run.ds.x_train,
            run.ds.y_train,
            batch_size=run.config.batch_size,
            seed=run.config.seed,
            epoch=run.epoch,
            criterion=run.criterion,
            progress=run.partial,
            should_stop=stop,
            on_step=on_step,
            mesh=run.mesh,
        )
    except NonFiniteLossError as e:
        kept = (
            f"the last good checkpoint (step {run.last_saved}) is kept in {run.ckpts.directory}"
            if run.last_saved is not None
            else "no epoch had finished, so no checkpoint was written"
        )
        raise NonFiniteLossError(f"{e}; {kept}. Lower --lr, or check the data.") from None
    run.partial = None
    _check_finite_state(run, run.epoch)
    if not done:  # SIGINT/SIGTERM mid-epoch: save where we are
        run.save_last(run.epoch, progress, "running")
        return None
    return progress


def _finish_epoch(run: _Run, progress: EpochProgress, probe: Batch | None, bar: Any) -> bool:
    """Evaluate, checkpoint (``best`` when the val loss improved, ``last`` always) and log
    epoch ``run.epoch``; whether early stopping ends the run here."""
    config, epoch = run.config, run.epoch
    record = _epoch_record(
        run.state, run.ds, config, run.criterion, epoch, progress, probe, run.mesh
    )
    run.history.append(record)
    # torch's ReduceLROnPlateau.step(val_loss) once per epoch, before the checkpoint saves the
    # optimizer state that holds it; every other optimizer's state is left as it is.
    opt_state = optim.plateau_step(run.state.tx, run.state.opt_state, record["val_loss"])
    run.state = run.state.replace(opt_state=opt_state)
    # The lr the next step uses (torch's param_groups[0]["lr"] after scheduler.step()): a
    # plateau's reduction shows at the epoch that caused it.
    record["lr"] = optim.lr_at(run.spec, int(run.state.step), opt_state)
    # A non-finite validation loss is never the best (NaN compares False, inf would win).
    finite = math.isfinite(record["val_loss"])
    if finite and (run.best["val_loss"] is None or record["val_loss"] < run.best["val_loss"]):
        run.best = {"epoch": epoch, "val_loss": record["val_loss"]}
        run.ckpts.save_best(epoch, run.state.params, run.meta(epoch + 1, None, "running"))
    stop_early = config.early_stopping is not None and (
        epoch - run.best["epoch"] >= config.early_stopping
    )
    status = "early-stopped" if stop_early else "finished" if epoch == config.epochs else "running"
    run.save_last(epoch + 1, None, status)
    if run.primary:
        try:
            report.write_metrics(run.history, run.workdir / "metrics.jsonl")
        except OSError as e:  # a full disk: name the last good checkpoint, as a failed save does
            raise run.ckpts.write_error(run.workdir / "metrics.jsonl", e) from e
    bar.console.print(_epoch_line(record))
    if stop_early:
        bar.console.print(
            f"early stopping: val loss has not improved for {config.early_stopping} epochs "
            f"(best epoch {run.best['epoch']})"
        )
    return stop_early


def _run_epochs(run: _Run, flag: _StopFlag) -> None:
    """Train until the last epoch, early stopping or a signal; sets ``run.status``."""
    stop = flag if jax.process_count() == 1 else _agreed(flag)
    probe = None
    if run.config.per_example_grad_norms:
        n_probe = min(run.config.per_example_grad_norms, len(run.ds.x_train))
        probe = (run.ds.x_train[:n_probe], run.ds.y_train[:n_probe])
    stopped_early = run.status == "early-stopped"
    bar = _progress_bar(run.config.progress and run.primary, run.console)
    with _catch_stop_signals(flag), bar:
        while run.epoch <= run.config.epochs and not stopped_early and not stop():
            progress = _train_one_epoch(run, stop, bar)
            if progress is None:
                run.status = "interrupted"
                return
            stopped_early = _finish_epoch(run, progress, probe, bar)
            run.epoch += 1
    if stopped_early:
        run.status = "early-stopped"
    elif run.epoch <= run.config.epochs:  # a signal came between two epochs
        run.status = "interrupted"
    else:
        run.status = "finished"


def train_and_evaluate(
    config: TrainConfig, workdir: str | os.PathLike, mesh: Mesh | None = None
) -> TrainResult:
    """Train ``Net`` on ``config.data``, evaluating after every epoch; write ``workdir``.

    Data-parallel over ``mesh`` (default ``jaxnet.parallel.make_mesh()``: every device of every
    process; start the processes with ``jaxnet.parallel.initialize_distributed`` first): params
    and optimizer state replicated, each global batch of ``config.batch_size`` split over the
    devices (it must split evenly), each process taking only its rows. On one device the arrays
    are not sharded at all. Every process runs this function alike; the primary one alone
    prints and writes ``metrics.jsonl`` and ``curves.png``; orbax writes each checkpoint once.

    Writes ``metrics.jsonl`` (one record per epoch: ``epoch``, ``step``, ``train_loss``,
    ``train_accuracy``, ``val_loss``, ``val_accuracy``, ``seconds``, and ``lr``: the one the
    next step uses), ``curves.png`` and ``checkpoints/`` (``last``: full state every epoch;
    ``best``: params with the lowest validation loss). ``config.resume`` continues the run in
    ``workdir`` exactly: a run killed at any point and resumed ends with the same params, bit
    for bit (on CPU), as one never stopped. SIGINT/SIGTERM save a mid-epoch checkpoint and
    return ``status="interrupted"``.

    Raises:
      ValueError: a batch size that does not split over the devices, an unknown loss,
        optimizer or schedule (before anything is written).
      jaxnet.data.DataError: unusable data (before anything is written).
      CheckpointError: a foreign, corrupt or incompatible checkpoint folder; or checkpoints in
        ``workdir`` while neither ``resume`` nor ``overwrite`` is set.
      NonFiniteLossError: a NaN/inf loss; the last good checkpoint stays as it was.
    """
    mesh = parallel.make_mesh() if mesh is None else mesh
    run = _setup(config, Path(workdir), mesh)
    flag = _StopFlag()
    # The lock outlives the checkpoints: close() waits for the saves in flight.
    with _writer_lock(run.workdir), run.ckpts:
        _start_or_resume(run, mesh)
        try:
            _run_epochs(run, flag)
        finally:
            _plot_curves(run)
    diagnosis = report.diagnose(run.history)
    if run.status == "interrupted":
        run.console.print(
            f"interrupted by {flag.signal or 'a signal'} at step {int(run.state.step)}: "
            f"checkpoint saved in {run.ckpts.directory}; continue with --resume"
        )
    else:
        run.console.print(f"diagnosis: {diagnosis.text}")
    return TrainResult(
        state=run.state,
        status=run.status,
        history=run.history,
        diagnosis=diagnosis,
        best_epoch=diagnosis.best_epoch,
        signal=flag.signal,
    )


def _plot_curves(run: _Run) -> None:
    """``curves.png`` of the history so far; a figure that cannot be written (a full disk) is
    reported in one line and never hides why the run ended."""
    if not (run.history and run.primary):
        return
    try:
        report.plot_curves(
            run.history,
            report.diagnose(run.history),
            run.workdir / "curves.png",
            title=f"jaxnet train: {run.ds.description}",
        )
    except OSError as e:
        run.console.print(f"could not write {run.workdir / 'curves.png'}: {e.strerror or e}")


def _epoch_line(r: Mapping[str, Any]) -> str:
    line = (
        f"epoch {r['epoch']:>3}: train loss {r['train_loss']:.4f} acc {r['train_accuracy']:.2%}"
        f" | val loss {r['val_loss']:.4f} acc {r['val_accuracy']:.2%} | {r['seconds']:.1f} s"
    )
    if "lr" in r:
        line += f" | next lr {r['lr']:.3g}"
    if "grad_norm_mean" in r:
        line += (
            f" | per-example grad norm mean {r['grad_norm_mean']:.3g} max {r['grad_norm_max']:.3g}"
        )
    return line


def _progress_bar(enabled: bool, console: Console) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    return Progress(
        TextColumn("epoch {task.fields[epoch]}/{task.fields[epochs]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[sps]:,.0f} samples/s"),
        TimeElapsedColumn(),
        console=console,
        # Not a terminal (a file, a pipe): no bar, which rich would dump at the end.
        disable=not enabled or not console.is_terminal,
    )
