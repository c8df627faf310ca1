"""`featurescribe report`: one self-contained HTML file, checked as text and in headless chromium."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from featurescribe.cli import main
from featurescribe.store import open_db
from tests.dbq import q
from tests.export_fixtures import build_demo_db
from tests.headless import Browser, chromium_path


@pytest.fixture(scope="module")
def report(demo, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "features.html"
    assert main(["report", "--db", demo, "--out", str(out)]) == 0
    return out



def embedded(html: str) -> dict:
    m = re.search(r'<script id="fs-data" type="application/json">(.*?)</script>', html, re.S)
    assert m, "no embedded data"
    return json.loads(m.group(1))


def test_report_is_one_self_contained_file(demo, report):
    html = report.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    # nothing to fetch: no external scripts, styles, images or requests
    assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)=", html, re.I)
    assert "fetch(" not in html and "XMLHttpRequest" not in html and "@import" not in html
    assert set(re.findall(r"https?://[^\s\"')]+", html)) <= {"http://www.w3.org/2000/svg"}
    data = embedded(html)
    feats = data["features"]
    assert [(f["source_id"], f["feature_id"]) for f in feats] == [
        tuple(r) for r in q(demo, "SELECT source_id, feature_id FROM features ORDER BY 1, 2")]
    labels = {(r[0], r[1]): (r[2], r[3]) for r in q(demo, "SELECT source_id, feature_id, explanation, score FROM labels")}
    for f in feats:
        key = (f["source_id"], f["feature_id"])
        assert (f["best"]["text"], f["best"]["score"]) == labels[key] if key in labels else f["best"] is None
        assert len(f["top"]) <= 8 and len(f["random"]) <= 4
        for w in f["top"] + f["random"]:
            assert len(w["tokens"]) == len(w["acts"])
        if f["stats"]["n_active"]:
            assert sum(f["histogram"]["counts"]) == f["stats"]["n_active"]
        for e in f["explanations"]:
            for s in e["scores"]:
                assert {"baseline_shuffled", "baseline_tokens", "lift"} <= set(s)


def test_report_embeds_text_safely(tmp_path):
    db = str(tmp_path / "x.duckdb")
    build_demo_db(db)
    con = open_db(db)
    con.execute("UPDATE explanations SET text = '</script><b>&amp; tags</b>' WHERE explanation_id = '6-mlp-f0-c0'")
    con.close()
    out = tmp_path / "r.html"
    assert main(["report", "--db", db, "--out", str(out), "--source", "6-mlp", "--examples", "2"]) == 0
    html = out.read_text(encoding="utf-8")
    assert html.count("</script>") == 2  # the data cannot close its own element
    data = embedded(html)
    assert data["features"][0]["explanations"][0]["text"] == "</script><b>&amp; tags</b>"
    assert all(len(f["top"]) <= 2 for f in data["features"])
    assert {f["source_id"] for f in data["features"]} == {"6-mlp"}


def test_report_twice_gives_identical_bytes(demo, report, tmp_path):
    again = tmp_path / "features.html"
    assert main(["report", "--db", demo, "--out", str(again)]) == 0
    assert again.read_bytes() == report.read_bytes()


def test_report_replaces_an_earlier_report_but_no_other_file(demo, report, tmp_path, capsys):
    mine = tmp_path / "notes.html"
    mine.write_text("<html><title>my notes</title></html>")
    assert main(["report", "--db", demo, "--out", str(mine)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"featurescribe: error: cannot write {mine}: the file exists and is not an earlier featurescribe "
        "report; choose another name, or remove it first")
    assert mine.read_text() == "<html><title>my notes</title></html>"
    earlier = tmp_path / "earlier.html"
    earlier.write_bytes(report.read_bytes().replace(b"fs-data", b"fs-old"))
    assert main(["report", "--db", demo, "--out", str(earlier)]) == 0
    assert earlier.read_bytes() == report.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier.html", "notes.html"]


CHROMIUM = chromium_path()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs Debian's chromium)")
def test_report_in_headless_chromium(demo, report, tmp_path):
    browser = Browser(CHROMIUM)
    try:
        page = browser.page()
        page.send("Network.enable")
        page.goto(report.resolve().as_uri(), ready="document.body && document.body.getAttribute('data-ready') === '1'")
        rows = "document.querySelectorAll('#rows tr').length"
        n_features = q(demo, "SELECT count(*) FROM features")[0][0]
        assert page.evaluate(rows) == n_features
        best_first = q(demo, "SELECT source_id || '/' || feature_id FROM labels ORDER BY score DESC LIMIT 1")[0][0]
        assert page.evaluate("document.querySelector('#rows tr').dataset.id") == best_first
        assert page.evaluate("document.querySelector('#rows tr.selected').dataset.id") == best_first
        assert page.evaluate("document.querySelectorAll('#detail .window .tok').length") > 0
        assert page.evaluate("document.querySelectorAll('#detail svg.hist rect').length") > 0

        # typing in the filter keeps exactly the features whose explanations say it
        page.type("#filter", "digit")
        expected = {f"{s}/{f}" for s, f in q(demo, """SELECT DISTINCT source_id, feature_id FROM explanations
                                                      WHERE lower(text) LIKE '%digit%'""")}
        assert 0 < len(expected) < n_features
        page.wait_for(f"{rows} === {len(expected)}", timeout=10)
        shown = page.evaluate("Array.from(document.querySelectorAll('#rows tr')).map(r => r.dataset.id)")
        assert set(shown) == expected
        assert page.evaluate("document.getElementById('count').textContent").startswith(f"{len(expected)} of ")
        page.evaluate("document.querySelector('#rows tr').click()")
        page.screenshot(tmp_path / "filtered.png")

        # the score filter and sorting by score
        page.evaluate("""(() => { const f = document.getElementById('filter'); f.value = '';
                                  f.dispatchEvent(new Event('input')); })()""")
        page.evaluate("""(() => { const m = document.getElementById('min-score'); m.value = '0.99';
                                  m.dispatchEvent(new Event('input')); })()""")
        n_good = q(demo, "SELECT count(*) FROM labels WHERE score >= 0.99")[0][0]
        page.wait_for(f"{rows} === {n_good}", timeout=10)
        # it opens sorted by score, best first; a click on the score header turns the order round
        first = page.evaluate("document.querySelector('#rows tr').dataset.id")
        best = q(demo, "SELECT source_id || '/' || feature_id FROM labels ORDER BY score DESC LIMIT 1")[0][0]
        assert first == best
        page.evaluate("document.querySelector('th[data-key=score]').click()")
        first = page.evaluate("document.querySelector('#rows tr').dataset.id")
        worst = q(demo, "SELECT source_id || '/' || feature_id FROM labels WHERE score >= 0.99 ORDER BY score LIMIT 1")[0][0]
        assert first == worst

        png = page.screenshot(tmp_path / "report.png")
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
        requested = [e["params"]["request"]["url"] for e in page.events if e["method"] == "Network.requestWillBeSent"]
        assert requested and all(u.startswith(("file:", "data:", "about:")) for u in requested), requested
        page.close()
    finally:
        browser.close()


def test_report_over_the_size_limit_is_refused_pointing_at_browse(demo, tmp_path, capsys):
    out = tmp_path / "big.html"
    assert main(["report", "--db", demo, "--out", str(out), "--max-mb", "0.01"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress line
    assert err.startswith("featurescribe: error: the report of 40 features would be about 0.")
    assert "over --max-mb 0.01" in err and f"featurescribe browse --db {demo}" in err
    assert not out.exists() and not list(tmp_path.glob("*.partial"))
    assert main(["report", "--db", demo, "--out", str(out), "--max-mb", "0"]) == 0 and out.exists()
    estimate_mb = float(err.split("would be about ")[1].split(" MB")[0])
    assert 0.5 < estimate_mb * 1e6 / out.stat().st_size < 2  # of the whole report, not of the part written


def test_report_size_estimate_refuses_early(tmp_path):
    from featurescribe.errors import FeaturescribeError
    from featurescribe.export.report import SizeGuard

    guard = SizeGuard(max_bytes=1_000_000, total=1_000_000, db_path="x.duckdb")
    with pytest.raises(FeaturescribeError, match="about 1,000 MB"):
        for i in range(1, SizeGuard.SAMPLE + 1):  # 1 kB a feature: a million would be 1 GB
            guard.add(1000, i)
    assert guard.written == SizeGuard.SAMPLE * 1000  # refused after the sample, not at the limit
