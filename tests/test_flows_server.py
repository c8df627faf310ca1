"""The flows against a configured Prefect server (`PREFECT_API_URL`): one that does not answer is
refused before any work; the runs on one that does carry the outcome the command reports."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from contextlib import closing

import pytest

from featurescribe.store import open_db
from tests.dbq import q
from tests.test_sampling import SOURCE, build_db


def _closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound, then let go)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


COMMANDS = {
    "label": ["label", "--source", SOURCE, "--features", "all", "--explainer", "baseline:tokens",
              "--simulator", "lexical", "--no-progress"],
    "demo": ["demo", "--no-progress"],
    "serve": ["serve", "--cron", "0 3 * * *", "--source", SOURCE],
    "sharded harvest": ["harvest", "--model", "smollm2-135m", "--layer", "2", "--shards", "2",
                        "--max-tokens", "2000", "--no-progress"],
}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_a_prefect_server_that_does_not_answer_is_one_line_before_any_work(tmp_path, name):
    db = str(tmp_path / "f.duckdb")
    if name in ("label", "serve"):
        with closing(open_db(db)) as con:
            build_db(con, n_features=6)
    url = f"http://127.0.0.1:{_closed_port()}/api"
    out = tmp_path / "out"
    args = COMMANDS[name] + ["--db", db] + (["--out", str(out)] if name == "demo" else [])
    r = subprocess.run([sys.executable, "-m", "featurescribe", *args], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path, env={**os.environ, "PREFECT_API_URL": url})
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.strip().splitlines() == [
        f"featurescribe: error: the Prefect server at {url} is unreachable (ConnectError: [Errno 111] "
        "Connection refused); start it (prefect server start), or unset PREFECT_API_URL to run on a "
        "temporary server of this command's own"]
    if name in ("label", "serve"):  # nothing written: no run, no label
        assert q(db, "SELECT count(*) FROM runs") == q(db, "SELECT count(*) FROM explanations") == [(0,)]
    else:  # no database made, no harvest, no export folder
        assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_label_run_that_failed_is_failed_on_the_server_too(db_path, fake_llm, prefect_server,
                                                               no_global_limits, capsys):
    """A run whose backend stopped answering (the circuit breaker) exits 1 and is `failed` in
    `runs`; Prefect showed it Completed."""
    from prefect.client.orchestration import get_client

    from featurescribe.cli import main

    with closing(open_db(db_path)) as con:
        build_db(con, n_features=6)
    fake_llm.html_status = 500
    rc = main(["label", "--db", db_path, "--source", SOURCE, "--features", "all", "--explainer",
               "openai:gpt-4o-mini", "--simulator", "lexical", "--max-failures", "2", "--no-progress"])
    assert rc == 1
    assert "is not answering" in capsys.readouterr().err
    ((status, error, flow_run_id),) = q(db_path, "SELECT status, error, prefect_flow_run_id FROM runs")
    assert status == "failed" and "is not answering" in error
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run_id).state
    assert state.is_failed() and state.message == error
