"""The tutorial's ``Net`` as a Flax Linen module."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxnet.convert import IMAGE_SIZE, IN_CHANNELS, check_nhwc_images

__all__ = ["Net", "summary", "torch_bias_init", "torch_kernel_init"]

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
        conv = {"kernel_size": (3, 3), "padding": "VALID", **common}
        x = nn.Conv(6, name="conv1", **conv, **self._inits(3 * 3 * IN_CHANNELS))(x)
        x = nn.relu(x)
        x = nn.Conv(16, name="conv2", **conv, **self._inits(3 * 3 * 6))(x)
        x = nn.relu(x)
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
