"""What ``Net`` takes as input: a batch of one-channel 32x32 float images, NHWC."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

__all__ = ["IMAGE_SIZE", "IN_CHANNELS", "check_nhwc_images"]

IMAGE_SIZE = 32
IN_CHANNELS = 1


def check_nhwc_images(x: Any) -> None:
    """Raise a ``ValueError``/``TypeError`` naming the fix unless ``x`` is ``(N, 32, 32, 1)`` float.

    Only static facts (shape and dtype) are checked, so this works on tracers inside ``jit``.
    """
    if type(x).__module__.startswith("torch"):
        raise TypeError(
            "Net takes numpy or JAX arrays, got a torch tensor; convert it with "
            "x.detach().cpu().numpy() (and NCHW to NHWC with jaxnet.nchw_to_nhwc)."
        )
    shape = tuple(getattr(x, "shape", ()))
    want = (IMAGE_SIZE, IMAGE_SIZE, IN_CHANNELS)
    dtype = np.dtype(getattr(x, "dtype", np.float32))
    if len(shape) == 3 and shape == want:
        raise ValueError(
            f"Net expects a batch of NHWC images (N, 32, 32, 1), got a single image {shape}; "
            "add the batch axis with x[None]."
        )
    if len(shape) != 4:
        raise ValueError(
            f"Net expects a batch of NHWC images of shape (N, 32, 32, 1), got shape {shape}."
        )
    if shape[1:] != want:
        if shape[1:] == (IN_CHANNELS, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(
                f"Net got an NCHW batch {shape} (PyTorch layout); it expects NHWC (N, 32, 32, 1). "
                "Transpose it with jaxnet.nchw_to_nhwc(x), i.e. x.transpose(0, 2, 3, 1)."
            )
        if shape[1:3] == (28, 28) or shape[2:4] == (28, 28):
            raise ValueError(
                f"Net got 28x28 images {shape}; it expects 32x32 (N, 32, 32, 1), as in the "
                "tutorial. Pad MNIST-sized images by 2 pixels on each side, e.g. "
                "jnp.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))."
            )
        raise ValueError(f"Net expects NHWC images of shape (N, 32, 32, 1), got {shape}.")
    if not jnp.issubdtype(dtype, jnp.floating):  # numpy does not count bfloat16 as floating
        raise TypeError(
            f"Net expects floating-point images, got dtype {dtype}. Convert first, e.g. "
            "x.astype(jnp.float32) / 255.0 for uint8 pixels."
        )
