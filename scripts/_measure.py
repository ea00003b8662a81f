"""What the measurement scripts beside this file share: sizing a timing round, timing calls
interleaved round by round, and the head of the JSON record they write for ``benchmarks/``
(with ``jaxnet.bench.write_json``, atomically).

``python3 scripts/<name>.py`` puts this folder on ``sys.path``, so the scripts import it as
``_measure``. ``time_interleaved`` and ``size_round`` use nothing of jaxnet, because
``default_path.py`` also times an older jaxnet build with them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Mapping
from typing import Any, TypeVar

K = TypeVar("K", bound=Hashable)

Timed = tuple[Callable[[], Any], Callable[[Any], Any]]
"""``(run, wait)``: one call, returning something to wait on, and the wait for that result."""


def size_round(
    run: Callable[[], Any], wait: Callable[[Any], Any], min_round_s: float
) -> tuple[float, int]:
    """``(first_call_s, calls_per_round)``: the first call (compiling and warming up), then
    how many calls fill ``min_round_s``, from two more timed calls."""
    start = time.perf_counter()
    wait(run())
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(2):
        wait(run())
    per_call = (time.perf_counter() - start) / 2
    return first, max(1, round(min_round_s / max(per_call, 1e-6)))


def time_interleaved(
    calls: Mapping[K, Timed],
    per_round: Mapping[K, int],
    rounds: int,
    reset: Callable[[], None] | None = None,
) -> dict[K, list[float]]:
    """Seconds per call of each entry, one figure per round.

    Each round calls ``reset`` first (back to the first weights and optimizer state), then
    times ``per_round[k]`` calls of each entry in turn, waiting once for the last result. So
    load from elsewhere hits every entry alike and their ratios stay meaningful; and no round
    runs on weights that thousands of steps on one batch carried off (PyTorch slows down ~2x
    on the subnormal momentum that follows, where XLA flushes subnormals to zero).
    """
    times: dict[K, list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        if reset is not None:
            reset()
        for k, (run, wait) in calls.items():
            n = per_round[k]
            start = time.perf_counter()
            for _ in range(n):
                out = run()
            wait(out)
            times[k].append((time.perf_counter() - start) / n)
    return times


def record(command: str, **fields: Any) -> dict[str, Any]:
    """The head of a script's JSON record: when, the command, jax and torch versions, the CPU
    (ratios to PyTorch depend on it), then ``fields``."""
    import jax
    import torch

    from jaxnet import host

    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": command,
        "jax": jax.__version__,
        "torch": torch.__version__,
        "cpu": host.cpu_description(),
        **fields,
    }
