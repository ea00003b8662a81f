"""Shared fixtures: the PyTorch reference and identical jaxnet copies of it, the criteria
registry's names, and one small reference training run reused by several test modules.

Objects that are static arguments of the jitted steps (the ``Net`` whose ``apply`` a state
holds, its optimizer) are shared through this module, so that tests in different files reuse
one compilation instead of each compiling the same step again.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxnet
import jaxnet.train
from jaxnet.criteria import CRITERIA as _REGISTRY
from jaxnet.model import init_params
from jaxnet.train import TrainConfig, train_and_evaluate


def _one_jit_cache_for_the_session() -> None:
    """One JAX compilation cache for this session and every subprocess it starts (CLI runs, the
    parallel workers, the notebook, the device check): they compile many of the same programs,
    and a program compiled once is then read back. Fresh per session, removed at its end; a
    cache the environment already names is used instead."""
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        folder = tempfile.mkdtemp(prefix="jaxnet-tests-jit-cache-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update(
        "jax_persistent_cache_min_compile_time_secs",
        float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
    )
    jax.config.update(
        "jax_persistent_cache_min_entry_size_bytes",
        int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]),
    )


_one_jit_cache_for_the_session()

BATCH = 16

CRITERIA = sorted(_REGISTRY)
"""Every named criterion of ``jaxnet.criteria.CRITERIA``: tests parametrize over these, with
``criterion(name)`` on the JAX side and ``criterion(name).torch`` on the torch side."""

NET = jaxnet.Net()
"""The one ``Net`` of the tests: a state's ``apply_fn`` (``NET.apply``) is a static argument of
the jitted steps, and bound methods of two equal ``Net`` instances are not equal."""


SGD = jaxnet.optim.sgd(0.01, momentum=0.9)
"""The training job's optimizer, shared: a state's ``tx`` is a static argument too."""


SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str) -> Any:
    """``scripts/<name>.py`` as a module, as ``python3 scripts/<name>.py`` would see it: with
    its folder on ``sys.path`` (for the scripts' shared ``_measure``)."""
    import importlib.util
    import sys

    if str(SCRIPTS) not in sys.path:
        sys.path.append(str(SCRIPTS))
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def labels(n: int, seed: int = 2, num_classes: int = 2) -> torch.Tensor:
    """Integer class labels ``(n,)``: what every criterion takes."""
    return torch.randint(0, num_classes, (n,), generator=torch.Generator().manual_seed(seed))


def to_jax_batch(x: torch.Tensor, t: torch.Tensor):
    return jnp.asarray(jaxnet.nchw_to_nhwc(x.numpy())), jnp.asarray(t.numpy())


def max_abs_diff_params(params, torch_net) -> dict[str, float]:
    """Per state_dict key: max |jaxnet - torch|, compared in torch's layout."""
    ours = jaxnet.params_to_torch(params, as_numpy=True)
    ref = {k: v.detach().double().numpy() for k, v in torch_net.state_dict().items()}
    return {k: float(np.abs(ours[k].astype(np.float64) - ref[k]).max()) for k in ref}


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(BATCH, 1, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def net() -> jaxnet.Net:
    return NET


@pytest.fixture(scope="session")
def params0():
    """``NET``'s params from ``jax.random.key(0)`` (read-only: jax arrays are immutable)."""
    return init_params(NET, jax.random.key(0))


@pytest.fixture
def torch_net():
    from jaxnet.torch_reference import make_torch_net

    return make_torch_net(0)


# A few steps on a small subset of the digits: 128 train / 32 val examples, 8 steps per epoch,
# and per-example gradient norms of 3 training examples logged every epoch.
SMALL = TrainConfig(limit=160, batch_size=16, epochs=2, per_example_grad_norms=3, progress=False)


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory: pytest.TempPathFactory):
    """An uninterrupted ``SMALL`` run: ``(workdir, TrainResult)``. Copy the workdir to modify it."""
    workdir = tmp_path_factory.mktemp("reference")
    result = train_and_evaluate(SMALL, workdir)
    return workdir, result


@pytest.fixture
def copy_of_reference(reference_run, tmp_path: Path) -> Path:
    workdir, _ = reference_run
    dst = tmp_path / "run"
    shutil.copytree(workdir, dst)
    return dst


def small(**changes) -> TrainConfig:
    return dataclasses.replace(SMALL, **changes)


# ---------------------------------------------------------------------------------------------
# Subprocess checks started in the background when the session starts
# ---------------------------------------------------------------------------------------------

BACKGROUND: dict[str, Callable[[Path], Any]] = {}
"""Session fixtures computed in the background (``name -> run(directory) -> result``),
registered with ``in_background``."""

IN_PROCESS: set[str] = set()
"""The background jobs that compute in this process (``in_background(..., in_process=True)``)."""

LIVE: set[subprocess.Popen] = set()
"""Subprocesses running now (``start_new_session=True``): killed, whole process group, when the
session ends; whoever starts one adds it here and removes it once it has been waited for."""

STOPPING = threading.Event()
"""Set when the session ends: a background job must not start another subprocess then."""

_FUTURES = pytest.StashKey[dict[str, Future]]()


def run_logged(argv: list[str], log_path: Path, *, cwd: Path, timeout: float, what: str) -> str:
    """Run ``argv`` as a subprocess the session owns (in ``LIVE``: killed with its process group
    when the session ends), stdout and stderr into ``log_path``; fail the test unless it exits 0
    within ``timeout`` seconds. Returns the log's text."""
    if STOPPING.is_set():
        pytest.fail(f"the session ended before {what} started")
    with open(log_path, "w+") as log:
        proc = subprocess.Popen(
            argv, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        LIVE.add(proc)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"{what} did not finish within {timeout} s; log in {log_path}")
        finally:
            LIVE.discard(proc)
        log.seek(0)
        text = log.read()
    assert code == 0, f"{what} failed (exit {code}):\n{text[-4000:]}"
    return text


def in_background(
    name: str, *, in_process: bool = False
) -> Callable[[Callable[[Path], Any]], Callable[[Path], Any]]:
    """Register ``run(directory)`` as the work behind the session fixture ``name``.

    When the session starts, every registered job that a selected test needs (``name`` in its
    fixture closure) is started in a background thread, so it runs while the in-process tests
    do (they leave a core idle while XLA compiles); the tests that need one run last, and the
    fixture waits for its result with ``background_result``. Jobs that start subprocesses run
    one at a time in one thread; ``in_process`` jobs (JAX work that compiles long: XLA
    compiles with the GIL released) one at a time in another, so they do not wait for those.
    An ``in_process`` job must leave global state alone (``jax.enable_x64`` as a context
    manager is per thread).
    """

    def register(run: Callable[[Path], Any]) -> Callable[[Path], Any]:
        BACKGROUND[name] = run
        if in_process:
            IN_PROCESS.add(name)
        return run

    return register


def background_result(request: pytest.FixtureRequest, name: str) -> Any:
    """The result of the background job ``name`` (waiting for it), or of running it now.

    Call it from the fixture named ``name``: the session starts a job in the background only
    for the tests whose fixtures include that name (and runs those tests last)."""
    if request.fixturename != name:
        raise RuntimeError(
            f"the fixture for background job {name!r} is named {request.fixturename!r}: name "
            "it as the job, or the job runs in the foreground when the fixture is first used"
        )
    futures = request.config.stash.get(_FUTURES, {})
    if name in futures:
        return futures[name].result()
    return BACKGROUND[name](request.getfixturevalue("tmp_path_factory").mktemp(name))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that wait for a background job run last (in their order), so that the jobs have the
    rest of the session to finish."""
    items.sort(key=lambda item: any(name in item.fixturenames for name in BACKGROUND))


@pytest.fixture(scope="session", autouse=True)
def _background_jobs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    items = request.session.items
    names = [n for n in BACKGROUND if any(n in item.fixturenames for item in items)]
    if not names:
        yield
        return
    pools = {
        kind: ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"background-{kind}")
        for kind in ("subprocess", "in-process")
    }
    futures = {
        n: pools["in-process" if n in IN_PROCESS else "subprocess"].submit(
            BACKGROUND[n], tmp_path_factory.mktemp(n)
        )
        for n in names
    }
    request.config.stash[_FUTURES] = futures
    try:
        yield
    finally:
        STOPPING.set()
        for future in futures.values():
            future.cancel()
        for proc in list(LIVE):  # a job still running when the session ends
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        for pool in pools.values():
            pool.shutdown(wait=True)


def signal_after_step(monkeypatch, sig: signal.Signals, at_step: int) -> None:
    """Make the training loop raise a real ``sig`` in this process right after step ``at_step``."""
    real_step = jaxnet.train.train_step

    def step_then_signal(state, batch, criterion):
        new_state, metrics = real_step(state, batch, criterion)
        if int(new_state.step) == at_step:
            os.kill(os.getpid(), sig)
        return new_state, metrics

    monkeypatch.setattr(jaxnet.train, "train_step", step_then_signal)


@pytest.fixture
def x64():
    """``jax_enable_x64`` for one test only (``jax.enable_x64`` context manager): float64
    arrays stay float64 inside it, and every other test keeps jax's float32 default. jit
    caches key on the flag, so nothing compiled in here leaks out."""
    with jax.enable_x64(True):
        yield
