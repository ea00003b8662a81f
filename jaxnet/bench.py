"""Training-step benchmark: jaxnet against PyTorch (eager and ``torch.compile``), same run.

Everything is measured in one process on the same data, with the repetitions of all variants
interleaved (variant A, B, C, A, B, C, ...), so that load from other processes hits every
variant alike and the *ratios* stay meaningful on a busy machine; absolute figures do not.

Variants per batch size (PyTorch ones only when torch is installed):

* ``jax_step``: ``jaxnet.train_step`` (the default, non-donating step);
* ``jax_donated``: ``step.train_step_donated`` (updates the state in place);
* ``jax_scan``: ``jaxnet.train_steps`` over a stack of ``scan_steps`` batches, per step;
* ``jax_eval``: ``step.eval_step`` (forward, loss, accuracy);
* ``jax_fc1_matmuls``: fc1's three matmuls alone (forward ``a @ W``, input gradient
  ``g @ W.T``, kernel gradient ``a.T @ g``). Every training step of this network does them, and
  they are ~85% of its FLOPs, so ``torch_step`` time / this time bounds the speed-up over
  PyTorch that any XLA step could reach on this machine (the "ceiling" column);
* ``torch_step``: ``zero_grad(); cross_entropy(net(x), y).backward(); opt.step()`` with
  ``torch.optim.SGD(lr, momentum=0.9)``; ``torch_eval``: its forward and loss under
  ``no_grad``;
* ``compile_step``: the same step with ``torch.compile(net)``, skipped with the reason printed
  if compiling fails here.

FLOPs are counted analytically (``net_flops``: multiply-adds of the convolutions and dense
layers as 2 FLOPs, backward = 2x forward except conv1's unneeded input gradient; bias, ReLU,
loss and optimizer work not counted). The matmul peak is the rate of a large float32 ``jnp``
matmul measured in the same run (the fastest of 7). Peak memory on CPU is the growth of the
process' peak resident set (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``) over the
variant's first calls: a lower bound, since allocators reuse memory freed by earlier variants;
on GPU it is the framework's device allocator peak. For jaxnet, XLA's buffer assignment of the
compiled step (arguments + outputs + temporaries - donated) is reported too: exact, and
comparable across machines.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import signal
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxnet import host, inference, optim, step
from jaxnet.convert import params_from_torch
from jaxnet.io import atomic_write
from jaxnet.model import Net, init_params

__all__ = [
    "BenchConfig",
    "format_results",
    "matmul_peak_gflops",
    "FC1_TRAIN_FLOPS_PER_SAMPLE",
    "net_flops",
    "COMPARISONS",
    "compile_seconds",
    "run_bench",
    "time_limit",
    "write_json",
]

DEFAULT_BATCH_SIZES = (1, 8, 32, 128, 256, 1024)
TORCH_COMPILE_OPTIONS = {"mode": "default", "dynamic": False}
"""``torch.compile``'s arguments: the default mode, and one static-shape graph per batch size
(compiled in that batch size's first call, after ``torch._dynamo.reset()``), as a training
script with one batch size gets."""


@dataclass(frozen=True)
class BenchConfig:
    """What to run. Times are per repetition; a repetition runs enough steps to last
    ``min_rep_s`` (at least one)."""

    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    warmup: int = 2
    reps: int = 7
    min_rep_s: float = 0.2
    scan_steps: int = 8
    torch: bool = True
    torch_compile: bool = True
    dtype: str = "float32"  # or "bfloat16": Net(dtype=bfloat16) / torch.autocast(bfloat16)
    lr: float = 0.001
    momentum: float = 0.9
    seed: int = 0
    variants: tuple[str, ...] = field(default=())  # empty: all available
    # A variant whose first call (compilation included) runs longer is dropped, for this and
    # every later batch size, with the reason in the results' "skipped" (None: no cap).
    first_call_cap_s: float | None = None
    peak_size: int | None = None  # matmul_peak_gflops' n (None: 2048 on CPU, 8192 on GPU)

    def __post_init__(self) -> None:
        if not self.batch_sizes or any(int(b) < 1 for b in self.batch_sizes):
            raise ValueError(f"batch sizes must be positive integers, got {self.batch_sizes}.")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}.")
        if self.reps < 1 or self.warmup < 0 or self.scan_steps < 1:
            raise ValueError("reps and scan_steps must be >= 1 and warmup >= 0.")
        if self.first_call_cap_s is not None and not self.first_call_cap_s > 0:
            raise ValueError(f"first_call_cap_s must be positive, got {self.first_call_cap_s}.")


FC1_TRAIN_FLOPS_PER_SAMPLE = 3 * 2 * 12544 * 512  # forward, input and kernel gradient


def net_flops(batch_size: int, num_classes: int = 2, train: bool = True) -> int:
    """FLOPs of the tutorial ``Net`` on ``batch_size`` images, counted analytically.

    Forward: 2 FLOPs per multiply-add of conv1 (30*30*6 outputs x 9), conv2 (28*28*16 x 54),
    fc1 (12544 x 512), fc2 (512 x 64) and fc3 (64 x num_classes). ``train=True`` adds the
    backward pass: the weight gradient and the input gradient of each layer (2x its forward),
    except conv1's input gradient, which training does not need. Elementwise work is ignored.
    """
    conv1 = 2 * 30 * 30 * 6 * 9
    conv2 = 2 * 28 * 28 * 16 * 54
    dense = 2 * (12544 * 512 + 512 * 64 + 64 * num_classes)
    forward = conv1 + conv2 + dense
    total = 3 * forward - conv1 if train else forward
    return batch_size * total


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------


def _on_gpu() -> bool:
    return jax.default_backend() != "cpu"


COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
"""The ``jax.monitoring`` duration events whose sum is JAX's compile time: tracing to a
jaxpr, lowering it to StableHLO, and XLA's compilation."""


@contextlib.contextmanager
def compile_seconds() -> Iterator[dict[str, float]]:
    """Seconds JAX spends compiling inside the block, per ``COMPILE_EVENTS`` entry and in
    ``"total"`` (filled in as it goes; read it after the block). Only this thread's
    compilations count: JAX reports each in the thread that compiles, and another thread's
    would not be part of the timed call."""
    totals = dict.fromkeys((*COMPILE_EVENTS, "total"), 0.0)
    owner = threading.get_ident()

    def listener(event: str, duration: float, **kwargs: Any) -> None:
        if event in COMPILE_EVENTS and threading.get_ident() == owner:
            totals[event] += duration
            totals["total"] += duration

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield totals
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


class FirstCallTimeout(Exception):
    """A variant's first call ran past ``BenchConfig.first_call_cap_s``."""


@contextlib.contextmanager
def time_limit(seconds: float | None, error: Callable[[str], BaseException]) -> Iterator[None]:
    """Raise ``error(message)`` in the block if it runs longer than ``seconds``.

    A ``SIGALRM`` timer, so it interrupts Python code (``torch.compile``'s tracing and code
    generation) but not one long C call (an XLA compilation), which it interrupts when the
    call returns. No limit where there is none to set: ``seconds`` None, off the main thread,
    or without ``SIGALRM`` (Windows). Nested limits: the outer one keeps its own deadline
    (an inner limit that would end later than it changes nothing).
    """
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if seconds is None or not usable:
        yield
        return
    start = time.monotonic()
    outer_left, _ = signal.getitimer(signal.ITIMER_REAL)
    if 0 < outer_left <= seconds:
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise error(f"ran past its limit of {seconds:g} s")

    old_handler = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if outer_left > 0:  # give the outer limit back what is left of it
            left = outer_left - (time.monotonic() - start)
            signal.setitimer(signal.ITIMER_REAL, max(left, 1e-3))


def matmul_peak_gflops(n: int | None = None, reps: int = 7, dtype: str = "float32") -> float:
    """GFLOP/s of an ``n x n`` ``jnp`` matmul in ``dtype`` (float32 at full precision, or
    bfloat16; n: 2048 on CPU, 8192 on GPU), from the fastest of ``reps`` runs: a peak, which a
    moment of load from elsewhere must not lower."""
    n = n or (8192 if _on_gpu() else 2048)
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
    matmul = jax.jit(lambda a, b: jnp.matmul(a, b, precision="highest"))
    matmul(a, a).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        matmul(a, a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times) / 1e9


def _proc_status_bytes(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmHWM``, ``VmRSS``) in bytes; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class _Memory:
    """Peak memory growth while running some calls: device allocator peak on GPU, process
    peak RSS on CPU (Linux only; ``None`` elsewhere)."""

    def __init__(self, framework: str) -> None:
        self.framework = framework
        self.start: int | None = None

    def __enter__(self) -> _Memory:
        gc.collect()
        if _on_gpu() and self.framework == "jax":
            stats = jax.devices()[0].memory_stats() or {}
            self.start = stats.get("bytes_in_use")
        elif self.framework == "torch" and _torch_device() == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current RSS
                self.start = _proc_status_bytes("VmRSS")
            except OSError:
                self.start = None
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def peak_mb(self) -> float | None:
        if self.start is None:
            return None
        if _on_gpu() and self.framework == "jax":
            peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
        elif self.framework == "torch" and _torch_device() == "cuda":
            import torch

            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _proc_status_bytes("VmHWM")
        return None if peak is None else max(peak - self.start, 0) / 2**20


def _torch_device() -> str:
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class _Variant:
    name: str
    framework: str  # "jax" or "torch"
    run: Callable[[], Any]  # one step (or one scan of scan_steps steps); returns a waitable
    sync: Callable[[Any], None]
    steps_per_call: int = 1
    calls_per_rep: int = 1
    compile_s: float = math.nan  # the first call, compilation included
    jax_compile_s: float | None = None  # of which JAX compiling (jax variants)
    peak_mb: float | None = None
    xla_memory: Callable[[], float | None] | None = None  # jax: XLA's own figure, in MB
    xla_mb: float | None = None
    times: list[float] = field(default_factory=list)
    # Back to the first weights and optimizer state, before every rep (see _bench_batch).
    reset: Callable[[], None] | None = None


def _jax_sync(out: Any) -> None:
    jax.block_until_ready(out)


def _jax_variants(cfg: BenchConfig, params: Any, x: np.ndarray, y: np.ndarray) -> list[_Variant]:
    dtype = jnp.bfloat16 if cfg.dtype == "bfloat16" else None
    net = Net(dtype=dtype)
    tx = optim.sgd(cfg.lr, momentum=cfg.momentum)
    xb, yb = jnp.asarray(x), jnp.asarray(y)
    # Each variant owns its state: the donated one deletes the state it is given.
    new_state = lambda: step.create_train_state(  # noqa: E731
        None, net, tx, jax.tree.map(jnp.array, params)
    )
    out: list[_Variant] = []

    def variant(name: str, step: Callable[..., Any], batch: Any, steps: int = 1) -> _Variant:
        box = [new_state()]

        def run() -> Any:
            box[0], metrics = step(box[0], batch)
            return metrics["loss"]

        def reset() -> None:
            box[0] = new_state()

        return _Variant(
            name,
            "jax",
            run,
            _jax_sync,
            steps_per_call=steps,
            xla_memory=lambda: _xla_peak_mb(step, box[0], batch),
            reset=reset,
        )

    stack = (jnp.stack([xb] * cfg.scan_steps), jnp.stack([yb] * cfg.scan_steps))
    out.append(variant("jax_step", step.train_step, (xb, yb)))
    out.append(variant("jax_donated", step.train_step_donated, (xb, yb)))
    out.append(variant("jax_scan", step.train_steps, stack, cfg.scan_steps))
    eval_state = new_state()
    out.append(
        _Variant(
            "jax_eval",
            "jax",
            lambda: step.eval_step(eval_state, (xb, yb))["loss"],
            _jax_sync,
            xla_memory=lambda: _xla_peak_mb(step.eval_step, eval_state, (xb, yb)),
        )
    )
    if dtype is None:  # jaxnet.inference computes in the params' dtype (float32)
        out.append(
            _Variant("jax_predict", "jax", lambda: inference.predict_logits(params, xb), _jax_sync)
        )
    fc1_matmuls = jax.jit(lambda a, w, g: (a @ w, g @ w.T, a.T @ g))
    keys = jax.random.split(jax.random.key(cfg.seed), 2)
    w = jnp.asarray(params["fc1"]["kernel"], xb.dtype if dtype is None else dtype)
    a = jax.random.normal(keys[0], (xb.shape[0], w.shape[0]), w.dtype)
    g = jax.random.normal(keys[1], (xb.shape[0], w.shape[1]), w.dtype)
    out.append(_Variant("jax_fc1_matmuls", "jax", lambda: fc1_matmuls(a, w, g), _jax_sync))
    return out


def _xla_peak_mb(fn: Any, *args: Any) -> float | None:
    """XLA's buffer assignment for one call: arguments + outputs + temporaries - aliased."""
    try:
        m = fn.lower(*args).compile().memory_analysis()
        total = (
            m.argument_size_in_bytes
            + m.output_size_in_bytes
            + m.temp_size_in_bytes
            - m.alias_size_in_bytes
        )
    except Exception:  # not every backend reports it
        return None
    return total / 2**20


def _torch_variants(
    cfg: BenchConfig, state_dict: Any, x: np.ndarray, y: np.ndarray, log: Callable[[str], None]
) -> list[_Variant]:
    import torch
    import torch.nn.functional as F

    from jaxnet.convert import nhwc_to_nchw
    from jaxnet.torch_reference import TorchNet

    device = _torch_device()
    if device == "cuda":  # a float32 comparison: no TF32 (jax is asked for "highest" too)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    # .copy(): fresh NCHW strides (a transposed view with C=1 would look channels_last to torch)
    xt = torch.from_numpy(nhwc_to_nchw(x).copy()).to(device)
    yt = torch.from_numpy(y.astype(np.int64)).to(device)
    autocast = (
        torch.autocast(device_type=device, dtype=torch.bfloat16)
        if cfg.dtype == "bfloat16"
        else torch.autocast(device_type=device, enabled=False)
    )

    def sync(out: Any) -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def make_step(compiled: bool) -> tuple[Callable[[], Any], Callable[[], None]]:
        net = TorchNet().to(device)
        net.load_state_dict(state_dict)
        if compiled:  # each batch size compiles afresh, in its own first call
            import torch._dynamo as dynamo

            dynamo.reset()
        model = torch.compile(net, **TORCH_COMPILE_OPTIONS) if compiled else net
        opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum)

        def run() -> Any:
            opt.zero_grad(set_to_none=True)
            with autocast:
                loss = F.cross_entropy(model(xt).float(), yt)
            loss.backward()
            opt.step()
            return loss

        def reset() -> None:
            net.load_state_dict(state_dict)  # in place: a compiled model is not recompiled
            opt.state.clear()  # no momentum yet, as in a new SGD

        return run, reset

    eval_net = TorchNet().to(device)
    eval_net.load_state_dict(state_dict)

    def run_eval() -> Any:
        with torch.no_grad(), autocast:
            return F.cross_entropy(eval_net(xt).float(), yt)

    def run_forward() -> Any:
        with torch.no_grad(), autocast:
            return eval_net(xt)

    run_step, reset_step = make_step(False)
    out = [
        _Variant("torch_step", "torch", run_step, sync, reset=reset_step),
        _Variant("torch_eval", "torch", run_eval, sync),
        _Variant("torch_forward", "torch", run_forward, sync),
    ]
    if cfg.torch_compile:
        run_compiled, reset_compiled = make_step(True)
        out.append(_Variant("compile_step", "torch", run_compiled, sync, reset=reset_compiled))
    return out


def _first_calls(v: _Variant, cfg: BenchConfig, log: Callable[[str], None]) -> float | str:
    """Time the first call (compilation included), run the warm-up, measure memory.
    Returns the warm-up's seconds per call, or why the variant is skipped (it failed, e.g.
    ``torch.compile`` without a working compiler, or its first call ran past the cap)."""
    try:
        with _Memory(v.framework) as mem:
            t = time.perf_counter()
            with time_limit(cfg.first_call_cap_s, FirstCallTimeout), compile_seconds() as comp:
                v.sync(v.run())
            v.compile_s = time.perf_counter() - t
            v.jax_compile_s = comp["total"] if v.framework == "jax" else None
            t = time.perf_counter()
            for _ in range(max(cfg.warmup, 1)):
                v.sync(v.run())
            per_call = (time.perf_counter() - t) / max(cfg.warmup, 1)
        v.peak_mb = mem.peak_mb()
        if v.xla_memory is not None:
            v.xla_mb = v.xla_memory()
    except Exception as e:
        timeout = _timeout_in(e)
        first = (str(e).strip().splitlines() or [""])[0][:300]
        reason = f"first call {timeout}" if timeout else f"{type(e).__name__}: {first}"
        log(f"  skipping {v.name}: {reason}")
        return reason
    return per_call


def _timeout_in(e: BaseException | None) -> FirstCallTimeout | None:
    """The ``FirstCallTimeout`` behind ``e``, if any (``torch.compile`` wraps exceptions)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, FirstCallTimeout):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _ready_variants(
    cfg: BenchConfig, variants: list[_Variant], dropped: dict[str, str], log: Callable[[str], None]
) -> tuple[list[_Variant], dict[str, str]]:
    """First calls and warm-up of each variant; those that fail or run past the first-call cap
    are skipped (capped ones for later batch sizes too, through ``dropped``)."""
    kept, skipped = [], {}
    for v in variants:
        if v.name in dropped:
            skipped[v.name] = dropped[v.name]
            continue
        per_call = _first_calls(v, cfg, log)
        if isinstance(per_call, str):
            skipped[v.name] = per_call
            if per_call.startswith("first call ran past"):
                dropped[v.name] = f"{per_call} at an earlier batch size"
            continue
        v.calls_per_rep = max(1, math.ceil(cfg.min_rep_s / max(per_call, 1e-9)))
        kept.append(v)
    return kept, skipped


def _variant_result(v: _Variant, batch_size: int) -> dict[str, Any]:
    step_s = statistics.median(v.times)
    f = net_flops(batch_size, train=not v.name.endswith(("_eval", "_forward", "_predict")))
    if v.name == "jax_fc1_matmuls":
        f = FC1_TRAIN_FLOPS_PER_SAMPLE * batch_size
    return {
        "median_step_s": step_s,
        "min_step_s": min(v.times),
        "steps_per_s": 1.0 / step_s,
        "samples_per_s": batch_size / step_s,
        "gflops_per_s": f / step_s / 1e9,
        "first_call_s": v.compile_s,
        "compile_s": v.jax_compile_s,  # JAX's compile time within the first call
        "peak_mb": v.peak_mb,  # process RSS growth (CPU) / allocator peak (GPU)
        "xla_buffers_mb": v.xla_mb,  # jax only: XLA's buffer assignment for one call
        "reps": len(v.times),
        "steps_per_rep": v.calls_per_rep * v.steps_per_call,
    }


def _bench_batch(
    cfg: BenchConfig,
    batch_size: int,
    params: Any,
    state_dict: Any,
    log: Callable[[str], None],
    dropped: dict[str, str],
) -> dict[str, Any]:
    rng = np.random.default_rng(cfg.seed + batch_size)
    x = rng.standard_normal((batch_size, 32, 32, 1), dtype=np.float32)
    y = rng.integers(0, 2, batch_size).astype(np.int32)
    variants = _jax_variants(cfg, params, x, y)
    if cfg.torch:
        variants += _torch_variants(cfg, state_dict, x, y, log)
    if cfg.variants:
        variants = [v for v in variants if v.name in cfg.variants]
    variants, skipped = _ready_variants(cfg, variants, dropped, log)
    for _ in range(cfg.reps):  # interleaved: noise from other processes hits all variants
        for v in variants:
            # Every rep steps from the first weights: thousands of steps on one batch drive
            # the loss to 0 and PyTorch's momentum into subnormal numbers, on which it runs
            # ~2x slower (XLA flushes them to zero): a regime no real run is timed in.
            if v.reset is not None:
                v.reset()
        for v in variants:
            t = time.perf_counter()
            for _ in range(v.calls_per_rep):
                out = v.run()
            v.sync(out)
            v.times.append((time.perf_counter() - t) / (v.calls_per_rep * v.steps_per_call))
    return {
        "batch_size": batch_size,
        "variants": {v.name: _variant_result(v, batch_size) for v in variants},
        "skipped": skipped,
    }


def run_bench(
    cfg: BenchConfig,
    log: Callable[[str], None] = print,
    on_batch: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run the benchmark; returns a JSON-able dict (``machine``, ``config``, ``batches``).

    ``on_batch(results_so_far)`` is called after each batch size (to save partial results).
    A float32 run computes at full float32 precision on both sides (no TF32 on a GPU: JAX's
    ``jax_default_matmul_precision`` "highest", torch's ``allow_tf32`` off).
    """
    precision = "highest" if cfg.dtype == "float32" else None
    with jax.default_matmul_precision(precision):
        return _run_bench(cfg, log, on_batch)


def _run_bench(
    cfg: BenchConfig, log: Callable[[str], None], on_batch: Callable[[dict[str, Any]], None] | None
) -> dict[str, Any]:
    torch_ok = cfg.torch
    state_dict: Any = None
    if cfg.torch:
        try:
            import torch

            from jaxnet.torch_reference import make_torch_net
        except ImportError:
            log("PyTorch is not installed: timing jaxnet only.")
            torch_ok = False
    if torch_ok:
        state_dict = make_torch_net(cfg.seed).state_dict()
        params = params_from_torch(state_dict)
    else:
        params = init_params(Net(), jax.random.key(cfg.seed))
    cfg_used = BenchConfig(**{**asdict(cfg), "torch": torch_ok})
    peak = matmul_peak_gflops(cfg.peak_size, dtype=cfg.dtype)
    machine = {
        "jax_backend": jax.default_backend(),
        "jax_device": str(jax.devices()[0].device_kind),
        "jax_version": jax.__version__,
        "cpu_count": os.cpu_count(),
        "cpu": host.cpu_description(),
        "matmul_peak_gflops": peak,  # in the run's dtype
    }
    if torch_ok:
        machine.update(
            torch_version=torch.__version__,
            torch_device=_torch_device(),
            torch_threads=torch.get_num_threads(),
        )
    log(f"{cfg.dtype} matmul peak (jnp, same run): {peak:.1f} GFLOP/s on {machine['jax_device']}")
    config = {**asdict(cfg_used), "torch_compile_options": TORCH_COMPILE_OPTIONS}
    results: dict[str, Any] = {"machine": machine, "config": config, "batches": []}
    dropped: dict[str, str] = {}  # variants whose first call ran past the cap
    for b in cfg.batch_sizes:
        log(f"batch {b} ...")
        r = _bench_batch(cfg_used, int(b), params, state_dict, log, dropped)
        for v in r["variants"].values():
            v["fraction_of_peak"] = v["gflops_per_s"] / peak
        results["batches"].append(r)
        machine["malloc"] = host.malloc_status()  # what jaxnet's first step did to malloc
        if on_batch is not None:
            on_batch(results)
    return results


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------


def _ratio(r: dict[str, Any], a: str, b: str) -> str:
    v = r["variants"]
    if a not in v or b not in v:
        return "-"
    return f"{v[b]['median_step_s'] / v[a]['median_step_s']:.2f}x"


def _get(r: dict[str, Any], name: str, key: str, fmt: str) -> str:
    v = r["variants"].get(name)
    if v is None or v.get(key) is None or (isinstance(v[key], float) and math.isnan(v[key])):
        return "-"
    return format(v[key], fmt)


COMPARISONS = (
    ("default path: `TrainState.create` + `jaxnet.train_step`", "jax_step", "torch_step"),
    ("tuned: `train_step_donated`", "jax_donated", "torch_step"),
    ("tuned: `train_steps` (scan), per step", "jax_scan", "torch_step"),
    ("`torch.compile` step", "compile_step", "torch_step"),
    ("`jaxnet.eval_step` / torch `no_grad` eval", "jax_eval", "torch_eval"),
    ("`jaxnet.inference.predict_logits` / torch `no_grad` forward", "jax_predict", "torch_forward"),
)
"""The report's rows: what is timed, and what it is compared with (PyTorch eager)."""


_MS_ROWS = {
    "jax_step": "default path: `jaxnet.train_step`",
    "jax_donated": "`train_step_donated`",
    "jax_scan": "`train_steps` (scan), per step",
    "torch_step": "PyTorch eager step",
    "compile_step": "`torch.compile` step",
    "jax_eval": "`jaxnet.eval_step`",
    "torch_eval": "PyTorch `no_grad` eval",
    "jax_predict": "`jaxnet.inference.predict_logits`",
    "torch_forward": "PyTorch `no_grad` forward",
}


def _cpu_words(cpu: dict[str, Any] | None) -> str:
    # " (model, id; ISA)" for results that record the CPU (older JSON does not).
    if not cpu:
        return ""
    isa = " ".join(cpu["vector_isa"]) or "no AVX2"
    return f" ({cpu['model']}, {cpu['id'] or 'id unknown'}; {isa})"


def _header(results: dict[str, Any]) -> str:
    m = results["machine"]
    malloc = m.get("malloc") or {}
    tuned = m.get("malloc_tuned", malloc.get("tuned"))
    return (
        f"jax {m['jax_version']} on {m['jax_backend']} ({m['jax_device']}), "
        f"{m['cpu_count']} CPUs{_cpu_words(m.get('cpu'))}; torch {m.get('torch_version', '-')} on "
        f"{m.get('torch_device', '-')} with {m.get('torch_threads', '-')} threads; "
        f"{results['config']['dtype']} matmul peak {m['matmul_peak_gflops']:.1f} GFLOP/s; "
        f"dtype {results['config']['dtype']}"
        + ("; glibc malloc thresholds raised (jaxnet.host)" if tuned else "")
    )


def format_results(results: dict[str, Any]) -> str:
    """Markdown tables: speed relative to PyTorch eager (one row per variant, the default path
    first), milliseconds per step, then FLOP rates, compile times and memory."""
    batches = results["batches"]
    head = "| " + " | ".join(["variant", *(f"batch {r['batch_size']}" for r in batches)]) + " |"
    rule = "|---" * (len(batches) + 1) + "|"
    lines = [_header(results), "", "Speed relative to PyTorch eager (>1: faster):", "", head, rule]
    for label, ours, theirs in COMPARISONS:
        if any(ours in r["variants"] for r in batches):
            lines.append(
                f"| {label} | " + " | ".join(_ratio(r, ours, theirs) for r in batches) + " |"
            )
    lines += ["", "Milliseconds per step (median):", "", head, rule]
    for name, label in _MS_ROWS.items():
        if any(name in r["variants"] for r in batches):
            cells = (_ms(r, name) for r in batches)
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", *_detail_table(batches)]
    return "\n".join(lines)


def _ms(r: dict[str, Any], name: str) -> str:
    v = r["variants"].get(name)
    return "-" if v is None else f"{1e3 * v['median_step_s']:.2f}"


def _detail_row(r: dict[str, Any]) -> str:
    names = ("jax_step", "jax_donated", "jax_scan", "torch_step")
    gf = " / ".join(_get(r, n, "gflops_per_s", ".1f") for n in names)
    pct = " / ".join(
        "-" if n not in r["variants"] else f"{100 * r['variants'][n]['fraction_of_peak']:.0f}%"
        for n in names
    )
    first = (
        f"{_get(r, 'jax_step', 'first_call_s', '.2f')} "
        f"({_get(r, 'jax_step', 'compile_s', '.2f')}) / "
        + _get(r, "compile_step", "first_call_s", ".1f")
    )
    mem = " / ".join(
        (
            _get(r, "jax_step", "xla_buffers_mb", ".0f"),
            _get(r, "jax_step", "peak_mb", ".0f"),
            _get(r, "torch_step", "peak_mb", ".0f"),
        )
    )
    fc1 = r["variants"].get("jax_fc1_matmuls")
    fc1_text = (
        "-"
        if fc1 is None
        else f"{1e3 * fc1['median_step_s']:.2f} ({100 * fc1['fraction_of_peak']:.0f}%)"
    )
    ceiling = _ratio(r, "jax_fc1_matmuls", "torch_step")
    return f"| {r['batch_size']} | {gf} | {pct} | {first} | {mem} | {fc1_text} | {ceiling} |"


def _detail_table(batches: list[dict[str, Any]]) -> list[str]:
    """FLOP rates, share of the matmul peak, first-call times, memory and the fc1 ceiling."""
    return [
        "| batch | GFLOP/s: step / donated / scan / torch | % of matmul peak: step / donated "
        "/ scan / torch | first call s (JAX compiling): train_step / torch.compile | MB: "
        "jaxnet XLA buffers / peak growth jaxnet / torch | fc1 matmuls alone: ms (% of peak) "
        "| ceiling: torch / fc1 matmuls |",
        "|---|---|---|---|---|---|---|",
        *(_detail_row(r) for r in batches),
    ]


def write_json(results: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``results`` as JSON, atomically (temporary file in the same folder, then rename)."""
    text = json.dumps(results, indent=2)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """``"1,8,32"`` -> ``(1, 8, 32)``, with a clear error for anything else."""
    try:
        sizes = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"--batch-sizes takes comma-separated integers, got {text!r}.") from None
    if not sizes or min(sizes) < 1:
        raise ValueError(f"--batch-sizes takes positive integers, got {text!r}.")
    return sizes
