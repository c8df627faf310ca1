"""Kill a label run (SIGKILL, mid-run) and start it again: only the missing features are done,
no explanation is duplicated, and no finished feature's request reaches the provider again.

The run is `featurescribe label` in a subprocess, through the real openai SDK against
tests/fake_llm.py (in this process), recording to the session's Prefect test server.
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

from featurescribe.store import open_db
from tests.test_sampling import SOURCE, build_db

ROOT = Path(__file__).resolve().parent.parent
N_FEATURES = 40  # 0 is dead, 1 rare: 38 to label


def _tag(req) -> str:
    return hashlib.sha256(req.user_text.encode()).hexdigest()[:12]


def _responder(req):
    # the explanation names the prompt it answers, so the database says which prompts are done
    return json.dumps({"explanation": f"prompt {_tag(req)}"})


def _label_cmd(db: str) -> list[str]:
    return [sys.executable, "-m", "featurescribe", "label", "--db", db, "--source", SOURCE,
            "--features", "all", "--explainer", "openai:test-model", "--simulator", "lexical",
            "--chunk-size", "4", "--concurrency", "4", "--no-progress"]


def _env(fake_llm, prefect_server) -> dict:
    env = dict(os.environ)
    env.update(OPENAI_BASE_URL=fake_llm.base_url_openai, OPENAI_API_KEY="test-key",
               PREFECT_API_URL=prefect_server, PYTHONPATH=str(ROOT),
               # the slots of a killed process come back only when their lease expires (a minute
               # on `prefect server start`; never on the test server): in-process limits here
               FEATURESCRIBE_PREFECT_LIMITS="off")
    return env


def _q(db: str, sql: str):
    con = open_db(db, read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_kill_and_resume(tmp_path, fake_llm, prefect_server):
    db = str(tmp_path / "resume.duckdb")
    con = open_db(db)
    build_db(con, n_features=N_FEATURES)
    con.close()
    fake_llm.responder = _responder
    fake_llm.latency_s = 0.3

    # 1. start, wait until several chunks are through, kill -9
    proc = subprocess.Popen(_label_cmd(db), cwd=ROOT, env=_env(fake_llm, prefect_server),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while len(fake_llm.requests_for("openai")) < 14:
        assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.stdout.read()}"
        assert time.monotonic() < deadline, "the run made too few requests in 120 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    first = fake_llm.requests_for("openai")
    time.sleep(0.5)  # requests still in flight at the kill are answered to nobody

    done = {t.split()[-1] for (t,) in _q(db, "SELECT text FROM explanations WHERE chosen")}
    assert 4 <= len(done) < N_FEATURES - 2, "the kill should land after some chunks, before the end"
    assert _q(db, "SELECT status FROM runs") == [("running",)]

    # 2. the same command again
    fake_llm.reset()
    out = subprocess.run(_label_cmd(db), cwd=ROOT, env=_env(fake_llm, prefect_server),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"already labelled (skipped)    {len(done)}" in out.stdout
    second = fake_llm.requests_for("openai")

    # no finished feature's request reached the provider again
    assert not {_tag(r) for r in second} & done
    # and the two runs together asked for each prompt about once (those in flight at the kill
    # may be asked twice; nothing else)
    assert len(first) + len(second) <= (N_FEATURES - 2) + 8
    # every alive feature has exactly one explanation, chosen and scored
    assert _q(db, "SELECT count(*), count(DISTINCT feature_id) FROM explanations") == [(38, 38)]
    assert _q(db, "SELECT count(*) FROM labels") == [(38,)]
    # the killed run is marked interrupted, the second completed, each beside Prefect's record
    rows = _q(db, "SELECT status, prefect_flow_run_id IS NOT NULL FROM runs ORDER BY started_at")
    assert rows == [("interrupted", True), ("completed", True)]
