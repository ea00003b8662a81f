"""The tutorial notebook executes, top to bottom, and prints what it promises.

It runs in a subprocess (a Jupyter kernel, driven by nbclient) started in the background when
the session starts (conftest's ``in_background``); the test checks the executed notebook.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest
from conftest import background_result, in_background, run_logged

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "tutorial.ipynb"

_EXECUTE = """
import sys
import nbclient, nbformat
nb = nbformat.read(sys.argv[1], as_version=4)
nbclient.NotebookClient(nb, timeout=300, kernel_name="python3").execute()
nbformat.write(nb, sys.argv[2])
"""


@in_background("executed_notebook")
def _execute(out: Path) -> Path:
    """The notebook executed by nbclient (which raises on a cell's error: a non-zero exit)."""
    executed = out / "tutorial.ipynb"
    argv = [sys.executable, "-c", _EXECUTE, str(NOTEBOOK), str(executed)]
    run_logged(argv, out / "log.txt", cwd=NOTEBOOK.parent.parent, timeout=600, what="the notebook")
    return executed


@pytest.fixture(scope="module")
def executed_notebook(request) -> Path:
    return background_result(request, "executed_notebook")


@pytest.mark.slow
def test_notebook_executes(executed_notebook):
    nb = nbformat.read(executed_notebook, as_version=4)
    outputs = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "6,456,942" in outputs
    assert "max |jaxnet - torch| =" in outputs
    assert not any(o.get("output_type") == "error" for c in nb.cells for o in c.get("outputs", []))
