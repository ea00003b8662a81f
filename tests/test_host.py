"""jaxnet.host.tune_malloc: XLA:CPU's per-step buffers stop costing fresh pages every step."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from jaxnet.host import tune_malloc

# Counts the minor page faults per donated train step at batch 128 (about 12,000 per step with
# glibc's default thresholds, measured with jax 0.10.2), after tune_malloc() if asked.
_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    from jaxnet.host import tune_malloc
    applied = tune_malloc() if sys.argv[1] == "tuned" else None
    import jax, jax.numpy as jnp, numpy as np
    import jaxnet
    from jaxnet import optim
    from jaxnet.model import abstract_params
    net = jaxnet.Net()
    rng = np.random.default_rng(0)
    # Params drawn with NumPy: compiling Net's init would cost more than the steps measured.
    params = jax.tree.map(
        lambda s: jnp.asarray(rng.uniform(-0.01, 0.01, s.shape).astype(s.dtype)),
        abstract_params(net),
    )
    state = jaxnet.create_train_state(None, net, optim.sgd(0.01, momentum=0.9), params)
    batch = (jnp.asarray(rng.standard_normal((128, 32, 32, 1), dtype=np.float32)),
             jnp.asarray(rng.integers(0, 2, 128).astype(np.int32)))
    for _ in range(3):
        state, _ = jaxnet.train_step_donated(state, batch)
    jax.block_until_ready(state)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        state, _ = jaxnet.train_step_donated(state, batch)
    jax.block_until_ready(state)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
    print(json.dumps({"applied": applied, "faults_per_step": faults}))
    """
)


def _faults_per_step(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_tune_malloc_rejects_a_non_positive_threshold():
    with pytest.raises(ValueError, match="positive"):
        tune_malloc(0)


def test_tune_malloc_removes_the_per_step_page_faults():
    if not sys.platform.startswith("linux"):
        assert tune_malloc() is False  # only glibc has these knobs; nothing is changed
        return
    tuned = _faults_per_step("tuned")
    print(f"minor page faults per step at batch 128, tuned: {tuned['faults_per_step']:.0f}")
    assert tuned["applied"] is True
    # 500 pages = 2 MB of fresh memory per step; untuned it is ~47 MB (~12,000 pages).
    assert tuned["faults_per_step"] < 500, tuned
