"""Data-parallel training with JAX's own runtime: ``jax.sharding`` on one host, and
``jax.distributed`` across hosts. No ``pmap``, no home-made collectives.

The idea (as in JAX's "distributed arrays and automatic parallelization" guide): a 1-D
``Mesh`` with a ``data`` axis over the devices; the global batch is sharded along that axis
(``NamedSharding(mesh, P("data"))``); params and optimizer state (the whole ``TrainState``) are
replicated (``P()``). The ordinary ``jaxnet.train_step`` / ``jaxnet.eval_step`` then run
unchanged: ``jit`` follows the input shardings, and because the loss is a mean over the *global*
batch, the gradient XLA computes is already the global mean; the partitioner inserts the
all-reduce that sums each device's partial contribution. Results equal the single-device step up
to float32 round-off (the summation order differs).

Single host::

    mesh = make_mesh()                          # all devices, axis "data"
    print(describe_mesh(mesh))                  # "8 devices, 1 process"
    state = replicate(create_train_state(...), mesh)
    state, metrics = train_step(state, shard_batch((images, labels), mesh))

Multi-host (one process per host, the same program everywhere)::

    initialize_distributed()                    # before any other JAX call
    mesh = make_mesh()                          # all devices of all processes
    rows = local_batch_indices(global_batch_size, mesh)
    batch = assemble_batch((images[start + rows], labels[start + rows]), mesh)

Each process reads only the rows of each global batch that its own devices hold
(``local_batch_indices``), so a run gives the same result whatever the number of processes.

Checkpoints with orbax across processes: *every* process calls ``CheckpointManager.save`` and
``restore`` (they synchronise inside; guarding them with ``if is_primary()`` deadlocks). Orbax
writes each array once (replicated arrays by replica 0 only, metadata by the primary host), and
``restore`` with a target whose leaves carry this mesh's shardings (``abstract_like``) gives every
process the global arrays. Use ``is_primary()`` only for side effects that must happen once
outside orbax: printing, metrics files, plots.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxnet import losses, optim
from jaxnet.io import atomic_write
from jaxnet.model import Net
from jaxnet.train import Batch, TrainState, create_train_state, train_step

__all__ = [
    "COORDINATOR_ADDRESS_ENV",
    "DATA_AXIS",
    "NUM_PROCESSES_ENV",
    "PROCESS_ID_ENV",
    "abstract_like",
    "assemble_batch",
    "batch_sharding",
    "check_batch_size",
    "describe_mesh",
    "init_params",
    "initialize_distributed",
    "is_primary",
    "local_batch_indices",
    "make_mesh",
    "read_params_npz",
    "replicate",
    "replicated_sharding",
    "shard_batch",
    "synthetic_dataset",
    "to_host",
    "train_data_parallel",
    "write_params_npz",
]

DATA_AXIS = "data"
"""Name of the mesh axis the batch is split over."""

COORDINATOR_ADDRESS_ENV = "JAX_COORDINATOR_ADDRESS"
"""``host:port`` of process 0's coordinator service (the name JAX itself reads)."""
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
"""Total number of processes taking part (one per host, usually)."""
PROCESS_ID_ENV = "JAX_PROCESS_ID"
"""This process' index, ``0 .. JAX_NUM_PROCESSES-1``; process 0 runs the coordinator."""


# --------------------------------------------------------------------------------------------
# Mesh and shardings


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis ``"data"`` over ``devices`` (default: all devices of all processes).

    The axis type is ``Auto`` (the partitioner propagates shardings through ``jit``), so the
    unchanged ``train_step`` works; ``jax.make_mesh``'s default ``Explicit`` axes would put
    shardings into the types instead.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_mesh needs at least one device; got an empty device list.")
    return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def describe_mesh(mesh: Mesh) -> str:
    """One line for the start of a run, e.g. ``"8 devices, 1 process"`` (platform appended
    when not CPU, e.g. ``"2 devices, 2 processes (gpu)"``)."""
    n = mesh.devices.size
    procs = len({d.process_index for d in mesh.devices.flat})
    text = f"{n} device{'s' if n != 1 else ''}, {procs} process{'es' if procs != 1 else ''}"
    platforms = sorted({d.platform for d in mesh.devices.flat})
    if platforms != ["cpu"]:
        text += f" ({', '.join(platforms)})"
    return text


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the ``data`` axis, other dimensions whole."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of the mesh (params, optimizer state, step)."""
    return NamedSharding(mesh, P())


def check_batch_size(global_batch_size: int, mesh: Mesh) -> int:
    """The per-device batch size; ``ValueError`` naming the fix if the split is not even."""
    n = mesh.shape[DATA_AXIS]
    if global_batch_size <= 0 or global_batch_size % n:
        lower = global_batch_size // n * n
        hint = f"{lower} or {lower + n}" if lower > 0 else f"{n}"
        raise ValueError(
            f"the global batch size {global_batch_size} does not split evenly over the {n} "
            f"devices of the data-parallel mesh. Use a multiple of {n} (e.g. {hint}), or run on "
            f"a number of devices that divides {global_batch_size}."
        )
    return global_batch_size // n


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every array leaf of ``tree`` (e.g. a ``TrainState``) replicated over the mesh.

    With several processes each one must pass the same values (e.g. params initialised from the
    same key, or restored from the same checkpoint): JAX does not compare them.
    """
    return jax.device_put(tree, replicated_sharding(mesh))


def abstract_like(tree: Any, mesh: Mesh) -> Any:
    """``jax.ShapeDtypeStruct``s with replicated shardings, shaped like ``tree``: the target to
    hand orbax's ``restore`` (e.g. ``ocp.args.StandardRestore(abstract_like(state, mesh))``) so
    that every process gets the state back replicated over ``mesh``."""
    sharding = replicated_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x), sharding=sharding), tree
    )


def _check_batch(batch: Batch) -> int:
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree.leaves(batch)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            "every array of a batch needs the same leading (batch) dimension, got shapes "
            f"{[np.shape(x) for x in jax.tree.leaves(batch)]}. Pass (images, targets) with "
            "images (N, 32, 32, 1) and N targets."
        )
    return sizes.pop()


def local_batch_indices(global_batch_size: int, mesh: Mesh) -> np.ndarray:
    """Rows of a global batch that this process' devices hold, in the order
    ``assemble_batch`` expects them (ascending).

    With one process that is ``arange(global_batch_size)``; with ``P`` processes over a mesh whose
    devices are ordered by process (``jax.devices()``), process ``p`` gets the contiguous block
    ``p*B/P .. (p+1)*B/P``. A data loader reads only these rows of each global batch.
    """
    check_batch_size(global_batch_size, mesh)
    index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,))
    starts = sorted({idx[0].indices(global_batch_size)[:2] for idx in index_map.values()})
    return np.concatenate([np.arange(lo, hi) for lo, hi in starts])


def assemble_batch(local_batch: Batch, mesh: Mesh) -> Batch:
    """The global, batch-sharded arrays from each process' own rows
    (``global[local_batch_indices(B, mesh)]``), via ``jax.make_array_from_process_local_data``.

    Every process calls this with its local rows; the global batch size is the local one times
    the number of processes (for the usual mesh over all devices).
    """
    local_size = _check_batch(local_batch)
    n_local = len(mesh.local_devices)
    if n_local == 0:
        raise ValueError(
            f"process {jax.process_index()} has no devices in the mesh; build the "
            "mesh over devices of every process (make_mesh() uses all of them)."
        )
    global_size = local_size * mesh.devices.size // n_local
    check_batch_size(global_size, mesh)
    sharding = batch_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(
            sharding, np.asarray(x), (global_size, *np.shape(x)[1:])
        ),
        local_batch,
    )


def shard_batch(batch: Batch, mesh: Mesh) -> Batch:
    """A host-side *global* batch (the same in every process) split over the ``data`` axis.

    Each process keeps only its own rows; prefer ``assemble_batch`` when a process can load just
    those rows itself. Raises ``ValueError`` if the batch does not split evenly over the devices.
    """
    size = _check_batch(batch)
    rows = local_batch_indices(size, mesh)
    return assemble_batch(jax.tree.map(lambda x: np.asarray(x)[rows], batch), mesh)


def to_host(tree: Any) -> Any:
    """NumPy copies of the leaves of ``tree``; replicated or sharded global arrays are gathered
    (``process_allgather``), so every process gets the full values."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


# --------------------------------------------------------------------------------------------
# Multi-process


def _from_env(value: Any, name: str, convert: type = str) -> Any:
    if value is not None:
        return value
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        return convert(raw)
    except ValueError:
        raise ValueError(
            f"environment variable {name}={raw!r} is not a valid {convert.__name__}; "
            f"set it to e.g. {name}=0."
        ) from None


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: Sequence[int] | None = None,
    initialization_timeout: int = 300,
) -> bool:
    """``jax.distributed.initialize`` with values from the arguments, else the environment:

    - ``JAX_COORDINATOR_ADDRESS``: ``host:port`` of process 0 (reachable from every host);
    - ``JAX_NUM_PROCESSES``: the number of processes;
    - ``JAX_PROCESS_ID``: this process' index (0 runs the coordinator).

    Call it first, before any other JAX call. Returns ``False`` (and does nothing) when none of
    the three is given, so one program runs single-process and multi-process alike; ``True`` after
    initialising. With some but not all given, raises ``ValueError`` naming the missing ones.
    On CPU the cross-process collectives are gloo (``jax_cpu_collectives_implementation``, JAX's
    default; set explicitly here so a changed default cannot silently break CPU runs).
    """
    coordinator_address = _from_env(coordinator_address, COORDINATOR_ADDRESS_ENV)
    num_processes = _from_env(num_processes, NUM_PROCESSES_ENV, int)
    process_id = _from_env(process_id, PROCESS_ID_ENV, int)
    given = {
        f"coordinator_address / {COORDINATOR_ADDRESS_ENV}": coordinator_address,
        f"num_processes / {NUM_PROCESSES_ENV}": num_processes,
        f"process_id / {PROCESS_ID_ENV}": process_id,
    }
    if all(v is None for v in given.values()):
        return False
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise ValueError(
            f"multi-process run needs all three of coordinator address, process count and process "
            f"id; missing: {', '.join(missing)}. Pass them as arguments or set the environment "
            "variables on every host."
        )
    if not 0 <= process_id < num_processes:
        raise ValueError(
            f"process id {process_id} is outside 0..{num_processes - 1} for {num_processes} "
            "processes; give each process a distinct id from 0 to num_processes-1."
        )
    if ":" not in coordinator_address:
        raise ValueError(
            f"coordinator address {coordinator_address!r} needs a port, e.g. 10.0.0.1:1234."
        )
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
        initialization_timeout=initialization_timeout,
    )
    return True


def is_primary() -> bool:
    """Whether this is process 0: the one that prints, logs and writes non-orbax files."""
    return jax.process_index() == 0


# --------------------------------------------------------------------------------------------
# Example driver


def synthetic_dataset(
    num_examples: int, num_classes: int = 2, seed: int = 0, dtype: Any = np.float32
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic random data: images ``(N, 32, 32, 1)`` standard normal rounded to float32
    (then cast to ``dtype``), labels ``(N,)`` int32 in ``[0, num_classes)``. The same in every
    process for the same arguments; the first ``n`` examples do not depend on ``num_examples``."""
    images = np.random.default_rng([seed, 0]).standard_normal((num_examples, 32, 32, 1))
    labels = np.random.default_rng([seed, 1]).integers(0, num_classes, num_examples)
    return images.astype(np.float32).astype(dtype), labels.astype(np.int32)


@functools.partial(jax.jit, static_argnums=0)
def init_params(net: Net, key: jax.Array) -> Any:
    """``net``'s float32 params from ``key``, as ``create_train_state(key, net, tx)`` makes
    them, but compiled once per ``net`` (Flax's eager init dispatches op by op: slower)."""
    return net.init(key, jnp.zeros((1, 32, 32, 1), jnp.float32))["params"]


def train_data_parallel(
    steps: int = 10,
    global_batch_size: int = 32,
    *,
    mesh: Mesh | None = None,
    seed: int = 0,
    lr: float = 0.01,
    momentum: float = 0.9,
    num_classes: int = 2,
    dtype: Any = jnp.float32,
    params: Any = None,
) -> tuple[TrainState, list[float]]:
    """``steps`` SGD steps of ``Net`` with cross-entropy on ``synthetic_dataset``, data-parallel
    over ``mesh`` (default: all devices of all processes).

    Global batch ``t`` is rows ``t*B .. (t+1)*B`` of the dataset whatever the mesh, and each
    process reads only its rows of it, so any mesh (1 device, 8 devices, 2 processes x 2 devices)
    trains on the same data. ``params`` (default: ``Net``'s init from ``seed``) is the start,
    the same in every process. ``dtype`` is that of params and images (``float64`` needs
    ``jax_enable_x64``; it starts from the float32 init and data cast up: a reference for the
    float32 noise floor). Returns the final state (replicated over ``mesh``) and the loss of
    each step.
    """
    mesh = make_mesh() if mesh is None else mesh
    check_batch_size(global_batch_size, mesh)
    images, labels = synthetic_dataset(steps * global_batch_size, num_classes, seed, dtype)
    net = Net(num_classes=num_classes)
    if params is None:
        params = init_params(net, jax.random.key(seed))
    # float32 init, then cast: a float64 run starts from the same values as a float32 one.
    params = jax.tree.map(lambda p: jnp.asarray(p, dtype), params)
    state = create_train_state(jax.random.key(seed), net, optim.sgd(lr, momentum), params)
    state = replicate(state, mesh)
    rows = local_batch_indices(global_batch_size, mesh)
    history = []
    for t in range(steps):
        take = t * global_batch_size + rows
        batch = assemble_batch((images[take], labels[take]), mesh)
        state, metrics = train_step(state, batch, losses.cross_entropy)
        history.append(metrics["loss"])
    return state, [float(x) for x in to_host(history)]


def write_params_npz(path: str | os.PathLike, params: Any) -> None:
    """``params`` as an ``.npz`` keyed by pytree path (``"['conv1']['kernel']"``), written to a
    temporary file and renamed, so no half-written file is left."""
    flat = {
        jax.tree_util.keystr(k): np.asarray(v)
        for k, v in jax.tree_util.tree_leaves_with_path(params)
    }

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez(f, **flat)

    atomic_write(path, write)


def read_params_npz(path: str | os.PathLike, net: Net) -> Any:
    """Params of ``net`` from an ``.npz`` written by ``write_params_npz``; ``ValueError`` if its
    arrays are not exactly those of ``net`` (names, shapes)."""
    like = jax.eval_shape(init_params, net, jax.random.key(0))
    with np.load(path) as f:
        arrays = dict(f)
    leaves = []
    for key, spec in jax.tree_util.tree_leaves_with_path(like):
        name = jax.tree_util.keystr(key)
        if name not in arrays or arrays[name].shape != spec.shape:
            raise ValueError(
                f"{path}: no array {name} of shape {spec.shape} (found "
                f"{ {k: v.shape for k, v in arrays.items()} }); write it with write_params_npz "
                "from the same Net."
            )
        leaves.append(arrays.pop(name))
    if arrays:
        raise ValueError(f"{path}: unexpected arrays {sorted(arrays)} for this Net.")
    return jax.tree.unflatten(jax.tree.structure(like), leaves)


def _checkpoint_roundtrip(directory: str, state: TrainState, mesh: Mesh) -> bool:
    """Save ``state`` with orbax and restore it replicated over ``mesh``, in every process.

    Orbax synchronises the processes inside ``save``/``restore``; each array is written once
    (replicated arrays by replica 0's process) and ``restore`` into ``abstract_like`` gives each
    process the global arrays. Whether the restored state equals ``state``, bit for bit.
    """
    import orbax.checkpoint as ocp

    step = int(to_host(state.step))
    path = os.path.abspath(directory)
    with ocp.CheckpointManager(path) as manager:
        manager.save(step, args=ocp.args.StandardSave(state))
        manager.wait_until_finished()
    with ocp.CheckpointManager(path) as manager:
        back = manager.restore(step, args=ocp.args.StandardRestore(abstract_like(state, mesh)))
    replicated = all(
        x.sharding.is_equivalent_to(replicated_sharding(mesh), np.ndim(x))
        for x in jax.tree.leaves(back)
    )
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), to_host(back), to_host(state))
    return replicated and all(jax.tree.leaves(same))


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jaxnet.parallel",
        description="Data-parallel SGD on random data over all devices (of all processes); "
        "prints the mesh and one JSON line with the losses.",
    )
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--global-batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument(
        "--num-devices", type=int, default=None, help="use only the first N devices (default: all)"
    )
    p.add_argument(
        "--coordinator-address",
        default=None,
        help=f"host:port of process 0 (default: ${COORDINATOR_ADDRESS_ENV})",
    )
    p.add_argument(
        "--num-processes",
        type=int,
        default=None,
        help=f"number of processes (default: ${NUM_PROCESSES_ENV})",
    )
    p.add_argument(
        "--process-id",
        type=int,
        default=None,
        help=f"this process' index (default: ${PROCESS_ID_ENV})",
    )
    p.add_argument(
        "--init-params",
        default=None,
        help="start from the params in this .npz (as --save-params writes them) "
        "instead of Net's init from --seed",
    )
    p.add_argument(
        "--save-params",
        default=None,
        help="write the final params to this .npz (primary process only)",
    )
    p.add_argument(
        "--checkpoint-dir",
        default=None,
        help="save the final TrainState there with orbax (every process takes part), "
        "restore it replicated over the mesh, and report whether it came back equal",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    devices = jax.devices()
    if args.num_devices is not None:
        if not 0 < args.num_devices <= len(devices):
            raise SystemExit(f"--num-devices {args.num_devices}: there are {len(devices)} devices.")
        devices = devices[: args.num_devices]
    mesh = make_mesh(devices)
    if is_primary():
        print(describe_mesh(mesh), flush=True)
    start = time.perf_counter()
    init = None if args.init_params is None else read_params_npz(args.init_params, Net())
    state, history = train_data_parallel(
        args.steps, args.global_batch_size, mesh=mesh, seed=args.seed, lr=args.lr, params=init
    )
    seconds = time.perf_counter() - start
    params = to_host(state.params)
    report = {
        "mesh": describe_mesh(mesh),
        "devices": mesh.devices.size,
        "processes": jax.process_count(),
        "steps": args.steps,
        "global_batch_size": args.global_batch_size,
        "losses": history,
        "seconds_incl_compile": seconds,
    }
    if args.checkpoint_dir:
        report["checkpoint_restored_equal"] = _checkpoint_roundtrip(
            args.checkpoint_dir, state, mesh
        )
    if is_primary():
        if args.save_params:
            write_params_npz(args.save_params, params)
        print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
