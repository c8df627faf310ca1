"""Several processes on one database: runs hold it only while they write, openings wait on a lock.

Writers run as real subprocesses of the `featurescribe` command (label against the fake LLM
server of this test, harvest of the offline SmolLM2); every row they wrote is checked afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from contextlib import closing

import numpy as np
import pytest

from featurescribe.store import open_db
from featurescribe.store.activation_store import insert_activations_query
from tests.dbq import q
from tests.test_label import _explain_responder
from tests.test_sampling import SOURCE, build_db

OTHER = "3-syn2"  # a second source: SOURCE's rows under another id
N_FEATURES = 14  # 0 dead, 1 rare, 2..13 labelled
LABELLED = list(range(2, N_FEATURES))


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "featurescribe", *args]


def _build(db: str, *, second_source: bool) -> None:
    with closing(open_db(db)) as con:
        build_db(con, n_features=N_FEATURES)
        if second_source:
            for table in ("sources", "features"):
                con.execute(f"INSERT INTO {table} SELECT * REPLACE (? AS source_id) FROM {table} "
                            "WHERE source_id = ?", [OTHER, SOURCE])
            insert_activations_query(con, OTHER, "SELECT feature_id, seq_id, pos, act FROM activations "
                                     "WHERE source_id = ?", [SOURCE])


def _label_process(db: str, source: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        _command("label", "--db", db, "--source", source, "--features", "all", "--explainer",
                 "openai:gpt-4o-mini", "--simulator", "lexical", "--chunk-size", "2", "--no-progress"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _env(prefect_server: str) -> dict:
    # no global concurrency limits: they would stay on the session's server for other tests
    return {**os.environ, "PREFECT_API_URL": prefect_server, "FEATURESCRIBE_PREFECT_LIMITS": "off"}


def _finish(proc: subprocess.Popen, timeout: float = 400) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-2000:]
    return out


def _check_labels(db: str, source: str) -> None:
    rows = q(db, "SELECT feature_id, count(*), count(*) FILTER (WHERE chosen) FROM explanations "
                 "WHERE source_id = ? GROUP BY feature_id ORDER BY feature_id", [source])
    assert rows == [(f, 1, 1) for f in LABELLED]  # every feature once: nothing lost, nothing twice
    n_scores = q(db, "SELECT count(*) FROM scores JOIN explanations e USING (explanation_id) "
                     "WHERE e.source_id = ? AND scorer = 'simulation' AND split = 'test'", [source])
    assert n_scores == [(len(LABELLED),)]
    assert q(db, "SELECT count(*) FROM labels WHERE source_id = ?", [source]) == [(len(LABELLED),)]


def _read_while(db: str, procs: list[subprocess.Popen]) -> list[int]:
    """Count explanations (read-only, as `featurescribe sql` does) until every process ended."""
    seen = []
    while any(p.poll() is None for p in procs):
        seen.append(q(db, "SELECT count(*) FROM explanations")[0][0])
        time.sleep(0.1)
    return seen


def test_two_label_runs_on_one_file_with_a_reader_lose_and_repeat_nothing(db_path, fake_llm, prefect_server):
    _build(db_path, second_source=True)
    fake_llm.responder = _explain_responder()
    fake_llm.latency_s = 0.3
    env = _env(prefect_server)
    procs = [_label_process(db_path, SOURCE, env), _label_process(db_path, OTHER, env)]
    try:
        seen = _read_while(db_path, procs)
        for p in procs:
            _finish(p)
    finally:
        for p in procs:
            p.kill()
    final = 2 * len(LABELLED)
    assert seen == sorted(seen)  # every read answered, and the counts only grow
    assert any(0 < n < final for n in seen), "no read landed while the runs were writing"
    for source in (SOURCE, OTHER):
        _check_labels(db_path, source)
    # both runs completed: neither marked the other interrupted when it started
    assert q(db_path, "SELECT flow, status FROM runs ORDER BY 1, 2") == [("label", "completed")] * 2
    calls = q(db_path, "SELECT count(*), count(DISTINCT call_id) FROM llm_calls WHERE status = 'ok'")
    assert calls == [(len(fake_llm.requests_for("openai")), len(fake_llm.requests_for("openai")))]
    # one explanation asked per feature: from the server, or from the cache the other run filled
    # (the sources are copies, so their prompts can be the same)
    assert q(db_path, "SELECT count(*) FROM llm_calls WHERE status IN ('ok', 'cached')") == [(final,)]


HARVEST_CTX = 16
HARVEST_TOKENS = 48 * HARVEST_CTX


def _harvest_args(db: str, corpus: str) -> list[str]:
    return ["harvest", "--db", db, "--model", "smollm2-135m", "--layer", "2", "--corpus", corpus,
            "--ctx", str(HARVEST_CTX), "--max-tokens", str(HARVEST_TOKENS), "--batch-size", "4", "--no-progress"]


def _activations(db: str, source: str):
    return q(db, "SELECT feature_id, seq_id, pos, act FROM activations WHERE source_id = ? "
                 "ORDER BY feature_id, seq_id, pos", [source])


def test_a_label_run_and_a_harvest_of_another_layer_both_finish_with_every_row(
        db_path, tmp_path, fake_llm, prefect_server, smollm2):
    from featurescribe.harvest.harvester import HarvestConfig, harvest
    from tests.test_harvest import TEXT

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 8)
    _build(db_path, second_source=False)
    alone = str(tmp_path / "alone.duckdb")
    shutil.copy(db_path, alone)  # the same harvest into a copy, with nothing beside it
    ref = harvest(HarvestConfig(db=alone, model="smollm2-135m", layer=2, corpus=str(corpus), ctx=HARVEST_CTX,
                                max_tokens=HARVEST_TOKENS, batch_size=4, progress=False), loaded=smollm2)

    fake_llm.responder = _explain_responder()
    fake_llm.latency_s = 0.3
    env = _env(prefect_server)
    procs = [_label_process(db_path, SOURCE, env),
             subprocess.Popen(_command(*_harvest_args(db_path, str(corpus))), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env)]
    try:
        outs = [_finish(p) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert f"source_id: {ref.source_id}" in outs[1]
    _check_labels(db_path, SOURCE)
    got, want = _activations(db_path, ref.source_id), _activations(alone, ref.source_id)
    assert len(got) == len(want) == ref.n_activations > 0
    assert [r[:3] for r in got] == [r[:3] for r in want]
    np.testing.assert_allclose([r[3] for r in got], [r[3] for r in want], rtol=1e-5, atol=1e-6)
    for db in (db_path, alone):  # the harvest's sequences once each, as in the copy
        assert q(db, "SELECT count(*), count(DISTINCT seq_id) FROM sequences") == \
            q(alone, "SELECT count(*), count(DISTINCT seq_id) FROM sequences")
    assert q(db_path, "SELECT flow, status FROM runs") == [("label", "completed")]


def _hold(db: str, seconds: float) -> subprocess.Popen:
    """A process that holds the database for writing for `seconds`, then closes it."""
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import duckdb, time
        con = duckdb.connect({db!r})
        print("ready", flush=True)
        time.sleep({seconds})
        con.close()
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _cli(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(_command(*args), capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_a_reader_waits_for_a_short_write_and_names_a_long_one(db_path):
    open_db(db_path).close()
    holder = _hold(db_path, 1.5)
    try:
        r = _cli("sql", "--db", db_path, "SELECT 42", "--format", "csv")
        assert r.returncode == 0, r.stderr
        assert "42" in r.stdout
    finally:
        holder.kill()
        holder.wait()
    holder = _hold(db_path, 60)
    try:
        for args, env in (((["--lock-timeout", "0.5", "sql"]), None), ((["sql", "--lock-timeout", "0.5"]), None),
                          ((["sql"]), {"FEATURESCRIBE_LOCK_TIMEOUT": "0.5"})):
            t0 = time.monotonic()
            r = _cli(*args, "--db", db_path, "SELECT 1", env=env)
            assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1
            assert "is locked by" in r.stderr and f"PID {holder.pid}" in r.stderr
            assert time.monotonic() - t0 < 60
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("args,env", [(["--lock-timeout", "soon"], None), (["--lock-timeout", "-1"], None),
                                      ([], {"FEATURESCRIBE_LOCK_TIMEOUT": "x"})])
def test_a_bad_lock_timeout_is_one_line(db_path, args, env):
    open_db(db_path).close()
    r = _cli("sql", *args, "--db", db_path, "SELECT 1", env=env)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "lock" in r.stderr.lower()


def test_browse_leaves_the_file_free_between_requests_and_shows_new_labels(labdb):
    import json
    import urllib.request

    from featurescribe.web.server import serve_in_thread

    running = serve_in_thread(labdb)
    running.state.reader.refresh_s = 0.0
    try:
        def listed() -> int:
            with urllib.request.urlopen(running.url + "/api/features?status=labelled", timeout=30) as r:
                return json.load(r)["total"]

        assert listed() == 0
        with closing(open_db(labdb, timeout=0)) as con:  # writable at once: nothing holds the file
            con.execute("INSERT INTO explanations (explanation_id, source_id, feature_id, text, explainer, "
                        "method, chosen, status) VALUES ('e1', ?, 2, 'commas', 'x', 'tokens', true, 'ok')",
                        [SOURCE])
            con.execute("INSERT INTO scores (explanation_id, scorer, value, split) VALUES ('e1', 'simulation', 0.5, 'test')")
        assert listed() == 1
    finally:
        running.stop()
