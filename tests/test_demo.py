"""`featurescribe demo` at a small size: harvest, baseline labels, the local LLM path, export."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from featurescribe.cli import main
from featurescribe.flows.demo import ANTHROPIC_JUDGE, OPENAI_JUDGE, pick_judge
from featurescribe.store import open_db
from tests.mounts import tmpfs

ROOT = Path(__file__).resolve().parent.parent


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


def _demo(db: Path, prefect_server: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY")}
    env.update(PYTHONPATH=str(ROOT), PREFECT_API_URL=prefect_server)
    return subprocess.run([sys.executable, "-m", "featurescribe", "demo", "--db", str(db), "--features", "2",
                           "--llm-features", "0", "--max-tokens", "1000", "--no-progress"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_demo_on_a_file_that_is_not_a_database_is_one_line(tmp_path, prefect_server):
    """The error comes from inside the demo's flow: Prefect's traceback lines for it are left out."""
    db = tmp_path / "notes.duckdb"
    db.write_text("my notes, not a database")
    r = _demo(db, prefect_server)
    assert r.returncode == 2
    assert r.stderr.splitlines() == [f'featurescribe: error: cannot open database {db}: IO Error: The file "{db}" '
                                     "exists, but it is not a valid DuckDB database file!"]
    assert db.read_text() == "my notes, not a database"
    # the Prefect server still has Prefect's lines about it: only the console is spared them
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterLevel

    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(level=LogFilterLevel(ge_=40)), limit=200)
    assert any("Encountered exception" in log.message and str(db) in log.message for log in logs)


def test_demo_on_a_full_disk_is_one_line_exit_1(tmp_path, prefect_server):
    with tmpfs(tmp_path / "small", "size=1m") as mnt:
        r = _demo(mnt / "demo.duckdb", prefect_server)
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("featurescribe: error: the disk is full ("), r.stderr[-3000:]


def test_demo_refuses_an_out_it_could_not_write_before_any_work(tmp_path, capsys):
    """It was found at the export, after the harvest and the labels: a FileExistsError traceback."""
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    (tmp_path / "theirs" / "json").mkdir(parents=True)
    (tmp_path / "theirs" / "json" / "data.csv").write_text("1,2")
    cases = {str(notes): f"cannot export to {notes}: it is a file, not a folder",
             str(notes / "sub"): f"cannot export to {notes / 'sub'}: {notes} is a file, not a folder",
             str(tmp_path / "theirs"): f"cannot export to {tmp_path / 'theirs' / 'json'}: the folder is not empty"}
    for out, message in cases.items():
        assert main(["demo", "--db", str(tmp_path / "demo.duckdb"), "--out", out, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"featurescribe: error: {message}") and len(err.splitlines()) == 1, err
    assert notes.read_text() == "mine" and not (tmp_path / "demo.duckdb").exists()


def test_sigterm_during_the_demos_harvest_is_one_line(tmp_path, prefect_server):
    """Prefect's own SIGTERM handler takes a signal in a task: its 'Crash detected!' lines for the
    task and each flow came before ours."""
    import signal
    import time

    from featurescribe.errors import FeaturescribeError
    from tests.dbq import q

    db = str(tmp_path / "demo.duckdb")
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY")}
    env.update(PYTHONPATH=str(ROOT), PREFECT_API_URL=prefect_server)
    proc = subprocess.Popen([sys.executable, "-m", "featurescribe", "demo", "--db", db, "--features", "2",
                             "--llm-features", "0", "--max-tokens", "200000", "--no-progress"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, "the harvest never started"
        try:
            if os.path.exists(db) and q(db, "SELECT count(*) FROM runs WHERE flow = 'harvest'")[0][0]:
                break
        except FeaturescribeError:  # locked by the harvest's writes
            pass
        time.sleep(0.2)
    time.sleep(2)  # into the harvest task
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert err.splitlines() == ["featurescribe: interrupted (SIGTERM); what finished is kept, run the same command "
                                "again to go on"], err


def test_demo_refuses_a_read_only_out_before_any_work(tmp_path, capsys):
    """A read-only --out was found at the export, after the harvest and the labels."""
    with tmpfs(tmp_path / "ro", "ro,size=64k") as mnt:
        assert main(["demo", "--db", str(tmp_path / "demo.duckdb"), "--out", str(mnt / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"featurescribe: error: cannot export to {mnt / 'out'}: {mnt} cannot be written to"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ro"]
