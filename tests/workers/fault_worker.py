"""``jaxnet`` with one fault injected into the checkpoint library, for tests/test_faults.py
and scripts/fault_sweep.py: ``python fault_worker.py FAULT ARGV...``.

FAULT ``enospc-at-finalize:N``: orbax's background thread fails with ``OSError(ENOSPC)`` when
it finalises the ``N``-th checkpoint of the process (counting from 1), as on a disk that fills
up while the run saves; ``none``: no fault.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo, as in tests/


def _enospc_at_finalize(n: int) -> None:
    from orbax.checkpoint._src.path import atomicity

    calls = {"count": 0}
    real = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self, *args, **kwargs):
        if self._final_path.name.isdigit():  # a whole checkpoint, not one of its items
            calls["count"] += 1
        if calls["count"] >= n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.get()))
        return await real(self, *args, **kwargs)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize


def main() -> int:
    fault, argv = sys.argv[1], sys.argv[2:]
    if fault.startswith("enospc-at-finalize:"):
        _enospc_at_finalize(int(fault.split(":")[1]))
    elif fault != "none":
        raise SystemExit(f"unknown fault {fault!r}")
    from jaxnet.cli import main as jaxnet_main

    return jaxnet_main(argv)


if __name__ == "__main__":
    sys.exit(main())
