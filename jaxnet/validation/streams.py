"""The batches a validation run feeds both frameworks: ``step -> (images, labels)``."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxnet import data as datasets
from jaxnet.data import DataError
from jaxnet.errors import ConfigError
from jaxnet.images import IMAGE_SIZE, IN_CHANNELS

__all__ = ["DataStream", "check_batch", "dataset_stream", "make_stream", "random_stream"]

DataStream = Callable[[int], tuple[np.ndarray, np.ndarray]]
"""``step -> (images, labels)``: images NHWC float32 ``(B, 32, 32, 1)``, labels int ``(B,)``
in ``[0, num_classes)``. The same step must give the same batch (both frameworks read it)."""

RANDOM = "random: standard-normal images, uniform labels"


@functools.partial(jax.jit, static_argnames=("batch_size", "num_classes"))
def _draw(
    key: jax.Array, step: jax.Array, batch_size: int, num_classes: int
) -> tuple[jax.Array, jax.Array]:
    """Batch ``step`` of ``random_stream``; module level, so every stream of one shape shares
    one compile."""
    kx, ky = jax.random.split(jax.random.fold_in(key, step))
    x = jax.random.normal(kx, (batch_size, IMAGE_SIZE, IMAGE_SIZE, IN_CHANNELS), jnp.float32)
    # int32 spelled out: with jax_enable_x64 (the float64 check) the default int64 would draw
    # other labels from the same key.
    return x, jax.random.randint(ky, (batch_size,), 0, num_classes, jnp.int32)


def random_stream(seed: int, batch_size: int, num_classes: int) -> DataStream:
    """Standard-normal images (like the tutorial's ``torch.randn``) and uniform labels.

    Batch ``k`` is drawn from ``fold_in(key(seed), k)``: any step can be read in any order.
    """
    if batch_size < 1 or num_classes < 1:
        raise ConfigError(
            f"batch_size and num_classes must be positive, got {batch_size}, {num_classes}."
        )
    key = jax.random.fold_in(jax.random.key(seed), 0x5EED)

    def stream(step: int) -> tuple[np.ndarray, np.ndarray]:
        x, y = _draw(key, step, batch_size=batch_size, num_classes=num_classes)
        return np.asarray(x), np.asarray(y)

    return stream


def dataset_stream(source: str, batch_size: int, seed: int, num_classes: int = 2) -> DataStream:
    """Training batches of a ``jaxnet.data`` set (``"digits"``, a ``.npz``, an MNIST folder),
    shuffled per epoch exactly as ``jaxnet train`` shuffles them (``epoch_permutation``)."""
    ds = datasets.load_data(source, num_classes=num_classes)
    per_epoch = datasets.num_batches(len(ds.x_train), batch_size)

    def stream(step: int) -> tuple[np.ndarray, np.ndarray]:
        epoch, i = divmod(step, per_epoch)
        order = datasets.epoch_permutation(seed, epoch, len(ds.x_train))
        idx = order[i * batch_size : (i + 1) * batch_size]
        return ds.x_train[idx], ds.y_train[idx]

    return stream


def make_stream(
    data: str | DataStream | None, batch_size: int, seed: int, num_classes: int
) -> tuple[DataStream, str]:
    """The stream ``ValidateConfig.data`` names, and a description for the report."""
    if data is None or data == "random":
        return random_stream(seed, batch_size, num_classes), RANDOM
    if isinstance(data, str):
        stream = dataset_stream(data, batch_size, seed, num_classes)
        return stream, f"{data}: jaxnet train's shuffled training batches"
    return data, getattr(data, "__name__", type(data).__name__)


def check_batch(images: Any, labels: Any, num_classes: int, step: int) -> None:
    """Raise ``DataError`` unless a stream's batch is float32 NHWC images and labels in range."""
    images, labels = np.asarray(images), np.asarray(labels)
    if (
        images.ndim != 4
        or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, IN_CHANNELS)
        or images.dtype != np.float32
    ):
        raise DataError(
            f"data stream, step {step}: images must be float32 NHWC (B, 32, 32, 1), got "
            f"{images.dtype} {images.shape}."
        )
    if labels.shape != images.shape[:1] or labels.dtype.kind not in "iu":
        raise DataError(
            f"data stream, step {step}: labels must be integers of shape {images.shape[:1]}, "
            f"got {labels.dtype} {labels.shape}."
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"data stream, step {step}: labels must lie in [0, {num_classes}), found "
            f"{labels.min()}..{labels.max()}; set num_classes to match the data."
        )
