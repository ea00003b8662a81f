#!/usr/bin/env python3
"""Where the training step's time goes, against PyTorch eager's, part by part.

For each batch size, from the same weights and data, timed interleaved round by round (so that
load from elsewhere hits them alike), median and minimum milliseconds per call:

* ``forward``: the loss, jitted (jaxnet), and under ``torch.no_grad`` (PyTorch);
* ``gradient``: ``jax.grad`` of that loss, jitted, and PyTorch's forward + ``backward()``;
* ``update``: ``TrainState.apply_gradients`` of SGD(0.01, momentum=0.9), jitted, not donated,
  and ``torch.optim.SGD.step()``;
* ``step``: ``jaxnet.train_step`` as a user's loop calls it, and PyTorch's whole step.

    python3 scripts/step_parts.py --json benchmarks/step-parts-cpu-2core.json

Prints one line per batch size and part: PyTorch time / jaxnet time (>1: jaxnet faster).
"""

from __future__ import annotations

import argparse
import copy
import statistics
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from _measure import Timed, record, size_round, time_interleaved

import jaxnet
from jaxnet.bench import write_json
from jaxnet.convert import nhwc_to_nchw
from jaxnet.losses import cross_entropy
from jaxnet.torch_reference import make_torch_net

PARTS = ("forward", "gradient", "update", "step")

Side = tuple[dict[str, Timed], Callable[[], None]]  # (calls by part, back to the first state)


def _no_wait(_: Any) -> None:
    return None


def _jax_calls(batch: tuple[jax.Array, jax.Array], params: Any) -> Side:
    net = jaxnet.Net()
    images, labels = batch

    def loss(p: Any) -> jax.Array:
        return cross_entropy(net.apply({"params": p}, images), labels)

    forward, gradient = jax.jit(loss), jax.jit(jax.grad(loss))
    state = jaxnet.TrainState.create(
        apply_fn=net.apply, params=params, tx=jaxnet.optim.sgd(0.01, momentum=0.9)
    )
    grads = gradient(params)
    update = jax.jit(lambda s, g: s.apply_gradients(grads=g))
    box = [state]

    def step() -> jax.Array:
        box[0], metrics = jaxnet.train_step(box[0], batch)
        return metrics["loss"]

    def reset() -> None:
        box[0] = state

    wait = jax.block_until_ready
    calls = {
        "forward": (lambda: forward(params), wait),
        "gradient": (lambda: gradient(params), wait),
        "update": (lambda: update(state, grads), wait),
        "step": (step, wait),
    }
    return calls, reset


def _torch_calls(x: np.ndarray, y: np.ndarray, seed: int) -> Side:
    net = make_torch_net(seed)
    # .copy(): fresh NCHW strides (a transposed view with C=1 would look channels_last to torch)
    xt = torch.from_numpy(nhwc_to_nchw(x).copy())
    yt = torch.from_numpy(y.astype(np.int64))
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

    def forward() -> Any:
        with torch.no_grad():
            return F.cross_entropy(net(xt), yt)

    def gradient() -> Any:
        net.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(xt), yt)
        loss.backward()
        return loss

    def step() -> Any:  # the tutorial's step: zero_grad, forward, backward, step
        loss = gradient()
        opt.step()
        return loss

    first = {k: v.clone() for k, v in net.state_dict().items()}
    first_opt = copy.deepcopy(opt.state_dict())

    def reset() -> None:
        # The weights and momentum of the start, and their .grad: what update steps with.
        net.load_state_dict(first)
        opt.load_state_dict(copy.deepcopy(first_opt))
        gradient()

    reset()
    calls = {
        "forward": (forward, _no_wait),
        "gradient": (gradient, _no_wait),
        "update": (opt.step, _no_wait),
        "step": (step, _no_wait),
    }
    return calls, reset


def measure(batch_size: int, reps: int, min_rep_s: float, seed: int = 0) -> dict[str, Any]:
    """``{part: {"jaxnet": {...}, "pytorch": {...}, "ratio": PyTorch / jaxnet median}}`` and
    ``loss_difference`` (the two forward losses' absolute difference: round-off only)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch_size, 32, 32, 1), dtype=np.float32)
    y = rng.integers(0, 2, batch_size).astype(np.int32)
    params = jaxnet.params_from_torch(make_torch_net(seed).state_dict())
    sides = {
        "jaxnet": _jax_calls((jnp.asarray(x), jnp.asarray(y)), params),
        "pytorch": _torch_calls(x, y, seed),
    }
    calls = {(side, part): c for side, (cs, _) in sides.items() for part, c in cs.items()}
    # Both sides compute the same loss from the same weights and data (float32 round-off).
    losses = {side: float(cs["forward"][0]()) for side, (cs, _) in sides.items()}
    per_round = {key: size_round(run, wait, min_rep_s)[1] for key, (run, wait) in calls.items()}

    def reset() -> None:  # both sides back to the first weights (see time_interleaved)
        for _, side_reset in sides.values():
            side_reset()

    seconds = time_interleaved(calls, per_round, reps, reset)
    times = {key: [1e3 * t for t in v] for key, v in seconds.items()}
    out: dict[str, Any] = {"loss_difference": abs(losses["jaxnet"] - losses["pytorch"])}
    for part in PARTS:
        row = {
            side: {
                "median_ms": statistics.median(times[side, part]),
                "min_ms": min(times[side, part]),
            }
            for side in sides
        }
        row["ratio"] = row["pytorch"]["median_ms"] / row["jaxnet"]["median_ms"]
        out[part] = row
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", default="256,1024")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--min-rep-s", type=float, default=0.5, help="seconds per variant per round")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    doc = record(
        f"scripts/step_parts.py --batch-sizes {args.batch_sizes} --reps {args.reps}",
        malloc=jaxnet.host.malloc_status(),
        batches={},
    )
    for b in (int(s) for s in args.batch_sizes.split(",")):
        doc["batches"][str(b)] = parts = measure(b, args.reps, args.min_rep_s)
        for part in PARTS:
            row = parts[part]
            print(
                f"batch {b} {part}: jaxnet {row['jaxnet']['median_ms']:.2f} ms, PyTorch "
                f"{row['pytorch']['median_ms']:.2f} ms, {row['ratio']:.2f}x",
                flush=True,
            )
    if args.json:
        write_json(doc, args.json)
    return doc


if __name__ == "__main__":
    main()
