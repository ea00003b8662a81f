"""Process-level settings of the host that decide how fast XLA:CPU runs the training step.

Two glibc ``malloc`` settings make the README's own usage the fast path on the CPU, with no
extra call (why: ``docs/performance.md``):

* **one arena**: importing jaxnet limits glibc to one malloc arena (``M_ARENA_MAX`` = 1), so
  the threads that XLA starts later allocate from the main heap. In a thread's own arena a
  block over 64 MB (a large batch's temporaries) is a fresh ``mmap`` on every step, whatever
  the thresholds, and a heap that empties is unmapped. It is set at import because it only
  acts on threads that have not allocated yet, and XLA's threads allocate as soon as JAX
  computes anything (``TrainState.create`` does);
* **thresholds** (:func:`tune_malloc`): the first time one of jaxnet's jitted steps runs on the
  CPU (``train_step``, ``eval_step``, ``train_steps``, ``train_step_donated``,
  ``per_example_grad_norms``, the ``jaxnet.inference`` predictions), glibc's mmap and trim
  thresholds are raised, so freed blocks are reused instead of faulted in afresh.

They change the whole process, so:

* ``JAXNET_TUNE_MALLOC=0`` in the environment keeps glibc's own settings (for the arena limit
  it must be set before jaxnet is imported); :func:`restore_malloc` before the first step keeps
  the thresholds; ``MALLOC_ARENA_MAX``, ``MALLOC_MMAP_THRESHOLD_`` or
  ``MALLOC_TRIM_THRESHOLD_`` set by the user stay in force;
* :func:`malloc_status` says what was done, by what and why; :func:`restore_malloc` undoes it
  (glibc keeps the arena count it has already settled on for the process, see there);
* nothing is done where JAX will run on a GPU or TPU (their buffers are not ``malloc``'s): the
  arena limit is set only when the CPU is expected to be JAX's backend (``JAX_PLATFORMS``
  names it first, or no accelerator plugin is installed), and a first step off the CPU lifts
  it and leaves the thresholds alone;
* the memory kept is capped: at most ``auto_threshold()`` bytes (1 GiB, or 1/16 of the
  physical memory if that is less) of freed memory stays with the process.

No other setting is touched.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
import sys
from collections.abc import Callable
from typing import Any

__all__ = [
    "DEFAULT_MALLOC_THRESHOLD",
    "MALLOC_ENV",
    "auto_threshold",
    "cpu_description",
    "malloc_status",
    "restore_malloc",
    "tune_malloc",
    "tunes_malloc_on_first_call",
]

# glibc mallopt() parameter numbers (malloc.h) and the defaults its manual gives.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_GLIBC_DEFAULT_THRESHOLD = 128 * 1024
_GLIBC_DEFAULT_ARENA_MAX = 0  # 0: glibc's own count, 8 per core

DEFAULT_MALLOC_THRESHOLD = 1 << 30
MALLOC_ENV = "JAXNET_TUNE_MALLOC"
"""``JAXNET_TUNE_MALLOC=0``: jaxnet leaves ``malloc`` as it is (set before importing jaxnet
for the arena limit, before the first step for the thresholds)."""
_USER_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
_USER_ARENA_ENV = "MALLOC_ARENA_MAX"


def _opted_out() -> bool:
    """``JAXNET_TUNE_MALLOC=0`` in the environment now."""
    return os.environ.get(MALLOC_ENV, "").strip() == "0"


def _initial_status() -> dict[str, Any]:
    """What :func:`malloc_status` says before jaxnet has done or decided anything."""
    return {
        "tuned": False,
        "threshold_bytes": None,
        "by": None,
        "note": None,
        "one_arena": False,
        "arena_note": None,
    }


_status: dict[str, Any] = _initial_status()
_first_call_done = False


def _mallopt() -> Callable[[int, int], int] | None:
    """glibc's ``mallopt``, or None where the C library is not glibc (macOS, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - present only in glibc
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt


def tune_malloc(threshold_bytes: int = DEFAULT_MALLOC_THRESHOLD) -> bool:
    """Make glibc's ``malloc`` keep freed blocks of up to ``threshold_bytes`` for reuse.

    Why: XLA:CPU allocates a step's temporary buffers and its outputs (a non-donated step's
    new parameters and optimizer state: 51 MB for ``Net`` with momentum) afresh on every call
    and frees them afterwards. glibc serves blocks above its mmap threshold (at most 32 MB by
    default) with a fresh ``mmap`` and gives freed memory at the top of the heap back to the
    OS beyond its trim threshold, so the kernel zero-fills those pages again on first touch:
    thousands of page faults per step, a large share of the step's time
    (``docs/performance.md``). With both thresholds at ``threshold_bytes`` the blocks are
    reused and the faults disappear (``tests/test_host.py``). The cost: up to
    ``threshold_bytes`` of freed memory stays mapped in the process.

    Calls ``mallopt(M_MMAP_THRESHOLD)`` and ``mallopt(M_TRIM_THRESHOLD)``: the same as starting
    Python with ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` set, but possible
    after start-up; it affects allocations made after the call. Returns True if both settings
    were applied; False where the C library is not glibc (nothing is changed) or glibc
    refuses a value.
    """
    if threshold_bytes <= 0:
        raise ValueError(f"threshold_bytes must be positive, got {threshold_bytes}.")
    return _tune(min(int(threshold_bytes), 2**31 - 1), "tune_malloc()")


def _tune(value: int, by: str) -> bool:
    done = _set_thresholds(value)
    if done:
        _status.update(tuned=True, threshold_bytes=value, by=by, note=None)
    return done


def _set_thresholds(value: int) -> bool:
    mallopt = _mallopt()
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, value)) and bool(mallopt(_M_TRIM_THRESHOLD, value))


def restore_malloc() -> bool:
    """Undo :func:`tune_malloc`, and keep jaxnet's steps from applying it in this process.

    Puts glibc's documented default values back (128 KiB each; glibc's dynamic raising of the
    mmap threshold stays off once a value has been set, as after any ``mallopt``) and lifts
    the one-arena limit. glibc settles the process's arena count the first time a thread
    needs an arena of its own and keeps it: threads started after that still share the one
    arena. Set ``JAXNET_TUNE_MALLOC=0`` before importing jaxnet to keep glibc's arenas.
    Returns True if values were restored, False if there was nothing to undo.
    """
    global _first_call_done
    _first_call_done = True
    was_tuned = _status["tuned"]
    if was_tuned:
        _set_thresholds(_GLIBC_DEFAULT_THRESHOLD)
    _status.update(tuned=False, threshold_bytes=None, by="restore_malloc()")
    _status["note"] = "glibc's default values restored" if was_tuned else "left untouched"
    had_one_arena = _lift_arena_limit("restore_malloc()")
    return bool(was_tuned or had_one_arena)


def malloc_status() -> dict[str, Any]:
    """What jaxnet did to ``malloc`` in this process: ``tuned`` (bool: the thresholds),
    ``threshold_bytes``, ``by`` (``"first step"``, ``"tune_malloc()"``, ``"restore_malloc()"``
    or None: nothing yet), ``note`` (why they were left alone, when they were), ``one_arena``
    (bool: ``M_ARENA_MAX`` = 1 since jaxnet's import) and ``arena_note`` (what was done to the
    arenas, or why not; after the limit is lifted, that glibc may keep the one arena)."""
    return dict(_status)


# The vector extensions that decide which kernels XLA:CPU (Eigen, YNNPACK) and PyTorch (oneDNN,
# MKL) can run, as /proc/cpuinfo spells them.
_VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_description(cpuinfo: str | None = None) -> dict[str, Any]:
    """The host CPU, for benchmark records: ``model`` (the model name), ``id`` (vendor, family
    and model numbers: virtual machines often give a generic name), ``vector_isa`` (which
    of AVX2, FMA, AVX-512, VNNI, BF16 and AMX it has, as /proc/cpuinfo names them) and
    ``cpu_count`` (CPUs this process may use, else all).

    Speed relative to PyTorch depends on the CPU, not only on the code: PyTorch's oneDNN
    convolutions use AVX-512 and AMX where XLA:CPU's kernels gain less from them
    (``docs/performance.md``), so a ratio means little without the CPU it was measured on.
    ``cpuinfo``: the text of /proc/cpuinfo (read here when None; where there is none, as off
    Linux, the model is ``platform.processor()`` and ``vector_isa`` is empty).
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:  # the first processor's
            fields[key.strip()] = value.strip()
    flags = set(fields.get("flags", "").split())
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity call off Linux
        count = os.cpu_count() or 0
    numbers = (fields.get("vendor_id"), fields.get("cpu family"), fields.get("model"))
    return {
        "model": fields.get("model name") or platform.processor() or "unknown",
        "id": "{} family {} model {}".format(*numbers) if all(numbers) else None,
        "vector_isa": [flag for flag in _VECTOR_FLAGS if flag in flags],
        "cpu_count": count,
    }


def _cpu_backend_expected() -> bool:
    """Whether JAX's default backend will be the CPU, known without starting a backend: the
    first of ``JAX_PLATFORMS`` / ``jax_platforms`` when set, else whether no accelerator
    plugin (CUDA, ROCm: the ``jax_plugins`` entry points and namespace; TPU: ``libtpu``) is
    installed."""
    import importlib.util
    from importlib.metadata import entry_points

    import jax

    platforms = os.environ.get("JAX_PLATFORMS") or getattr(jax.config, "jax_platforms", None) or ""
    if platforms.strip():
        return platforms.split(",")[0].strip().lower() == "cpu"
    if any(True for _ in entry_points(group="jax_plugins")):
        return False
    return all(importlib.util.find_spec(name) is None for name in ("jax_plugins", "libtpu"))


def _limit_arenas_on_import(cpu_expected: Callable[[], bool] = _cpu_backend_expected) -> None:
    """One malloc arena from here on, unless told not to or another backend is expected (see
    the module's docstring)."""
    if _opted_out():
        _status["arena_note"] = f"{MALLOC_ENV}=0: left untouched"
    elif _USER_ARENA_ENV in os.environ:
        _status["arena_note"] = f"{_USER_ARENA_ENV} set in the environment: left as set"
    elif not _safely(cpu_expected):
        _status["arena_note"] = "an accelerator backend is expected: left untouched"
    elif not _set_arena_max(1):
        _status["arena_note"] = "not glibc: nothing to limit"
    else:
        _status.update(one_arena=True, arena_note="one arena since jaxnet was imported")


def _safely(cpu_expected: Callable[[], bool]) -> bool:
    # Importing jaxnet must not fail on a speed setting: an unreadable installation (a broken
    # package's metadata) counts as "not known to be the CPU", and nothing is changed.
    try:
        return bool(cpu_expected())
    except Exception:
        return False


# What lifting the limit cannot undo (measured: restore_malloc() right after import, once
# JAX has started its threads, still leaves one arena).
_SETTLED = (
    "threads keep sharing one arena if glibc settled its arena count while the limit was set "
    f"(it does so once); {MALLOC_ENV}=0 before importing jaxnet keeps glibc's own"
)


def _lift_arena_limit(by: str) -> bool:
    if not _status["one_arena"]:
        return False
    _set_arena_max(_GLIBC_DEFAULT_ARENA_MAX)
    _status.update(one_arena=False, arena_note=f"limit lifted by {by}; {_SETTLED}")
    return True


def _set_arena_max(value: int) -> bool:
    mallopt = _mallopt()
    return mallopt is not None and bool(mallopt(_M_ARENA_MAX, value))


def auto_threshold() -> int:
    """The threshold the first step applies: 1 GiB, or 1/16 of the physical memory if less."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return DEFAULT_MALLOC_THRESHOLD
    return max(min(DEFAULT_MALLOC_THRESHOLD, physical // 16), 32 << 20)


def _on_first_call(backend: Callable[[], str]) -> None:
    """Tune ``malloc`` for XLA:CPU unless told not to; record why not otherwise."""
    global _first_call_done
    _first_call_done = True
    if _opted_out():
        _status["note"] = f"{MALLOC_ENV}=0: left untouched"
        _lift_arena_limit(f"the first step ({MALLOC_ENV}=0)")
    elif backend() != "cpu":
        _status["note"] = "not on the CPU: left untouched"
        _lift_arena_limit("the first step (not on the CPU)")
    elif any(name in os.environ for name in _USER_ENV):
        _status["note"] = "MALLOC_*_THRESHOLD_ set in the environment: left as set"
    elif not _tune(auto_threshold(), "first step"):
        _status["note"] = "not glibc: nothing to tune"


def tunes_malloc_on_first_call(jitted: Callable[..., Any]) -> Callable[..., Any]:
    """``jitted``, whose first call (of all so wrapped) tunes ``malloc`` first (see above)."""
    return _FirstCallTuning(jitted)


class _FirstCallTuning:
    """A jitted function whose first call runs ``_on_first_call`` first. Everything else
    (``lower``, ``trace``, ``eval_shape``, the docstring) is the jitted function's; a call
    costs one flag check more."""

    def __init__(self, jitted: Callable[..., Any]) -> None:
        self._jitted = jitted
        functools.update_wrapper(self, jitted)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not _first_call_done:
            import jax

            _on_first_call(jax.default_backend)
        return self._jitted(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._jitted, name)


_limit_arenas_on_import()
