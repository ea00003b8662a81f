"""The compute forms of ``Net``'s layers that XLA:CPU runs faster than the plain op.

* ``conv3x3_relu``: the 3x3 convolution + ReLU of the conv layers, with a hand-written
  backward pass. The forward pass is XLA's convolution (or, for one input channel, a fused sum
  of shifted slices); the backward pass picks, per platform, the forms XLA:CPU runs fastest
  and plain convolutions elsewhere.
* ``dense_dot_general``: the ``dot_general`` of the fully connected layers (``nn.Dense``'s
  ``dot_general`` hook): for a few rows against a long kernel (fc1 at small batches) the CPU
  computes it as a batch of shorter products.

Why each form exists, and what it was measured against, is in ``docs/performance.md``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["conv3x3_relu", "dense_dot_general"]

_CONV_DIMS = ("NHWC", "HWIO", "NHWC")


def _conv3x3_xla(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=_CONV_DIMS)


# XLA:CPU's own (Eigen) convolution runs an input feature axis of 8 faster than one of 6
# (conv2's forward pass: 1.3-1.5x at batch 32-1024, docs/performance.md), so on CPU the input
# channels are zero-padded up to a multiple of 8, the kernel with zero rows: the same sums.
_CPU_FEATURE_MULTIPLE = 8


def _pad_in_channels(kernel: jax.Array) -> jax.Array:
    # A (3, 3, C, O) kernel with zero rows up to C a multiple of _CPU_FEATURE_MULTIPLE.
    pad = -kernel.shape[2] % _CPU_FEATURE_MULTIPLE
    return jnp.pad(kernel, ((0, 0), (0, 0), (0, pad), (0, 0)))


def _conv3x3_padded(x: jax.Array, kernel: jax.Array) -> jax.Array:
    padded = _pad_in_channels(kernel)
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, padded.shape[2] - x.shape[-1])))
    return _conv3x3_xla(x, padded)


def _conv3x3_forward(x: jax.Array, kernel: jax.Array) -> jax.Array:
    # Lowered for the platform the step runs on; elsewhere the convolution as it is (cuDNN).
    return jax.lax.platform_dependent(x, kernel, cpu=_conv3x3_padded, default=_conv3x3_xla)


def _conv3x3_shifted(x: jax.Array, kernel: jax.Array) -> jax.Array:
    # A VALID 3x3 convolution as 9*C shifted slices of x, each times one row of the kernel,
    # summed: XLA:CPU fuses it into one elementwise loop with the bias and the ReLU.
    ho, wo = x.shape[1] - 2, x.shape[2] - 2
    terms = (
        x[:, i : i + ho, j : j + wo, c : c + 1] * kernel[i, j, c]
        for i in range(3)
        for j in range(3)
        for c in range(x.shape[-1])
    )
    return functools.reduce(jnp.add, terms)


def _conv3x3_dkernel_single(x: jax.Array, g: jax.Array) -> jax.Array:
    # dL/dkernel[i, j, c, o] = sum_{n,h,w} x[n, h+i, w+j, c] g[n, h, w, o]: a convolution of x
    # by g with the batch as the contracted feature axis. Written out (rather than left to
    # autodiff) so XLA:CPU gets these layouts everywhere: inside a lax.scan body it otherwise
    # keeps NHWC and runs this convolution ~10x slower.
    dk = jax.lax.conv_general_dilated(
        x.transpose(3, 1, 2, 0),
        g.transpose(1, 2, 0, 3),
        (1, 1),
        "VALID",
        dimension_numbers=_CONV_DIMS,
    )
    return dk.transpose(1, 2, 0, 3)


# XLA:CPU hands a convolution to YNNPACK when its input or output feature axis is longer than
# 16, and keeps it in its own (Eigen) kernels otherwise. For the kernel gradient the contracted
# feature axis is the batch, and YNNPACK runs it several times slower than Eigen does
# (docs/performance.md). So on CPU the batch is cut into chunks of at most 16 samples and the
# chunks' kernel gradients are summed.
_DKERNEL_CHUNK = 16
# Chunks per loop iteration, unrolled: a loop keeps compile time flat in the batch size (a
# fully unrolled sum compiles in time growing with the batch), and 4 chunks per iteration ran
# fastest (docs/performance.md).
_DKERNEL_UNROLL = 4


def _conv3x3_dkernel_chunked(x: jax.Array, g: jax.Array) -> jax.Array:
    # Chunk k holds samples k, k + G, k + 2G, ... (G = N // 16 chunks), not 16 neighbours: a
    # batch sharded over devices in contiguous blocks then keeps every chunk spread over all
    # devices, so each chunk's gradient is a local convolution plus an all-reduce, as for the
    # whole batch; 16 neighbours would live on one device and be gathered to all of them.
    # Each chunk is read in place (a dynamic slice of the (16, G, ...) view) by a fori_loop:
    # transposing x and g to (G, 16, ...) first was slower at large batches.
    n = x.shape[0]
    main = (n // _DKERNEL_CHUNK) * _DKERNEL_CHUNK
    chunks = main // _DKERNEL_CHUNK
    x4 = x[:main].reshape(_DKERNEL_CHUNK, chunks, *x.shape[1:])
    g4 = g[:main].reshape(_DKERNEL_CHUNK, chunks, *g.shape[1:])

    def chunk(k: Any) -> jax.Array:
        xk = jax.lax.dynamic_index_in_dim(x4, k, axis=1, keepdims=False)
        gk = jax.lax.dynamic_index_in_dim(g4, k, axis=1, keepdims=False)
        return _conv3x3_dkernel_single(xk, gk)

    def unrolled(first: Any, count: int) -> jax.Array:
        return functools.reduce(jnp.add, (chunk(first + u) for u in range(count)))

    looped = (chunks // _DKERNEL_UNROLL) * _DKERNEL_UNROLL if chunks >= 2 * _DKERNEL_UNROLL else 0
    parts = []
    if looped:
        zero = jnp.zeros((3, 3, x.shape[-1], g.shape[-1]), jnp.result_type(x, g))
        parts.append(
            jax.lax.fori_loop(
                0,
                looped // _DKERNEL_UNROLL,
                lambda i, acc: acc + unrolled(i * _DKERNEL_UNROLL, _DKERNEL_UNROLL),
                zero,
            )
        )
    if chunks > looped:
        parts.append(unrolled(looped, chunks - looped))
    if n > main:  # the last n % 16 samples (under sharding, XLA moves these few rows)
        parts.append(_conv3x3_dkernel_single(x[main:], g[main:]))
    return functools.reduce(jnp.add, parts)


def _conv3x3_dkernel_autodiff(x: jax.Array, g: jax.Array) -> jax.Array:
    # JAX's own transpose of the forward convolution (the convolution is linear in the kernel,
    # so the point of the vjp does not matter): the form XLA:GPU recognises as a backward-filter
    # convolution and hands to cuDNN's backward-filter kernels, as PyTorch does.
    zero = jnp.zeros((3, 3, x.shape[-1], g.shape[-1]), jnp.result_type(x, g))
    _, vjp = jax.vjp(lambda k: _conv3x3_xla(x, k), zero)
    return vjp(g)[0]


def _conv3x3_dkernel(x: jax.Array, g: jax.Array) -> jax.Array:
    # Lowered for the platform the step runs on: on CPU the forms above; elsewhere (GPU, TPU)
    # autodiff's backward-filter convolution.
    cpu = _conv3x3_dkernel_single if x.shape[0] <= _DKERNEL_CHUNK else _conv3x3_dkernel_chunked
    return jax.lax.platform_dependent(x, g, cpu=cpu, default=_conv3x3_dkernel_autodiff)


def _conv3x3_dinput_conv(g: jax.Array, kernel: jax.Array) -> jax.Array:
    # The transposed convolution: g padded by 2, correlated with the flipped, I/O-swapped kernel.
    k = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
    return jax.lax.conv_general_dilated(
        g, k, (1, 1), ((2, 2), (2, 2)), dimension_numbers=_CONV_DIMS
    )


def _conv3x3_dinput_padded(g: jax.Array, kernel: jax.Array) -> jax.Array:
    # The transposed convolution with its output features (the input's channels, 6 for conv2)
    # zero-padded up to a multiple of 8 and sliced off after: XLA:CPU's Eigen convolution runs
    # it 1.4-2.5x faster than with 6 (docs/performance.md).
    return _conv3x3_dinput_conv(g, _pad_in_channels(kernel))[..., : kernel.shape[2]]


def _conv3x3_dinput(g: jax.Array, kernel: jax.Array) -> jax.Array:
    # Lowered for the platform the step runs on; elsewhere the convolution (cuDNN on GPU).
    return jax.lax.platform_dependent(
        g, kernel, cpu=_conv3x3_dinput_padded, default=_conv3x3_dinput_conv
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def conv3x3_relu(x: jax.Array, kernel: jax.Array, bias: jax.Array, shifted: bool) -> jax.Array:
    """``relu(conv(x, kernel) + bias)``: a VALID, stride-1 3x3 convolution, NHWC/HWIO.

    ``x`` ``(N, H, W, C)``, ``kernel`` ``(3, 3, C, O)``, ``bias`` ``(O,)`` -> ``(N, H-2, W-2, O)``.
    Equal to ``nn.Conv(O, (3, 3), padding="VALID")`` then ``nn.relu`` up to float32 round-off.

    ``shifted=True`` computes the forward pass as a fused sum of 9*C shifted slices, much
    faster than XLA:CPU's convolution for C=1 (conv1); for larger C it loses,
    because XLA fuses the sum again into each consumer of the output. On CPU the other
    convolutions pad their channel axis to a multiple of 8 with zeros. The backward pass is
    written out: on CPU the input gradient as a transposed convolution with its output
    channels padded the same way, and the kernel gradient as convolutions over chunks of at
    most 16 samples, in the layouts XLA:CPU runs fastest, also inside ``lax.scan``; on other
    platforms, two plain convolutions.
    """
    z = _conv3x3_shifted(x, kernel) if shifted else _conv3x3_forward(x, kernel)
    return jax.nn.relu(z + bias)


def _conv3x3_relu_fwd(x, kernel, bias, shifted):
    y = conv3x3_relu(x, kernel, bias, shifted)
    return y, (x, kernel, y)


def _conv3x3_relu_bwd(shifted, res, dy):
    del shifted
    x, kernel, y = res
    # relu'(0) = 0, as in jax.nn.relu's and torch's backward.
    g = jnp.where(y > 0, dy, jnp.zeros_like(dy))
    return _conv3x3_dinput(g, kernel), _conv3x3_dkernel(x, g), jnp.sum(g, axis=(0, 1, 2))


conv3x3_relu.defvjp(_conv3x3_relu_fwd, _conv3x3_relu_bwd)


# XLA:CPU runs a product of a few rows with a long (K, N) kernel (fc1: K = 12544) as one
# matrix-vector style product that streams the kernel at a fraction of memory speed; cut into
# K / L products of length L, batched, and summed, it runs 1.2-1.8x faster at 1 to 32 rows
# (docs/performance.md). Longer row counts are left to the plain product, which wins there.
_CHUNKED_MAX_ROWS = 32
_CHUNKED_MIN_DEPTH = 4096


def _chunk_length(rows: Any, depth: Any) -> int | None:
    # The measured best: L = 256 for one row, 128 for 2 to 32; None where the form is not used,
    # also for a symbolic row count (jax.export with a symbolic batch: any size is possible).
    if not (isinstance(rows, int) and isinstance(depth, int)):
        return None
    if rows > _CHUNKED_MAX_ROWS or depth < _CHUNKED_MIN_DEPTH:
        return None
    length = 256 if rows == 1 else 128
    return length if depth % length == 0 else None


def _matmul_chunked(x: jax.Array, w: jax.Array, precision: Any, preferred: Any) -> jax.Array:
    rows, depth = x.shape
    length = _chunk_length(rows, depth)
    chunks = depth // length
    out = preferred or jnp.result_type(x, w)
    # Partial products of bf16/fp16 inputs are summed in float32, rounded once at the end, as
    # the plain product rounds once.
    accumulate = jnp.promote_types(out, jnp.float32)
    parts = jnp.einsum(
        "bck,ckn->cbn",
        x.reshape(rows, chunks, length),
        w.reshape(chunks, length, w.shape[1]),
        precision=precision,
        preferred_element_type=accumulate,
    )
    return jnp.sum(parts, axis=0).astype(out)


def _matmul_plain(x: jax.Array, w: jax.Array, precision: Any, preferred: Any) -> jax.Array:
    return jax.lax.dot_general(
        x, w, (((1,), (0,)), ((), ())), precision=precision, preferred_element_type=preferred
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul_few_rows(x: jax.Array, w: jax.Array, precision: Any, preferred: Any) -> jax.Array:
    # Lowered for the platform the step runs on; elsewhere the plain product (cuBLAS on GPU).
    return jax.lax.platform_dependent(
        x,
        w,
        cpu=functools.partial(_matmul_chunked, precision=precision, preferred=preferred),
        default=functools.partial(_matmul_plain, precision=precision, preferred=preferred),
    )


def _matmul_few_rows_fwd(x, w, precision, preferred):
    # Differentiated (a training step), the plain product: there XLA:CPU does not hand the
    # batched form to the fast kernel it uses in inference, and the plain one ran as fast or
    # faster (docs/performance.md).
    return _matmul_plain(x, w, precision, preferred), (x, w)


def _matmul_few_rows_bwd(precision, preferred, res, g):
    # The plain product's own transposes (what autodiff of x @ w gives).
    x, w = res
    g = g.astype(jnp.result_type(x, w))
    dx = jax.lax.dot_general(g, w, (((1,), (1,)), ((), ())), precision=precision)
    dw = jax.lax.dot_general(x, g, (((0,), (0,)), ((), ())), precision=precision)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_matmul_few_rows.defvjp(_matmul_few_rows_fwd, _matmul_few_rows_bwd)


def dense_dot_general(
    lhs: jax.Array,
    rhs: jax.Array,
    dimension_numbers: Any,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
    """``jax.lax.dot_general`` for ``nn.Dense(..., dot_general=dense_dot_general)``.

    The same product, ``(rows, K) x (K, N) -> (rows, N)``, up to float32 round-off. Evaluated
    (not differentiated) with at most 32 rows against a kernel with ``K >= 4096`` (fc1's
    inference at small batches), the CPU sums ``K / L`` products of length ``L`` instead,
    batched (faster there, see ``docs/performance.md``). Differentiated, every other call, and
    on every other platform, it is ``lax.dot_general`` itself.
    """
    plain = dimension_numbers == (((lhs.ndim - 1,), (0,)), ((), ()))
    if plain and lhs.ndim == 2 and rhs.ndim == 2 and _chunk_length(*lhs.shape) is not None:
        return _matmul_few_rows(lhs, rhs, precision, preferred_element_type)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type)
