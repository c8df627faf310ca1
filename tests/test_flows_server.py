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


def _start_prefect_server(home) -> tuple[subprocess.Popen, str]:
    """A real `prefect server start` on a free port of 127.0.0.1, answering: (process, API URL)."""
    import time
    import urllib.request
    from pathlib import Path

    port = _closed_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    server = subprocess.Popen([str(Path(sys.executable).with_name("prefect")), "server", "start", "--host",
                               "127.0.0.1", "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 90
    while True:
        assert server.poll() is None, "prefect server start exited"
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2)
            return server, f"http://127.0.0.1:{port}/api"
        except OSError:
            assert time.monotonic() < deadline, "the Prefect server did not answer in 90 s"
            time.sleep(0.3)


def test_a_prefect_server_gone_mid_run_is_one_line_at_the_end_and_the_labels_are_kept(tmp_path, fake_llm):
    """The Prefect server is only bookkeeping: killed mid-run, the run labels every feature; the
    command then says so in one line and exits 1. Before: a pair of Prefect lines every ~7 s, an
    httpx.ConnectError traceback after ~80 s of retries, and a process that never ended (it drained
    the events it could not send). With the server's global limits on (the default with a server),
    the chunks after the kill failed to take their slots and the run stopped with 4 of 10 labelled."""
    import signal
    import time

    db = str(tmp_path / "f.duckdb")
    with closing(open_db(db)) as con:
        build_db(con, n_features=8)
    fake_llm.latency_s = 0.3
    server, url = _start_prefect_server(tmp_path / "prefect-home")
    try:
        label = subprocess.Popen(
            [sys.executable, "-m", "featurescribe", "label", "--db", db, "--source", SOURCE, "--features", "all",
             "--explainer", "openai:gpt-4o-mini", "--simulator", "lexical", "--chunk-size", "2",
             "--concurrency", "1", "--no-progress"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env={**os.environ, "PREFECT_API_URL": url, "FEATURESCRIBE_PREFECT_LIMITS": "on"})
        while len(fake_llm.requests) < 2 and label.poll() is None:  # the run is under way
            time.sleep(0.1)
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    asked_before = len(fake_llm.requests)
    try:
        _, err = label.communicate(timeout=150)
    finally:
        label.kill()
    assert label.returncode == 1, err[-3000:]
    assert err.strip().splitlines() == [
        f"featurescribe: error: the Prefect server at {url} stopped answering during the run (ConnectError: "
        "[Errno 111] Connection refused), so the flow run's end is not recorded there; what finished is kept in "
        "the database, run the same command again to go on"]
    assert len(fake_llm.requests) > asked_before  # it went on labelling
    assert q(db, "SELECT status FROM runs") == [("completed",)]
    (alive,) = q(db, "SELECT count(*) FROM features WHERE status = 'alive'")[0]
    assert alive >= 5
    assert q(db, "SELECT count(*), count(DISTINCT feature_id) FROM labels") == [(alive, alive)]
    assert q(db, "SELECT count(*) FROM explanations") == [(alive,)]


def test_the_python_api_names_a_prefect_server_gone_mid_run(monkeypatch):
    """`fs.label()` / `fs.harvest()` raised httpx's bare ConnectError when the configured server went
    away during the run; they raise `PrefectServerGone` (what finished is in the database). The
    error is the one Prefect's client raises, made on a request to that server; the run that raises
    it is cut to the raise."""
    import httpx
    from prefect.settings import PREFECT_API_URL, temporary_settings

    import featurescribe as fs
    from featurescribe.flows import label_command

    url = f"http://127.0.0.1:{_closed_port()}/api"

    def run_label(db, options):
        raise httpx.ConnectError("[Errno 111] Connection refused", request=httpx.Request("POST", f"{url}/flow_runs/"))

    monkeypatch.setattr(label_command, "run_label", run_label)
    with temporary_settings({PREFECT_API_URL: url}):  # over the test session's own server, if it runs
        with pytest.raises(fs.PrefectServerGone, match=f"the Prefect server at {url} stopped answering"):
            fs.label("any.duckdb", source="6-mlp")
        other = httpx.ConnectError("refused", request=httpx.Request("POST", "http://127.0.0.1:9/v1/chat/completions"))
        monkeypatch.setattr(label_command, "run_label", lambda db, options: (_ for _ in ()).throw(other))
        with pytest.raises(httpx.ConnectError):  # not the Prefect server's: left as it is
            fs.label("any.duckdb", source="6-mlp")
