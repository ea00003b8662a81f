#!/usr/bin/env python3
"""What writing a step's results into new buffers costs: SGD with momentum on one array, jitted,
returning new arrays (as ``jaxnet.train_step`` does) or updating them in place (donated, as
``train_step_donated`` does), against PyTorch's in-place ``mul_``/``add_``, per array size.

Each round starts from the same arrays; the forms of one size are timed interleaved, round by
round, with malloc tuned as jaxnet's steps tune it. fc1's kernel, which is nearly all of the
state, is 24.5 MiB.

    python3 scripts/update_buffers.py --json benchmarks/update-buffers.json

Prints one line per size: milliseconds per update (median) and the GB/s that the arrays' bytes
(read p, m, g; write p, m) make of it.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from _measure import record, time_interleaved

from jaxnet import host
from jaxnet.bench import write_json

LR, MOMENTUM = 0.01, 0.9


def _update(p: jax.Array, m: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    m = MOMENTUM * m + g
    return p - LR * m, m


_NEW_BUFFERS = jax.jit(_update)
_DONATED = jax.jit(_update, donate_argnums=(0, 1))


def _forms(n: int) -> dict[str, Any]:
    """form -> (one update, back to the first arrays, the parameters now as NumPy)."""
    g = jnp.full((n,), 0.01, jnp.float32)
    forms: dict[str, Any] = {}
    for name, fn in (("new buffers", _NEW_BUFFERS), ("donated", _DONATED)):
        box: list[jax.Array] = []

        def reset(box: list[jax.Array] = box) -> None:
            box[:] = [jnp.ones((n,), jnp.float32), jnp.zeros((n,), jnp.float32)]

        def run(box: list[jax.Array] = box, fn: Any = fn) -> None:
            box[:] = fn(box[0], box[1], g)
            box[1].block_until_ready()

        forms[name] = (run, reset, lambda box=box: np.asarray(box[0]))
    tp, tm, tg = torch.ones(n), torch.zeros(n), torch.full((n,), 0.01)

    def torch_run() -> None:
        tm.mul_(MOMENTUM).add_(tg)
        tp.add_(tm, alpha=-LR)

    def torch_reset() -> None:
        tp.fill_(1.0)
        tm.zero_()

    forms["pytorch in place"] = (torch_run, torch_reset, lambda: tp.numpy().copy())
    return forms


def measure(mib: float, reps: int, calls_per_round: int) -> dict[str, Any]:
    """``{form: {"median_ms", "gb_per_s"}}`` for arrays of ``mib`` MiB (float32)."""
    n = int(mib * 2**20) // 4
    forms = _forms(n)
    for run, reset, _ in forms.values():  # compile and warm up
        reset()
        run()

    def reset_all() -> None:
        for _, reset, _ in forms.values():
            reset()

    calls = {name: (run, lambda _: None) for name, (run, _, _) in forms.items()}
    times = time_interleaved(calls, dict.fromkeys(forms, calls_per_round), reps, reset_all)
    moved = 5 * n * 4  # read p, m, g; write p, m
    out = {}
    for name, t in times.items():
        median = statistics.median(t)
        out[name] = {"median_ms": 1e3 * median, "gb_per_s": moved / median / 1e9}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", default="2,8,16,24.5,32,64,128", help="array sizes, MiB")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--calls", type=int, default=10, help="updates per round")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    host.tune_malloc()
    torch.set_num_threads(2)
    doc = record(f"scripts/update_buffers.py --mib {args.mib} --reps {args.reps}", sizes_mib={})
    for mib in (float(s) for s in args.mib.split(",")):
        doc["sizes_mib"][f"{mib:g}"] = row = measure(mib, args.reps, args.calls)
        cells = [f"{n} {r['median_ms']:.3f} ms ({r['gb_per_s']:.0f} GB/s)" for n, r in row.items()]
        slower = row["new buffers"]["median_ms"] / row["donated"]["median_ms"]
        print(f"{mib:6g} MiB: {', '.join(cells)}; new buffers / donated {slower:.2f}x", flush=True)
    if args.json:
        write_json(doc, args.json)
    return doc


if __name__ == "__main__":
    main()
