"""Run by tests/test_parallel.py in a subprocess with 8 host devices: the training job
(``train_and_evaluate``) data-parallel over 8 and over 4 devices, plus the float64 reference
for the float32 noise floor.

Usage: python tests/workers/train_parallel_worker.py OUT_DIR CONFIG_JSON (the test's small
``TrainConfig``, as ``jaxnet.config.config_to_json`` gives it), or through
``parallel_worker.py OUT_DIR CONFIG_JSON`` (the same, after that worker's runs, in one process).
Writes OUT_DIR/result.json and the final params of each run as .npz (``p8``, ``p4``: the job on
8 and on 4 devices; ``loop64``: the job's steps in float64 on one device; ``loop64_4``,
``loop64_8_4``: its first 4 steps in float64 on one and on 8 devices).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

from jaxnet import data, optim
from jaxnet import parallel as par
from jaxnet.config import TrainConfig
from jaxnet.criteria import criterion
from jaxnet.examples.data_parallel import write_params_npz
from jaxnet.model import Net, init_params
from jaxnet.step import create_train_state, train_step
from jaxnet.train import evaluate, train_and_evaluate


def job(config, workdir: Path, mesh) -> tuple[dict, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = train_and_evaluate(config, workdir, mesh)
    leaves = jax.tree.leaves(result.state.params)
    info = {
        "history": result.history,
        "replicated": all(
            leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == mesh.size
            for leaf in leaves
        ),
    }
    write_params_npz(workdir.parent / f"{workdir.name}.npz", par.to_host(result.state.params))
    return info, out.getvalue()


def same_steps(c: TrainConfig, dtype, mesh=None, steps: int | None = None) -> dict:
    """The job's run of ``c`` as a plain loop of train_step in ``dtype``, on one device or
    data-parallel over ``mesh``; only its first ``steps`` steps if given."""
    ds = data.load_data(limit=c.limit)
    # Batches drawn outside enable_x64, exactly as the job draws them.
    batches = [
        b
        for epoch in range(1, c.epochs + 1)
        for b in data.batches(ds.x_train, ds.y_train, c.batch_size, seed=c.seed, epoch=epoch)
    ]
    net = Net(num_classes=ds.num_classes, weight_init=c.weight_init)
    key = jax.random.key(c.seed)
    params = init_params(net, key)
    with jax.enable_x64(dtype == np.float64):
        params = jax.tree.map(lambda p: np.asarray(p, dtype), params)
        tx = optim.build(c.optimizer, {"lr": c.lr})  # the job's: sgd, momentum 0.9
        state = create_train_state(key, net, tx, params)
        if mesh is not None:
            state = par.replicate(state, mesh)
        crit = criterion(c.loss)
        for x, y in batches[:steps]:
            batch = (x.astype(dtype), y)
            if mesh is not None:
                batch = par.shard_batch(batch, mesh)
            state, _ = train_step(state, batch, crit)
        return jax.tree.map(lambda p: np.asarray(p, np.float64), par.to_host(state.params))


def float64_loops(out: Path, config: TrainConfig) -> None:
    """The same steps in float64, on 1 and on 8 devices: equal but for float64 round-off when
    the sharding is right (float32 round-off excluded); and the float32 noise floor. Run first
    in the process: the 8-device float64 state is its largest memory."""
    mesh8 = par.make_mesh()
    write_params_npz(out / "loop64.npz", same_steps(config, np.float64))
    # 4 steps (momentum acts from step 2) show the semantics; a float64 step on 8 host devices
    # costs 6x one on a single device (every device updates its replica of fc1), so not all 16.
    write_params_npz(out / "loop64_4.npz", same_steps(config, np.float64, steps=4))
    write_params_npz(out / "loop64_8_4.npz", same_steps(config, np.float64, mesh8, steps=4))


def jobs(out: Path, config: TrainConfig) -> None:
    """The job on 8 and on 4 devices, its uneven-batch error, and evaluate's partial batches."""
    start = time.perf_counter()
    devices = jax.devices()
    mesh8, mesh4 = par.make_mesh(), par.make_mesh(devices[:4])
    result: dict = {}
    result["run8"], result["stdout8"] = job(config, out / "p8", mesh8)
    result["run4"], _ = job(config, out / "p4", mesh4)

    # An uneven global batch: a clear error, before anything is written.
    try:
        train_and_evaluate(dataclasses.replace(config, batch_size=12), out / "uneven", mesh8)
        result["uneven_error"] = None
    except ValueError as e:
        result["uneven_error"] = str(e)
    result["uneven_wrote"] = (out / "uneven").exists()

    # evaluate() with partial batches: 29 examples in batches of 16 on 8 devices are a sharded
    # 16, then 8 sharded + 5 on each process' own copy; against one device, unsharded.
    ds = data.load_data(limit=config.limit)
    net = Net(num_classes=ds.num_classes)
    state = create_train_state(jax.random.key(1), net, optim.build("sgd", {"lr": 0.01}))
    x, y = ds.x_val[:29], ds.y_val[:29]
    result["eval_partial"] = {
        "one": evaluate(state, x, y, batch_size=16),
        "eight": evaluate(par.replicate(state, mesh8), x, y, batch_size=16, mesh=mesh8),
    }
    result["seconds"] = time.perf_counter() - start
    (out / "result.json").write_text(json.dumps(result))


def main(out: Path, config: TrainConfig) -> None:
    assert len(jax.devices()) == 8, f"expected 8 host devices, got {jax.devices()}"
    float64_loops(out, config)
    jobs(out, config)


if __name__ == "__main__":
    main(Path(sys.argv[1]), TrainConfig(**json.loads(sys.argv[2])))
