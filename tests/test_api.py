"""The Python API's database handle on a real database (tests/export_fixtures.py): labels,
features, one feature with every score and its windows, SQL, the result formats, the notebook
cards, and one typed error per kind of bad input."""

from __future__ import annotations

import html
import re
import sys

import numpy as np
import pyarrow as pa
import pytest

import featurescribe as fs
from tests.dbq import q


def test_labels_are_the_labels_view(demo):
    db = fs.open(demo)
    labels = db.labels()
    assert isinstance(labels, fs.Labels) and isinstance(labels.to_arrow(), pa.Table)
    want = q(demo, "SELECT source_id, feature_id, explanation, score FROM labels ORDER BY 1, 2")
    assert [(r["source_id"], r["feature_id"], r["explanation"], r["score"]) for r in labels] == \
        [tuple(r) for r in want]
    one = db.labels("6-mlp")
    assert len(one) == sum(1 for r in want if r[0] == "6-mlp") > 0
    assert {"lift", "baseline_shuffled", "scorer", "explainer"} <= set(one.columns)


def test_features_have_every_feature_with_its_best_label(demo):
    t = fs.open(demo).features("6-res-sae16")
    rows = t.to_dicts()
    assert [r["feature_id"] for r in rows] == [r[0] for r in q(
        demo, "SELECT feature_id FROM features WHERE source_id = '6-res-sae16' ORDER BY 1")]
    dead = [r for r in rows if r["n_active"] == 0]
    assert dead and all(r["explanation"] is None for r in dead)
    assert any(r["explanation"] and r["score"] is not None for r in rows)


def test_one_feature_has_stats_all_scores_with_baselines_and_windows(demo):
    src, fid = q(demo, "SELECT source_id, feature_id FROM labels ORDER BY score DESC LIMIT 1")[0]
    f = fs.open(demo).feature(src, fid)
    assert (f.source_id, f.feature_id) == (src, fid)
    assert f.stats["n_active"] == q(demo, f"SELECT n_active FROM features WHERE source_id='{src}' AND feature_id={fid}")[0][0]
    n_scores = q(demo, f"SELECT count(*) FROM scores JOIN explanations USING (explanation_id) "
                       f"WHERE source_id='{src}' AND feature_id={fid}")[0][0]
    assert sum(len(e["scores"]) for e in f.explanations) == n_scores > 0
    assert f.explanations[0]["is_best"] and f.best["text"] == f.explanations[0]["text"]
    assert f.best["lift"] == pytest.approx(f.best["score"] - f.best["baseline_shuffled"])
    assert all("baseline_shuffled" in s and "baseline_tokens" in s for e in f.explanations for s in e["scores"])
    assert f.examples and all(len(w["tokens"]) == len(w["acts"]) for w in f.examples)
    assert any(a > 0 for w in f.examples for a in w["acts"])
    assert f.histogram and sum(f.histogram["counts"]) == f.stats["n_active"]
    assert repr(f).startswith(f"<Feature {src}/{fid}: {f.best['text']!r}")


def test_a_feature_no_run_sampled_reads_its_windows_from_activations(demo, tmp_path):
    import shutil

    path = str(tmp_path / "copy.duckdb")
    shutil.copy(demo, path)
    fs.open(path, read_only=False).sql("DELETE FROM examples WHERE source_id = '6-mlp' AND feature_id = 0")
    f = fs.open(path).feature("6-mlp", 0, windows=3)
    assert f.examples and {w["kind"] for w in f.examples} <= {"top", "quantile", "random"}
    assert len(f.windows("top")) <= 3


def test_sql_and_the_result_formats(demo, monkeypatch):
    db = fs.open(demo)
    t = db.sql("SELECT feature_id, max_act FROM features WHERE source_id = '6-mlp' ORDER BY 1")
    assert isinstance(t, fs.Table) and len(t) == 24 and t.columns == ["feature_id", "max_act"]
    assert db.sql("SELECT 1 AS a", format="arrow").equals(pa.table({"a": pa.array([1], pa.int32())}))
    assert "feature_id" in repr(t) and "(20 rows)" in repr(t) and "4 more rows" in repr(t)
    monkeypatch.setitem(sys.modules, "polars", None)  # as if it were not installed
    with pytest.raises(fs.MissingDependency, match="pip install polars"):
        t.to_polars()
    with pytest.raises(fs.BadOption, match="unknown format 'excel'"):
        db.labels(format="excel")


@pytest.mark.parametrize("name", ["pandas", "polars"])
def test_dataframes_when_installed(demo, name):
    pytest.importorskip(name)
    df = fs.open(demo).labels("6-mlp", format=name)
    assert type(df).__module__.startswith(name) and len(df) == len(fs.open(demo).labels("6-mlp"))
    assert list(df.columns)[:3] == ["source_id", "feature_id", "explanation"]


def test_the_handle_holds_no_lock_between_calls(demo, tmp_path):
    import shutil

    path = str(tmp_path / "copy.duckdb")
    shutil.copy(demo, path)
    db = fs.open(path)
    db.labels()
    writer = fs.open(path, read_only=False)  # another writer gets the file between reads
    writer.sql("UPDATE features SET status = 'alive' WHERE feature_id = 0")
    assert len(db.labels()) > 0


def test_read_only_by_default(demo):
    with pytest.raises(fs.SQLFailed, match="read-only"):
        fs.open(demo).sql("DELETE FROM features")


def test_bad_input_is_one_typed_error_each(demo, tmp_path):
    db = fs.open(demo)
    cases = [
        (lambda: fs.open(tmp_path / "none.duckdb"), fs.NoDatabase, "no database at"),
        (lambda: db.labels("7-mlp"), fs.UnknownSource, "no source '7-mlp'.*6-mlp, 6-res-sae16"),
        (lambda: db.features("7-mlp"), fs.UnknownSource, "no source '7-mlp'"),
        (lambda: db.feature("6-mlp", 999), fs.UnknownFeature, "has no feature 999"),
        (lambda: db.feature("6-mlp", "3"), fs.BadOption, "must be an integer"),
        (lambda: db.labels(6), fs.BadOption, "source must be a source id"),
        (lambda: db.search("digits", k=0), fs.BadOption, "at least 1"),
        (lambda: db.sql("SELEC 1"), fs.SQLFailed, "SQL error: Parser Error"),
        (lambda: db.sql("SELECT * FROM no_such_table"), fs.SQLFailed, "no_such_table"),
        (lambda: db.search("digits"), fs.NoEmbeddings, "no label embeddings"),
        (lambda: db.search("   "), fs.FeaturescribeError, "query is empty"),
        (lambda: fs.export(demo, format="xml", out=str(tmp_path / "x")), fs.BadOption, "unknown export format"),
        (lambda: fs.export(demo, format="json"), fs.BadOption, r"needs out=\.\.\."),
        (lambda: fs.export(demo, fmt="json"), fs.BadOption, "unknown option 'fmt'"),
        (lambda: fs.export(demo, format="json", out=str(tmp_path / "x"), source="9-x"), fs.UnknownSource, "9-x"),
        (lambda: fs.label(demo, source="6-mlp", scorers="simulation,vibes"), fs.BadOption, "unknown scorer"),
        (lambda: fs.label(demo, features="0:4"), fs.BadOption, r"needs source=\.\.\."),
        (lambda: fs.label(demo, source="6-mlp", features=[1, 2]), fs.BadOption, r"features= must be a string, not \[1, 2\]"),
        (lambda: fs.label(demo, source="6-mlp", candidates="2"), fs.BadOption, "candidates= must be an integer, not '2'"),
        (lambda: fs.label(demo, source="6-mlp", redo="yes"), fs.BadOption, "redo= must be True or False"),
        (lambda: fs.label(demo, source=7), fs.UnknownSource, "no source '7'"),
        (lambda: fs.export(demo, format="json", out=None), fs.BadOption, "out= must be a string, not None"),
        (lambda: db.feature("6-mlp", 3, windows="8"), fs.BadOption, "windows= must be an integer"),
        (lambda: db.search(None), fs.BadOption, "text must be a string, not None"),
        (lambda: db.search("digits", k="5"), fs.BadOption, "k= must be an integer, not '5'"),
        (lambda: fs.open(None), fs.BadOption, "path must be a string, not None"),
    ]
    for call, kind, message in cases:
        with pytest.raises(kind, match=message) as info:
            call()
        assert "\n" not in str(info.value)
    assert issubclass(fs.UnknownSource, LookupError) and issubclass(fs.BadOption, ValueError)
    assert not (tmp_path / "x").exists()


def test_paths_and_numbers_are_taken_where_an_option_is_a_string(tmp_path):
    from featurescribe.harvest.options import HarvestOptions
    from featurescribe.options import options_from_kwargs

    o = options_from_kwargs(HarvestOptions, "harvest", {"model": "smollm2-135m", "layer": 6, "threshold": 0.2,
                                                         "corpus": tmp_path / "c.txt", "max_tokens": np.int64(64)})
    assert (o.layer, o.threshold, o.corpus, o.max_tokens) == ("6", "0.2", str(tmp_path / "c.txt"), 64)
    assert type(o.max_tokens) is int


def test_export_returns_a_record_and_writes_what_the_cli_writes(demo, tmp_path):
    from featurescribe.cli import main

    r = fs.export(demo, format="json", out=str(tmp_path / "api"), source="6-mlp")
    assert isinstance(r, fs.ExportResult) and (r.format, r.sources, r.n_features) == ("json", ["6-mlp"], 24)
    assert main(["export", "--db", demo, "--format", "json", "--out", str(tmp_path / "cli"), "--source", "6-mlp"]) == 0
    for name in ("feature_dictionary.json", "featurescribe-export.json"):
        assert (tmp_path / "api" / name).read_bytes() == (tmp_path / "cli" / name).read_bytes()


def _text(markup: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", re.sub(r"<style>.*?</style>", "", markup, flags=re.S)))


def test_notebook_cards(demo):
    db = fs.open(demo)
    src, fid = q(demo, "SELECT source_id, feature_id FROM labels ORDER BY score DESC LIMIT 1")[0]
    f = db.feature(src, fid)
    card = f._repr_html_()
    assert card.startswith('<div class="fs"><style>') and ".fs .window" in card  # the report's styles
    text = _text(card)
    assert f.best["text"] in text and f"lift {f.best['lift']:.3f}" in text and f"{f.best['score']:.3f}" in text
    assert card.count('<svg class="hist"') == 1 and card.count("<rect") == sum(1 for c in f.histogram["counts"] if c)
    hot = re.findall(r'<span class="tok" title="[^"]*" style="background:rgba\(var\(--hot\),([0-9.]+)\)">', card)
    assert hot and max(float(a) for a in hot) == pytest.approx(1.0)
    labels = db.labels()
    lc = labels._repr_html_()
    assert _text(lc).count("6-mlp") == min(50, sum(1 for r in labels if r["source_id"] == "6-mlp"))
    assert "&lt;" not in lc or "<script" not in lc


def test_report_and_cards_share_the_styles(demo, tmp_path):
    from featurescribe.cli import main

    out = tmp_path / "r.html"
    assert main(["report", "--db", demo, "--out", str(out)]) == 0
    page = out.read_text()
    assert "@@CARDS_CSS@@" not in page and ".fs .window {" in page and '<div id="detail" class="fs">' in page


def test_writable_sql_runs_a_script_whole_or_not_at_all(db_path):
    """The handle's sql() ran a script statement by statement: a failing statement kept the changes
    of those before it, and 'BEGIN; INSERT ...' returned the count while the row was rolled back
    unseen when the handle closed its connection. It now does what `featurescribe sql --write` does."""
    from featurescribe.store import open_db

    open_db(db_path).close()
    db = fs.open(db_path, read_only=False)
    db.sql("CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (1)")
    with pytest.raises(fs.SQLFailed, match="^SQL error: Conversion Error"):
        db.sql("INSERT INTO t VALUES (2); INSERT INTO t VALUES ('not a number')")
    with pytest.raises(fs.SQLFailed, match="^SQL error: the query ends inside a transaction"):
        db.sql("BEGIN; INSERT INTO t VALUES (3)")
    assert db.sql("SELECT x FROM t ORDER BY x").to_dicts() == [{"x": 1}]
    assert db.sql("INSERT INTO t VALUES (4); SELECT count(*) AS n FROM t").to_dicts() == [{"n": 2}]
    with pytest.raises(fs.BadOption, match="no SQL statement"):
        db.sql("-- nothing")
    with pytest.raises(fs.SQLFailed, match=r"read-only mode! \(the handle is read-only: open it with "
                                           r"featurescribe.open\(path, read_only=False\) to change it\)"):
        fs.open(db_path).sql("DELETE FROM t")
