"""`featurescribe browse`: the read-only web app, through HTTP and in real headless chromium."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from featurescribe.cli import main
from featurescribe.semantic.embed import embed_labels
from featurescribe.store import open_db
from featurescribe.store.windows import feature_windows
from tests.dbq import q, version1_database
from featurescribe.web.server import serve_in_thread
from tests.export_fixtures import build_demo_db
from tests.headless import Browser, chromium_path
from tests.processes import end_process

ROOT = Path(__file__).resolve().parent.parent

CHROMIUM = chromium_path()
UNSAMPLED = ("6-mlp", 7)  # an alive, labelled feature whose sampled windows the fixture removes


@pytest.fixture(scope="module")
def browse_db(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("browse") / "demo.duckdb")
    build_demo_db(path)
    con = open_db(path)
    try:
        embed_labels(con, progress=False)
        con.execute("DELETE FROM examples WHERE source_id = ? AND feature_id = ?", list(UNSAMPLED))
        con.execute("CHECKPOINT")
    finally:
        con.close()
    return path


def digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()



@pytest.fixture(scope="module")
def served(browse_db):
    before = digest(browse_db)
    running = serve_in_thread(browse_db)
    yield running
    running.stop()
    assert digest(browse_db) == before, "the browser wrote to the database"


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.load(r)


def test_feature_list_is_sorted_filtered_and_paged_in_the_database(served, browse_db):
    page = get(served.url + "/api/features?limit=5")
    best = q(browse_db, "SELECT source_id, feature_id FROM labels ORDER BY score DESC, source_id, feature_id LIMIT 5")
    assert [(r["source_id"], r["feature_id"]) for r in page["rows"]] == [tuple(b) for b in best]
    assert page["total"] == q(browse_db, "SELECT count(*) FROM features")[0][0]
    second = get(served.url + "/api/features?limit=5&offset=5")
    assert not {(r["source_id"], r["feature_id"]) for r in page["rows"]} & {
        (r["source_id"], r["feature_id"]) for r in second["rows"]}
    dead = get(served.url + "/api/features?status=dead&limit=500")
    assert dead["total"] == q(browse_db, "SELECT count(*) FROM features WHERE n_active = 0 OR status = 'dead'")[0][0]
    dense = get(served.url + "/api/features?min_density=0.1&sort=density&order=asc&limit=500")["rows"]
    assert dense and all(r["frac_active"] >= 0.1 for r in dense)
    assert [r["frac_active"] for r in dense] == sorted(r["frac_active"] for r in dense)
    lifted = get(served.url + "/api/features?min_lift=1.0&source=6-mlp&limit=500")["rows"]
    assert len(lifted) == q(browse_db, "SELECT count(*) FROM labels WHERE lift >= 1.0 AND source_id = '6-mlp'")[0][0]
    with pytest.raises(urllib.error.HTTPError) as err:
        get(served.url + "/api/features?sort=nonsense")
    assert err.value.code == 400 and "unknown sort" in json.load(err.value)["error"]
    for bad in ("offset=9223372036854775808", "offset=99999999999999999999", "offset=-1", "limit=0", "limit=501"):
        with pytest.raises(urllib.error.HTTPError) as err:
            get(served.url + "/api/features?" + bad)
        assert err.value.code == 400 and "offset must be 0 to" in json.load(err.value)["error"], bad
    assert get(served.url + "/api/features?offset=9223372036854775807")["rows"] == []
    for bad in ("min_score=nan", "max_density=inf", "min_lift=-inf"):  # nan gave an empty list, no word
        with pytest.raises(urllib.error.HTTPError) as err:
            get(served.url + "/api/features?" + bad)
        assert err.value.code == 400 and "must be a finite number" in json.load(err.value)["error"], bad
    with pytest.raises(urllib.error.HTTPError) as err:  # it was an empty list, as if the source had no features
        get(served.url + "/api/features?source=6-nope")
    assert err.value.code == 400 and json.load(err.value)["error"] == (
        "no source '6-nope' (sources in this database: 6-mlp, 6-res-sae16)")


def test_feature_page_has_everything(served, browse_db):
    f = get(served.url + "/api/feature/6-mlp/3")
    assert f["stats"]["n_active"] == q(browse_db, "SELECT n_active FROM features WHERE source_id='6-mlp' AND feature_id=3")[0][0]
    assert sum(f["histogram"]["counts"]) == f["stats"]["n_active"]
    n_expl = q(browse_db, "SELECT count(*) FROM explanations WHERE source_id='6-mlp' AND feature_id=3")[0][0]
    assert len(f["explanations"]) == n_expl and f["explanations"][0]["is_best"]
    assert {s["scorer"] for s in f["explanations"][0]["scores"]} >= {"simulation"}
    assert f["windows_from"] == "examples" and {w["kind"] for w in f["windows"]} >= {"top", "random"}
    for w in f["windows"]:
        assert len(w["tokens"]) == len(w["acts"])
    nb = get(served.url + "/api/feature/6-mlp/3/neighbours")["neighbours"]
    assert nb and all((n["source_id"], n["feature_id"]) != ("6-mlp", 3) for n in nb)
    assert nb[0]["explanation"] == f["explanations"][0]["text"]  # the same label elsewhere

    # a feature the label run never sampled still has windows, read from activations
    g = get(served.url + "/api/feature/%s/%d" % UNSAMPLED)
    assert g["windows_from"] == "activations"
    tops = [w for w in g["windows"] if w["kind"] == "top"]
    assert tops and max(tops[0]["acts"]) == pytest.approx(g["stats"]["max_act"], rel=1e-5)
    assert {w["kind"] for w in g["windows"]} == {"top", "random"} or "quantile" in {w["kind"] for w in g["windows"]}
    # the app's prepared sequence tables give the windows the exports give (computed per query there)
    con = open_db(browse_db, read_only=True)
    try:
        assert g["windows"] == json.loads(json.dumps(feature_windows(con, *UNSAMPLED)))
    finally:
        con.close()
    with pytest.raises(urllib.error.HTTPError) as err:
        get(served.url + "/api/feature/6-mlp/999")
    assert err.value.code == 404


def test_port_in_use_is_one_line(browse_db, capsys):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    try:
        port = s.getsockname()[1]
        assert main(["browse", "--db", browse_db, "--port", str(port)]) == 2
    finally:
        s.close()
    err = capsys.readouterr().err.strip()
    assert err == f"featurescribe: error: port {port} on 127.0.0.1 is in use; pick another with --port"


def test_missing_database_is_one_line(tmp_path, capsys):
    assert main(["browse", "--db", str(tmp_path / "nope.duckdb"), "--port", "0"]) == 2
    assert "no database at" in capsys.readouterr().err


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs Debian's chromium)")
def test_browse_in_headless_chromium(served, browse_db, tmp_path):
    browser = Browser(CHROMIUM)
    try:
        page = browser.page()
        page.goto(served.url + "/", ready="document.body && document.body.dataset.ready === '1' && document.body.dataset.feature")
        rows = "document.querySelectorAll('#rows tr[data-id]')"
        best = q(browse_db, "SELECT source_id || '/' || feature_id FROM labels ORDER BY score DESC, source_id, feature_id LIMIT 1")[0][0]
        assert page.evaluate(f"{rows}[0].dataset.id") == best
        assert page.evaluate("document.body.dataset.feature") == best  # opens on the best label
        assert page.evaluate("location.pathname") == "/feature/" + best
        assert page.evaluate("document.querySelectorAll('#detail .window .tok').length") > 0
        assert page.evaluate("document.querySelectorAll('#detail svg.hist rect').length") > 0

        # words: the features whose best label says it
        page.type("#q", "digit")
        expected = {f"{s}/{f}" for s, f in q(browse_db, "SELECT source_id, feature_id FROM labels WHERE explanation ILIKE '%digit%'")}
        assert 0 < len(expected)
        page.wait_for(f"{rows}.length === {len(expected)}", timeout=10)
        assert set(page.evaluate(f"Array.from({rows}).map(r => r.dataset.id)")) == expected
        assert "q=digit" in page.evaluate("location.search")

        # meaning: "numbers" finds the digit features first, though no label says "numbers"
        page.evaluate("""(() => { const q = document.getElementById('q'); q.value = 'numbers';
                                  const m = document.getElementById('mode'); m.value = 'semantic';
                                  m.dispatchEvent(new Event('change')); })()""")
        page.wait_for("document.getElementById('sim-h').textContent === 'similarity'", timeout=60)
        page.wait_for(f"{rows}.length > 0", timeout=30)
        assert "digit" in page.evaluate(f"{rows}[0].children[1].textContent")

        # a permalink to a feature never sampled: windows from activations, neighbours link on
        page.goto(served.url + "/feature/%s/%d" % UNSAMPLED, ready="document.body && document.body.dataset.feature === '%s/%d'" % UNSAMPLED)
        assert page.evaluate("document.getElementById('windows').dataset.from") == "activations"
        assert page.evaluate("document.querySelectorAll('#windows .window[data-kind=top] .tok').length") > 0
        page.wait_for("document.getElementById('neighbours').dataset.ready === '1'", timeout=30)
        target = page.evaluate("document.querySelector('#neighbours a.nb').dataset.id")
        page.evaluate("document.querySelector('#neighbours a.nb').click()")
        page.wait_for(f"document.body.dataset.feature === {json.dumps(target)}", timeout=10)
        assert page.evaluate("location.pathname") == "/feature/" + target

        # the score filter keeps the list to labels at or above it
        page.goto(served.url + "/?min_score=0.99", ready="document.body && document.body.dataset.ready === '1'")
        n_good = q(browse_db, "SELECT count(*) FROM labels WHERE score >= 0.99")[0][0]
        page.wait_for(f"{rows}.length === {min(n_good, 50)}", timeout=10)
        png = page.screenshot(tmp_path / "browse.png")
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
        page.close()
    finally:
        browser.close()


def _start_browse(db: str, port: int, *more: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "featurescribe", "browse", "--db", db, "--port", str(port), *more],
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_serving(proc: subprocess.Popen, url: str) -> None:
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            get(url + "/api/meta")  # the server closes the connection first: it lingers in TIME_WAIT
            return
        except OSError:
            time.sleep(0.1)
    end_process(proc)
    raise AssertionError(f"browse did not serve: {proc.communicate()}")


def test_browse_stopped_and_started_again_on_the_same_port(browse_db):
    """Ctrl-C then the same command again: the port is free, though the last connections linger."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for sig in (signal.SIGTERM, signal.SIGINT):
        proc = _start_browse(browse_db, port)
        _wait_serving(proc, f"http://127.0.0.1:{port}")
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == (143 if sig == signal.SIGTERM else 130), err
        assert err.strip() == f"featurescribe: interrupted ({sig.name}); the server stopped"


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs Debian's chromium)")
def test_hand_edited_urls_read_sensibly_in_chromium(served):
    """Odd offsets start at the first page; a long feature id is asked for as written; an error
    the API returns as a list (FastAPI's 422) reads as words, not '[object Object]'."""
    browser = Browser(CHROMIUM)
    try:
        page = browser.page()
        rows = "document.querySelectorAll('#rows tr[data-id]').length"
        for query in ("offset=abc", "offset=-50", "offset=0.5"):
            page.goto(served.url + "/?" + query, ready="document.body && document.body.dataset.ready === '1'")
            assert page.evaluate(rows) > 0 and page.evaluate("document.getElementById('page').textContent").startswith("1–")
        page.goto(served.url + "/?offset=100000", ready="document.body && document.body.dataset.ready === '1'")
        assert page.evaluate("document.getElementById('page').textContent") == "past the last page"
        long_id = "1" + "0" * 21  # past what a JavaScript Number holds exactly
        page.goto(served.url + f"/feature/6-mlp/{long_id}",
                  ready="document.querySelector('#detail .error') !== null")
        assert page.evaluate("document.querySelector('#detail .error').textContent") == f"no feature 6-mlp/{long_id}"
        page.goto(served.url + "/feature/6-mlp/abc", ready="document.querySelector('#detail .error') !== null")
        assert page.evaluate("document.querySelector('#detail .error').textContent") == \
            "a feature id is a whole number, not 'abc'"  # it was FastAPI's 422 JSON, no page
        page.evaluate("getJson('/api/features?limit=abc').catch(e => { document.body.dataset.err = e.message; })")
        page.wait_for("document.body.dataset.err !== undefined", timeout=10)
        assert page.evaluate("document.body.dataset.err") == "limit: Input should be a valid integer, unable to parse string as an integer"
        page.close()
    finally:
        browser.close()


def test_browse_on_an_ipv6_address(browse_db):
    """--host ::1 was refused: 'Address family for hostname not supported'."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
            port = s.getsockname()[1]
    except OSError:
        pytest.skip("no IPv6 loopback here")
    proc = _start_browse(browse_db, port, "--host", "::1")
    _wait_serving(proc, f"http://[::1]:{port}")
    assert get(f"http://[::1]:{port}/api/features?limit=1")["total"] == q(browse_db, "SELECT count(*) FROM features")[0][0]
    end_process(proc)
    out, _ = proc.communicate()
    assert f"at http://[::1]:{port}/ (read-only" in out


def test_a_database_browse_cannot_read_is_one_line_and_left_as_it_was(tmp_path, capsys):
    """An older schema crashed the start with a DuckDB traceback (features.status missing); another
    program's DuckDB file gave 500s on every page."""
    import duckdb

    old, theirs = str(tmp_path / "v1.duckdb"), str(tmp_path / "theirs.duckdb")
    version1_database(old)
    con = duckdb.connect(theirs)
    con.execute("CREATE TABLE measurements (x INTEGER)")
    con.close()
    before = {p: digest(p) for p in (old, theirs)}
    expected = {old: f"database {old} has schema version 1, older than browse reads; browse only reads, so "
                     f"upgrade it once with: featurescribe init --db {old}",
                theirs: f"database {theirs} is not a featurescribe database (it has no schema_version table)"}
    for db, message in expected.items():
        assert main(["browse", "--db", db, "--port", "0"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"featurescribe: error: {message}") and len(err.splitlines()) == 1, err
    assert {p: digest(p) for p in (old, theirs)} == before
