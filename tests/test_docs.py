"""Every ```python block of README.md and docs/*.md runs as written (each on its own, in an empty folder)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """(line number, code) of each ```python block of a Markdown file."""
    text = path.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 2, m.group(1))
            for m in re.finditer(r"^```python\n(.*?)^```$", text, re.S | re.M)]


BLOCKS = [(path, line, code) for path in FILES for line, code in python_blocks(path)]


def test_the_docs_hold_python_blocks():
    assert len(python_blocks(ROOT / "README.md")) >= 2  # the pipeline and the tokenizer quick starts
    assert python_blocks(ROOT / "README.md")[0][1].startswith("import torch\n")  # what broke the first snippet


@pytest.mark.parametrize("path, line, code", BLOCKS,
                         ids=[f"{path.relative_to(ROOT)}:{line}" for path, line, _ in BLOCKS])
def test_python_block_runs(path, line, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks write to outputs/: keep the checkout clean
    exec(compile(code, f"{path.relative_to(ROOT)}:{line}", "exec"), {"__name__": "__docs__"})
