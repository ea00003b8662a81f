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

The example driver (random data, every device, several processes) is
``python -m jaxnet.examples.data_parallel``.

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

import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxnet.step import Batch

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
    "initialize_distributed",
    "is_primary",
    "local_batch_indices",
    "local_copy",
    "make_mesh",
    "replicate",
    "replicated_sharding",
    "shard_batch",
    "to_host",
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


def local_copy(tree: Any) -> Any:
    """This process' own copy of a tree of replicated arrays, on one of its devices: for work
    every process does alike, outside the mesh (no collectives)."""
    return jax.tree.map(lambda a: a.addressable_data(0) if isinstance(a, jax.Array) else a, tree)
