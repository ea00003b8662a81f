"""The tutorial's ``Net`` as a Flax Linen module."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxnet.errors import ConfigError
from jaxnet.images import IMAGE_SIZE, IN_CHANNELS, check_nhwc_images
from jaxnet.kernels import conv3x3_relu, dense_dot_general

__all__ = [
    "Conv3x3ReLU",
    "Net",
    "abstract_params",
    "conv3x3_relu",
    "init_params",
    "summary",
    "torch_bias_init",
    "torch_kernel_init",
]

Initializer = Callable[..., jax.Array]


def torch_kernel_init(
    key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32
) -> jax.Array:
    """PyTorch's Linear/Conv2d weight initialiser, ``kaiming_uniform_(a=sqrt(5))``, which is
    ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, for a Flax kernel: HWIO ``(kh, kw, in, out)`` or
    Dense ``(in, out)``, with ``fan_in`` the product of all but the last axis, as in torch.

    The same numbers as ``nn.initializers.variance_scaling(1/3, "fan_in", "uniform")`` (bound
    ``sqrt(3 * (1/3) / fan_in)``) bit for bit, drawn as one flat vector and reshaped:
    ``jax.random`` fills a shape in row-major order, so the bits are the same, and XLA compiles
    a flat draw several times faster than a 4-D one (``docs/performance.md``).
    """
    fan_in = math.prod(shape[:-1])
    # variance_scaling's arithmetic, in its order and dtypes.
    variance = jnp.array(1.0 / 3.0 / fan_in, dtype=dtype)
    flat = jax.random.uniform(key, (math.prod(shape),), dtype, -1)
    return (flat * jnp.sqrt(3 * variance).astype(dtype)).reshape(shape)


def torch_bias_init(fan_in: int) -> Initializer:
    """PyTorch's bias initialiser, ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``.

    A bias initialiser only sees the bias' own shape, so the layer's fan_in is passed in.
    """
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


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


def _initializers(weight_init: str, fan_in: int) -> dict[str, Initializer]:
    """A layer's initialiser keywords. A plain function, not a ``Net`` method: Flax records
    every method's return value in ``tabulate``, and these are functions, not arrays."""
    if weight_init == "torch":
        return {"kernel_init": torch_kernel_init, "bias_init": torch_bias_init(fan_in)}
    if weight_init == "flax":
        return {}
    raise ValueError(f"Net.weight_init must be 'torch' or 'flax', got {weight_init!r}.")


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

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ConfigError(f"Net needs num_classes >= 1, got {self.num_classes!r}.")
        check_nhwc_images(x)
        common = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        # nn.Dense's parameters and numbers; fc1's product with few rows in the form XLA:CPU
        # runs fastest.
        dense = {**common, "dot_general": dense_dot_general}
        # Conv3x3ReLU: nn.Conv's parameters and numbers; conv1 (one input channel) in the form
        # XLA:CPU runs fastest.
        inits1, inits2 = (
            _initializers(self.weight_init, 3 * 3 * IN_CHANNELS),
            _initializers(self.weight_init, 3 * 3 * 6),
        )
        x = Conv3x3ReLU(6, shifted=True, name="conv1", **common, **inits1)(x)
        x = Conv3x3ReLU(16, name="conv2", **common, **inits2)(x)
        # H,W,C flatten order; the conversion module permutes fc1's rows to match torch's C,H,W.
        x = x.reshape(x.shape[0], -1)
        x = nn.Dense(512, name="fc1", **dense, **_initializers(self.weight_init, x.shape[-1]))(x)
        x = nn.relu(x)
        x = nn.Dense(64, name="fc2", **dense, **_initializers(self.weight_init, 512))(x)
        x = nn.relu(x)
        return nn.Dense(
            self.num_classes, name="fc3", **dense, **_initializers(self.weight_init, 64)
        )(x)


def _zero_images(dtype: Any = jnp.float32) -> jax.Array:
    return jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, IN_CHANNELS), dtype)


@functools.partial(jax.jit, static_argnums=0)
def init_params(net: Net, key: jax.Array) -> Any:
    """``net.init(key, zeros (1, 32, 32, 1))["params"]``, compiled once per ``net``.

    The same bits as ``net.init`` run eagerly (which dispatches dozens of ops one by one).
    """
    return net.init(key, _zero_images())["params"]


def abstract_params(net: Net) -> Any:
    """The params tree of ``net`` as ``jax.ShapeDtypeStruct``s, computing nothing (a restore
    target, a shape check)."""
    return jax.eval_shape(init_params, net, jax.random.key(0))


def summary(net: Net | None = None, batch_size: int = 1) -> str:
    """The layer table of ``net`` (default ``Net()``) for a ``(batch_size, 32, 32, 1)`` input:
    each module's input and output shapes and parameter counts, and the total (6,456,942 for
    two classes), like the tutorial's ``print(net)``.

    Returns the table as a string (``print(jaxnet.summary())``); ``jaxnet summary`` prints it.
    Flax's ``tabulate`` records every method's return value as a shape, so ``Net``'s methods
    return arrays only (see ``_initializers``).
    """
    net = net if net is not None else Net()
    x = jnp.zeros((batch_size, IMAGE_SIZE, IMAGE_SIZE, IN_CHANNELS), jnp.float32)
    return net.tabulate(
        jax.random.key(0),
        x,
        compute_flops=False,
        console_kwargs={"width": 120, "color_system": None, "force_jupyter": False},
    )
