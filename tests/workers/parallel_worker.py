"""Run by tests/test_parallel.py in a subprocess with 8 host devices (XLA_FLAGS must be set
before jax is imported, so this cannot run inside the pytest process).

Usage: python tests/workers/parallel_worker.py OUT_DIR [CONFIG_JSON]. Writes
OUT_DIR/result.json, the initial params as OUT_DIR/init.npz and the 4-device run's final params
as OUT_DIR/mesh4.npz (the start and the reference for the 2-process run). With CONFIG_JSON (a
``TrainConfig`` as ``jaxnet.config.config_to_json`` gives it), the same process also runs
``train_parallel_worker`` into OUT_DIR/job: one launch, one JAX start-up for both.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxnet import Net, create_train_state, eval_step, losses, optim, train_step
from jaxnet import parallel as par
from jaxnet.examples.data_parallel import synthetic_dataset, train_data_parallel, write_params_npz
from jaxnet.model import abstract_params

BATCH = 32
STEPS = 10


def flat(params) -> dict[str, np.ndarray]:
    return {
        jax.tree_util.keystr(k): np.asarray(v, np.float64)
        for k, v in jax.tree_util.tree_leaves_with_path(par.to_host(params))
    }


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def max_abs(a: dict) -> float:
    return max(float(np.max(np.abs(v))) for v in a.values())


def error_of(fn) -> str | None:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return None


def torch_like_init(net: Net, seed: int = 0) -> dict:
    """Params distributed like Net's torch init, U(+-1/sqrt(fan_in)), drawn with NumPy: compiling
    Net's threefry init costs more than all the steps here, and any realistic start will do."""
    rng = np.random.default_rng(seed)
    like = abstract_params(net)
    out = {}
    for layer, p in like.items():
        bound = 1 / np.sqrt(np.prod(p["kernel"].shape[:-1]))
        out[layer] = {
            k: rng.uniform(-bound, bound, v.shape).astype(np.float32) for k, v in p.items()
        }
    return out


def main(out: Path) -> None:
    start = time.perf_counter()
    devices = jax.devices()
    assert len(devices) == 8, f"expected 8 host devices, got {devices}"
    mesh1, mesh4, mesh8 = (par.make_mesh(devices[:n]) for n in (1, 4, 8))
    result: dict = {"describe": [par.describe_mesh(m) for m in (mesh1, mesh4, mesh8)]}

    # Shardings as intended: batch split over "data", state replicated on all 8 devices.
    x, y = synthetic_dataset(BATCH)
    images, labels = par.shard_batch((x, y), mesh8)
    result["batch_spec"] = str(images.sharding.spec)
    result["batch_shard_shapes"] = sorted({s.data.shape for s in images.addressable_shards})
    result["batch_roundtrip_equal"] = bool(
        np.array_equal(np.asarray(images), x) and np.array_equal(np.asarray(labels), y)
    )
    result["local_rows_8"] = par.local_batch_indices(BATCH, mesh8).tolist()

    params0 = torch_like_init(Net())
    write_params_npz(out / "init.npz", params0)  # the 2-process run starts from it too
    # The unchanged train_step, given these shardings, compiles to a program in which XLA's
    # all-reduce sums the per-device gradient contributions.
    state8 = par.replicate(
        create_train_state(jax.random.key(0), Net(), optim.sgd(0.01, 0.9), params0), mesh8
    )
    compiled = train_step.lower(state8, (images, labels), losses.cross_entropy).compile()
    result["compiled_all_reduce"] = "all-reduce" in compiled.as_text()
    # Data parallelism moves gradients only: no activation is gathered or permuted.
    result["compiled_gathers"] = sum(
        compiled.as_text().count(op) for op in ("all-gather", "collective-permute", "all-to-all")
    )
    # eval_step, unchanged, on the sharded batch and state vs one device.
    m8 = eval_step(state8, (images, labels))
    m1 = eval_step(
        create_train_state(jax.random.key(0), Net(), optim.sgd(0.01, 0.9), params0),
        (jnp.asarray(x), jnp.asarray(y)),
    )
    result["eval"] = {k: [float(m1[k]), float(m8[k])] for k in m1}
    runs: dict[str, dict] = {}
    for steps in (1, STEPS):
        for name, mesh, dtype in (
            ("f32_1", mesh1, jnp.float32),
            ("f32_8", mesh8, jnp.float32),
            ("f32_4", mesh4, jnp.float32),
            ("f64_1", mesh1, jnp.float64),
        ):
            if steps == 1 and name == "f32_4":
                continue
            with jax.enable_x64(dtype == jnp.float64):
                state, history = train_data_parallel(
                    steps, BATCH, mesh=mesh, dtype=dtype, params=params0
                )
                params = flat(state.params)
            leaves = jax.tree.leaves(state.params)
            runs[f"{name}_{steps}"] = {"params": params, "losses": history}
            if name == "f32_8":
                result[f"state_replicated_{steps}"] = all(
                    leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8
                    for leaf in leaves
                )
            if name.startswith("f32"):
                result[f"dtypes_{name}_{steps}"] = sorted({str(leaf.dtype) for leaf in leaves})
            if name == "f32_4" and steps == STEPS:
                np.savez(out / "mesh4.npz", **params)

    for steps in (1, STEPS):
        r = {k.rsplit("_", 1)[0]: v for k, v in runs.items() if k.endswith(f"_{steps}")}
        result[f"steps_{steps}"] = {
            "sharded8_vs_single": max_abs_diff(r["f32_8"]["params"], r["f32_1"]["params"]),
            "single_vs_f64": max_abs_diff(r["f32_1"]["params"], r["f64_1"]["params"]),
            "sharded8_vs_f64": max_abs_diff(r["f32_8"]["params"], r["f64_1"]["params"]),
            "param_scale": max_abs(r["f32_1"]["params"]),
            "losses": {k: v["losses"] for k, v in r.items()},
        }
        if "f32_4" in r:
            result[f"steps_{steps}"]["sharded4_vs_single"] = max_abs_diff(
                r["f32_4"]["params"], r["f32_1"]["params"]
            )

    # Uneven global batch: a clear error naming the fix, from every entry point.
    result["errors"] = {
        "shard_batch": error_of(lambda: par.shard_batch(synthetic_dataset(12), mesh8)),
        "driver": error_of(lambda: train_data_parallel(1, 12, mesh=mesh8)),
        "local_rows": error_of(lambda: par.local_batch_indices(4, mesh8)),
        "mismatched": error_of(lambda: par.shard_batch((x, y[:8]), mesh8)),
    }
    result["seconds"] = time.perf_counter() - start
    (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    out = Path(sys.argv[1])
    if len(sys.argv) > 2:
        import train_parallel_worker  # this script's folder is on sys.path

        from jaxnet.config import TrainConfig

        config = TrainConfig(**json.loads(sys.argv[2]))
        (out / "job").mkdir()
        train_parallel_worker.float64_loops(out / "job", config)  # first: the largest memory
    main(out)
    if len(sys.argv) > 2:
        train_parallel_worker.jobs(out / "job", config)
