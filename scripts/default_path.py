#!/usr/bin/env python3
"""The README's own usage against PyTorch eager, before and after, in one run.

The jaxnet side calls only the public API, as a user's script does: ``TrainState.create``,
then ``jaxnet.train_step`` in a loop, ``jaxnet.eval_step``, and ``jaxnet.inference.predict_logits``
(nothing else: no ``tune_malloc``, no donated step). The PyTorch side is the tutorial's loop:
``zero_grad(); cross_entropy(net(x), y).backward(); opt.step()`` with ``SGD(lr, momentum=0.9)``,
its ``no_grad`` evaluation (forward and loss) and its ``no_grad`` forward.

Each build runs in its own process (malloc settings are per process), with every variant of a
batch size interleaved (A, B, C, A, B, C, ...) so that load from elsewhere hits them alike:

* ``before``: the tree of commit ``--before`` (default 9d8691e, ``git archive`` into /tmp);
* ``after``: this tree;
* ``PyTorch alone``: PyTorch's side only, in a process that never tunes malloc
  (``JAXNET_TUNE_MALLOC=0``), as a PyTorch user's own script runs. Beside jaxnet, PyTorch gets
  jaxnet's malloc settings too, which spare it page faults at large batches.

    python3 scripts/default_path.py                       # batches 1,32,256,1024
    python3 scripts/default_path.py --json benchmarks/default-path.json

Prints markdown tables of speed ratios (PyTorch time / jaxnet time: >1 means jaxnet is
faster), step times, first-call (compile) times and the compile share of a default run, and
this tree against PyTorch alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _measure import size_round, time_interleaved

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "9d8691e"


def _data(batch_size: int, seed: int) -> tuple[Any, Any]:
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch_size, 32, 32, 1), dtype=np.float32)
    return x, rng.integers(0, 2, batch_size).astype(np.int32)


def _torch_variants(batch_size: int, seed: int = 0) -> tuple[dict[str, Any], Any]:
    """PyTorch's side: (name -> (one call, sync), back to the first weights)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from jaxnet.torch_reference import make_torch_net

    x, y = _data(batch_size, seed)
    net = make_torch_net(seed)
    first_weights = {k: v.clone() for k, v in net.state_dict().items()}
    # .copy(): standard NCHW strides (the transposed view with C=1 would look channels_last)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    yt = torch.from_numpy(y.astype(np.int64))
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

    def torch_step() -> Any:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(xt), yt)
        loss.backward()
        opt.step()
        return loss

    eval_net = make_torch_net(seed)

    def torch_eval() -> Any:
        with torch.no_grad():
            return F.cross_entropy(eval_net(xt), yt)

    def torch_forward() -> Any:
        with torch.no_grad():
            return eval_net(xt)

    def reset() -> None:  # every round from the first weights (see time_interleaved)
        net.load_state_dict(first_weights)
        opt.state.clear()

    done = lambda o: None  # noqa: E731
    calls = {
        "torch_step": (torch_step, done),
        "torch_eval": (torch_eval, done),
        "torch_forward": (torch_forward, done),
    }
    return calls, reset


def _jax_variants(batch_size: int, seed: int = 0) -> tuple[dict[str, Any], Any]:
    """jaxnet's side, through the public API only, from the same weights and data."""
    import jax
    import jax.numpy as jnp

    import jaxnet
    from jaxnet.torch_reference import make_torch_net

    x, y = _data(batch_size, seed)
    net = jaxnet.Net()
    params = jaxnet.params_from_torch(make_torch_net(seed).state_dict())
    first_state = jaxnet.TrainState.create(
        apply_fn=net.apply, params=params, tx=jaxnet.optim.sgd(0.01, momentum=0.9)
    )
    box = [first_state]
    batch = (jnp.asarray(x), jnp.asarray(y))

    def jax_step() -> Any:
        box[0], metrics = jaxnet.train_step(box[0], batch)
        return metrics["loss"]

    def reset() -> None:
        box[0] = first_state

    calls = {
        "jax_train_step": (jax_step, jax.block_until_ready),
        "jax_eval_step": (
            lambda: jaxnet.eval_step(first_state, batch)["loss"],
            jax.block_until_ready,
        ),
    }
    # Builds before jaxnet.inference have none (an installed jaxnet must not fill the gap).
    if (Path(jaxnet.__file__).parent / "inference.py").exists():
        from jaxnet.inference import predict_logits

        calls["jax_predict_logits"] = (
            lambda: predict_logits(params, batch[0]),
            jax.block_until_ready,
        )
    return calls, reset


def _variants(batch_size: int, torch_alone: bool) -> tuple[dict[str, Any], Any]:
    """(name -> (one call, sync), back to the first weights): both sides interleaved, or
    PyTorch's alone."""
    torch_calls, torch_reset = _torch_variants(batch_size)
    if torch_alone:
        return torch_calls, torch_reset
    jax_calls, jax_reset = _jax_variants(batch_size)

    def reset() -> None:
        jax_reset()
        torch_reset()

    return {**jax_calls, **torch_calls}, reset


def _measure(
    batch_size: int, reps: int, min_rep_s: float, torch_alone: bool = False
) -> dict[str, Any]:
    variants, reset = _variants(batch_size, torch_alone)
    sized = {name: size_round(run, sync, min_rep_s) for name, (run, sync) in variants.items()}
    times = time_interleaved(variants, {n: c for n, (_, c) in sized.items()}, reps, reset)
    return {
        name: {
            "median_ms": 1e3 * statistics.median(v),
            "min_ms": 1e3 * min(v),
            "first_call_s": sized[name][0],
        }
        for name, v in times.items()
    }


def default_run() -> dict[str, Any] | None:
    """``jaxnet train``'s default run (``train_and_evaluate(TrainConfig())``: digits, 8 epochs
    of batch 32) in a fresh process: wall seconds and JAX's compile seconds within them."""
    import importlib

    import jaxnet

    bench = importlib.import_module("jaxnet.bench")
    if not hasattr(bench, "compile_seconds"):
        return None  # builds without it: not measured
    with tempfile.TemporaryDirectory() as workdir, bench.compile_seconds() as compiling:
        t = time.perf_counter()
        jaxnet.train_and_evaluate(jaxnet.TrainConfig(progress=False), workdir)
        wall = time.perf_counter() - t
    return {"wall_s": wall, "compile_s": compiling["total"], "share": compiling["total"] / wall}


def child(args: argparse.Namespace) -> None:
    """Measure this build (the one on sys.path), or PyTorch alone, and print one JSON line."""
    import jax
    import torch

    import jaxnet

    # First: a fresh process, as `jaxnet train` starts.
    run = None if args.torch_alone else default_run()
    results = {
        str(b): _measure(b, args.reps, args.min_rep_s, args.torch_alone) for b in args.batch_sizes
    }
    status = getattr(getattr(jaxnet, "host", None), "malloc_status", None)
    describe = getattr(getattr(jaxnet, "host", None), "cpu_description", None)
    print(
        json.dumps(
            {
                "jaxnet": str(Path(jaxnet.__file__).parent),
                "jax": jax.__version__,
                "torch": torch.__version__,
                "torch_threads": torch.get_num_threads(),
                "malloc": status()
                if status
                else "not tuned (this build never tunes it in a user's script)",
                "cpu": describe() if describe else None,
                "batches": results,
                "default_run": run,
            }
        )
    )


def _before_tree(rev: str) -> Path:
    """``rev``'s jaxnet package, from ``git archive``, in a temporary folder named by its
    commit (so ``--before HEAD`` follows new commits), extracted whole or not at all."""
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--verify", f"{rev}^{{commit}}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    dest = Path(tempfile.gettempdir()) / f"jaxnet-{commit}"
    if not dest.exists():
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", commit, "jaxnet"], capture_output=True, check=True
        ).stdout
        partial = Path(tempfile.mkdtemp(prefix=f"jaxnet-{commit[:12]}-", dir=dest.parent))
        subprocess.run(["tar", "-x", "-C", str(partial)], input=archive, check=True)
        partial.rename(dest)
    return dest


def _run_child(tree: Path, args: argparse.Namespace, torch_alone: bool = False) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    argv = [sys.executable, str(Path(__file__).resolve()), "--child"]
    argv += ["--batch-sizes", ",".join(map(str, args.batch_sizes))]
    argv += ["--reps", str(args.reps), "--min-rep-s", str(args.min_rep_s)]
    if torch_alone:  # as a PyTorch user's script runs: glibc's malloc as it comes
        env["JAXNET_TUNE_MALLOC"] = "0"
        argv.append("--torch-alone")
    done = subprocess.run(argv, env=env, cwd=tree, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _ratio(r: dict[str, Any], jax_name: str, torch_name: str) -> str:
    if jax_name not in r or torch_name not in r:
        return "-"
    return f"{r[torch_name]['median_ms'] / r[jax_name]['median_ms']:.2f}x"


def _ms(r: dict[str, Any], *names: str) -> str:
    return " / ".join(f"{r[n]['median_ms']:.2f}" if n in r else "-" for n in names)


def _row(build: str, b: str, r: dict[str, Any]) -> str:
    first = " / ".join(f"{r[n]['first_call_s']:.2f}" for n in ("jax_train_step", "jax_eval_step"))
    return (
        f"| {build} | {b} | {_ratio(r, 'jax_train_step', 'torch_step')} "
        f"| {_ratio(r, 'jax_eval_step', 'torch_eval')} "
        f"| {_ratio(r, 'jax_predict_logits', 'torch_forward')} "
        f"| {_ms(r, 'jax_train_step', 'torch_step')} "
        f"| {_ms(r, 'jax_eval_step', 'jax_predict_logits', 'torch_forward')} | {first} |"
    )


def table(runs: dict[str, dict[str, Any]]) -> str:
    """Speed ratios (PyTorch time / jaxnet time) and times, one row per build and batch."""
    lines = [
        "| build | batch | train_step / torch step | eval_step / torch eval | predict_logits / "
        "torch forward | ms: train_step / torch step | ms: eval_step / predict_logits / torch "
        "forward | first call s: train_step / eval_step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for build, run in runs.items():
        lines += [_row(build, b, r) for b, r in run["batches"].items()]
    return "\n".join(lines)


def alone_table(after: dict[str, Any], alone: dict[str, Any]) -> str:
    """This tree against PyTorch in a process of its own (glibc's malloc as it comes, as in a
    PyTorch user's script), and that PyTorch's times against the one beside jaxnet."""
    lines = [
        "| batch | train_step / torch step alone | eval_step / torch eval alone | predict_logits "
        "/ torch forward alone | ms: torch step beside jaxnet / alone | ms: torch forward "
        "beside jaxnet / alone |",
        "|---|---|---|---|---|---|",
    ]
    for b, r in after["batches"].items():
        t = {**r, **{f"{k} alone": v for k, v in alone["batches"][b].items()}}
        lines.append(
            f"| {b} | {_ratio(t, 'jax_train_step', 'torch_step alone')} "
            f"| {_ratio(t, 'jax_eval_step', 'torch_eval alone')} "
            f"| {_ratio(t, 'jax_predict_logits', 'torch_forward alone')} "
            f"| {_ms(t, 'torch_step', 'torch_step alone')} "
            f"| {_ms(t, 'torch_forward', 'torch_forward alone')} |"
        )
    return "\n".join(lines)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", default="1,32,256,1024")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--min-rep-s", type=float, default=0.2)
    p.add_argument("--before", default=BEFORE, help="the commit measured as 'before'")
    p.add_argument("--json", help="also write both runs as JSON here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--torch-alone", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.batch_sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.child:
        child(args)
        return 0
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    runs = {
        f"before ({args.before})": _run_child(_before_tree(args.before), args),
        "after (this tree)": _run_child(ROOT, args),
    }
    alone = _run_child(ROOT, args, torch_alone=True)
    cpu = runs["after (this tree)"].get("cpu")
    if cpu:
        print(f"CPU: {cpu['model']} ({cpu['id']}), {' '.join(cpu['vector_isa'])}")
    print(table(runs))
    print("\nPyTorch alone (a process of its own, glibc's malloc as it comes):\n")
    print(alone_table(runs["after (this tree)"], alone))
    for build, run in runs.items():
        if run.get("default_run"):
            d = run["default_run"]
            print(
                f"{build}: default run (jaxnet train's defaults) {d['wall_s']:.1f} s, of which "
                f"JAX compiling {d['compile_s']:.1f} s ({100 * d['share']:.0f}%)"
            )
    if args.json:
        doc = {
            "date": started,
            "command": " ".join(sys.argv),
            "runs": runs,
            "pytorch_alone": alone,
            "cpu_count": os.cpu_count(),
            "cpu": cpu,
        }
        from jaxnet.bench import write_json

        write_json(doc, args.json)
        print(f"written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
