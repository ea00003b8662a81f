"""scripts/device_check.py, the GPU check, run reduced on the CPU so that it cannot rot.

Every section must run without error and write what the lead reads off a GPU run: versions,
the parity table judged against float32's noise floor, validate's verdict, the benchmark's
per-batch ratios to PyTorch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import SCRIPTS, background_result, in_background, load_script, run_logged

pytest.importorskip("torch")

SCRIPT = SCRIPTS / "device_check.py"


@in_background("reduced_device_check")
def _reduced_run(out: Path) -> Path:
    """``scripts/device_check.py --reduced`` as a user runs it, in a subprocess of its own, so
    that it runs beside the in-process tests."""
    argv = [sys.executable, str(SCRIPT), "--reduced", "--out", str(out / "result")]
    run_logged(
        argv,
        out / "console.txt",
        cwd=SCRIPT.parents[1],
        timeout=300,
        what="the reduced device check",
    )
    return out / "result"


@pytest.fixture(scope="module")
def reduced_device_check(request) -> Path:
    return background_result(request, "reduced_device_check")


@pytest.mark.slow
def test_reduced_run_writes_every_section_without_errors(reduced_device_check):
    device_check = load_script("device_check")
    out = reduced_device_check
    assert sorted(p.name for p in out.iterdir()) == ["device_check.json", "device_check.log"]
    doc = json.loads((out / "device_check.json").read_text())
    assert doc["reduced"] is True
    sections = doc["sections"]
    assert list(sections) == list(device_check.SECTION_CAPS_S)
    for name, entry in sections.items():
        assert entry["ok"], (name, entry.get("error"), entry.get("traceback"))
        assert "error" not in entry and entry["seconds"] > 0
    env = sections["environment"]["result"]
    assert env["versions"]["jax"] and env["versions"]["torch"] and env["jax_devices"]
    parity = sections["parity"]["result"]
    assert parity["passed"] and parity["worst_ratio"] <= parity["limit"]
    assert {"outputs[logits]", "loss[loss]", "grads[fc1.weight]", "params[fc1.weight]"} <= set(
        parity["tensors"]
    )
    assert sections["validate"]["result"]["verdict"]["passed"]
    float64 = sections["parity_float64"]["result"]
    assert float64["passed"] and float64["worst_max_rel"] < 1e-12, float64["worst"]
    assert float64["tensors"]["grads[conv1.weight]"]["dtype"] == "float64"
    assert parity["conv_kernels_of_train_step"]["xla convolution instructions"] > 0
    assert sections["validate_float64"]["result"]["config"]["precision"] == "float64"
    assert sections["validate_float64"]["result"]["verdict"]["passed"]
    for dtype in ("float32", "bfloat16"):
        result = sections[f"bench_{dtype}"]["result"]
        assert result["config"]["dtype"] == dtype
        (row,) = result["summary"]
        assert row["speed_vs_torch_eager"]["jax_step"] > 0 and row["first_call_s"]["jax_step"] > 0
    log = (out / "device_check.log").read_text()
    assert "all sections ok" in log and "== bench_bfloat16" in log
