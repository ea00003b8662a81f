"""Benchmark jaxnet's train_step against PyTorch: ``python scripts/bench.py --help``.

The same as ``jaxnet bench`` (``python -m jaxnet bench``); the logic is in ``jaxnet.bench``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from jaxnet.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
