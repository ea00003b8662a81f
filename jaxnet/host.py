"""Process-level settings of the host that decide how fast XLA:CPU runs the training step.

These change the whole process (not just jaxnet), so the library never applies them on its
own: ``jaxnet train`` and ``jaxnet bench`` call :func:`tune_malloc` at start-up (opt out with
``--malloc-defaults``), and scripts that call ``train_step`` themselves may call it first.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["DEFAULT_MALLOC_THRESHOLD", "tune_malloc"]

# glibc mallopt() parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

DEFAULT_MALLOC_THRESHOLD = 1 << 30


def tune_malloc(threshold_bytes: int = DEFAULT_MALLOC_THRESHOLD) -> bool:
    """Make glibc's ``malloc`` keep freed blocks of up to ``threshold_bytes`` for reuse.

    Why: XLA:CPU allocates a step's temporary buffers afresh on every call and frees them
    afterwards (tens of MB per step for ``Net``'s training step at batch 128 and up). glibc
    serves blocks above its mmap threshold (at most 32 MB by default) with a fresh ``mmap``
    and unmaps them on ``free``, so the kernel zero-fills every page again on first touch:
    thousands of page faults per step, a large share of the step's time
    (``docs/performance.md`` has the figures). With the mmap and trim thresholds raised to
    ``threshold_bytes`` such blocks are served from the heap and reused, and the faults
    disappear (see
    ``tests/test_host.py``). The cost: up to ``threshold_bytes`` of freed memory stays mapped
    in the process instead of going back to the OS.

    Calls ``mallopt(M_MMAP_THRESHOLD)`` and ``mallopt(M_TRIM_THRESHOLD)``. The same as
    starting Python with ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` set, but
    possible after start-up. Affects allocations made after the call. Returns True if both
    settings were applied; False where the C library is not glibc (macOS, musl: nothing is
    changed) or glibc refuses a value.
    """
    if threshold_bytes <= 0:
        raise ValueError(f"threshold_bytes must be positive, got {threshold_bytes}.")
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - present only in glibc
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    value = min(int(threshold_bytes), 2**31 - 1)
    return bool(mallopt(_M_MMAP_THRESHOLD, value)) and bool(mallopt(_M_TRIM_THRESHOLD, value))
