"""One base for every error jaxnet raises about its input or a run, and the exit-code rule.

Each specific error also keeps the built-in base it always had (``ValueError``,
``RuntimeError``, ``FloatingPointError``), so ``except ValueError`` in a user's code still
catches a bad weight file. The command line maps every ``JaxnetError`` to its ``exit_code``.
"""

from __future__ import annotations

__all__ = ["EXIT_BAD_INPUT", "EXIT_OK", "EXIT_RUN_FAILED", "ConfigError", "JaxnetError"]

EXIT_OK = 0
"""The command did what was asked (and a verdict, where there is one, passed)."""
EXIT_RUN_FAILED = 1
"""The run started and failed (a NaN loss, a full disk), or a verdict failed."""
EXIT_BAD_INPUT = 2
"""Bad input or usage: nothing was run; the message names the fix."""


class JaxnetError(Exception):
    """Base of jaxnet's errors. ``exit_code``: what ``jaxnet`` exits with when it stops on one."""

    exit_code: int = EXIT_BAD_INPUT


class ConfigError(JaxnetError, ValueError):
    """An option or configuration value jaxnet cannot use (unknown name, out of range)."""
