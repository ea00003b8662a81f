"""The tutorial's losses with ``torch.nn.functional``'s semantics, argument names and defaults.

Each function is pure and jit-able. Shapes and dtypes are checked statically (also under
``jit``). Class labels are checked by value when they are concrete arrays; inside ``jit`` an
out-of-range label turns the loss into NaN (never a silently clamped gather), and
``jaxnet.train_step``/``eval_step`` raise on it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["check_labels", "cross_entropy", "kl_div", "l1_loss", "mse_loss"]

Array = jax.Array
ArrayLike = Any

_REDUCTIONS = ("none", "mean", "sum")


def _check_reduction(name: str, reduction: str, allowed: tuple[str, ...] = _REDUCTIONS) -> None:
    if reduction not in allowed:
        raise ValueError(f"{name}: reduction must be one of {allowed}, got {reduction!r}.")


def _check_float(name: str, what: str, x: ArrayLike) -> None:
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise TypeError(
            f"{name}: {what} must be floating point, got dtype {jnp.result_type(x)}. "
            f"Convert it with {what}.astype(jnp.float32)."
        )


def _check_same_shape(name: str, input: ArrayLike, target: ArrayLike) -> None:
    if jnp.shape(input) != jnp.shape(target):
        raise ValueError(
            f"{name}: target shape {jnp.shape(target)} differs from input shape "
            f"{jnp.shape(input)}; they must match (torch would broadcast with a warning, "
            "which is almost always a bug)."
        )


def _reduce(loss: Array, reduction: str) -> Array:
    if reduction == "mean":
        return jnp.mean(loss)
    if reduction == "sum":
        return jnp.sum(loss)
    return loss


def l1_loss(input: ArrayLike, target: ArrayLike, reduction: str = "mean") -> Array:
    """``F.l1_loss``: ``|input - target|`` elementwise, then mean (default), sum or none.

    ``input`` and ``target`` are floating arrays of the same shape, e.g. ``(N, 2)``.
    """
    _check_reduction("l1_loss", reduction)
    _check_float("l1_loss", "input", input)
    _check_float("l1_loss", "target", target)
    _check_same_shape("l1_loss", input, target)
    return _reduce(jnp.abs(jnp.asarray(input) - jnp.asarray(target)), reduction)


def mse_loss(input: ArrayLike, target: ArrayLike, reduction: str = "mean") -> Array:
    """``F.mse_loss``: ``(input - target)**2`` elementwise, then mean (default), sum or none.

    Unlike ``optax.l2_loss`` there is no factor 1/2.
    """
    _check_reduction("mse_loss", reduction)
    _check_float("mse_loss", "input", input)
    _check_float("mse_loss", "target", target)
    _check_same_shape("mse_loss", input, target)
    return _reduce(jnp.square(jnp.asarray(input) - jnp.asarray(target)), reduction)


def _is_concrete(x: ArrayLike) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_labels(target: ArrayLike, num_classes: int, ignore_index: int | None = None) -> None:
    """Raise ``ValueError`` if a concrete label lies outside ``[0, num_classes)``.

    Labels equal to ``ignore_index`` are allowed. Traced labels are not checked here.
    """
    if not _is_concrete(target):
        return
    t = np.asarray(target)
    bad = (t < 0) | (t >= num_classes)
    if ignore_index is not None:
        bad &= t != ignore_index
    if bad.any():
        values = np.unique(t[bad])[:10].tolist()
        raise ValueError(
            f"class labels must lie in [0, {num_classes}) (the network has {num_classes} "
            f"outputs), found {values}"
            + (f" (ignore_index={ignore_index} is allowed)" if ignore_index is not None else "")
            + ". Map the labels to 0..num_classes-1 or build Net(num_classes=...) to match."
        )


def cross_entropy(
    input: ArrayLike,
    target: ArrayLike,
    weight: ArrayLike | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Array:
    """``F.cross_entropy`` on logits, classes along axis 1 (axis 0 for an unbatched ``(C,)``).

    Args:
      input: logits ``(N, C)``, ``(C,)`` or ``(N, C, d1, ...)``.
      target: either integer class indices of ``input``'s shape without the class axis
        (values in ``[0, C)`` or ``ignore_index``), or class probabilities of ``input``'s shape.
      weight: optional ``(C,)`` rescaling weight per class.
      ignore_index: with index targets, entries equal to it contribute nothing.
      reduction: ``"mean"`` (with index targets: divided by the summed weight of the
        non-ignored targets; with probabilities: by the number of samples), ``"sum"``,
        ``"none"``.
      label_smoothing: mixes the target with the uniform distribution:
        ``(1 - eps) * target + eps / C``.
    """
    _check_reduction("cross_entropy", reduction)
    _check_float("cross_entropy", "input", input)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(
            f"cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}."
        )
    input = jnp.asarray(input)
    if input.ndim == 0:
        raise ValueError("cross_entropy: input must have a class axis, got a scalar.")
    class_axis = 1 if input.ndim >= 2 else 0
    num_classes = input.shape[class_axis]
    if weight is not None:
        weight = jnp.asarray(weight)
        if weight.shape != (num_classes,):
            raise ValueError(
                f"cross_entropy: weight must have shape ({num_classes},), got {weight.shape}."
            )
        _check_float("cross_entropy", "weight", weight)
        w_bcast = weight.reshape((num_classes,) + (1,) * (input.ndim - class_axis - 1))
    else:
        w_bcast = None
    logp = jax.nn.log_softmax(input, axis=class_axis)

    target_shape = tuple(jnp.shape(target))
    if target_shape == input.shape and jnp.issubdtype(jnp.result_type(target), jnp.floating):
        return _cross_entropy_probabilities(
            logp, jnp.asarray(target), w_bcast, class_axis, reduction, label_smoothing
        )
    index_shape = input.shape[:class_axis] + input.shape[class_axis + 1 :]
    if target_shape != index_shape:
        raise ValueError(
            f"cross_entropy: for logits of shape {input.shape} the target must be class indices "
            f"of shape {index_shape} or probabilities of shape {input.shape}; got {target_shape}."
        )
    if not jnp.issubdtype(jnp.result_type(target), jnp.integer):
        raise TypeError(
            f"cross_entropy: class-index targets must be integers, got dtype "
            f"{jnp.result_type(target)}; use target.astype(jnp.int32) (or give probabilities of "
            f"shape {input.shape})."
        )
    check_labels(target, num_classes, ignore_index)
    return _cross_entropy_indices(
        logp,
        jnp.asarray(target),
        weight,
        w_bcast,
        class_axis,
        ignore_index,
        reduction,
        label_smoothing,
    )


def _cross_entropy_probabilities(
    logp: Array,
    target: Array,
    w_bcast: Array | None,
    class_axis: int,
    reduction: str,
    label_smoothing: float,
) -> Array:
    """``cross_entropy`` with class-probability targets (``w_bcast``: the class weights
    broadcast along the class axis, or None)."""
    num_classes = logp.shape[class_axis]
    if label_smoothing > 0:
        target = target * (1 - label_smoothing) + label_smoothing / num_classes
    prod = logp * target if w_bcast is None else logp * w_bcast * target
    per_sample = -jnp.sum(prod, axis=class_axis)
    if reduction == "mean":
        return jnp.sum(per_sample) / (logp.size / num_classes)
    return _reduce(per_sample, reduction)


def _cross_entropy_indices(
    logp: Array,
    target: Array,
    weight: Array | None,
    w_bcast: Array | None,
    class_axis: int,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
) -> Array:
    """``cross_entropy`` with class-index targets (checked by the caller)."""
    num_classes = logp.shape[class_axis]
    kept = target != ignore_index
    in_range = (target >= 0) & (target < num_classes)
    safe = jnp.where(kept & in_range, target, 0)
    picked = jnp.squeeze(
        jnp.take_along_axis(logp, jnp.expand_dims(safe, class_axis), axis=class_axis),
        class_axis,
    )
    w_target = jnp.ones_like(picked) if weight is None else weight[safe]
    w_target = jnp.where(kept, w_target, 0.0)
    nll = -w_target * picked
    if label_smoothing > 0:
        smooth = -jnp.sum(logp if weight is None else logp * w_bcast, axis=class_axis)
        smooth = jnp.where(kept, smooth, 0.0)
    # A traced out-of-range label poisons the loss instead of reading a clamped logit.
    poison = jnp.where(kept & ~in_range, jnp.nan, 0.0)
    nll = nll + poison
    if reduction == "none":
        if label_smoothing > 0:
            return (1 - label_smoothing) * nll + (label_smoothing / num_classes) * smooth
        return nll
    if reduction == "sum":
        total = jnp.sum(nll)
        if label_smoothing > 0:
            total = (1 - label_smoothing) * total + (label_smoothing / num_classes) * jnp.sum(
                smooth
            )
        return total
    denom = jnp.sum(w_target)  # torch: summed weight of non-ignored targets (0/0 -> NaN)
    mean = jnp.sum(nll) / denom
    if label_smoothing > 0:
        mean = (1 - label_smoothing) * mean + (label_smoothing / num_classes) * (
            jnp.sum(smooth) / denom
        )
    return mean


def kl_div(
    input: ArrayLike, target: ArrayLike, reduction: str = "mean", log_target: bool = False
) -> Array:
    """``F.kl_div``: ``input`` holds log-probabilities, ``target`` probabilities (or
    log-probabilities with ``log_target=True``), both of the same shape.

    Pointwise ``xlogy(target, target) - target * input`` (a zero target contributes 0), or
    ``exp(target) * (target - input)`` with ``log_target``. ``"mean"`` divides by the number of
    elements (torch's default, not the KL divergence); ``"batchmean"`` by ``input.shape[0]``,
    which is the mathematical KL divergence per sample.
    """
    _check_reduction("kl_div", reduction, ("none", "mean", "sum", "batchmean"))
    _check_float("kl_div", "input", input)
    _check_float("kl_div", "target", target)
    _check_same_shape("kl_div", input, target)
    input, target = jnp.asarray(input), jnp.asarray(target)
    if log_target:
        pointwise = jnp.exp(target) * (target - input)
    else:
        pointwise = jax.scipy.special.xlogy(target, target) - target * input
    if reduction == "batchmean":
        return jnp.sum(pointwise) / (input.shape[0] if input.ndim else 1)
    return _reduce(pointwise, reduction)
