"""`featurescribe demo` at a small size: harvest, baseline labels, the local LLM path, export."""

from __future__ import annotations

import pytest

from featurescribe.cli import main
from featurescribe.flows.demo import ANTHROPIC_JUDGE, OPENAI_JUDGE, pick_judge
from featurescribe.store import open_db


def test_the_best_judge_available():
    assert pick_judge({"OPENAI_API_KEY": "k", "ANTHROPIC_API_KEY": "k"}) == OPENAI_JUDGE
    assert pick_judge({"ANTHROPIC_API_KEY": "k"}) == ANTHROPIC_JUDGE
    assert pick_judge({}) is None


@pytest.mark.slow
def test_demo_small(tmp_path, monkeypatch, capsys, prefect_server):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    db = str(tmp_path / "demo.duckdb")
    assert main(["demo", "--db", db, "--features", "6", "--llm-features", "1", "--max-tokens", "6000",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "judges: baseline:tokens + lexical on every feature, and local:smollm2-135m" in out
    assert "feature  explainer" in out and "baseline:tokens / lexical: 6 features" in out
    assert f'featurescribe sql --db {db} "SELECT feature_id, explanation' in out
    assert (tmp_path / "out" / "demo" / "report.html").is_file()
    con = open_db(db, read_only=True)
    try:
        assert con.execute("SELECT count(DISTINCT feature_id) FROM labels").fetchone()[0] == 6
        # the local model was asked to explain one feature (it may fail to answer in JSON: the
        # demo says so), and everything ran as flows: demo > harvest, label x2, export
        assert con.execute("SELECT count(*) FROM llm_calls WHERE backend = 'local' AND purpose = 'explain'"
                           ).fetchone()[0] >= 1
        flows = con.execute("SELECT flow, status FROM runs ORDER BY started_at").fetchall()
        assert flows == [("demo", "completed"), ("harvest", "completed"), ("label", "completed"),
                         ("label", "completed"), ("export", "completed")]
    finally:
        con.close()
