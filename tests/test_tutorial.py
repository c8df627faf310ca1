"""docs/tutorial.md runs: its python blocks, in order, in one namespace, in a fresh folder, on the
real offline model with the offline judges (harvest -> label -> search -> export)."""

from __future__ import annotations

import html
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
TUTORIAL = Path(__file__).resolve().parent.parent / "docs" / "tutorial.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_the_tutorial_runs_end_to_end(tmp_path, monkeypatch, capsys):
    blocks = python_blocks(TUTORIAL.read_text(encoding="utf-8"))
    assert len(blocks) >= 6
    monkeypatch.chdir(tmp_path)
    ns: dict = {"__name__": "tutorial"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{TUTORIAL.name} block {i + 1}", "exec"), ns)
    out = capsys.readouterr().out
    fs = ns["fs"]
    assert ns["harvested"].source_id == "6-mlp" and ns["summary"].labelled
    assert isinstance(ns["feature"], fs.Feature) and ns["feature"].explanations
    assert len(ns["hits"]) == 3 and all(h["explanation"] for h in ns["hits"])
    card = ns["hits"]._repr_html_()  # how Jupyter shows it
    assert all(html.escape(h["explanation"]) in card for h in ns["hits"])
    assert (tmp_path / "tutorial-export" / "feature_dictionary.json").is_file()
    assert ns["exported"].n_features == ns["harvested"].width
    assert "as expected: source '6-mlp' has no feature 1000000000" in out
