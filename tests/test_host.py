"""jaxnet.host: the README's own loop tunes malloc on its first step (XLA:CPU's per-step buffers
stop costing fresh pages every step); the opt-outs, the status and the undo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import pytest

from jaxnet import host
from jaxnet.host import _USER_ARENA_ENV, _USER_ENV, MALLOC_ENV, tune_malloc

# The README's own usage (TrainState.create, then jaxnet.train_step in a loop) at batch 1,
# nothing else called: minor page faults per step, then again after host.restore_malloc().
# Each non-donated step returns new params and momentum (51 MB): with glibc's own thresholds
# those pages are handed back to the OS and faulted in again on every step (~12,500 pages).
PAGE_FAULTS = Path(__file__).resolve().parents[1] / "scripts" / "page_faults.py"
_SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, resource, sys
    import jax, jaxnet
    from jaxnet import host
    spec = importlib.util.spec_from_file_location("page_faults", sys.argv[1])
    page_faults = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(page_faults)
    state, batch = page_faults.readme_state(1)
    def faults_per_step():
        # The fewest of 4 windows of 5 steps, after 10. Each step is waited for: a dispatch
        # that runs ahead (further on a loaded machine) keeps several steps' buffers alive
        # and grows the heap for longer, which is not the per-step cost measured here.
        global state
        best = None
        for window in range(5):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(10 if window == 0 else 5):
                state, _ = jax.block_until_ready(jaxnet.train_step(state, batch))
            faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
            best = faults if window == 1 or (window > 1 and faults < best) else best
        return best
    out = {"status_before": host.malloc_status(), "default": faults_per_step()}
    out["status"] = host.malloc_status()
    out["restored"] = host.restore_malloc()
    out["after_restore"] = faults_per_step()
    out["auto_threshold"] = host.auto_threshold()
    print(json.dumps(out))
    """
)


def test_tune_malloc_rejects_a_non_positive_threshold():
    with pytest.raises(ValueError, match="positive"):
        tune_malloc(0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_the_default_path_has_no_per_step_page_faults_and_restore_undoes_it():
    env = {k: v for k, v in os.environ.items() if k not in ("JAXNET_TUNE_MALLOC", *_USER_ENV)}

    # A run is measured again, up to 3 runs, when either figure misses its bound: this VM's
    # own page reclaim can fault a reused block in afresh, and where the kernel backs fresh
    # mappings with huge pages an untuned step faults far less. Untuned, every run we have
    # seen is far above the tuned bound.
    def meets_bounds(run):
        return run["default"] < 500 and run["after_restore"] > max(100, 50 * run["default"])

    runs = []
    for _ in range(3):
        done = subprocess.run(
            [sys.executable, "-c", _SCRIPT, str(PAGE_FAULTS)],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        )
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        if meets_bounds(runs[-1]):
            break
    out = next((run for run in runs if meets_bounds(run)), runs[-1])
    print(
        f"minor page faults per step at batch 1: {out['default']:.0f}, "
        f"after restore_malloc(): {out['after_restore']:.0f}"
    )
    assert out["status_before"]["tuned"] is False and out["status_before"]["by"] is None
    assert out["status"]["tuned"] is True and out["status"]["by"] == "first step"
    assert out["status"]["threshold_bytes"] == out["auto_threshold"]
    # 500 pages = 2 MB of fresh memory per step. Restored, the 51 MB of new state is mapped
    # afresh every step: ~12,500 pages, or far fewer faults where the kernel backs fresh
    # mappings with huge pages, hence the loose bound.
    assert out["default"] < 500, out
    assert out["restored"] is True and out["after_restore"] > max(100, 50 * out["default"]), out


@pytest.fixture
def fresh_host(monkeypatch):
    """jaxnet.host as in a new process before its import-time arena limit, with mallopt's two
    uses replaced by recorders: thresholds as values, arena limits as ("arena_max", value)."""
    calls = []
    monkeypatch.setattr(host, "_status", host._initial_status())
    monkeypatch.setattr(host, "_first_call_done", False)
    monkeypatch.setattr(host, "_set_thresholds", lambda value: calls.append(value) or True)
    monkeypatch.setattr(
        host, "_set_arena_max", lambda value: calls.append(("arena_max", value)) or True
    )
    for name in ("JAXNET_TUNE_MALLOC", _USER_ARENA_ENV, *_USER_ENV):
        monkeypatch.delenv(name, raising=False)
    return calls


@pytest.mark.parametrize(
    ("env", "backend", "note"),
    [
        ({"JAXNET_TUNE_MALLOC": "0"}, "cpu", "JAXNET_TUNE_MALLOC=0"),
        ({"MALLOC_MMAP_THRESHOLD_": "65536"}, "cpu", "set in the environment"),
        ({}, "gpu", "not on the CPU"),
    ],
)
def test_the_first_step_leaves_malloc_alone_when_told_or_off_the_cpu(
    fresh_host, monkeypatch, env, backend, note
):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    host._on_first_call(lambda: backend)
    assert fresh_host == []
    status = host.malloc_status()
    assert status["tuned"] is False and note in status["note"]


def test_the_first_call_of_a_wrapped_step_tunes_once_and_restore_undoes_it(fresh_host):
    calls = []
    wrapped = host.tunes_malloc_on_first_call(jax.jit(lambda x: calls.append(1) or x + 1))
    assert int(wrapped(1)) == 2 and int(wrapped(2)) == 3
    assert fresh_host == [host.auto_threshold()]  # once, with the capped threshold
    assert 32 << 20 <= host.auto_threshold() <= host.DEFAULT_MALLOC_THRESHOLD
    assert host.malloc_status()["by"] == "first step"
    assert wrapped.lower(1).compile() is not None  # the jitted function's API stays
    assert host.restore_malloc() is True and fresh_host[-1] == 128 * 1024
    assert host.malloc_status() == {
        **host._initial_status(),
        "by": "restore_malloc()",
        "note": "glibc's default values restored",
    }
    assert host.restore_malloc() is False  # nothing left to undo


def test_restore_before_the_first_step_keeps_the_steps_from_tuning(fresh_host):
    assert host.restore_malloc() is False
    host.tunes_malloc_on_first_call(lambda: None)()
    assert fresh_host == [] and host.malloc_status()["note"] == "left untouched"


@pytest.mark.parametrize(
    ("env", "limited", "note"),
    [
        ({}, True, "one arena since jaxnet was imported"),
        ({"JAXNET_TUNE_MALLOC": "0"}, False, "JAXNET_TUNE_MALLOC=0: left untouched"),
        ({"MALLOC_ARENA_MAX": "4"}, False, "MALLOC_ARENA_MAX set in the environment"),
    ],
)
def test_the_import_limits_arenas_unless_told_not_to(fresh_host, monkeypatch, env, limited, note):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    host._limit_arenas_on_import(cpu_expected=lambda: True)
    assert fresh_host == ([("arena_max", 1)] if limited else [])
    status = host.malloc_status()
    assert status["one_arena"] is limited and note in status["arena_note"]


@pytest.mark.parametrize(
    ("env", "backend", "lifted_by"),
    [({}, "gpu", "not on the CPU"), ({"JAXNET_TUNE_MALLOC": "0"}, "cpu", "JAXNET_TUNE_MALLOC=0")],
)
def test_the_first_step_lifts_the_arena_limit_off_the_cpu_or_when_told(
    fresh_host, monkeypatch, env, backend, lifted_by
):
    host._limit_arenas_on_import(cpu_expected=lambda: True)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    host._on_first_call(lambda: backend)
    assert fresh_host == [("arena_max", 1), ("arena_max", 0)]  # 0: glibc's own count
    status = host.malloc_status()
    assert status["one_arena"] is False and lifted_by in status["arena_note"]
    assert status["tuned"] is False


def test_restore_malloc_lifts_the_arena_limit(fresh_host):
    host._limit_arenas_on_import(cpu_expected=lambda: True)
    host._on_first_call(lambda: "cpu")
    assert host.malloc_status()["one_arena"] is True and host.malloc_status()["tuned"] is True
    assert host.restore_malloc() is True
    assert fresh_host[-2:] == [128 * 1024, ("arena_max", 0)]
    note = host.malloc_status()["arena_note"]
    assert note.startswith("limit lifted by restore_malloc(); threads keep sharing one arena")
    assert "JAXNET_TUNE_MALLOC=0 before importing jaxnet" in note


def _unreadable() -> bool:
    raise RuntimeError("a package's metadata cannot be read")


@pytest.mark.parametrize("cpu_expected", [lambda: False, _unreadable])
def test_the_import_leaves_arenas_alone_where_an_accelerator_is_expected(fresh_host, cpu_expected):
    host._limit_arenas_on_import(cpu_expected=cpu_expected)
    assert fresh_host == []
    status = host.malloc_status()
    assert status["one_arena"] is False and "accelerator" in status["arena_note"]


@pytest.mark.parametrize(
    ("platforms", "cpu"), [("cpu", True), ("cpu,cuda", True), ("cuda", False), ("tpu,cpu", False)]
)
def test_jax_platforms_decides_the_expected_backend(monkeypatch, platforms, cpu):
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    assert host._cpu_backend_expected() is cpu


def test_an_installed_accelerator_plugin_means_no_cpu_backend(monkeypatch):
    import importlib.metadata

    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    assert not jax.config.jax_platforms  # the suite leaves JAX to pick its backend
    plugin = importlib.metadata.EntryPoint("xla_cuda12", "jax_cuda12_plugin", "jax_plugins")
    monkeypatch.setattr(
        importlib.metadata, "entry_points", lambda group: [plugin] if group == "jax_plugins" else []
    )
    assert host._cpu_backend_expected() is False
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [])
    assert host._cpu_backend_expected() is True  # this machine: no jax_plugins, no libtpu


# A fresh process: import jaxnet, let XLA's threads compute, then count the arenas glibc's
# malloc_stats() reports (on stderr: "Arena 0:", "Arena 1:", ...).
_ARENAS = textwrap.dedent(
    """
    import ctypes, json
    import jax, jax.numpy as jnp
    import jaxnet
    from jaxnet import host
    x = jnp.ones((256, 256))
    jax.block_until_ready(jax.jit(lambda x: jnp.tanh(x @ x).sum(0) + x)(x))
    print(json.dumps(host.malloc_status()), flush=True)
    ctypes.CDLL("libc.so.6").malloc_stats()
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
@pytest.mark.parametrize("opt_out", [False, True])
def test_xla_threads_share_one_arena_after_import_unless_opted_out(opt_out):
    env = {k: v for k, v in os.environ.items() if k not in (MALLOC_ENV, _USER_ARENA_ENV)}
    if opt_out:
        env[MALLOC_ENV] = "0"
    done = subprocess.run(
        [sys.executable, "-c", _ARENAS],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    status = json.loads(done.stdout.strip().splitlines()[-1])
    arenas = [line for line in done.stderr.splitlines() if line.startswith("Arena ")]
    assert status["one_arena"] is not opt_out
    if opt_out:
        assert len(arenas) > 1, done.stderr  # XLA's threads took arenas of their own
    else:
        assert arenas == ["Arena 0:"], done.stderr


_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse avx2 fma avx512f avx512_vnni amx_tile

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: some other name
flags\t\t: fpu
"""


def test_cpu_description_reads_the_first_processor_and_its_vector_extensions():
    cpu = host.cpu_description(_CPUINFO)
    assert cpu["model"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert cpu["id"] == "GenuineIntel family 6 model 143"
    assert cpu["vector_isa"] == ["avx2", "fma", "avx512f", "avx512_vnni", "amx_tile"]
    assert cpu["cpu_count"] >= 1
    bare = host.cpu_description("")  # no /proc/cpuinfo (off Linux): nothing made up
    assert bare["id"] is None and bare["vector_isa"] == [] and bare["model"]
    # This machine's own, as the benchmarks record it.
    here = host.cpu_description()
    assert here["model"] and isinstance(here["vector_isa"], list)
