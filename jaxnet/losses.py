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

from jaxnet.errors import ConfigError, JaxnetError

__all__ = ["LossDtypeError", "check_labels", "cross_entropy", "kl_div", "l1_loss", "mse_loss"]

Array = jax.Array
ArrayLike = Any

_REDUCTIONS = ("none", "mean", "sum")


class LossDtypeError(JaxnetError, TypeError):
    """An argument of a loss has a dtype it cannot take (integer logits, float class indices);
    the message names the conversion."""


def _check_reduction(name: str, reduction: str, allowed: tuple[str, ...] = _REDUCTIONS) -> None:
    if reduction not in allowed:
        raise ConfigError(
            f"{name}: {reduction} is not a valid value for reduction; use one of "
            f"{', '.join(repr(r) for r in allowed)}."
        )


def _check_float(name: str, what: str, x: ArrayLike) -> None:
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise LossDtypeError(
            f"{name}: {what} must be floating point, got dtype {jnp.result_type(x)}. "
            f"Convert it with {what}.astype(jnp.float32)."
        )


def _check_same_shape(name: str, input: ArrayLike, target: ArrayLike) -> None:
    if jnp.shape(input) != jnp.shape(target):
        raise ConfigError(
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
      ignore_index: with index targets, entries equal to it contribute nothing. With
        probability targets it must stay negative (torch refuses it there).
      reduction: ``"mean"`` (with index targets: divided by the summed weight of the
        non-ignored targets; with probabilities: by the number of samples ``N * d1 * ...``),
        ``"sum"``, ``"none"`` (the shape of ``input`` without the class axis).
      label_smoothing: mixes the target with the uniform distribution:
        ``(1 - eps) * target + eps / C``.

    A ``"mean"`` over targets that are all ``ignore_index`` is NaN (0/0) with zero gradients,
    as in torch: such a batch moves no parameter.
    """
    input = _check_cross_entropy_input(input, reduction, label_smoothing)
    class_axis = 1 if input.ndim >= 2 else 0
    num_classes = input.shape[class_axis]
    weight = _check_class_weight(weight, num_classes)
    w_bcast = (
        None
        if weight is None
        else weight.reshape((num_classes,) + (1,) * (input.ndim - class_axis - 1))
    )
    logp = jax.nn.log_softmax(input, axis=class_axis)
    if _is_probability_target(input, target, ignore_index):
        return _cross_entropy_probabilities(
            logp, jnp.asarray(target), w_bcast, class_axis, reduction, label_smoothing
        )
    _check_index_target(input, target, class_axis)
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


def _check_cross_entropy_input(input: ArrayLike, reduction: str, label_smoothing: float) -> Array:
    """``input`` as an array, after the checks that need nothing else (torch's messages)."""
    _check_reduction("cross_entropy", reduction)
    _check_float("cross_entropy", "input", input)
    if not 0.0 <= label_smoothing <= 1.0:
        # torch checks only the upper bound; a negative smoothing is refused here too.
        raise ConfigError(
            f"cross_entropy: label_smoothing must be between 0.0 and 1.0. Got: "
            f"{label_smoothing}. Use 0 for none, 0.1 is common."
        )
    input = jnp.asarray(input)
    if input.ndim == 0:
        raise ConfigError(
            "cross_entropy: input must have a class axis, got a scalar; give logits of shape "
            "(C,), (N, C) or (N, C, d1, ...)."
        )
    return input


def _check_class_weight(weight: ArrayLike | None, num_classes: int) -> Array | None:
    if weight is None:
        return None
    weight = jnp.asarray(weight)
    if weight.shape != (num_classes,):
        raise ConfigError(
            f"cross_entropy: weight tensor should be defined either for all {num_classes} "
            f"classes or no classes but got weight tensor of shape: {list(weight.shape)}. "
            f"Give one weight per class, shape ({num_classes},)."
        )
    _check_float("cross_entropy", "weight", weight)
    return weight


def _is_probability_target(input: Array, target: ArrayLike, ignore_index: int) -> bool:
    """True for class-probability targets (``input``'s shape); raises torch's errors for an
    integer target of that shape and for probabilities with a non-negative ``ignore_index``."""
    if tuple(jnp.shape(target)) != input.shape:
        return False
    dtype = jnp.result_type(target)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise LossDtypeError(
            f"cross_entropy: Expected floating point type for target with class "
            f"probabilities, got {dtype}. A target of the logits' shape {input.shape} holds "
            "probabilities: convert it with target.astype(input.dtype)."
        )
    if ignore_index >= 0:
        raise ConfigError(
            "cross_entropy: ignore_index is not supported for floating point target "
            f"(got ignore_index={ignore_index}). Leave ignore_index at its default (-100) "
            "with probability targets, or give class indices."
        )
    return True


def _check_index_target(input: Array, target: ArrayLike, class_axis: int) -> None:
    """Class-index targets: ``input``'s shape without the class axis, integer dtype."""
    index_shape = input.shape[:class_axis] + input.shape[class_axis + 1 :]
    target_shape = tuple(jnp.shape(target))
    if target_shape != index_shape:
        if input.ndim >= 2 and len(target_shape) >= 1 and target_shape[0] != input.shape[0]:
            problem = (
                f"Expected input batch_size ({input.shape[0]}) to match target batch_size "
                f"({target_shape[0]})"
            )
        elif input.ndim == 2 and len(target_shape) >= 2:
            problem = "0D or 1D target tensor expected, multi-target not supported"
        else:
            problem = f"Expected target size {list(index_shape)}, got {list(target_shape)}"
        raise ConfigError(
            f"cross_entropy: {problem}. For logits of shape {input.shape} the target must be "
            f"class indices of shape {index_shape} or probabilities of shape {input.shape}."
        )
    dtype = jnp.result_type(target)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise LossDtypeError(
            f"cross_entropy: class-index targets must be integers, got dtype {dtype}; use "
            f"target.astype(jnp.int32) (or give probabilities of shape {input.shape})."
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
    w_target = jnp.where(kept, w_target, 0)
    # where, not a product with the zero weight: an ignored target's gradient is exactly 0
    # even when the mean's 1/denominator is inf (zero total weight), as in torch.
    nll = jnp.where(kept, -w_target * picked, 0)
    if label_smoothing > 0:
        smooth = -jnp.sum(logp if weight is None else logp * w_bcast, axis=class_axis)
        smooth = jnp.where(kept, smooth, 0)
    # A traced out-of-range label poisons the loss instead of reading a clamped logit.
    nll = _reduce_kept(jnp.where(kept & ~in_range, jnp.nan, nll), w_target, kept, reduction)
    if label_smoothing == 0:
        return nll
    smooth = _reduce_kept(smooth, w_target, kept, reduction)
    return (1 - label_smoothing) * nll + (label_smoothing / num_classes) * smooth


def _reduce_kept(values: Array, w_target: Array, kept: Array, reduction: str) -> Array:
    """``reduction`` of per-target ``values``; the mean divides by the summed weight of the
    kept targets (``w_target``, 0 where ignored), as torch's ``nll_loss`` does."""
    if reduction != "mean":
        return _reduce(values, reduction)
    # Every target ignored: torch's loss is NaN (0/0) but its gradients are 0, since no
    # target contributes one. Dividing by a safe 1 and then selecting NaN keeps the inf of
    # 1/0 out of the backward pass (a plain 0/0 gives NaN gradients to every logit).
    empty = ~jnp.any(kept)
    return jnp.where(empty, jnp.nan, jnp.sum(values) / jnp.where(empty, 1, jnp.sum(w_target)))


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
