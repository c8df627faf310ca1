"""Shape rules of the code base that a reader relies on (the project's charter)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "featurescribe"
MAX_FUNCTION_LINES = 60
NOT_YET: tuple[str, ...] = ()


def _functions(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.lineno, node.end_lineno - node.lineno + 1


def test_no_function_is_longer_than_60_lines():
    """In the package, its tests and its benchmarks (a nested function counts in its outer one)."""
    files = [p for folder in (PACKAGE, ROOT / "tests", ROOT / "benchmarks") for p in sorted(folder.rglob("*.py"))]
    long = [f"{p.relative_to(ROOT)}:{line} {name} ({n} lines)"
            for p in files if not set(p.relative_to(ROOT).parts) & set(NOT_YET)
            for name, line, n in _functions(p) if n > MAX_FUNCTION_LINES]
    assert not long, "functions over 60 lines:\n" + "\n".join(long)


def test_the_rule_sees_the_package():
    assert len([p for p in PACKAGE.rglob("*.py")]) > 40


def test_only_store_speaks_sql_in_the_label_pipeline():
    """The flows and the harvest hand SQL to store/: no query text in flows/ or harvest/."""
    offenders = []
    for p in sorted([*(PACKAGE / "flows").rglob("*.py"), *(PACKAGE / "harvest").rglob("*.py")]):
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "execute":
                offenders.append(f"{p.name}:{node.lineno}")
    assert not offenders, offenders
