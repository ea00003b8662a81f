#!/usr/bin/env python3
"""The GPU check: environment, parity with PyTorch, ``jaxnet validate`` and the benchmark.

Run from the source tree (nothing is installed; the repository root goes on ``sys.path``)::

    JAXNET_DEVICE_OUT=out python3 scripts/device_check.py

Sections, each timed, capped (``SECTION_CAPS_S``, 7 minutes in all, about 4 on an H200) and
recorded with its error if it fails, the others running regardless:

* ``environment``: Python, package versions, JAX's devices, torch's CUDA, ``nvidia-smi``;
* ``parity``: the Net's outputs, loss, gradients and one SGD step of ``jaxnet.train_step``
  against PyTorch on the same device, float32 with TF32 off on both sides, each error
  judged against float32's own round-off there (PyTorch float32 vs PyTorch float64); and
  which kernels the compiled step gives its convolutions (cuDNN's custom calls on a GPU);
* ``parity_float64``: the same with jaxnet in float64 (``jax.enable_x64``) against PyTorch
  float64: equal semantics agree to ~1e-15, so this separates a real difference from
  float32 summation order;
* ``validate``, ``validate_float64``: ``jaxnet validate --steps 20`` (the library call) on the
  device, in float32 and with ``--precision float64``;
* ``bench_float32``, ``bench_bfloat16``: ``jaxnet bench`` at batches 1, 32, 256 and 1024
  against PyTorch CUDA eager and ``torch.compile`` (``bench.TORCH_COMPILE_OPTIONS``; its first
  call capped, skipped with the reason when it runs longer), in float32 (TF32 off) and with
  bfloat16 compute, each against the matmul peak in its own dtype.

Output, in the folder ``JAXNET_DEVICE_OUT`` names (default ``./device_check_out``):
``device_check.json`` (rewritten after every section and every benchmarked batch size, so a
run cut short keeps what it finished) and ``device_check.log`` (what it printed).

``--reduced`` (or ``JAXNET_DEVICE_CHECK_REDUCED=1``) runs every section tiny on the CPU in
seconds: ``tests/test_device_check.py`` runs it so that this script cannot rot.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SECTION_CAPS_S = {  # seconds: at most 7 minutes in all; about 4 on an H200
    "environment": 20,
    "parity": 45,
    "parity_float64": 30,
    "validate": 60,
    "validate_float64": 40,
    "bench_float32": 130,
    "bench_bfloat16": 100,
}
COMPILE_CAP_S = 40  # torch.compile's first call, per batch size
BATCH_SIZES = (1, 32, 256, 1024)
PACKAGES = (
    "jax",
    "jaxlib",
    "jax-cuda13-plugin",
    "jax-cuda12-plugin",
    "flax",
    "optax",
    "chex",
    "orbax-checkpoint",
    "numpy",
    "torch",
    "triton",
    "rich",
    "matplotlib",
    "scikit-learn",
    "safetensors",
    "pytest",
)


class SectionTimeout(BaseException):
    """A section ran past its cap. A ``BaseException``: no ``except Exception`` inside the
    section (the benchmark's skip of a failing variant) may swallow it."""


class Recorder:
    """The JSON document and the log, both rewritten as the run goes."""

    def __init__(self, out: Path, reduced: bool) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.json_path = out / "device_check.json"
        self.log_file = (out / "device_check.log").open("w", buffering=1)
        self.doc: dict[str, Any] = {
            "started_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "reduced": reduced,
            "section_caps_s": SECTION_CAPS_S,
            "sections": {},
        }
        self.t0 = time.perf_counter()

    def log(self, line: str) -> None:
        print(line, flush=True)
        self.log_file.write(line + "\n")

    def save(self) -> None:
        from jaxnet.bench import write_json

        self.doc["total_s"] = round(time.perf_counter() - self.t0, 2)
        write_json(self.doc, self.json_path)

    def section(self, name: str, cap_s: float, run: Callable[[dict[str, Any]], None]) -> None:
        """Run ``run(result)`` under its cap; ``result`` (filled as it goes) is kept whatever
        happens, with ``ok``, ``seconds`` and the error if any."""
        from jaxnet.bench import time_limit

        entry: dict[str, Any] = {"ok": False, "cap_s": cap_s, "result": {}}
        self.doc["sections"][name] = entry
        self.log(f"== {name} (cap {cap_s} s)")
        t = time.perf_counter()
        try:
            with time_limit(cap_s, SectionTimeout):
                run(entry["result"])
            entry["ok"] = True
        except (Exception, SectionTimeout) as e:
            entry["error"] = f"{type(e).__name__}: {e}"
            entry["traceback"] = traceback.format_exc(limit=8)
            self.log(f"   FAILED: {entry['error']}")
        entry["seconds"] = round(time.perf_counter() - t, 2)
        self.log(f"   {name}: {'ok' if entry['ok'] else 'error'} in {entry['seconds']} s")
        self.save()


# ---------------------------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------------------------


def environment(result: dict[str, Any]) -> None:
    import jax
    import torch

    versions = {}
    for name in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    result["python"] = platform.python_version()
    result["platform"] = platform.platform()
    result["versions"] = versions
    result["jax_backend"] = jax.default_backend()
    result["jax_devices"] = [f"{d.platform}:{d.device_kind}" for d in jax.devices()]
    stats = jax.devices()[0].memory_stats() or {}
    result["jax_memory_limit_gb"] = stats.get("bytes_limit", 0) / 2**30 or None
    result["torch_cuda"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        result["torch_cuda_version"] = torch.version.cuda
        result["torch_cudnn_version"] = torch.backends.cudnn.version()
        result["torch_device_name"] = torch.cuda.get_device_name(0)
    result["nvidia_smi"] = _nvidia_smi()


def _nvidia_smi() -> str | None:
    query = "name,driver_version,memory.total,clocks.max.sm,power.limit"
    try:
        done = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or done.stderr.strip() or None


# ---------------------------------------------------------------------------------------------
# parity
# ---------------------------------------------------------------------------------------------


def _torch_device(reduced: bool) -> str:
    import jax
    import torch

    on_gpu = jax.default_backend() != "cpu" and torch.cuda.is_available()
    return "cuda" if on_gpu and not reduced else "cpu"


@contextlib.contextmanager
def float32_everywhere() -> Iterator[None]:
    """Full float32 matmuls and convolutions in both frameworks: no TF32 on the GPU."""
    import jax
    import torch

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        with jax.default_matmul_precision("highest"):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _torch_one_step(start: Any, dtype: Any, device: str, x: Any, y: Any) -> dict[str, Any]:
    """PyTorch's outputs, loss, gradients and parameters after one SGD step, in ``dtype``."""
    import torch
    import torch.nn.functional as F

    from jaxnet.convert import nhwc_to_nchw

    net = copy.deepcopy(start).to(device, dtype)
    opt = torch.optim.SGD(net.parameters(), lr=PARITY_LR, momentum=PARITY_MOMENTUM)
    xt = torch.from_numpy(nhwc_to_nchw(x).copy()).to(device, dtype)
    out = net(xt)
    loss = F.cross_entropy(out, torch.from_numpy(y).long().to(device))
    loss.backward()
    grads = {k: p.grad.detach().cpu().numpy() for k, p in net.named_parameters()}
    opt.step()
    return {
        "outputs": {"logits": out.detach().cpu().numpy()},
        "loss": {"loss": loss.detach().cpu().numpy()},
        "grads": grads,
        "params": {k: p.detach().cpu().numpy() for k, p in net.named_parameters()},
    }


PARITY_LR, PARITY_MOMENTUM = 0.01, 0.9


def _jax_one_step(start: Any, x: Any, y: Any, dtype: Any = None) -> dict[str, Any]:
    """The same through jaxnet's public API: ``compute_grads`` (logits, gradients) and the
    README's ``TrainState.create`` + ``jaxnet.train_step`` (loss, new params); torch's layout.
    ``dtype`` float64 (under ``jax_enable_x64``): params and images in float64."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxnet
    from jaxnet import losses, optim, step

    dtype = dtype or np.float32
    state_dict = {k: v.cpu() for k, v in start.state_dict().items()}
    params = jaxnet.params_from_torch(state_dict, dtype=dtype)
    x = np.asarray(x, dtype)
    net = jaxnet.Net()
    state = jaxnet.TrainState.create(
        apply_fn=net.apply, params=params, tx=optim.sgd(PARITY_LR, momentum=PARITY_MOMENTUM)
    )
    batch = (jnp.asarray(x), jnp.asarray(y, jnp.int32))
    grads_fn = jax.jit(step.compute_grads, static_argnames=("apply_fn", "criterion"))
    grads, _, logits = grads_fn(params, net.apply, batch, losses.cross_entropy)
    new_state, metrics = jaxnet.train_step(state, batch)
    compiled = jaxnet.train_step.lower(
        state, batch, criterion=losses.cross_entropy, guard=False
    ).compile()
    return {
        "conv_kernels": _conv_kernels(compiled.as_text()),
        "outputs": {"logits": np.asarray(logits)},
        "loss": {"loss": np.asarray(metrics["loss"])},
        "grads": jaxnet.params_to_torch(grads, as_numpy=True),
        "params": jaxnet.params_to_torch(new_state.params, as_numpy=True),
        "device": str(next(iter(logits.devices()))),
    }


def _conv_kernels(hlo: str) -> dict[str, int]:
    """How the compiled step computes its convolutions: the custom calls (cuDNN's
    ``__cudnn$conv*`` on a GPU) and XLA's own convolution instructions, with their counts."""
    import collections
    import re

    calls = re.findall(r'custom_call_target="([^"]+)"', hlo)
    found = collections.Counter(c for c in calls if "conv" in c.lower())
    found["xla convolution instructions"] = len(re.findall(r"= \S+ convolution\(", hlo))
    return dict(found)


def _judge(runs: dict[str, Any]) -> dict[str, Any]:
    """Per tensor: max|jax - torch64|, torch float32's own max|torch32 - torch64| (the noise
    floor) and their ratio, the floor plus one float32 ulp at the tensor's scale below it."""
    import numpy as np

    eps = float(np.finfo(np.float32).eps)
    table = {}
    for group in ("outputs", "loss", "grads", "params"):
        for k, ref in runs["torch64"][group].items():
            ref = np.asarray(ref, np.float64)
            err = {
                name: float(np.max(np.abs(np.asarray(runs[name][group][k], np.float64) - ref)))
                for name in ("jax", "torch32")
            }
            scale = float(np.max(np.abs(ref)))
            table[f"{group}[{k}]"] = {
                "jax_vs_torch64_max_abs": err["jax"],
                "jax_vs_torch64_max_rel": err["jax"] / scale if scale else err["jax"],
                "floor_torch32_vs_torch64_max_abs": err["torch32"],
                "ratio_to_floor": err["jax"] / (err["torch32"] + eps * scale or 1.0),
            }
    return table


def _one_batch(reduced: bool) -> tuple[str, Any, Any, Any]:
    """The parity checks' torch device, batch (images NHWC float32, int64 labels) and start
    Net: 64 samples (4 reduced), seed 0."""
    import numpy as np

    from jaxnet.torch_reference import make_torch_net

    n = 4 if reduced else 64
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 32, 32, 1), dtype=np.float32)
    y = rng.integers(0, 2, n).astype(np.int64)
    return _torch_device(reduced), x, y, make_torch_net(0)


def parity(result: dict[str, Any], reduced: bool) -> None:
    import torch

    from jaxnet.validation import DEFAULT_STEP_FACTOR

    device, x, y, start = _one_batch(reduced)
    with float32_everywhere():
        runs = {
            "torch32": _torch_one_step(start, torch.float32, device, x, y),
            "torch64": _torch_one_step(start, torch.float64, device, x, y),
            "jax": _jax_one_step(start, x, y),
        }
    table = _judge(runs)
    worst = max(table, key=lambda k: table[k]["ratio_to_floor"])
    result.update(
        batch_size=len(x),
        torch_device=device,
        jax_device=runs["jax"]["device"],
        conv_kernels_of_train_step=runs["jax"]["conv_kernels"],
        precision="float32, TF32 off (torch allow_tf32 False; jax matmul precision highest)",
        limit=DEFAULT_STEP_FACTOR,
        worst=worst,
        worst_ratio=table[worst]["ratio_to_floor"],
        passed=table[worst]["ratio_to_floor"] <= DEFAULT_STEP_FACTOR,
        tensors=table,
    )


def parity_float64(result: dict[str, Any], reduced: bool) -> None:
    """jaxnet in float64 against PyTorch in float64 on the device: with equal semantics they
    agree to ~1e-15 relative, so anything larger is a real difference, not summation order."""
    import jax
    import numpy as np
    import torch

    device, x, y, start = _one_batch(reduced)
    with float32_everywhere(), jax.enable_x64(True):
        ours = _jax_one_step(start, x, y, np.float64)
        ref = _torch_one_step(start, torch.float64, device, x, y)
    table = {}
    for group in ("outputs", "loss", "grads", "params"):
        for k, r in ref[group].items():
            r = np.asarray(r, np.float64)
            a = np.asarray(ours[group][k])
            err = float(np.max(np.abs(a.astype(np.float64) - r)))
            scale = float(np.max(np.abs(r))) or 1.0
            table[f"{group}[{k}]"] = {"dtype": str(a.dtype), "max_abs": err, "max_rel": err / scale}
    worst = max(table, key=lambda k: table[k]["max_rel"])
    result.update(
        batch_size=len(x),
        torch_device=device,
        jax_device=ours["device"],
        conv_kernels_of_train_step=ours["conv_kernels"],
        limit_max_rel=FLOAT64_LIMIT,
        worst=worst,
        worst_max_rel=table[worst]["max_rel"],
        passed=table[worst]["max_rel"] <= FLOAT64_LIMIT
        and all(t["dtype"] == "float64" for t in table.values()),
        tensors=table,
    )


FLOAT64_LIMIT = 1e-12  # float64 round-off of these sums is ~1e-15 relative; float32's ~1e-7


# ---------------------------------------------------------------------------------------------
# validate
# ---------------------------------------------------------------------------------------------


def validate(result: dict[str, Any], reduced: bool, precision: str = "float32") -> None:
    from jaxnet.validation import ValidateConfig
    from jaxnet.validation import validate as run_validate

    config = ValidateConfig(
        steps=2 if reduced else 20,
        batch_size=4 if reduced else 32,
        device="cpu" if reduced else "auto",
        precision=precision,
    )
    report = run_validate(config)
    summary = report.to_dict()
    summary.pop("steps")  # per-step records: the drift and floor below are what judges them
    result.update(summary)
    result["drift"] = report.drift().tolist()
    result["noise_floor"] = report.noise_floor().tolist()
    result["verdict_lines"] = report.verdict_lines()


# ---------------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------------


def bench_summary(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per batch size: ms per step of each variant, each jaxnet variant's speed relative to
    what it is compared with (``jaxnet.bench.COMPARISONS``; >1: faster than PyTorch),
    first-call and compile seconds, and what was skipped."""
    from jaxnet.bench import COMPARISONS

    rows = []
    for r in results["batches"]:
        v = r["variants"]
        rows.append(
            {
                "batch_size": r["batch_size"],
                "ms": {k: 1e3 * x["median_step_s"] for k, x in v.items()},
                "first_call_s": {k: x["first_call_s"] for k, x in v.items()},
                "jax_compile_s": {k: x.get("compile_s") for k, x in v.items()},
                "skipped": r.get("skipped", {}),
                "speed_vs_torch_eager": {
                    ours: v[theirs]["median_step_s"] / v[ours]["median_step_s"]
                    for _, ours, theirs in COMPARISONS
                    if ours in v and theirs in v
                },
            }
        )
    return rows


def bench(result: dict[str, Any], dtype: str, reduced: bool, rec: Recorder) -> None:
    from jaxnet import bench as jbench

    if reduced:
        cfg = jbench.BenchConfig(
            batch_sizes=(2,),
            warmup=0,
            reps=1,
            min_rep_s=0.0,
            scan_steps=2,
            torch_compile=False,
            dtype=dtype,
            variants=("jax_step", "torch_step"),
            peak_size=256,
        )
    else:
        cfg = jbench.BenchConfig(
            batch_sizes=BATCH_SIZES,
            warmup=2,
            reps=5,
            min_rep_s=0.05,
            dtype=dtype,
            first_call_cap_s=COMPILE_CAP_S,
        )

    def on_batch(partial: dict[str, Any]) -> None:
        result.update(partial)
        result["summary"] = bench_summary(partial)
        rec.save()

    on_batch(jbench.run_bench(cfg, log=lambda line: rec.log("   " + line), on_batch=on_batch))
    rec.log(jbench.format_results(result))


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reduced", action="store_true", help="every section tiny, on the CPU")
    p.add_argument(
        "--out", help="output folder (default: $JAXNET_DEVICE_OUT or ./device_check_out)"
    )
    args = p.parse_args(argv)
    reduced = args.reduced or os.environ.get("JAXNET_DEVICE_CHECK_REDUCED") == "1"
    if reduced and "jax" not in sys.modules:  # a GPU machine's reduced run stays on the CPU
        os.environ["JAX_PLATFORMS"] = "cpu"
    out = Path(args.out or os.environ.get("JAXNET_DEVICE_OUT") or "device_check_out")
    rec = Recorder(out, reduced)
    caps = {k: (v if not reduced else 60) for k, v in SECTION_CAPS_S.items()}
    sections: dict[str, Callable[[dict[str, Any]], None]] = {
        "environment": environment,
        "parity": lambda r: parity(r, reduced),
        "parity_float64": lambda r: parity_float64(r, reduced),
        "validate": lambda r: validate(r, reduced),
        "validate_float64": lambda r: validate(r, reduced, "float64"),
        "bench_float32": lambda r: bench(r, "float32", reduced, rec),
        "bench_bfloat16": lambda r: bench(r, "bfloat16", reduced, rec),
    }
    for name, run in sections.items():
        rec.section(name, caps[name], run)
    ok = all(s["ok"] for s in rec.doc["sections"].values())
    rec.log(
        f"done in {rec.doc['total_s']} s; {'all sections ok' if ok else 'some sections failed'}"
    )
    rec.log(f"results: {rec.json_path}")
    rec.log_file.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
