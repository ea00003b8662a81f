"""The fast train step (issue 5) computes the same numbers as PyTorch and as the plain Flax Net.

Correctness only: speed is measured by scripts/bench.py, never asserted here.
"""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnet
from jaxnet import bench, optim
from jaxnet.model import Conv3x3ReLU, conv3x3_relu

torch = pytest.importorskip("torch")
F = torch.nn.functional

from jaxnet.torch_reference import make_torch_net  # noqa: E402


def _data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((n, 32, 32, 1), dtype=np.float32),
        rng.integers(0, 2, n).astype(np.int32),
    )


def _max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


class _NnConvReLU(nn.Module):
    """The plain Flax layer Conv3x3ReLU must equal: nn.Conv(VALID) then ReLU."""

    features: int

    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Conv(self.features, (3, 3), padding="VALID", name="conv")(x))


class _Wrapped(nn.Module):
    features: int
    shifted: bool

    @nn.compact
    def __call__(self, x):
        return Conv3x3ReLU(self.features, shifted=self.shifted, name="conv")(x)


@pytest.mark.parametrize(("cin", "cout", "shifted"), [(1, 6, True), (6, 16, False), (6, 16, True)])
def test_conv3x3_relu_equals_nn_conv(cin, cout, shifted):
    x = jax.random.normal(jax.random.key(1), (3, 12, 11, cin))
    key = jax.random.key(0)
    ref_vars = _NnConvReLU(cout).init(key, x)
    new_vars = _Wrapped(cout, shifted).init(key, x)
    # Same names, shapes, initialisers: the same random draws, bit for bit.
    jax.tree.map(np.testing.assert_array_equal, new_vars, ref_vars)
    # Biases are zero-initialised: give them values so their gradient path is exercised.
    params = jax.tree.map(
        lambda a: a + 0.1 * jnp.arange(a.size).reshape(a.shape) / a.size, ref_vars
    )
    dy = jax.random.normal(jax.random.key(2), (3, 10, 9, cout))

    def vjp(module):
        out, f = jax.vjp(lambda p, x: module.apply(p, x), params, x)
        return out, f(dy)

    (y_ref, (gp_ref, gx_ref)), (y, (gp, gx)) = vjp(_NnConvReLU(cout)), vjp(_Wrapped(cout, shifted))
    assert y.shape == y_ref.shape == (3, 10, 9, cout)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gx, gx_ref, rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), gp, gp_ref)


def test_conv3x3_relu_relu_gradient_is_zero_at_zero():
    # relu'(0) = 0 as in torch: an all-zero kernel and bias give zero gradients everywhere.
    x = jnp.ones((1, 5, 5, 1))
    k, b = jnp.zeros((3, 3, 1, 2)), jnp.zeros((2,))
    grads = jax.grad(lambda x, k, b: conv3x3_relu(x, k, b, True).sum(), argnums=(0, 1, 2))(x, k, b)
    for g in grads:
        np.testing.assert_array_equal(g, np.zeros_like(g))


def test_net_keeps_parameter_layout_and_input_checks():
    variables = jaxnet.Net().init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))
    shapes = jax.tree.map(jnp.shape, variables)
    assert shapes == {
        "params": {
            "conv1": {"kernel": (3, 3, 1, 6), "bias": (6,)},
            "conv2": {"kernel": (3, 3, 6, 16), "bias": (16,)},
            "fc1": {"kernel": (12544, 512), "bias": (512,)},
            "fc2": {"kernel": (512, 64), "bias": (64,)},
            "fc3": {"kernel": (64, 2), "bias": (2,)},
        }
    }
    with pytest.raises(ValueError, match="NCHW"):
        jaxnet.Net().init(jax.random.key(0), jnp.zeros((1, 1, 32, 32)))


def _torch_step(net, x, y, lr=0.01):
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    xt = torch.from_numpy(jaxnet.nhwc_to_nchw(x).copy()).to(next(net.parameters()).dtype)
    opt.zero_grad()
    out = net(xt)
    loss = F.cross_entropy(out, torch.from_numpy(y).long())
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in net.named_parameters()}
    opt.step()
    return out.detach(), loss.detach(), grads, net.state_dict()


@pytest.mark.parametrize("step", ["train_step", "train_step_donated"])
def test_train_step_matches_pytorch(step):
    x, y = _data(8)
    tnet, tnet64 = make_torch_net(3), make_torch_net(3, dtype=torch.float64)
    params = jaxnet.params_from_torch(tnet.state_dict())
    state = jaxnet.create_train_state(None, jaxnet.Net(), optim.sgd(0.01, momentum=0.9), params)

    out = jaxnet.Net().apply({"params": state.params}, jnp.asarray(x))
    (loss, _), grads = jax.value_and_grad(jaxnet.loss_fn, has_aux=True)(
        state.params, state.apply_fn, (jnp.asarray(x), jnp.asarray(y)), jaxnet.losses.cross_entropy
    )
    state, metrics = getattr(jaxnet, step)(state, (jnp.asarray(x), jnp.asarray(y)))

    t_out, t_loss, t_grads, t_after = _torch_step(tnet, x, y)
    # The float32 noise floor: torch float32 against torch float64 from the same start.
    t64_out, _, g64, _ = _torch_step(tnet64, x, y)
    floor_out = _max_abs(t_out, t64_out)
    assert _max_abs(out, t_out) <= max(1e-6, 10 * floor_out)
    assert abs(float(loss) - float(t_loss)) <= 1e-6
    assert abs(float(metrics["loss"]) - float(t_loss)) <= 1e-6

    g_as_torch = jaxnet.params_to_torch(grads, as_numpy=True)
    for k, g in g_as_torch.items():
        scale = float(t_grads[k].abs().max()) + 1e-12
        floor = _max_abs(t_grads[k], g64[k]) / scale
        assert _max_abs(g, t_grads[k]) / scale <= max(1e-5, 10 * floor), k
    new_as_torch = jaxnet.params_to_torch(state.params, as_numpy=True)
    for k, v in new_as_torch.items():
        assert _max_abs(v, t_after[k]) <= 1e-6, k


def test_train_step_donated_consumes_the_old_state():
    x, y = _data(4)
    params = jaxnet.Net().init(jax.random.key(0), jnp.asarray(x))["params"]
    state = jaxnet.create_train_state(None, jaxnet.Net(), optim.sgd(0.01, momentum=0.9), params)
    kept = jaxnet.train_step(state, (jnp.asarray(x), jnp.asarray(y)))[0]
    old_kernel = state.params["fc1"]["kernel"]
    new, _ = jaxnet.train_step_donated(state, (jnp.asarray(x), jnp.asarray(y)))
    assert old_kernel.is_deleted()
    jax.tree.map(np.testing.assert_array_equal, new.params, kept.params)


def test_train_steps_equals_step_by_step_loop():
    steps, n = 3, 4
    xs = np.stack([_data(n, seed=s)[0] for s in range(steps)])
    ys = np.stack([_data(n, seed=s)[1] for s in range(steps)])
    params = jaxnet.Net().init(jax.random.key(0), jnp.asarray(xs[0]))["params"]
    make = lambda: jaxnet.create_train_state(  # noqa: E731
        None, jaxnet.Net(), optim.sgd(0.05, momentum=0.9), params
    )
    state, losses = make(), []
    for s in range(steps):
        state, m = jaxnet.train_step(state, (jnp.asarray(xs[s]), jnp.asarray(ys[s])))
        losses.append(float(m["loss"]))
    fused, metrics = jaxnet.train_steps(make(), (jnp.asarray(xs), jnp.asarray(ys)))
    assert metrics["loss"].shape == metrics["accuracy"].shape == (steps,)
    np.testing.assert_allclose(metrics["loss"], losses, rtol=0, atol=1e-6)
    assert int(fused.step) == int(state.step) == steps
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), fused.params, state.params
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6),
        fused.opt_state,
        state.opt_state,
    )
    # Params moved: the comparison above is not of two unchanged states.
    assert _max_abs(fused.params["fc3"]["kernel"], params["fc3"]["kernel"]) > 1e-4


def test_train_steps_rejects_bad_input():
    x, y = _data(4)
    params = jaxnet.Net().init(jax.random.key(0), jnp.asarray(x))["params"]
    state = jaxnet.create_train_state(None, jaxnet.Net(), optim.sgd(0.01), params)
    with pytest.raises(ValueError, match="stack of batches"):
        jaxnet.train_steps(state, (jnp.asarray(x)[None], jnp.asarray(y)[None].repeat(2, 0)))
    bad = np.array([[0, 1, 2, 0]], np.int32)
    # Raised in a host callback: it reaches the caller wrapped in jax's runtime error.
    with pytest.raises((ValueError, jax.errors.JaxRuntimeError), match="class labels"):
        out = jaxnet.train_steps(state, (jnp.asarray(x)[None], jnp.asarray(bad)))
        jax.block_until_ready(out)


def test_bfloat16_compute_keeps_float32_params():
    x, y = _data(8)
    params = jaxnet.Net().init(jax.random.key(0), jnp.asarray(x))["params"]
    batch = (jnp.asarray(x), jnp.asarray(y))
    tx = optim.sgd(0.01, momentum=0.9)
    s16 = jaxnet.create_train_state(None, jaxnet.Net(dtype=jnp.bfloat16), tx, params)
    s32 = jaxnet.create_train_state(None, jaxnet.Net(), tx, params)
    assert jaxnet.Net(dtype=jnp.bfloat16).apply({"params": params}, batch[0]).dtype == jnp.bfloat16
    s16, m16 = jaxnet.train_step(s16, batch)
    s32, m32 = jaxnet.train_step(s32, batch)
    assert m16["loss"].dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(s16.params))
    assert abs(float(m16["loss"]) - float(m32["loss"])) < 2e-2  # bf16 has 8 mantissa bits
    d16 = s16.params["fc1"]["kernel"] - params["fc1"]["kernel"]
    d32 = s32.params["fc1"]["kernel"] - params["fc1"]["kernel"]
    cos = float(jnp.vdot(d16, d32) / (jnp.linalg.norm(d16) * jnp.linalg.norm(d32)))
    assert cos > 0.99  # the bf16 step points where the float32 step does


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
def test_bench_runs_and_writes_json(tmp_path, capsys):
    from jaxnet.cli import main

    path = tmp_path / "out" / "bench.json"
    argv = [
        "bench",
        "--batch-sizes",
        "2",
        "--reps",
        "1",
        "--warmup",
        "0",
        "--min-rep-s",
        "0",
        "--scan-steps",
        "2",
        "--no-torch-compile",
        "--malloc-defaults",  # leave this test process' malloc as it is
        "--json",
        str(path),
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "jaxnet / torch" in text and "| 2 |" in text
    results = json.loads(path.read_text())
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
    assert results["machine"]["malloc_tuned"] is False
    assert "fc1 matmuls alone" in text
    for v in batch["variants"].values():
        assert v["steps_per_s"] > 0 and v["gflops_per_s"] > 0 and v["first_call_s"] > 0
    assert [p.name for p in path.parent.iterdir()] == ["bench.json"]  # no temporary left


def test_in_place_ordering_leaves_params_bit_exact():
    from jaxnet.train import _after_gradients

    params = {"a": jnp.array([-0.0, 0.0, 1.5, -jnp.inf, jnp.nan]), "b": jnp.array([[2.0]])}
    for g0 in (jnp.nan, jnp.inf, -jnp.inf, -3.0, -0.0, 7.0):
        grads = {"a": jnp.full((5,), g0), "b": jnp.array([[g0]])}
        out = jax.jit(_after_gradients)(grads, params)
        for k in params:  # compare bits: -0.0 stays -0.0, NaN stays NaN
            np.testing.assert_array_equal(
                np.asarray(out[k]).view(np.uint32), np.asarray(params[k]).view(np.uint32)
            )


@pytest.mark.parametrize("n", [1, 16, 17, 40, 128, 150])
def test_chunked_kernel_gradient_equals_one_convolution(n):
    # n covers: one chunk, a remainder chunk, several unrolled chunks, exactly two scanned
    # groups of 64, and scanned groups plus an unrolled remainder. The reference is the
    # kernel gradient in float64 (numpy), so chunking must keep the sum to float32 round-off.
    from jaxnet import model

    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, 30, 30, 6), dtype=np.float32)
    g = rng.standard_normal((n, 28, 28, 16), dtype=np.float32)
    x64, g64 = x.astype(np.float64), g.astype(np.float64)
    ref = np.stack(
        [
            np.stack(
                [np.einsum("nhwc,nhwo->co", x64[:, i : i + 28, j : j + 28], g64) for j in range(3)]
            )
            for i in range(3)
        ]
    )
    # float32 round-off scale of each entry: eps * sum |x||g| over the n*784 terms.
    scale = np.finfo(np.float32).eps * np.einsum(
        "nhwc,nhwo->co", np.abs(x64[:, :28, :28]), np.abs(g64)
    )
    fns = (model._conv3x3_dkernel_chunked, model._conv3x3_dkernel, model._conv3x3_dkernel_single)
    for fn in fns:
        out = np.asarray(jax.jit(fn)(x, g), np.float64)
        assert out.shape == (3, 3, 6, 16)
        assert np.all(np.abs(out - ref) <= 4 * scale), (
            fn.__name__,
            np.max(np.abs(out - ref) / scale),
        )


@pytest.mark.parametrize(("n", "cin", "cout"), [(1, 1, 6), (5, 6, 16), (64, 6, 16)])
def test_input_gradient_forms_agree(n, cin, cout):
    # The CPU form (one matmul over the 9 taps + shifted sum) and the transposed convolution
    # used on other platforms, both against float64 numpy.
    from jaxnet import model

    rng = np.random.default_rng(n)
    g = rng.standard_normal((n, 10, 9, cout), dtype=np.float32)
    k = rng.standard_normal((3, 3, cin, cout), dtype=np.float32)
    g64, k64 = g.astype(np.float64), k.astype(np.float64)
    ref = np.zeros((n, 12, 11, cin))
    for i in range(3):
        for j in range(3):
            ref[:, i : i + 10, j : j + 9] += np.einsum("nhwo,co->nhwc", g64, k64[i, j])
    for fn in (model._conv3x3_dinput_taps, model._conv3x3_dinput_conv, model._conv3x3_dinput):
        out = np.asarray(jax.jit(fn)(g, k), np.float64)
        assert out.shape == ref.shape
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_cpu_kernel_gradient_is_lowered_in_chunks_of_16():
    # XLA:CPU gives a convolution to YNNPACK (6-7x slower here) when a feature axis is longer
    # than 16: the kernel gradient must reach XLA as convolutions over at most 16 samples.
    from jaxnet import model

    def lowered_convolutions(n: int) -> list[str]:
        x, g = jnp.zeros((n, 30, 30, 6)), jnp.zeros((n, 28, 28, 16))
        text = jax.jit(model._conv3x3_dkernel).lower(x, g).as_text()
        return [line for line in text.splitlines() if "stablehlo.convolution" in line]

    assert len(lowered_convolutions(16)) == 1
    assert len(lowered_convolutions(40)) == 3  # 16 + 16 + 8
    assert len(lowered_convolutions(256)) == 4  # a loop over 4 groups of 4 chunks
    for line in lowered_convolutions(150):  # 2 scanned groups of 4 chunks, 1 chunk, 6 samples
        assert "[b, 0, 1, f]x[0, 1, i, o]" in line, line
        lhs_type = line.rsplit(" : (", 1)[1].split("tensor<")[1]  # e.g. "6x30x30x16xf32>, "
        assert int(lhs_type.split("x")[3]) <= 16, line  # the contracted feature axis


def test_compiled_step_gives_no_convolution_to_ynnpack():
    state = jaxnet.create_train_state(jax.random.key(0), jaxnet.Net(), optim.sgd(0.01, 0.9))
    x, y = _data(256)
    text = jaxnet.train_step.lower(state, (x, y)).compile().as_text()
    assert " convolution(" in text
    ynn_bodies = {
        line.split("calls=")[1].split(",")[0].strip()
        for line in text.splitlines()
        if '"__ynn_fusion"' in line and "calls=" in line
    }
    computations = text.split("\n\n")
    for body in ynn_bodies:
        for comp in computations:
            if comp.lstrip().startswith(body + " ") or f"\n{body} " in comp:
                assert " convolution(" not in comp, comp
