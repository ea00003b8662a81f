#!/usr/bin/env python3
"""Minor page faults and wall time of the README's ``train_step`` loop, window by window.

Runs ``TrainState.create`` + ``jaxnet.train_step`` (malloc set up by jaxnet, as in a
user's script) in windows of 10 steps and prints, per window after the first, the faults per
step and the window's milliseconds. A window whose steps each fault ~6,270 pages (25.7 MB,
fc1's kernel) in total took one of its 51 MB of fresh output buffers from new pages.

    python3 scripts/page_faults.py --batch-size 1 --windows 30
    JAXNET_TUNE_MALLOC=0 python3 scripts/page_faults.py   # glibc's own arenas and thresholds
"""

from __future__ import annotations

import argparse
import resource
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxnet
from jaxnet import optim
from jaxnet.model import abstract_params


def readme_state(batch_size: int, seed: int = 0) -> tuple[jaxnet.TrainState, tuple[Any, Any]]:
    """The README's usage at ``batch_size``: ``TrainState.create`` of ``Net`` with
    ``optim.sgd(0.01, momentum=0.9)``, and one batch (images NHWC float32, int32 labels).
    The params are drawn with NumPy: compiling Net's init is not what is measured."""
    net = jaxnet.Net()
    rng = np.random.default_rng(seed)
    params = jax.tree.map(
        lambda s: jnp.asarray(rng.uniform(-0.01, 0.01, s.shape).astype(s.dtype)),
        abstract_params(net),
    )
    state = jaxnet.TrainState.create(
        apply_fn=net.apply, params=params, tx=optim.sgd(0.01, momentum=0.9)
    )
    batch = (
        jnp.asarray(rng.standard_normal((batch_size, 32, 32, 1), dtype=np.float32)),
        jnp.asarray(rng.integers(0, 2, batch_size), jnp.int32),
    )
    return state, batch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--windows", type=int, default=30)
    args = p.parse_args()
    state, batch = readme_state(args.batch_size)
    rows = []
    for _ in range(args.windows):
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        for _ in range(10):
            state, _ = jax.block_until_ready(jaxnet.train_step(state, batch))
        ms = (time.perf_counter() - start) * 1e3
        rows.append(((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / 10, ms))
    rows = rows[1:]  # the first window compiles and grows the heap
    for faults, ms in rows:
        print(f"{faults:8.0f} faults/step  {ms:7.1f} ms per 10 steps")
    hit = [ms for f, ms in rows if f >= 100]
    calm = [ms for f, ms in rows if f < 100]
    print(
        f"{len(hit)} of {len(rows)} windows faulted; median ms per 10 steps: "
        f"{np.median(calm) if calm else float('nan'):.1f} without, "
        f"{np.median(hit) if hit else float('nan'):.1f} with faults"
    )


if __name__ == "__main__":
    main()
