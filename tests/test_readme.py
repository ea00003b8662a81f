"""The README's promises: its Python blocks run as written, it stays short, its doc links exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_LINES = 150

_PYTHON_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
_DOC_LINK = re.compile(r"\]\((docs/[^)#\s]+\.md)(?:#[^)]*)?\)")


def _python_blocks() -> list[str]:
    return _PYTHON_BLOCK.findall(README.read_text(encoding="utf-8"))


def test_readme_has_a_python_block():
    assert _python_blocks(), "README.md has no ```python block to run"


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_python_block_runs_as_written(index, tmp_path, monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)  # whatever a block writes into the cwd lands here
    # The sentinel is set by the block's own last line: the whole block ran, top to bottom.
    code = _python_blocks()[index] + "\n__readme_block_done__ = True\n"
    namespace: dict[str, object] = {"__name__": "__readme__"}
    exec(compile(code, f"README.md python block {index}", "exec"), namespace)
    assert namespace.get("__readme_block_done__") is True
    assert list(tmp_path.iterdir()) == [], "a README block wrote into the current directory"


def test_readme_is_at_most_150_lines():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_LINES, f"README.md has {n} lines; keep it at most {MAX_LINES}"


def test_readme_doc_links_exist():
    links = set(_DOC_LINK.findall(README.read_text(encoding="utf-8")))
    assert links, "README.md links to no docs/*.md"
    missing = sorted(link for link in links if not (ROOT / link).is_file())
    assert not missing, f"README.md links to missing docs: {missing}"
