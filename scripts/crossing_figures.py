"""Measure optimizer-state crossing on the tutorial Net, and write
``benchmarks/optstate-crossing.json``.

Per optimizer case, on the same fixed batches (16 random 32x32 images, 2 classes,
cross-entropy), each framework computing its own gradients:

* ``torch_to_jaxnet``: torch trains K steps, its ``optimizer.state_dict()`` crosses with
  ``jaxnet.opt_state_from_torch``, jaxnet trains M more; distance from torch's own K+M run;
* ``jaxnet_to_torch``: jaxnet trains K steps, its state crosses with
  ``jaxnet.opt_state_to_torch`` (and ``torch_scheduler_state``), torch trains M more;
  distance from jaxnet's own K+M run;
* ``no_crossing``: jaxnet's own K+M run from torch's own (the two frameworks' gradients
  differ in round-off, which training carries along: the reference for the two above);

in float64 (``jax_enable_x64``, torch default dtype float64) and float32, next to the float32
noise floor (torch float32 vs torch float64 after K+M steps). Distances: max over tensors of
``max|a - b| / max|b|`` of the final weights.

Usage: ``python scripts/crossing_figures.py [--k 5] [--m 5] [--out ...]``; ``--markdown``
prints the table of an existing ``--out`` for docs/crossing.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import platform
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's jaxnet, also when another one is installed

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402

from jaxnet import optim, schedules, step  # noqa: E402
from jaxnet.convert import nchw_to_nhwc, params_from_torch, params_to_torch  # noqa: E402
from jaxnet.criteria import criterion  # noqa: E402
from jaxnet.model import Net  # noqa: E402
from jaxnet.optstate import (  # noqa: E402
    opt_state_from_torch,
    opt_state_to_torch,
    torch_scheduler_state,
)
from jaxnet.torch_reference import make_torch_net, torch_default_dtype  # noqa: E402

CASES = [
    ("sgd", {"lr": 0.05, "momentum": 0.9, "dampening": 0.5, "weight_decay": 1e-2}, None, {}),
    ("sgd", {"lr": 0.05, "momentum": 0.9, "nesterov": True}, "step_lr", {"step_size": 3}),
    ("adam", {"lr": 2e-3, "betas": (0.8, 0.99), "eps": 1e-6, "amsgrad": True}, None, {}),
    ("adamw", {"lr": 1e-3}, "one_cycle_lr", {"total_steps": 40}),
    ("rmsprop", {"lr": 1e-3, "centered": True, "momentum": 0.9}, None, {}),
    ("adagrad", {"lr": 1e-2, "lr_decay": 0.01}, None, {}),
    ("adamax", {"lr": 2e-3}, None, {}),
    ("nadam", {"lr": 2e-3, "decoupled_weight_decay": True, "weight_decay": 1e-2}, None, {}),
    ("radam", {"lr": 1e-3}, None, {}),
    ("adadelta", {"lr": 1.0}, None, {}),
]
CRITERION = criterion("cross_entropy")
NET = Net()
GRADS = jax.jit(step.compute_grads, static_argnames=("apply_fn", "criterion"))


@contextlib.contextmanager
def precision(dtype: torch.dtype):
    """float64: jax x64 and torch's default dtype (its step counts, NAdam's mu_product)."""
    with torch_default_dtype(dtype), jax.enable_x64(dtype == torch.float64):
        yield


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [
        (torch.randn(16, 1, 32, 32, generator=gen), torch.randint(0, 2, (16,), generator=gen))
        for _ in range(n)
    ]


def torch_run(spec: optim.OptimizerSpec, dtype: torch.dtype, weights: dict[str, Any]):
    net = make_torch_net(0, dtype=dtype)
    net.load_state_dict({k: torch.as_tensor(np.asarray(v)).to(dtype) for k, v in weights.items()})
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.options.items()}
    opt = getattr(torch.optim, optim.TORCH_CLASSES[spec.name])(net.parameters(), **options)
    sched = None
    if spec.schedule is not None:
        cls = getattr(torch.optim.lr_scheduler, schedules.TORCH_CLASSES[spec.schedule])
        sched = cls(opt, **spec.schedule_options)
    return net, opt, sched


def torch_steps(run, data) -> dict[str, np.ndarray]:
    net, opt, sched = run
    for x, t in data:
        opt.zero_grad()
        CRITERION.torch(net(x.to(next(net.parameters()).dtype)), t).backward()
        opt.step()
        if sched is not None:
            sched.step()
    return {k: v.detach().double().numpy().copy() for k, v in net.state_dict().items()}


def jax_steps(tx, params, state, data):
    update = jax.jit(lambda p, s, g: _apply(tx, p, s, g))
    dtype = jax.tree.leaves(params)[0].dtype
    for x, t in data:
        batch = (jax.numpy.asarray(nchw_to_nhwc(x.numpy()), dtype), jax.numpy.asarray(t.numpy()))
        grads, _, _ = GRADS(params, NET.apply, batch, CRITERION)
        params, state = update(params, state, grads)
    return params, state


def _apply(tx, params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state


def rel(a: dict, b: dict) -> float:
    return max(float(np.max(np.abs(a[n] - b[n])) / np.max(np.abs(b[n]))) for n in b)


def as_torch(params) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float64) for k, v in params_to_torch(params, as_numpy=True).items()}


def crossings(spec: optim.OptimizerSpec, dtype: torch.dtype, k: int, m: int) -> dict[str, Any]:
    """Both directions in one precision; the final weights of torch's own run too."""
    data, np_dtype = batches(k + m), (np.float64 if dtype == torch.float64 else np.float32)
    initial = make_torch_net(0).state_dict()
    tx = optim.transform(spec)
    with precision(dtype):
        run = torch_run(spec, dtype, initial)
        weights = torch_steps(run, data[:k])
        saved = copy.deepcopy(run[1].state_dict())
        torch_full = torch_steps(run, data[k:])
        params = params_from_torch(weights, dtype=np_dtype)
        state = opt_state_from_torch(saved, spec, params, step=k)
        forward, _ = jax_steps(tx, params, state, data[k:])

        params = params_from_torch(initial, dtype=np_dtype)
        params, state = jax_steps(tx, params, tx.init(params), data[:k])
        run = torch_run(spec, dtype, as_torch(params))
        run[1].load_state_dict(opt_state_to_torch(state, spec, params, step=k))
        if run[2] is not None:
            run[2].load_state_dict(torch_scheduler_state(spec, k))
        back = torch_steps(run, data[k:])
        jax_full, _ = jax_steps(tx, params, state, data[k:])
    return {
        "torch_to_jaxnet": rel(as_torch(forward), torch_full),
        "jaxnet_to_torch": rel(back, as_torch(jax_full)),
        "no_crossing": rel(as_torch(jax_full), torch_full),
        "torch_final": torch_full,
    }


def measure(case: tuple, k: int, m: int) -> dict[str, Any]:
    name, options, schedule, schedule_options = case
    spec = optim.resolve(name, options, schedule, schedule_options)
    f64 = crossings(spec, torch.float64, k, m)
    f32 = crossings(spec, torch.float32, k, m)
    return {
        "optimizer": name,
        "options": {k_: list(v) if isinstance(v, tuple) else v for k_, v in options.items()},
        "schedule": schedule,
        "schedule_options": schedule_options,
        "float64": {d: f64[d] for d in ("torch_to_jaxnet", "jaxnet_to_torch", "no_crossing")},
        "float32": {d: f32[d] for d in ("torch_to_jaxnet", "jaxnet_to_torch", "no_crossing")},
        "torch_float32_floor": rel(f32["torch_final"], f64["torch_final"]),
    }


def case_name(r: dict[str, Any]) -> str:
    opts = ", ".join(f"{k}={v}" for k, v in r["options"].items())
    sched = f" + {r['schedule']}({r['schedule_options']})" if r["schedule"] else ""
    return f"{r['optimizer']}({opts}){sched}"


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| optimizer and schedule | float64 torch→jaxnet | float64 jaxnet→torch "
        "| float64 jaxnet vs torch, no crossing | float32 torch→jaxnet | float32 jaxnet→torch "
        "| torch float32 vs float64 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [
            r["float64"]["torch_to_jaxnet"],
            r["float64"]["jaxnet_to_torch"],
            r["float64"]["no_crossing"],
            r["float32"]["torch_to_jaxnet"],
            r["float32"]["jaxnet_to_torch"],
            r["torch_float32_floor"],
        ]
        lines.append(f"| `{case_name(r)}` | " + " | ".join(f"{c:.1e}" for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--m", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/optstate-crossing.json"))
    parser.add_argument("--markdown", action="store_true", help="print the table of --out")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.out.read_text())["rows"]))
        return
    torch.set_num_threads(1)
    rows = []
    for case in CASES:
        rows.append(measure(case, args.k, args.m))
        print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    record = {
        "what": f"optimizer state crossing on the tutorial Net: K={args.k} steps in one "
        f"framework, M={args.m} in the other, against the first framework's own K+M-step run "
        "(max over tensors of max|a - b| / max|b| of the final weights); batches of 16 random "
        "images, cross_entropy",
        "date": datetime.date.today().isoformat(),
        "command": f"python scripts/crossing_figures.py --k {args.k} --m {args.m}",
        "versions": {
            "jax": jax.__version__,
            "optax": optax.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "k": args.k,
        "m": args.m,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
