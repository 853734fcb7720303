"""The docs name the tests that show a behaviour (`tests/test_x.py::test_y[id]`): every one named exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = re.compile(r"(tests/test_\w+\.py)::(test_\w+)(?:\[([^\]\s]+)\])?")


def defined_in(path: Path) -> tuple[set[str], set[str]]:
    """The top-level test functions of a test file, and its string constants (where parameter ids come from)."""
    tree = ast.parse(path.read_text())
    names = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    strings = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    return names, strings


def test_every_test_the_docs_name_exists():
    found, missing = 0, []
    for doc in sorted([*ROOT.glob("*.md"), *ROOT.glob("docs/**/*.md")]):
        for file, name, param in REFERENCE.findall(doc.read_text()):
            found += 1
            path = ROOT / file
            names, strings = defined_in(path) if path.is_file() else (set(), set())
            # a parameter id is its values joined by "-": each must be a string in the file
            if name not in names or (param and not all(part in strings for part in param.split("-"))):
                missing.append(f"{doc.relative_to(ROOT)}: {file}::{name}" + (f"[{param}]" if param else ""))
    assert found > 50  # docs/reliability.md alone names more: the pattern still matches how docs cite tests
    assert missing == []
