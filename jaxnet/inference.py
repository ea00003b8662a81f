"""Inference: the logits, probabilities and classes of ``Net`` for a batch of images.

No training state, no labels: ``predict`` is what ``jaxnet predict`` and a serving script call.
Images are NHWC ``(N, 32, 32, 1)`` and already normalised the way the model was trained.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxnet import host
from jaxnet.images import check_nhwc_images
from jaxnet.model import Net

__all__ = ["Prediction", "predict", "predict_logits"]


@dataclass(frozen=True)
class Prediction:
    """One batch's predictions, as host numpy arrays.

    logits: ``(N, C)`` float32, the network's output.
    probabilities: ``(N, C)`` float32, ``softmax(logits)``.
    classes: ``(N,)`` int64, ``argmax(logits)`` (the first maximum on ties, as torch).
    """

    logits: np.ndarray
    probabilities: np.ndarray
    classes: np.ndarray


@host.tunes_malloc_on_first_call
@functools.partial(jax.jit, static_argnames=("num_classes",))
def _logits(params: Any, images: jax.Array, num_classes: int) -> jax.Array:
    return Net(num_classes=num_classes).apply({"params": params}, images)


def _num_classes(params: Any) -> int:
    return int(params["fc3"]["kernel"].shape[-1])


def predict_logits(params: Any, images: Any) -> jax.Array:
    """``Net``'s logits ``(N, C)`` for NHWC images ``(N, 32, 32, 1)``; ``C`` from the params."""
    images = jnp.asarray(images)
    check_nhwc_images(images)
    return _logits(params, images, _num_classes(params))


def predict(params: Any, images: Any) -> Prediction:
    """Logits, softmax probabilities and argmax classes of NHWC images ``(N, 32, 32, 1)``."""
    logits = np.asarray(predict_logits(params, images), np.float32)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    probabilities = (exp / exp.sum(axis=-1, keepdims=True)).astype(np.float32)
    return Prediction(logits, probabilities, logits.argmax(axis=-1).astype(np.int64))
