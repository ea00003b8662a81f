"""jaxnet.bench: the FLOP count, the option checks, and one tiny run of every variant.

Speed itself is never asserted: ``jaxnet bench`` measures it.
"""

from __future__ import annotations

import pytest

from jaxnet import bench

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
def test_bench_runs_every_variant_and_writes_json(tmp_path, monkeypatch):
    import functools
    import json

    # A smaller matmul for the peak (2048 x 2048, 8 times, by default): still measured.
    small_peak = functools.partial(bench.matmul_peak_gflops, n=512, reps=2)
    monkeypatch.setattr(bench, "matmul_peak_gflops", small_peak)
    # The smallest run that still times every variant once.
    cfg = bench.BenchConfig(
        batch_sizes=(2,), reps=1, warmup=0, min_rep_s=0, scan_steps=2, torch_compile=False
    )
    results = bench.run_bench(cfg, log=lambda line: None)
    assert results["machine"]["matmul_peak_gflops"] > 0
    (batch,) = results["batches"]
    assert set(batch["variants"]) == {
        "jax_step",
        "jax_donated",
        "jax_scan",
        "jax_eval",
        "jax_fc1_matmuls",
        "torch_step",
        "torch_eval",
    }
    for v in batch["variants"].values():
        assert v["steps_per_s"] > 0 and v["gflops_per_s"] > 0 and v["first_call_s"] > 0
    text = bench.format_results(results)
    assert "jaxnet / torch" in text and "| 2 |" in text
    assert "fc1 matmuls alone" in text
    path = tmp_path / "out" / "bench.json"
    bench.write_json(results, path)
    assert json.loads(path.read_text()) == json.loads(json.dumps(results))
    assert [p.name for p in path.parent.iterdir()] == ["bench.json"]  # no temporary left
