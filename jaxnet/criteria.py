"""The named training criteria: one registry that ``jaxnet train``, ``jaxnet validate``, the
command line and the tests share.

A criterion is a loss on ``Net``'s logits ``(N, C)`` and integer class labels ``(N,)``: it
builds the targets its loss takes from the labels (class indices, one-hot rows, or smoothed
probabilities) and applies a ``jaxnet.losses`` function with ``torch.nn.functional``'s options.
``Criterion.torch`` is the same computation in PyTorch, so the validator checks exactly what
the trainer trains. Every criterion takes integer labels, so ``train_step`` reports accuracy
and checks the label range for all of them.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxnet import losses
from jaxnet.errors import ConfigError

__all__ = ["CRITERIA", "Criterion", "CriterionSpec", "criterion", "ignored_label"]

SMOOTHING = 0.1
"""``kl_div_smoothed``'s targets: ``(1 - SMOOTHING) * one_hot + SMOOTHING / C``."""


@dataclasses.dataclass(frozen=True)
class CriterionSpec:
    """What a criterion name means.

    Attributes:
      loss: the ``jaxnet.losses`` function; the ``torch.nn.functional`` one has the same name.
      targets: how labels become its targets: ``"indices"`` (as they are), ``"one_hot"``, or
        ``"smoothed"`` (one-hot mixed with the uniform distribution, no zero entry, so KL's
        ``target * log(target)`` term is exercised).
      log_softmax: the loss takes log-probabilities (``kl_div``), not logits.
      defaults: options that differ from torch's defaults (``kl_div``: ``reduction="batchmean"``,
        the KL divergence; torch's ``"mean"`` divides by the number of elements).
      description: one line for ``--help`` and the docs.
    """

    loss: Callable[..., jax.Array]
    targets: str
    log_softmax: bool = False
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    description: str = ""


CRITERIA: Mapping[str, CriterionSpec] = {
    "cross_entropy": CriterionSpec(
        losses.cross_entropy, "indices", description="F.cross_entropy(logits, labels)"
    ),
    "mse": CriterionSpec(
        losses.mse_loss, "one_hot", description="F.mse_loss(logits, one_hot(labels))"
    ),
    "l1": CriterionSpec(
        losses.l1_loss, "one_hot", description="F.l1_loss(logits, one_hot(labels))"
    ),
    "kl_div": CriterionSpec(
        losses.kl_div,
        "one_hot",
        log_softmax=True,
        defaults={"reduction": "batchmean"},
        description="F.kl_div(log_softmax(logits), one_hot(labels), reduction='batchmean')",
    ),
    "kl_div_smoothed": CriterionSpec(
        losses.kl_div,
        "smoothed",
        log_softmax=True,
        defaults={"reduction": "batchmean"},
        description=f"kl_div against {1 - SMOOTHING:g}*one_hot(labels) + {SMOOTHING:g}/C",
    ),
}
"""Every named criterion. Add one here and train, validate, the CLI and the tests pick it up."""


def _hashable(value: Any) -> Any:
    if isinstance(value, list | tuple | np.ndarray):
        return tuple(_hashable(v) for v in np.asarray(value).tolist())
    return value


def _options_of(loss: Callable[..., Any]) -> list[str]:
    return [p for p in inspect.signature(loss).parameters if p not in ("input", "target")]


@dataclasses.dataclass(frozen=True)
class Criterion:
    """A named criterion with its options: ``criterion(logits, labels) -> scalar loss``.

    Hashable by value, so ``train_step`` (whose criterion is a static argument) compiles once
    per name and options. Build it with ``jaxnet.criteria.criterion(name, **options)``.
    """

    name: str
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def spec(self) -> CriterionSpec:
        return CRITERIA[self.name]

    @property
    def ignore_index(self) -> int | None:
        """The label this criterion skips (cross-entropy's ``ignore_index``), or None."""
        if self.spec.targets != "indices":
            return None
        return int(dict(self.options).get("ignore_index", -100))

    def _soften(self, one_hot: Any, log: Callable[[Any], Any]) -> Any:
        """One-hot targets as this criterion takes them (smoothed, log-probabilities)."""
        if self.spec.targets == "smoothed":
            one_hot = (1 - SMOOTHING) * one_hot + SMOOTHING / one_hot.shape[-1]
        return log(one_hot) if dict(self.options).get("log_target") else one_hot

    def __call__(self, logits: jax.Array, labels: jax.Array) -> jax.Array:
        """The loss in JAX (``logits (N, C)``, integer ``labels (N,)``)."""
        opts = dict(self.options)
        if opts.get("weight") is not None:
            opts["weight"] = jnp.asarray(opts["weight"], logits.dtype)
        targets = labels
        if self.spec.targets != "indices":
            one_hot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
            targets = self._soften(one_hot, jnp.log)
        inputs = jax.nn.log_softmax(logits, axis=-1) if self.spec.log_softmax else logits
        return self.spec.loss(inputs, targets, **opts)

    def torch(self, logits: Any, labels: Any) -> Any:
        """The same loss in PyTorch, on torch tensors (for the validator and the tests)."""
        import torch
        import torch.nn.functional as F

        opts = dict(self.options)
        if opts.get("weight") is not None:
            opts["weight"] = torch.as_tensor(
                opts["weight"], dtype=logits.dtype, device=logits.device
            )
        targets = labels
        if self.spec.targets != "indices":
            one_hot = F.one_hot(labels.long(), logits.shape[-1]).to(logits.dtype)
            targets = self._soften(one_hot, torch.log)
        inputs = F.log_softmax(logits, dim=-1) if self.spec.log_softmax else logits
        return getattr(F, self.spec.loss.__name__)(inputs, targets, **opts)


def criterion(name: str, **options: Any) -> Criterion:
    """The named criterion (see ``CRITERIA``) with ``torch.nn.functional``'s options.

    Raises ``ConfigError`` for an unknown name, an option its loss does not take,
    ``reduction="none"`` (no scalar to train on), or ``log_target`` with one-hot targets
    (their zeros have no logarithm; use ``kl_div_smoothed``).
    """
    if name not in CRITERIA:
        raise ConfigError(f"unknown loss {name!r}; choose one of {', '.join(sorted(CRITERIA))}.")
    spec = CRITERIA[name]
    accepted = _options_of(spec.loss)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(
            f"loss {name!r} takes no option {', '.join(unknown)}; its options are "
            f"{', '.join(accepted)}."
        )
    if options.get("reduction") == "none":
        raise ConfigError(f"loss {name!r}: reduction='none' gives no scalar loss to train on.")
    if options.get("log_target") and spec.targets == "one_hot":
        raise ConfigError(
            f"loss {name!r}: log_target=True needs targets without zeros; one-hot targets have "
            "them. Use kl_div_smoothed, or drop log_target."
        )
    merged = {**spec.defaults, **options}
    return Criterion(name, tuple(sorted((k, _hashable(v)) for k, v in merged.items())))


def ignored_label(criterion: Callable[..., Any]) -> int | None:
    """The class-index target ``criterion`` skips, or None (every label must be a class).

    A ``Criterion`` knows its own; a ``functools.partial`` of a loss that sets
    ``ignore_index`` skips that; ``losses.cross_entropy`` itself skips torch's default -100;
    any other callable skips nothing.
    """
    if isinstance(criterion, Criterion):
        return criterion.ignore_index
    keywords: dict[str, Any] = {}
    while isinstance(criterion, functools.partial):
        keywords = {**criterion.keywords, **keywords}
        criterion = criterion.func
    if "ignore_index" in keywords:
        return int(keywords["ignore_index"])
    return -100 if criterion is losses.cross_entropy else None
