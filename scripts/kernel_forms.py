#!/usr/bin/env python3
"""conv2's forward pass and input gradient in every form measured, fc1's three matmuls
with the kernel stored (in, out) as Flax's Dense does or (out, in) as torch's Linear does,
and fc1's inference product plain and as ``kernels.dense_dot_general`` computes it, on this
machine's CPU.

Each form is jitted alone and timed (median per call over ``--reps`` rounds of
``--min-round-s``) with glibc's malloc tuned as jaxnet's steps tune it, the forms of one batch
size interleaved round by round, so that load from elsewhere hits them alike; PyTorch's
``no_grad`` conv2 + ReLU and fc1 ``linear`` are timed beside them.
``max_abs_diff`` is against the first form of each section (float32 round-off only).

    python3 scripts/kernel_forms.py --json benchmarks/kernel-forms-cpu-2core.json
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from _measure import record, size_round, time_interleaved

from jaxnet import host, kernels
from jaxnet.bench import write_json


def _pad_channels(x: jax.Array, axis_size: int) -> jax.Array:
    return jnp.pad(x, ((0, 0),) * (x.ndim - 1) + ((0, axis_size - x.shape[-1]),))


def _forward_forms() -> dict[str, Any]:
    def padded_in(c: int):
        def f(x, k):
            kp = jnp.pad(k, ((0, 0), (0, 0), (0, c - k.shape[2]), (0, 0)))
            return kernels._conv3x3_xla(_pad_channels(x, c), kp)

        return f

    def padded_out(o: int):
        return lambda x, k: kernels._conv3x3_xla(x, _pad_channels(k, o))[..., : k.shape[3]]

    return {
        "xla (6 channels)": kernels._conv3x3_xla,
        "inputs padded to 8 (used)": kernels._conv3x3_padded,
        "inputs padded to 16": padded_in(16),
        "outputs padded to 32 (YNNPACK)": padded_out(32),
    }


def _input_gradient_forms() -> dict[str, Any]:
    def taps(g, kernel):  # one matmul over the 9 taps, then a fused sum of shifted slices
        n, h, w, o = g.shape
        c = kernel.shape[2]
        t = g.reshape(n * h * w, o) @ kernel.transpose(3, 0, 1, 2).reshape(o, 9 * c)
        t = t.reshape(n, h, w, 3, 3, c)
        pads = (((0, 0), (i, 2 - i), (j, 2 - j), (0, 0)) for i in range(3) for j in range(3))
        return sum(jnp.pad(t[:, :, :, i // 3, i % 3, :], p) for i, p in enumerate(pads))

    return {
        "transposed conv (6 channels)": kernels._conv3x3_dinput_conv,
        "transposed conv padded to 8 (used)": kernels._conv3x3_dinput_padded,
        "9-tap matmul + shifted sum": taps,
    }


def _fc1_forms() -> dict[str, Any]:
    # (x, g, w_in_out, w_out_in) -> the forward matmul and the two gradient matmuls.
    nt = (((1,), (1,)), ((), ()))
    return {
        "forward, kernel (in, out)": lambda x, g, w, wt: x @ w,
        "forward, kernel (out, in)": lambda x, g, w, wt: jax.lax.dot_general(x, wt, nt),
        "input gradient, kernel (in, out)": lambda x, g, w, wt: jax.lax.dot_general(g, w, nt),
        "input gradient, kernel (out, in)": lambda x, g, w, wt: g @ wt,
        "kernel gradient (in, out)": lambda x, g, w, wt: x.T @ g,
        "kernel gradient (out, in)": lambda x, g, w, wt: g.T @ x,
    }


def _fc1_inference_forms() -> dict[str, Any]:
    # (x, w) -> fc1's product as inference computes it: dense_dot_general is the batched form
    # up to 32 rows and the plain product above.
    dims = (((1,), (0,)), ((), ()))
    return {
        "plain product": lambda x, w: x @ w,
        "dense_dot_general (used)": lambda x, w: kernels.dense_dot_general(x, w, dims),
    }


def _torch_fc1(x: jax.Array, w: jax.Array) -> Any:
    weight = torch.from_numpy(np.asarray(w).T.copy())  # torch's (out, in)
    xt = torch.from_numpy(np.array(x))  # a writable copy

    def call() -> None:
        with torch.no_grad():
            torch.nn.functional.linear(xt, weight)

    return call


def _median_ms(calls: dict[str, Any], reps: int, min_round_s: float) -> dict[str, float]:
    """Median milliseconds per call of each, over ``reps`` rounds of ``min_round_s`` each.

    Why whole rounds: the forms of a section share their inputs, so one call per round would
    find them in cache after the form before it (fc1's 25 MB kernel fits some L3s) and time
    the first form of each round cold: the same product measured 13.0 against 7.8 ms.
    """
    timed = {name: (call, lambda _: None) for name, call in calls.items()}
    per_round = {name: size_round(*timed[name], min_round_s)[1] for name in timed}
    times = time_interleaved(timed, per_round, reps)
    return {name: round(statistics.median(t) * 1e3, 3) for name, t in times.items()}


def _torch_conv2(x: jax.Array) -> Any:
    conv = torch.nn.Conv2d(6, 16, 3)
    xt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())

    def call() -> None:
        with torch.no_grad():
            torch.relu(conv(xt))

    return call


def measure(batch: int, reps: int, min_round_s: float = 0.05) -> dict[str, Any]:
    """Per section and form: milliseconds per call and the largest difference from the
    section's reference form."""
    rng = np.random.default_rng(batch)
    x = jnp.asarray(rng.standard_normal((batch, 30, 30, 6), np.float32))
    g = jnp.asarray(rng.standard_normal((batch, 28, 28, 16), np.float32))
    k = jnp.asarray(rng.standard_normal((3, 3, 6, 16), np.float32))
    h = jnp.asarray(rng.standard_normal((batch, 12544), np.float32))
    g1 = jnp.asarray(rng.standard_normal((batch, 512), np.float32))
    w = jnp.asarray(rng.standard_normal((12544, 512), np.float32) / 112)
    out: dict[str, Any] = {}
    for section, forms, args in (
        ("conv2_forward", _forward_forms(), (x, k)),
        ("conv2_input_gradient", _input_gradient_forms(), (g, k)),
        ("fc1", _fc1_forms(), (h, g1, w, w.T.copy())),
        ("fc1_inference", _fc1_inference_forms(), (h, w)),
    ):
        jitted = {name: jax.jit(f) for name, f in forms.items()}
        outs = {name: np.asarray(f(*args)) for name, f in jitted.items()}
        names = list(outs)
        # Each form against the section's first; fc1's (out, in) forms against their twins.
        ref_of = {
            n: names[i - i % 2] if section == "fc1" else names[0] for i, n in enumerate(names)
        }
        calls = {n: (lambda f=f, a=args: jax.block_until_ready(f(*a))) for n, f in jitted.items()}
        if section == "conv2_forward":
            calls["pytorch conv2d + relu, no_grad"] = _torch_conv2(x)
        if section == "fc1_inference":
            calls["pytorch linear, no_grad"] = _torch_fc1(h, w)
        ms = _median_ms(calls, reps, min_round_s)
        out[section] = {name: {"ms": ms[name]} for name in calls}
        for name in names:
            out[section][name]["max_abs_diff"] = _diff(outs[name], outs[ref_of[name]])
    return out


def _diff(got: np.ndarray, ref: np.ndarray) -> float:
    # A kernel gradient of an (out, in) kernel is the transpose of its (in, out) twin's.
    return float(np.max(np.abs((got.T if got.shape != ref.shape else got) - ref)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", default="1,32,256,1024")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--min-round-s", type=float, default=0.05, help="seconds per form per round")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    host.tune_malloc()
    torch.set_num_threads(2)
    command = f"scripts/kernel_forms.py --batch-sizes {args.batch_sizes} --reps {args.reps}"
    doc = record(f"{command} --min-round-s {args.min_round_s}", batches={})
    for b in (int(s) for s in args.batch_sizes.split(",")):
        doc["batches"][str(b)] = measure(b, args.reps, args.min_round_s)
        for section, forms in doc["batches"][str(b)].items():
            row = ", ".join(f"{n}: {v['ms']:.2f} ms" for n, v in forms.items())
            print(f"batch {b} {section}: {row}", flush=True)
    if args.json:
        write_json(doc, args.json)


if __name__ == "__main__":
    main()
