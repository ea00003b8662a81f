"""``python -m jaxnet``: the same as the ``jaxnet`` command."""

import sys

from jaxnet.cli import main

sys.exit(main())
