"""jaxnet.kernels: ``conv3x3_relu`` and its CPU backward forms equal a plain convolution (and
float64 numpy), and reach XLA:CPU in the form that keeps them off YNNPACK.

Correctness and lowering only: speed is measured by ``jaxnet bench``, never asserted here.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import NET, SGD, load_script

import jaxnet
from jaxnet import kernels
from jaxnet.kernels import conv3x3_relu
from jaxnet.model import Conv3x3ReLU, abstract_params


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
    rng = np.random.default_rng(cin + cout)
    x = jnp.asarray(rng.standard_normal((3, 12, 11, cin), dtype=np.float32))
    # An "rbg" key: the same draws for the same names and initialisers, as with the default
    # threefry key, which costs seconds to compile for each of the two inits.
    key = jax.random.key(0, impl="rbg")
    ref_vars = jax.jit(_NnConvReLU(cout).init)(key, x)
    new_vars = jax.jit(_Wrapped(cout, shifted).init)(key, x)
    # Same names, shapes, initialisers: the same random draws, bit for bit.
    jax.tree.map(np.testing.assert_array_equal, new_vars, ref_vars)
    # Biases are zero-initialised: give them values so their gradient path is exercised.
    params = jax.tree.map(
        lambda a: a + 0.1 * jnp.arange(a.size).reshape(a.shape) / a.size, ref_vars
    )
    dy = jnp.asarray(rng.standard_normal((3, 10, 9, cout), dtype=np.float32))

    def vjp(module):
        @jax.jit
        def run(params, x, dy):
            out, f = jax.vjp(lambda p, x: module.apply(p, x), params, x)
            return out, f(dy)

        return run(params, x, dy)

    (y_ref, (gp_ref, gx_ref)), (y, (gp, gx)) = vjp(_NnConvReLU(cout)), vjp(_Wrapped(cout, shifted))
    assert y.shape == y_ref.shape == (3, 10, 9, cout)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gx, gx_ref, rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), gp, gp_ref)


def test_conv3x3_relu_relu_gradient_is_zero_at_zero():
    # relu'(0) = 0 as in torch: an all-zero kernel and bias give zero gradients everywhere.
    x = jnp.ones((1, 5, 5, 1))
    k, b = jnp.zeros((3, 3, 1, 2)), jnp.zeros((2,))
    grad = jax.grad(lambda x, k, b: conv3x3_relu(x, k, b, True).sum(), argnums=(0, 1, 2))
    grads = jax.jit(grad)(x, k, b)
    for g in grads:
        np.testing.assert_array_equal(g, np.zeros_like(g))


@pytest.mark.parametrize("n", [1, 16, 17, 40, 128, 150])
def test_chunked_kernel_gradient_equals_one_convolution(n):
    # n covers: one chunk, a remainder chunk, several unrolled chunks, exactly two scanned
    # groups of 64, and scanned groups plus an unrolled remainder. The reference is the
    # kernel gradient in float64 (numpy), so chunking must keep the sum to float32 round-off.
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
    fns = (
        kernels._conv3x3_dkernel_chunked,
        kernels._conv3x3_dkernel,
        kernels._conv3x3_dkernel_single,
        kernels._conv3x3_dkernel_autodiff,  # the form used off the CPU
    )
    for fn in fns:
        out = np.asarray(jax.jit(fn)(x, g), np.float64)
        assert out.shape == (3, 3, 6, 16)
        assert np.all(np.abs(out - ref) <= 4 * scale), (
            fn.__name__,
            np.max(np.abs(out - ref) / scale),
        )


@pytest.mark.parametrize(("n", "cin", "cout"), [(1, 1, 6), (5, 6, 16), (3, 8, 16), (64, 6, 16)])
def test_input_gradient_forms_agree(n, cin, cout):
    # The CPU form (the transposed convolution with its output channels padded to a multiple of
    # 8) and the one used on other platforms, both against float64 numpy.
    rng = np.random.default_rng(n)
    g = rng.standard_normal((n, 10, 9, cout), dtype=np.float32)
    k = rng.standard_normal((3, 3, cin, cout), dtype=np.float32)
    g64, k64 = g.astype(np.float64), k.astype(np.float64)
    ref = np.zeros((n, 12, 11, cin))
    for i in range(3):
        for j in range(3):
            ref[:, i : i + 10, j : j + 9] += np.einsum("nhwo,co->nhwc", g64, k64[i, j])
    for fn in (
        kernels._conv3x3_dinput_padded,
        kernels._conv3x3_dinput_conv,
        kernels._conv3x3_dinput,
    ):
        out = np.asarray(jax.jit(fn)(g, k), np.float64)
        assert out.shape == ref.shape
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_cpu_kernel_gradient_is_lowered_in_chunks_of_16():
    # XLA:CPU gives a convolution to YNNPACK (6-7x slower here) when a feature axis is longer
    # than 16: the kernel gradient must reach XLA as convolutions over at most 16 samples.
    def lowered_convolutions(n: int) -> list[str]:
        x, g = jnp.zeros((n, 30, 30, 6)), jnp.zeros((n, 28, 28, 16))
        text = jax.jit(kernels._conv3x3_dkernel).lower(x, g).as_text()
        return [line for line in text.splitlines() if "stablehlo.convolution" in line]

    assert len(lowered_convolutions(16)) == 1
    assert len(lowered_convolutions(40)) == 3  # 16 + 16 + 8
    assert len(lowered_convolutions(256)) == 4  # a loop over 4 groups of 4 chunks
    for line in lowered_convolutions(150):  # 2 scanned groups of 4 chunks, 1 chunk, 6 samples
        assert "[b, 0, 1, f]x[0, 1, i, o]" in line, line
        lhs_type = line.rsplit(" : (", 1)[1].split("tensor<")[1]  # e.g. "6x30x30x16xf32>, "
        assert int(lhs_type.split("x")[3]) <= 16, line  # the contracted feature axis


def test_compiled_step_gives_no_convolution_to_ynnpack():
    # Compiled only (not run), from abstract arguments: nothing is initialised or computed.
    state = jax.eval_shape(
        lambda p: jaxnet.create_train_state(None, NET, SGD, p), abstract_params(NET)
    )
    batch = (
        jax.ShapeDtypeStruct((256, 32, 32, 1), jnp.float32),
        jax.ShapeDtypeStruct((256,), jnp.int32),
    )
    text = jaxnet.train_step.lower(state, batch).compile().as_text()
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


def test_the_kernel_forms_benchmark_runs_and_its_forms_agree():
    # scripts/kernel_forms.py gives docs/performance.md its conv2 and fc1 figures: the forms of
    # each section must compute the same thing (float32 round-off of sums of 54-12,544 terms).
    module = load_script("kernel_forms")
    result = module.measure(2, reps=1)
    assert set(result) == {"conv2_forward", "conv2_input_gradient", "fc1", "fc1_inference"}
    for forms in result.values():
        assert len(forms) >= 3 and all(v["ms"] > 0 for v in forms.values())
        for v in forms.values():
            assert v.get("max_abs_diff", 0.0) < 1e-4, forms


def _compiled_dots(fn, *args) -> list[str]:
    text = jax.jit(fn).lower(*args).compile().as_text()
    return [line for line in text.splitlines() if " dot(" in line]


@pytest.mark.parametrize("rows", [1, 32, 33])
def test_dense_dot_general_equals_dot_general_and_its_gradients(rows):
    # fc1's shape. At most 32 rows the CPU evaluates a batch of shorter products, summed:
    # float32 round-off of a different summation order (numpy's float64 product bounds it).
    rng = np.random.default_rng(rows)
    x = jnp.asarray(rng.standard_normal((rows, 12544), dtype=np.float32))
    w = jnp.asarray(rng.standard_normal((12544, 512), dtype=np.float32) * 0.01)
    dims = (((1,), (0,)), ((), ()))
    got = jax.jit(lambda x, w: kernels.dense_dot_general(x, w, dims))(x, w)
    want = jax.lax.dot_general(x, w, dims)
    exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    bound = 4 * np.abs(np.asarray(want, np.float64) - exact).max() + 1e-6
    assert np.abs(np.asarray(got, np.float64) - exact).max() <= bound
    # Differentiated, it is the plain product's forward and backward: the same bits.
    dy = jnp.asarray(rng.standard_normal((rows, 512), dtype=np.float32))

    def vjp(dot):
        return jax.jit(lambda x, w, dy: jax.vjp(lambda x, w: dot(x, w, dims), x, w)[1](dy))

    jax.tree.map(
        np.testing.assert_array_equal,
        vjp(kernels.dense_dot_general)(x, w, dy),
        vjp(jax.lax.dot_general)(x, w, dy),
    )


def test_dense_dot_general_is_a_batched_product_in_cpu_inference_only():
    x1, x64 = jnp.zeros((1, 12544)), jnp.zeros((64, 12544))
    w = jnp.zeros((12544, 512))
    dims = (((1,), (0,)), ((), ()))

    def forward(x, w):
        return kernels.dense_dot_general(x, w, dims)

    def batched(dots):
        return [line for line in dots if "lhs_batch_dims" in line]

    assert batched(_compiled_dots(forward, x1, w))  # 49 products of 256
    assert not batched(_compiled_dots(forward, x64, w))
    grads = jax.grad(lambda w, x: jnp.sum(forward(x, w)))
    assert not batched(_compiled_dots(grads, w, x1))
    # Short kernels (fc2, fc3) and other dimension numbers are lax.dot_general itself.
    assert not batched(_compiled_dots(forward, jnp.zeros((1, 512)), jnp.zeros((512, 64))))
    y = kernels.dense_dot_general(jnp.ones((2, 3)), jnp.ones((2, 4)), (((0,), (0,)), ((), ())))
    np.testing.assert_array_equal(y, jnp.full((3, 4), 2.0))


def test_net_inference_at_batch_1_uses_the_batched_product():
    # fc1 through dense_dot_general: 49 products of (1, 256) x (256, 512).
    params = abstract_params(NET)
    images = jax.ShapeDtypeStruct((1, 32, 32, 1), jnp.float32)
    dots = _compiled_dots(lambda p, x: NET.apply({"params": p}, x), params, images)
    assert any("f32[49,1,512]" in line and "lhs_batch_dims" in line for line in dots), dots


def test_dense_dot_general_in_bfloat16_is_as_close_to_exact_as_the_plain_product():
    # bf16 compute (Net(dtype=jnp.bfloat16)): the partial products are summed in float32 and
    # rounded to bfloat16 once, like the plain product.
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 12544), dtype=np.float32), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((12544, 512), dtype=np.float32), jnp.bfloat16)
    dims = (((1,), (0,)), ((), ()))
    got = jax.jit(lambda x, w: kernels.dense_dot_general(x, w, dims))(x, w)
    plain = jax.lax.dot_general(x, w, dims)
    assert got.dtype == plain.dtype == jnp.bfloat16
    exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)

    def error(y):
        return np.abs(np.asarray(y, np.float64) - exact).mean()

    assert error(got) <= 1.1 * error(plain)
