"""Shape rules of the code base that a reader relies on (the project's charter)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "featurescribe"
MAX_FUNCTION_LINES = 60
# harvest/ is being rewritten on another branch; it joins the rule once that lands
NOT_YET = ("harvest",)


def _functions(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.lineno, node.end_lineno - node.lineno + 1


def test_no_function_is_longer_than_60_lines():
    long = [f"{p.relative_to(PACKAGE.parent)}:{line} {name} ({n} lines)"
            for p in sorted(PACKAGE.rglob("*.py")) if not set(p.relative_to(PACKAGE).parts) & set(NOT_YET)
            for name, line, n in _functions(p) if n > MAX_FUNCTION_LINES]
    assert not long, "functions over 60 lines:\n" + "\n".join(long)


def test_the_rule_sees_the_package():
    assert len([p for p in PACKAGE.rglob("*.py")]) > 40


def test_only_store_speaks_sql_in_the_label_pipeline():
    """The flows hand SQL to store/: no query text in flows/ (harvest/ joins later)."""
    offenders = []
    for p in sorted((PACKAGE / "flows").rglob("*.py")):
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "execute":
                offenders.append(f"{p.name}:{node.lineno}")
    assert not offenders, offenders
