"""Data-parallel throughput against device count: samples/s of one jaxnet train step
(``jaxnet.train_step`` over ``jaxnet.parallel``'s mesh) for 1, 2, 4, 8 devices.

    python scripts/scaling.py                        # 1, 2, 4, 8 CPU host devices, global batch 128
    python scripts/scaling.py --per-device-batch 32  # weak scaling: the batch grows with devices
    python scripts/scaling.py --json                 # one JSON document instead of the table
    python scripts/scaling.py --platform gpu --devices 1,2,4,8   # real accelerators

Each device count runs in its own process: host (CPU) devices are made with
``XLA_FLAGS=--xla_force_host_platform_device_count=N``, which must be set before jax starts.
On CPU the "devices" share the machine's cores, so the figures show the cost of sharding and
of the all-reduce, not a speed-up from more hardware. The PyTorch reference (same Net, batch
and SGD step, in the same run, ``torch.get_num_threads()`` threads) gives the scale; skip it
with ``--no-torch``. Timing: ``--warmup`` untimed steps (compilation), then the best of
``--repeats`` timings of ``--steps`` steps each, on one batch already on the devices (no input
pipeline).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's jaxnet, also when another one is installed


def _child(args: argparse.Namespace) -> dict:
    import jax
    import numpy as np

    from jaxnet import Net, create_train_state, losses, optim, train_step
    from jaxnet import parallel as par
    from jaxnet.examples.data_parallel import synthetic_dataset
    from jaxnet.model import init_params

    devices = jax.devices()
    if len(devices) < args.n:
        raise SystemExit(f"asked for {args.n} devices, {args.platform} has {len(devices)}")
    mesh = par.make_mesh(devices[: args.n])
    batch_size = args.global_batch
    par.check_batch_size(batch_size, mesh)
    net = Net()
    state = create_train_state(
        jax.random.key(0), net, optim.sgd(0.01, 0.9), init_params(net, jax.random.key(0))
    )
    state = par.replicate(state, mesh)
    batch = par.shard_batch(synthetic_dataset(batch_size), mesh)
    for _ in range(args.warmup):
        state, _ = train_step(state, batch, losses.cross_entropy)
    jax.block_until_ready(state)
    best = float("inf")
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = train_step(state, batch, losses.cross_entropy)
        jax.block_until_ready((state, metrics))
        best = min(best, (time.perf_counter() - start) / args.steps)
    assert np.isfinite(float(metrics["loss"]))
    return {
        "impl": "jaxnet",
        "devices": args.n,
        "mesh": par.describe_mesh(mesh),
        "platform": devices[0].platform,
        "global_batch": batch_size,
        "step_ms": best * 1e3,
        "samples_per_s": batch_size / best,
    }


def _torch(global_batch: int, steps: int, warmup: int, repeats: int) -> dict:
    import torch

    from jaxnet.convert import nhwc_to_nchw
    from jaxnet.examples.data_parallel import synthetic_dataset
    from jaxnet.torch_reference import make_torch_net

    net = make_torch_net(0)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    images, labels = synthetic_dataset(global_batch)
    # .copy(), not ascontiguousarray: with C=1 the transposed view counts as contiguous but keeps
    # strides that make torch treat it as channels_last, and TorchNet's .view() then fails.
    x = torch.from_numpy(nhwc_to_nchw(images).copy())
    y = torch.from_numpy(labels).long()

    def step() -> None:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()

    for _ in range(warmup):
        step()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        best = min(best, (time.perf_counter() - start) / steps)
    return {
        "impl": f"torch ({torch.get_num_threads()} threads)",
        "devices": 1,
        "mesh": "1 process",
        "platform": "cpu",
        "global_batch": global_batch,
        "step_ms": best * 1e3,
        "samples_per_s": global_batch / best,
    }


def _run_child(args: argparse.Namespace, n: int, global_batch: int) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    if args.platform == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
        flag = f"--xla_force_host_platform_device_count={n}"
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
    cmd = [
        sys.executable,
        __file__,
        "--child",
        str(n),
        "--global-batch-size",
        str(global_batch),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--repeats",
        str(args.repeats),
        "--platform",
        args.platform,
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        raise SystemExit(f"{n} devices failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", default="1,2,4,8", help="comma-separated device counts")
    p.add_argument(
        "--global-batch-size", type=int, default=128, help="fixed global batch (strong scaling)"
    )
    p.add_argument(
        "--per-device-batch", type=int, default=None, help="batch per device instead (weak scaling)"
    )
    p.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--platform",
        default="cpu",
        help="cpu: host devices made with XLA_FLAGS; gpu/tpu: the real devices",
    )
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    p.add_argument("--timeout", type=int, default=600, help="seconds per device count")
    p.add_argument("--json", action="store_true")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child is not None:
        args.n, args.global_batch = args.child, args.global_batch_size
        print(json.dumps(_child(args)))
        return 0

    counts = [int(c) for c in args.devices.split(",")]
    rows = []
    for n in counts:
        batch = args.per_device_batch * n if args.per_device_batch else args.global_batch_size
        rows.append(_run_child(args, n, batch))
    base = rows[0]["samples_per_s"]
    for r in rows:
        r["vs_first"] = r["samples_per_s"] / base
    if not args.no_torch:
        batch = args.per_device_batch or args.global_batch_size
        t = _torch(batch, args.steps, args.warmup, args.repeats)
        t["vs_first"] = t["samples_per_s"] / base
        rows.append(t)
    info = {
        "cpu_count": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
        "command": " ".join(["python", "scripts/scaling.py", *sys.argv[1:]]),
    }
    if args.json:
        print(json.dumps({"machine": info, "rows": rows}, indent=2))
        return 0
    print(f"{info['command']}  ({info['cpu_count']} CPUs, load average {info['load_avg_1m']:.1f})")
    print(
        f"{'impl':<20} {'mesh':<24} {'batch':>6} {'step ms':>9} {'samples/s':>10} "
        f"{'vs ' + str(counts[0]) + ' dev':>9}"
    )
    for r in rows:
        print(
            f"{r['impl']:<20} {r['mesh']:<24} {r['global_batch']:>6} {r['step_ms']:>9.1f} "
            f"{r['samples_per_s']:>10.0f} {r['vs_first']:>9.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
