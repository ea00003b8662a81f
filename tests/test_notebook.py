"""The tutorial notebook executes, top to bottom, and prints what it promises.

It runs in a subprocess (a Jupyter kernel, driven by nbclient) started in the background when
the session starts (conftest's ``in_background``); the test checks the executed notebook.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from conftest import LIVE, STOPPING, background_result, in_background

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
    if STOPPING.is_set():
        pytest.fail("the session ended before the notebook started")
    with open(out / "log.txt", "w+") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", _EXECUTE, str(NOTEBOOK), str(executed)],
            cwd=NOTEBOOK.parent.parent,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        LIVE.add(proc)
        try:
            code = proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"the notebook did not finish within 600 s; log in {out}")
        finally:
            LIVE.discard(proc)
        log.seek(0)
        assert code == 0, f"the notebook failed (exit {code}):\n{log.read()[-4000:]}"
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
