"""The tutorial notebook executes, and the CLI's commands run."""

from __future__ import annotations

from pathlib import Path

import nbclient
import nbformat
import pytest

from jaxnet.cli import main

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "tutorial.ipynb"


@pytest.mark.slow
def test_notebook_executes():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3").execute()
    outputs = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "6,456,942" in outputs
    assert "max |jaxnet - torch| =" in outputs
    assert not any(o.get("output_type") == "error" for c in nb.cells for o in c.get("outputs", []))


def test_cli_summary(capsys):
    assert main(["summary"]) == 0
    assert "6,456,942" in capsys.readouterr().out


def test_cli_tutorial(capsys):
    assert main(["tutorial", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    before = float(out.split("L1 loss before:")[1].split()[0])
    after = float(out.split("L1 loss after:")[1].split()[0])
    assert after < before
