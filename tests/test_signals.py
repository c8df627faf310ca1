"""SIGINT and SIGTERM stop `label`, `harvest` and `serve` within 5 s, with a non-zero exit status
(130 for SIGINT, 143 for SIGTERM): finished chunks are kept, the answers already paid for are in
the ledger and the response cache, the run is marked 'interrupted', and a re-run asks the provider
for none of them again.

Each command runs in a real subprocess (its own session, so the signal goes to it alone), through
the real openai SDK against tests/fake_llm.py (in this process) with a slow answer.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from featurescribe.statuses import ExitStatus
from featurescribe.store import open_db
from tests.dbq import q
from tests.test_sampling import SOURCE, build_db

ROOT = Path(__file__).resolve().parent.parent
N_FEATURES = 40  # 0 is dead, 1 rare: 38 to label
STOP_WITHIN_S = 5.0
EXPECTED = {signal.SIGINT: ExitStatus.INTERRUPTED, signal.SIGTERM: ExitStatus.TERMINATED}


def _tag(req) -> str:
    return hashlib.sha256(req.user_text.encode()).hexdigest()[:12]


def _responder(req):
    return json.dumps({"explanation": f"prompt {_tag(req)}"})


def _env(fake_llm, prefect_server) -> dict:
    return dict(os.environ, OPENAI_BASE_URL=fake_llm.base_url_openai, OPENAI_API_KEY="test-key",
                PREFECT_API_URL=prefect_server, PYTHONPATH=str(ROOT), FEATURESCRIBE_PREFECT_LIMITS="off")


def _label_cmd(db: str, runner: str) -> list[str]:
    return [sys.executable, "-m", "featurescribe", "label", "--db", db, "--source", SOURCE,
            "--features", "all", "--explainer", "openai:test-model", "--simulator", "lexical",
            # Dask: chunks of 8 at 2 requests a worker, so a worker holds paid answers for a while
            "--chunk-size", "8" if runner == "dask" else "4", "--concurrency", "4", "--task-runner", runner,
            "--workers", "2" if runner == "dask" else "1"]


def _wait_for(proc, what, deadline_s: float = 150):
    deadline = time.monotonic() + deadline_s
    while not what():
        if proc.poll() is not None:
            pytest.fail(f"the process ended first (rc {proc.returncode}):\n{proc.stdout.read()}")
        assert time.monotonic() < deadline, "the process did not get there in time"
        time.sleep(0.02)


def _stop(proc, sig) -> tuple[int, float, float]:
    """Send `sig`; (exit status, seconds it took, when it was sent)."""
    sent = time.monotonic()
    proc.send_signal(sig)
    try:
        rc = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail("the process did not stop within 60 s of the signal")
    return rc, time.monotonic() - sent, sent


@pytest.mark.parametrize("sig,runner", [(signal.SIGTERM, "thread"), (signal.SIGINT, "thread"),
                                        (signal.SIGTERM, "dask")])
def test_a_signal_stops_label_and_a_rerun_pays_nothing_twice(tmp_path, fake_llm, prefect_server, sig, runner):
    db = str(tmp_path / "sig.duckdb")
    with open_db(db) as con:
        build_db(con, n_features=N_FEATURES)
    fake_llm.responder = _responder
    fake_llm.latency_s = 0.4
    proc = subprocess.Popen(_label_cmd(db, runner), cwd=ROOT, env=_env(fake_llm, prefect_server),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    if runner == "dask":  # two chunks written (14 answers), the workers' next two half done
        _wait_for(proc, lambda: sum(r.finished_at is not None for r in fake_llm.requests_for("openai")) >= 20)
    else:  # a few chunks through
        _wait_for(proc, lambda: len(fake_llm.requests_for("openai")) >= 14)
    rc, took, sent = _stop(proc, sig)
    out = proc.stdout.read()
    assert rc == EXPECTED[sig], out
    assert took <= STOP_WITHIN_S, f"{took:.1f} s from the signal to the exit"
    assert "featurescribe: interrupted" in out
    first = fake_llm.requests_for("openai")
    # nothing was asked after the signal (the in-flight calls were cancelled, not retried)
    assert max(r.started_at for r in first) <= sent + 0.5
    paid = {_tag(r) for r in first if r.status == 200 and r.finished_at is not None and r.finished_at < sent - 0.3}
    assert paid, "some answers should have arrived before the signal"

    assert q(db, "SELECT status, error FROM runs") == [("interrupted", f"stopped by {signal.Signals(sig).name}")]
    n_ok, n_cached_answers = q(db, """SELECT count(*), count(DISTINCT c.cache_key) FROM llm_calls l
                                      LEFT JOIN llm_cache c ON c.cache_key = l.prompt_hash
                                      WHERE l.status = 'ok'""")[0]
    assert n_ok >= len(paid) and n_cached_answers == n_ok  # every answer received is in ledger and cache
    done = q(db, "SELECT count(*) FROM explanations WHERE chosen")[0][0]
    assert done >= 2  # the chunks that finished are kept (the first has 2 alive features)

    fake_llm.reset()
    fake_llm.latency_s = 0.0
    again = subprocess.run(_label_cmd(db, runner) + ["--no-progress"], cwd=ROOT,
                           env=_env(fake_llm, prefect_server), capture_output=True, text=True, timeout=300)
    assert again.returncode == ExitStatus.OK, again.stdout + again.stderr
    asked_again = [_tag(r) for r in fake_llm.requests_for("openai")]
    assert not set(asked_again) & paid  # no answer paid twice
    assert len(asked_again) == len(set(asked_again))  # nor asked twice by the re-run
    assert q(db, "SELECT count(*) FROM labels") == [(N_FEATURES - 2,)]
    # every feature labelled once: one chosen explanation each, over both runs
    assert q(db, "SELECT count(*), count(DISTINCT feature_id) FROM explanations WHERE chosen") == \
        [(N_FEATURES - 2, N_FEATURES - 2)]
    assert [s for (s,) in q(db, "SELECT status FROM runs ORDER BY started_at")] == ["interrupted", "completed"]


def test_sigterm_stops_serve(tmp_path, fake_llm, prefect_server):
    db = str(tmp_path / "serve.duckdb")
    with open_db(db) as con:
        build_db(con, n_features=8)
    proc = subprocess.Popen(
        [sys.executable, "-m", "featurescribe", "serve", "--cron", "0 3 * * *", "--db", db,
         "--source", SOURCE, "--name", "sigterm"],
        cwd=ROOT, env=_env(fake_llm, prefect_server), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True)
    lines: list[str] = []
    _wait_for(proc, lambda: lines.append(proc.stdout.readline()) or "serving" in lines[-1])
    time.sleep(3)  # the runner is up and polling
    rc, took, _ = _stop(proc, signal.SIGTERM)
    assert rc == ExitStatus.TERMINATED, "".join(lines) + proc.stdout.read()
    assert took <= STOP_WITHIN_S, f"{took:.1f} s from the signal to the exit"


def test_sigterm_stops_harvest_and_a_rerun_finishes(tmp_path):
    from tests.test_harvest import TEXT

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 400)
    db = str(tmp_path / "harvest.duckdb")
    cmd = [sys.executable, "-m", "featurescribe", "harvest", "--db", db, "--model", "smollm2-135m",
           "--layer", "2", "--corpus", str(corpus), "--ctx", "32", "--batch-size", "1", "--device", "cpu",
           "--max-tokens", "16000"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    lines: list[str] = []
    _wait_for(proc, lambda: lines.append(proc.stdout.readline()) or lines[-1].startswith("harvest:"), 300)
    rc, took, _ = _stop(proc, signal.SIGTERM)
    assert rc == ExitStatus.TERMINATED, "".join(lines) + proc.stdout.read()
    assert took <= STOP_WITHIN_S, f"{took:.1f} s from the signal to the exit"
    again = subprocess.run(cmd + ["--no-progress"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == ExitStatus.OK, again.stdout + again.stderr
    assert again.stdout.strip().splitlines()[-1] == "source_id: 2-mlp"


def test_sigterm_stops_a_sharded_harvest_on_threads(tmp_path):
    """The shards run on threads of the process, where the signal raises nothing: each stops at its
    next batch (it used to harvest its whole range first), keeps what it committed, and the same
    command finishes them and merges."""
    from tests.test_harvest import TEXT

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 400)
    db = str(tmp_path / "harvest.duckdb")
    cmd = [sys.executable, "-m", "featurescribe", "harvest", "--db", db, "--model", "smollm2-135m",
           "--layer", "2", "--corpus", str(corpus), "--ctx", "32", "--batch-size", "1", "--device", "cpu",
           "--max-tokens", "16000", "--shards", "2", "--task-runner", "thread", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    shards = Path(db + ".shards")
    _wait_for(proc, lambda: len(list(shards.glob("shard-*.duckdb"))) == 2, 300)
    time.sleep(2)  # both shards are in their batches
    rc, took, _ = _stop(proc, signal.SIGTERM)
    out = proc.stdout.read()
    assert rc == ExitStatus.TERMINATED, out
    assert took <= STOP_WITHIN_S, f"{took:.1f} s from the signal to the exit"
    assert "featurescribe: interrupted (SIGTERM)" in out
    assert "Error logging to API" not in out  # Prefect's log lines went out before its server stopped
    assert shards.is_dir()  # not merged: the shards did not finish
    assert q(db, "SELECT status, error FROM runs") == [("interrupted", "stopped by SIGTERM")]
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == ExitStatus.OK, again.stdout + again.stderr
    assert again.stdout.strip().splitlines()[-1] == "source_id: 2-mlp"
    assert not shards.exists()
    n_seq = q(db, "SELECT count(*) FROM sequences")[0][0]
    assert q(db, "SELECT n_tokens FROM sources") == [(n_seq * 31,)]  # position 0 of each is context only
    assert q(db, "SELECT count(*) FROM (SELECT DISTINCT feature_id, seq_id, pos FROM activations)") == \
        q(db, "SELECT count(*) FROM activations")


def test_a_signal_leaves_one_line_and_no_prefect_noise(tmp_path, fake_llm):
    """Without PREFECT_API_URL the command runs its own temporary Prefect server; the logs queued
    for it are sent before it stops, so stderr has no 'Error logging to API' after our line, nor
    Prefect's 'Crash detected!' lines about the runs the signal stopped."""
    db = str(tmp_path / "eph.duckdb")
    with open_db(db) as con:
        build_db(con, n_features=12)
    fake_llm.responder = _responder
    fake_llm.latency_s = 0.5
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(OPENAI_BASE_URL=fake_llm.base_url_openai, OPENAI_API_KEY="test-key", PYTHONPATH=str(ROOT),
               PREFECT_HOME=str(tmp_path / "prefect-home"), FEATURESCRIBE_PREFECT_LIMITS="off")
    proc = subprocess.Popen(_label_cmd(db, "thread"), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for(proc, lambda: len(fake_llm.requests_for("openai")) >= 3, 300)
    rc, _, _ = _stop(proc, signal.SIGINT)
    err = proc.stderr.read()
    assert rc == ExitStatus.INTERRUPTED, err
    assert "featurescribe: interrupted (SIGINT)" in err
    assert "Error logging to API" not in err, err
    assert "Crash detected" not in err and "Crashed" not in err, err  # Prefect's lines on the runs we stopped


def _holds_write_lock(db: str) -> bool:
    import duckdb

    try:
        duckdb.connect(db, read_only=True).close()
        return False
    except duckdb.IOException:
        return True


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_a_long_sql_query_and_its_writes_are_not_kept(tmp_path, sig):
    """DuckDB computes without returning to Python, where signal handlers run: the query runs in a
    thread and the signal interrupts it."""
    db = str(tmp_path / "q.duckdb")
    with open_db(db):
        pass
    query = ("CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (1); "
             "SELECT count(*) FROM range(1000000000000) r(x) WHERE x % 7 = 3")  # hours
    proc = subprocess.Popen([sys.executable, "-m", "featurescribe", "sql", "--db", db, "--write", query],
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for(proc, lambda: _holds_write_lock(db), deadline_s=60)
    time.sleep(1)  # into the query
    rc, took, _ = _stop(proc, sig)
    assert rc == EXPECTED[sig] and took <= STOP_WITHIN_S, f"rc {rc}, {took:.1f} s"
    assert proc.stderr.read().strip() == (f"featurescribe: interrupted ({sig.name}); the query stopped; "
                                          "with --write, nothing it changed is kept")
    assert q(db, "SELECT count(*) FROM information_schema.tables WHERE table_name = 't'") == [(0,)]


def test_a_command_run_again_in_the_same_process_is_not_stopped_by_the_last_signal():
    """`main()` called from Python (a notebook, a test) after a command that a signal stopped: the
    next command ran into the old signal at its first LLM chunk and ended 143 at once."""
    import asyncio

    from featurescribe.interrupts import Interrupted, handling_signals, run_cancellable

    async def answer() -> int:
        await asyncio.sleep(0)
        return 42

    with pytest.raises(Interrupted), handling_signals():
        os.kill(os.getpid(), signal.SIGTERM)  # the handler raises at the next bytecode
        time.sleep(5)
    with handling_signals():
        assert run_cancellable(answer()) == 42
