"""``KEY=VALUE`` options, as ``jaxnet train/validate --opt/--sched-opt/--loss-opt`` take them.

One parser for every such option, so ``--opt betas=0.9,0.99`` means the same in every
subcommand: values are Python literals, ``true``/``false`` in any case are booleans, anything
else stays a string.
"""

from __future__ import annotations

import argparse
import ast
from collections.abc import Sequence
from typing import Any

from jaxnet.errors import ConfigError

__all__ = ["key_value", "parse_options"]


def _parse_one(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key:
        raise ConfigError(f"option {item!r} is not KEY=VALUE (e.g. lr=0.01).")
    # "none" stays a string: it is a value of torch's reduction=.
    text = {"true": "True", "false": "False"}.get(raw.strip().lower(), raw.strip())
    try:
        return key, ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return key, raw.strip()


def parse_options(items: Sequence[str] | None) -> dict[str, Any]:
    """``["lr=0.01", "betas=0.9,0.999", "nesterov=true"]`` -> ``{"lr": 0.01, ...}``.

    Values are Python literals (numbers, tuples, lists, ``None``); ``true``/``false`` in any
    case are accepted; anything else stays a string (``reduction=none`` is ``"none"``).
    Dashes in a key become underscores; a later item overrides an earlier one with its key.

    Raises ``jaxnet.errors.ConfigError`` (a ``ValueError``) for an item that is not
    ``KEY=VALUE``.
    """
    return dict(_parse_one(item) for item in items or ())


def key_value(text: str) -> tuple[str, Any]:
    """One ``KEY=VALUE`` as ``(key, value)``, parsed as ``parse_options`` does: argparse's
    ``type=`` (a bad item is a usage error naming the form, exit status 2)."""
    try:
        return _parse_one(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
