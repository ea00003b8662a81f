"""jaxnet.checkpoint: what the save/restore tests of test_train.py and test_faults.py do not
reach directly."""

from __future__ import annotations

import asyncio
import sys
import types

import jax
import numpy as np

from jaxnet import checkpoint
from jaxnet.checkpoint import checksums


def test_late_tensorstore_callbacks_are_kept_off_the_terminal(monkeypatch):
    """After a failed save, tensorstore writes still in flight end on an asyncio loop orbax
    has closed, and tensorstore prints each "Event loop is closed" through sys.excepthook or
    sys.unraisablehook; so do a failed restore's abandoned reads. Those are dropped; every other
    error still reaches the hook."""
    seen, unraisable = [], []
    monkeypatch.setattr(sys, "excepthook", lambda kind, value, tb: seen.append(value))
    monkeypatch.setattr(sys, "unraisablehook", lambda u: unraisable.append(u.exc_value))
    checkpoint._quiet_late_callbacks()
    loop = asyncio.new_event_loop()
    loop.close()
    try:
        loop.call_soon_threadsafe(print)
    except RuntimeError as e:
        late = e
    other = RuntimeError("Event loop is closed")  # not from a callback: reported
    # A reader's restore that failed (the step was replaced): orbax's other array reads are
    # closed unfinished and raise as they are collected; a read that failed on its own is
    # reported.
    abandoned = Exception(f"{checkpoint._ABANDONED_READ}: (slice(0, 6, 1),). See ...")
    abandoned.__cause__ = GeneratorExit()
    failed = Exception(f"{checkpoint._ABANDONED_READ}: (slice(0, 6, 1),). See ...")
    failed.__cause__ = OSError("corrupt")
    for value, tb in [(late, late.__traceback__), (other, None), (abandoned, None), (failed, None)]:
        sys.excepthook(type(value), value, tb)
        sys.unraisablehook(types.SimpleNamespace(exc_value=value, exc_traceback=tb))
    assert seen == [other, failed] and unraisable == [other, failed]


def test_checksums_see_every_byte_dtype_and_shape():
    a = np.arange(3 * (1 << 20), dtype=np.float32)  # 12 MiB: three 4 MiB chunks
    tree = {"a": a, "b": {"c": np.float32(2.0)}}
    sums = checksums(tree)
    assert set(sums) == {"['a']", "['b']['c']"}
    assert checksums({"a": a.copy(), "b": {"c": np.float32(2.0)}}) == sums
    changed = a.copy()
    changed[-1] += 1  # in the last chunk
    assert checksums({"a": changed})["['a']"] != sums["['a']"]
    assert checksums({"a": a.reshape(3, -1)})["['a']"] != sums["['a']"]
    assert checksums({"a": a.view(np.int32)})["['a']"] != sums["['a']"]
    assert checksums({"a": jax.numpy.asarray(a)}) == {"['a']": sums["['a']"]}
