"""The tutorial's ``Net`` as a Flax Linen module."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxnet.convert import IMAGE_SIZE, IN_CHANNELS, check_nhwc_images

__all__ = [
    "Conv3x3ReLU",
    "Net",
    "conv3x3_relu",
    "summary",
    "torch_bias_init",
    "torch_kernel_init",
]

Initializer = Callable[..., jax.Array]

# PyTorch's Linear/Conv2d reset_parameters: kaiming_uniform_(a=sqrt(5)) for the weight, which is
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and the same bound for the bias. variance_scaling(1/3,
# fan_in, uniform) has bound sqrt(3 * (1/3) / fan_in) = 1/sqrt(fan_in), with fan_in computed
# from the kernel's shape (kh*kw*in for HWIO conv kernels, in for Dense kernels), as in torch.
torch_kernel_init: Initializer = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int) -> Initializer:
    """PyTorch's bias initialiser, ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``.

    A bias initialiser only sees the bias' own shape, so the layer's fan_in is passed in.
    """
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


_CONV_DIMS = ("NHWC", "HWIO", "NHWC")


def _conv3x3_xla(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=_CONV_DIMS)


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
# feature axis is the batch, and YNNPACK runs it 6-7x slower than Eigen does (batch 256: 39 ms
# against 5.5 ms; batch 1024: 236 ms against 21 ms, measured on 2 cores). So on CPU the batch is
# cut into chunks of at most 16 samples and the chunks' kernel gradients are summed.
_DKERNEL_CHUNK = 16
# Chunks per loop iteration, unrolled: a loop keeps compile time flat in the batch size (fully
# unrolled, batch 4096 took 7 s to compile), and 4 chunks per iteration ran fastest.
_DKERNEL_UNROLL = 4


def _conv3x3_dkernel_chunked(x: jax.Array, g: jax.Array) -> jax.Array:
    # Chunk k holds samples k, k + G, k + 2G, ... (G = N // 16 chunks), not 16 neighbours: a
    # batch sharded over devices in contiguous blocks then keeps every chunk spread over all
    # devices, so each chunk's gradient is a local convolution plus an all-reduce, as for the
    # whole batch; 16 neighbours would live on one device and be gathered to all of them.
    # Each chunk is read in place (a dynamic slice of the (16, G, ...) view) by a fori_loop:
    # transposing x and g to (G, 16, ...) first cost up to 2x at batch 1024.
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


def _conv3x3_dkernel(x: jax.Array, g: jax.Array) -> jax.Array:
    if x.shape[0] <= _DKERNEL_CHUNK:
        return _conv3x3_dkernel_single(x, g)
    # Lowered for the platform the step runs on: one convolution wherever the library
    # threshold above does not apply (GPU, TPU).
    return jax.lax.platform_dependent(
        x, g, cpu=_conv3x3_dkernel_chunked, default=_conv3x3_dkernel_single
    )


def _conv3x3_dinput_conv(g: jax.Array, kernel: jax.Array) -> jax.Array:
    # The transposed convolution: g padded by 2, correlated with the flipped, I/O-swapped kernel.
    k = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
    return jax.lax.conv_general_dilated(
        g, k, (1, 1), ((2, 2), (2, 2)), dimension_numbers=_CONV_DIMS
    )


def _conv3x3_dinput_taps(g: jax.Array, kernel: jax.Array) -> jax.Array:
    # dL/dx[n, y, x, c] = sum_{i,j,o} g[n, y-i, x-j, o] kernel[i, j, c, o]. One matmul gives
    # every tap's term at once, (N*H*W, O) @ (O, 9*C), and one fused loop adds the 9 shifted,
    # zero-padded slices. XLA:CPU runs this 1.4-2x faster than its transposed convolution
    # (batch 256: 8 ms against 16 ms; the training step at batch 128: 45 ms against 51 ms).
    n, h, w, o = g.shape
    c = kernel.shape[2]
    taps = g.reshape(n * h * w, o) @ kernel.transpose(3, 0, 1, 2).reshape(o, 9 * c)
    taps = taps.reshape(n, h, w, 3, 3, c)
    placed = (
        jnp.pad(taps[:, :, :, i, j, :], ((0, 0), (i, 2 - i), (j, 2 - j), (0, 0)))
        for i in range(3)
        for j in range(3)
    )
    return functools.reduce(jnp.add, placed)


def _conv3x3_dinput(g: jax.Array, kernel: jax.Array) -> jax.Array:
    # Lowered for the platform the step runs on; elsewhere the convolution (cuDNN on GPU).
    return jax.lax.platform_dependent(
        g, kernel, cpu=_conv3x3_dinput_taps, default=_conv3x3_dinput_conv
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def conv3x3_relu(x: jax.Array, kernel: jax.Array, bias: jax.Array, shifted: bool) -> jax.Array:
    """``relu(conv(x, kernel) + bias)``: a VALID, stride-1 3x3 convolution, NHWC/HWIO.

    ``x`` ``(N, H, W, C)``, ``kernel`` ``(3, 3, C, O)``, ``bias`` ``(O,)`` -> ``(N, H-2, W-2, O)``.
    Equal to ``nn.Conv(O, (3, 3), padding="VALID")`` then ``nn.relu`` up to float32 round-off.

    ``shifted=True`` computes the forward pass as a fused sum of 9*C shifted slices, ~15x
    faster than XLA:CPU's convolution for C=1 (conv1) at batch 256; for larger C it loses,
    because XLA fuses the sum again into each consumer of the output. The backward pass is
    written out: on CPU the input gradient as one matmul over all taps plus a fused shifted
    sum, and the kernel gradient as convolutions over chunks of at most 16 samples, in the
    layouts XLA:CPU runs fastest, also inside ``lax.scan``; on other platforms, two plain
    convolutions.
    """
    z = _conv3x3_shifted(x, kernel) if shifted else _conv3x3_xla(x, kernel)
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


class Conv3x3ReLU(nn.Module):
    """``nn.Conv(features, (3, 3), padding="VALID")`` then ReLU, with ``nn.Conv``'s parameters
    (``kernel`` HWIO ``(3, 3, C, features)``, ``bias`` ``(features,)``), initialisers (same
    names, so the same random draws) and dtype promotion.

    Computed by ``conv3x3_relu``; ``shifted``: its forward pass as a sum of shifted slices
    (fast for few input channels). The numbers agree to float32 round-off either way.
    """

    features: int
    shifted: bool = False
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros_init()
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (3, 3, x.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return conv3x3_relu(x, kernel, bias, self.shifted)


class Net(nn.Module):
    """conv(1->6, 3x3) - ReLU - conv(6->16, 3x3) - ReLU - fc(12544->512) - ReLU - fc(512->64)
    - ReLU - fc(64->num_classes), as in the tutorial, with VALID padding like ``nn.Conv2d``.

    Input: NHWC floating images ``(N, 32, 32, 1)``. Output: logits ``(N, num_classes)``.
    With ``num_classes=2`` it has 6,456,942 parameters, like the PyTorch ``Net``.

    Attributes:
      num_classes: fc3's output size (2 in the tutorial).
      weight_init: ``"torch"`` (default) draws every kernel and bias from U(+-1/sqrt(fan_in)),
        so a fresh ``Net`` is distributed like a fresh PyTorch ``Net``; ``"flax"`` uses
        Flax's defaults
        (lecun_normal kernels, zero biases).
      dtype: computation dtype (``None``: that of the inputs and params).
      param_dtype: dtype of the parameters.
    """

    num_classes: int = 2
    weight_init: Literal["torch", "flax"] = "torch"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def _inits(self, fan_in: int) -> dict[str, Initializer]:
        if self.weight_init == "torch":
            return {"kernel_init": torch_kernel_init, "bias_init": torch_bias_init(fan_in)}
        if self.weight_init == "flax":
            return {}
        raise ValueError(f"Net.weight_init must be 'torch' or 'flax', got {self.weight_init!r}.")

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        check_nhwc_images(x)
        common = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        # Conv3x3ReLU: nn.Conv's parameters and numbers; conv1 (one input channel) in the form
        # XLA:CPU runs fastest.
        inits1, inits2 = self._inits(3 * 3 * IN_CHANNELS), self._inits(3 * 3 * 6)
        x = Conv3x3ReLU(6, shifted=True, name="conv1", **common, **inits1)(x)
        x = Conv3x3ReLU(16, name="conv2", **common, **inits2)(x)
        # H,W,C flatten order; the conversion module permutes fc1's rows to match torch's C,H,W.
        x = x.reshape(x.shape[0], -1)
        x = nn.Dense(512, name="fc1", **common, **self._inits(x.shape[-1]))(x)
        x = nn.relu(x)
        x = nn.Dense(64, name="fc2", **common, **self._inits(512))(x)
        x = nn.relu(x)
        return nn.Dense(self.num_classes, name="fc3", **common, **self._inits(64))(x)


def summary(net: Net | None = None, batch_size: int = 1) -> str:
    """A layer table (shapes, parameter counts) like the tutorial's ``print(net)``."""
    net = net if net is not None else Net()
    x = jnp.zeros((batch_size, IMAGE_SIZE, IMAGE_SIZE, IN_CHANNELS), jnp.float32)
    return net.tabulate(
        jax.random.key(0),
        x,
        compute_flops=False,
        console_kwargs={"width": 120, "color_system": None, "force_jupyter": False},
    )
