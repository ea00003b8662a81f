"""jaxnet.bench: the FLOP count, the option checks, and one tiny run of every variant.

Speed itself is never asserted: ``jaxnet bench`` measures it.
"""

from __future__ import annotations

import json
import signal
import threading
import time

import pytest
from conftest import load_script

from jaxnet import bench, host

pytest.importorskip("torch")


def test_net_flops_counts_every_layer():
    fwd = 2 * (30 * 30 * 6 * 9 + 28 * 28 * 16 * 54 + 12544 * 512 + 512 * 64 + 64 * 2)
    assert bench.net_flops(1, train=False) == fwd
    assert bench.net_flops(4) == 4 * (3 * fwd - 2 * 30 * 30 * 6 * 9)
    assert 42.9e6 < bench.net_flops(1) < 43.1e6  # ~43 MFLOP per sample, as in the issue


def test_batch_size_parsing():
    assert bench.parse_batch_sizes("1,8, 32") == (1, 8, 32)
    for bad in ("", "0,8", "a,b"):
        with pytest.raises(ValueError, match="--batch-sizes"):
            bench.parse_batch_sizes(bad)
    with pytest.raises(ValueError, match="dtype"):
        bench.BenchConfig(dtype="float16")


@pytest.mark.slow
def test_bench_runs_every_variant_and_writes_json(tmp_path):

    # The smallest run that still times every variant once; a 512 x 512 matmul for the peak.
    cfg = bench.BenchConfig(
        batch_sizes=(2,),
        reps=1,
        warmup=0,
        min_rep_s=0,
        scan_steps=2,
        torch_compile=False,
        peak_size=512,
    )
    partial = []
    results = bench.run_bench(cfg, log=lambda line: None, on_batch=partial.append)
    assert partial == [results]  # called after each batch size with the results so far
    assert results["machine"]["matmul_peak_gflops"] > 0
    assert results["machine"]["cpu"] == host.cpu_description()  # ratios depend on the CPU
    (batch,) = results["batches"]
    assert set(batch["variants"]) == {
        "jax_step",
        "jax_donated",
        "jax_scan",
        "jax_eval",
        "jax_predict",
        "jax_fc1_matmuls",
        "torch_step",
        "torch_eval",
        "torch_forward",
    }
    assert batch["skipped"] == {}
    for v in batch["variants"].values():
        assert v["steps_per_s"] > 0 and v["gflops_per_s"] > 0 and v["first_call_s"] > 0
    # JAX's own compile time, part of the first call (the fc1 matmuls: a tiny jit of its own)
    assert (
        0
        < batch["variants"]["jax_step"]["compile_s"]
        < batch["variants"]["jax_step"]["first_call_s"]
    )
    text = bench.format_results(results)
    assert f"({results['machine']['cpu']['model']}, " in text.splitlines()[0]
    # The default path is its own row, first, beside the tuned variants.
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[1].startswith("| default path: `TrainState.create` + `jaxnet.train_step` | ")
    assert any(r.startswith("| tuned: `train_step_donated` |") for r in rows)
    assert any(r.startswith("| `jaxnet.inference.predict_logits`") for r in rows)
    assert "| batch 2 |" in rows[0] and "fc1 matmuls alone" in text
    path = tmp_path / "out" / "bench.json"
    bench.write_json(results, path)
    assert json.loads(path.read_text()) == json.loads(json.dumps(results))
    assert [p.name for p in path.parent.iterdir()] == ["bench.json"]  # no temporary left


def _busy(seconds: float) -> None:
    """Python code that runs ``seconds`` (a signal handler can interrupt it)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_time_limit_interrupts_python_code_and_leaves_no_timer():
    with pytest.raises(TimeoutError, match=r"limit of 0\.05 s"):
        with bench.time_limit(0.05, TimeoutError):
            _busy(5)
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    with bench.time_limit(5, TimeoutError):  # a block that ends in time: nothing raised
        _busy(0.01)
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_compile_seconds_counts_only_this_threads_compilations():
    import jax
    import jax.numpy as jnp

    def compile_in_another_thread() -> None:
        jax.jit(lambda x: x * 3.0 + 1.0)(jnp.ones(7)).block_until_ready()

    with bench.compile_seconds() as totals:
        other = threading.Thread(target=compile_in_another_thread)
        other.start()
        other.join()
    assert totals["total"] == 0
    with bench.compile_seconds() as totals:
        jax.jit(lambda x: x * 5.0 - 2.0)(jnp.ones(7)).block_until_ready()
    assert totals["/jax/core/compile/jaxpr_trace_duration"] > 0
    assert totals["total"] > 0


def test_time_limit_nested_keeps_the_outer_deadline():
    class Outer(BaseException):
        pass

    t = time.monotonic()
    with pytest.raises(Outer):
        with bench.time_limit(0.3, Outer):
            with pytest.raises(TimeoutError):
                with bench.time_limit(0.05, TimeoutError):  # ends first
                    _busy(5)
            _busy(5)  # the outer limit, re-armed with what was left of it, still ends this
    with pytest.raises(Outer):
        with bench.time_limit(0.1, Outer):
            with bench.time_limit(10, TimeoutError):  # would end later: the outer one fires
                _busy(5)
    assert time.monotonic() - t < 2
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_a_first_call_past_the_cap_is_skipped_with_the_reason():
    cfg = bench.BenchConfig(first_call_cap_s=0.05, warmup=0)
    slow = bench._Variant("slow", "jax", lambda: _busy(5), lambda out: None)
    assert bench._first_calls(slow, cfg, log=lambda line: None) == (
        "first call ran past its limit of 0.05 s"
    )
    fast = bench._Variant("fast", "jax", lambda: None, lambda out: None)
    dropped: dict[str, str] = {}
    kept, skipped = bench._ready_variants(cfg, [slow, fast], dropped, log=lambda line: None)
    assert [v.name for v in kept] == ["fast"] and set(skipped) == {"slow"}
    assert "earlier batch size" in dropped["slow"]  # and later batch sizes skip it unrun
    kept, skipped = bench._ready_variants(cfg, [slow], dropped, log=lambda line: None)
    assert kept == [] and skipped == {"slow": dropped["slow"]}
    with pytest.raises(ValueError, match="first_call_cap_s"):
        bench.BenchConfig(first_call_cap_s=0)


def test_the_step_parts_script_runs_and_both_sides_compute_the_same_loss():
    # scripts/step_parts.py gives docs/performance.md its forward / gradient / update / step
    # comparison at large batches: it must run, and time the same computation on both sides.
    module = load_script("step_parts")
    doc = module.main(["--batch-sizes", "16", "--reps", "1", "--min-rep-s", "0"])
    parts = doc["batches"]["16"]
    assert doc["cpu"] == host.cpu_description()
    assert parts["loss_difference"] < 1e-5
    for part in module.PARTS:
        assert parts[part]["ratio"] > 0
        assert parts[part]["jaxnet"]["median_ms"] > 0 and parts[part]["pytorch"]["min_ms"] > 0


def test_every_variant_that_trains_steps_again_from_the_first_weights_after_reset():
    # _bench_batch resets before every rep: without it, thousands of steps on one batch drive
    # PyTorch's momentum into subnormal numbers (~2x slower steps) and skew the ratios.
    import numpy as np

    from jaxnet.convert import params_from_torch
    from jaxnet.torch_reference import make_torch_net

    cfg = bench.BenchConfig(batch_sizes=(2,), scan_steps=2, torch_compile=False)
    state_dict = make_torch_net(cfg.seed).state_dict()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 32, 32, 1), dtype=np.float32)
    y = np.array([0, 1], np.int32)
    variants = bench._jax_variants(cfg, params_from_torch(state_dict), x, y)
    variants += bench._torch_variants(cfg, state_dict, x, y, log=lambda line: None)
    trained = {v.name: v for v in variants if v.reset is not None}
    assert set(trained) == {"jax_step", "jax_donated", "jax_scan", "torch_step"}
    for v in trained.values():

        def loss(v=v):
            return np.asarray(v.run().detach() if v.framework == "torch" else v.run())

        # Two steps' losses: the second shows the first update (weights and momentum).
        first = [loss(), loss()]
        later = [loss() for _ in range(3)][-1]
        assert not np.array_equal(later, first[0]), v.name  # the steps moved the weights
        v.reset()
        np.testing.assert_array_equal([loss(), loss()], first, err_msg=v.name)


def test_the_timing_loop_resets_every_variant_before_every_rep(monkeypatch):
    resets = []
    fake = bench._Variant(
        "jax_step", "jax", run=lambda: 0.0, sync=lambda out: None, reset=lambda: resets.append(1)
    )
    monkeypatch.setattr(bench, "_jax_variants", lambda *args: [fake])
    cfg = bench.BenchConfig(batch_sizes=(2,), reps=3, warmup=0, min_rep_s=0, torch=False)
    result = bench._bench_batch(cfg, 2, None, None, log=lambda line: None, dropped={})
    assert len(resets) == 3 and len(result["variants"]["jax_step"]) > 0


def test_the_update_buffers_script_times_one_update_three_ways():
    # scripts/update_buffers.py gives docs/performance.md what new output buffers cost: its
    # three forms must compute the same SGD-momentum update, and each round start afresh.
    import numpy as np

    module = load_script("update_buffers")
    params = {}
    for name, (run, reset, result) in module._forms(1000).items():
        reset()
        run()
        reset()  # back to the start: two updates from p = 1, m = 0
        run()
        run()
        params[name] = result()
    m = 0.9 * 0.01 + 0.01
    expected = 1 - 0.01 * 0.01 - 0.01 * m
    for name, p in params.items():
        np.testing.assert_allclose(p, expected, rtol=1e-6, err_msg=name)
    doc = module.main(["--mib", "0.25", "--reps", "1", "--calls", "1"])
    row = doc["sizes_mib"]["0.25"]
    assert set(row) == {"new buffers", "donated", "pytorch in place"}
    assert all(r["median_ms"] > 0 for r in row.values())
    assert doc["cpu"] == host.cpu_description()


def test_the_scripts_time_interleaved_rounds_each_from_a_reset():
    # scripts/_measure.py times every measurement script: each round resets first, then runs
    # per_round calls of every entry in turn and waits once for the last result.
    measure = load_script("_measure")
    log: list[str] = []

    def entry(name: str):
        return (lambda: log.append(name) or name, lambda out: log.append(f"wait {out}"))

    calls = {"a": entry("a"), "b": entry("b")}
    times = measure.time_interleaved(calls, {"a": 2, "b": 1}, 3, lambda: log.append("reset"))
    assert log == ["reset", "a", "a", "wait a", "b", "wait b"] * 3
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    assert all(t >= 0 for v in times.values() for t in v)

    log.clear()
    first, per_round = measure.size_round(*entry("a"), min_round_s=0.0)
    assert log == ["a", "wait a"] * 3 and first >= 0 and per_round == 1

    doc = measure.record("scripts/x.py --flag", rows={})
    assert doc["command"] == "scripts/x.py --flag" and doc["rows"] == {}
    assert doc["cpu"] == host.cpu_description() and {"date", "jax", "torch"} <= set(doc)


def test_the_default_path_script_times_pytorch_alone_with_glibc_malloc_as_it_comes():
    # scripts/default_path.py compares the README's usage with PyTorch in a process of its own:
    # beside jaxnet, PyTorch would get jaxnet's malloc settings (fewer page faults at large
    # batches) and look faster than a PyTorch user's own script.
    script = load_script("default_path")
    args = script._parse(["--batch-sizes", "2", "--reps", "1", "--min-rep-s", "0"])
    alone = script._run_child(script.ROOT, args, torch_alone=True)
    assert alone["malloc"]["tuned"] is False and alone["malloc"]["one_arena"] is False
    assert set(alone["batches"]["2"]) == {"torch_step", "torch_eval", "torch_forward"}
    assert alone["default_run"] is None

    both, reset = script._variants(2, torch_alone=False)
    assert set(both) == set(alone["batches"]["2"]) | {
        "jax_train_step",
        "jax_eval_step",
        "jax_predict_logits",
    }

    # Both sides step from the same weights and data: the same first loss, and again after reset.
    def first_losses() -> list[float]:
        outs = [both[name][0]() for name in ("jax_train_step", "torch_step")]
        return [float(getattr(o, "detach", lambda o=o: o)()) for o in outs]

    losses = first_losses()
    reset()
    again = first_losses()
    assert abs(losses[0] - losses[1]) < 1e-5 and again == losses

    after = {"batches": {"2": {n: {"median_ms": 2.0} for n in both}}}
    slower = {"batches": {"2": {n: {"median_ms": 3.0} for n in alone["batches"]["2"]}}}
    table = script.alone_table(after, slower)
    assert table.splitlines()[-1] == "| 2 | 1.50x | 1.50x | 1.50x | 2.00 / 3.00 | 2.00 / 3.00 |"


def test_the_default_path_scripts_before_tree_is_the_commit_it_names(tmp_path, monkeypatch):
    # --before HEAD must follow new commits: the tree is kept per commit, not per name.
    import subprocess
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    script = load_script("default_path")
    head = subprocess.run(
        ["git", "-C", str(script.ROOT), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    tree = script._before_tree("HEAD")
    assert tree.name == f"jaxnet-{head}"
    assert (tree / "jaxnet" / "__init__.py").is_file()
    assert script._before_tree(head) == tree
    assert [p.name for p in tmp_path.iterdir()] == [tree.name]  # no partial extraction left
