"""Data-parallel SGD on random data over every device of every process: the example driver
of ``jaxnet.parallel``.

``python -m jaxnet.examples.data_parallel --steps 10 --global-batch-size 32`` prints the mesh
and one JSON line with the losses; with ``--coordinator-address``/``--num-processes``/
``--process-id`` (or the ``JAX_*`` variables) it runs as one of several processes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxnet import losses, optim
from jaxnet.io import atomic_write
from jaxnet.model import Net, abstract_params, init_params
from jaxnet.parallel import (
    COORDINATOR_ADDRESS_ENV,
    NUM_PROCESSES_ENV,
    PROCESS_ID_ENV,
    abstract_like,
    assemble_batch,
    check_batch_size,
    describe_mesh,
    initialize_distributed,
    is_primary,
    local_batch_indices,
    make_mesh,
    replicate,
    replicated_sharding,
    to_host,
)
from jaxnet.step import TrainState, create_train_state, train_step

__all__ = [
    "main",
    "read_params_npz",
    "synthetic_dataset",
    "train_data_parallel",
    "write_params_npz",
]


def synthetic_dataset(
    num_examples: int, num_classes: int = 2, seed: int = 0, dtype: Any = np.float32
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic random data: images ``(N, 32, 32, 1)`` standard normal rounded to float32
    (then cast to ``dtype``), labels ``(N,)`` int32 in ``[0, num_classes)``. The same in every
    process for the same arguments; the first ``n`` examples do not depend on ``num_examples``."""
    images = np.random.default_rng([seed, 0]).standard_normal((num_examples, 32, 32, 1))
    labels = np.random.default_rng([seed, 1]).integers(0, num_classes, num_examples)
    return images.astype(np.float32).astype(dtype), labels.astype(np.int32)


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
    like = abstract_params(net)
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
        prog="python -m jaxnet.examples.data_parallel",
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
