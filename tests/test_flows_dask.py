"""The label flow on a local Dask cluster of 2 workers: same labels as the thread runner, the
LLM calls made in the workers (through the real openai SDK), written by the flow alone."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

from featurescribe.store import open_db
from tests.dbq import q
from tests.processes import end_process
from tests.test_sampling import SOURCE, build_db

DASK = str(Path(sys.executable).with_name("dask"))


def _responder(req):
    return json.dumps({"explanation": 'the tokens " def" and " class"'})


def _q(db, sql):
    con = open_db(db, read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_dask_runner_spreads_chunks_and_the_flow_writes(tmp_path, fake_llm, prefect_server):
    from featurescribe.flows.label_flow import label_flow

    db = str(tmp_path / "dask.duckdb")
    con = open_db(db)
    build_db(con, n_features=12)  # 0 dead, 1 rare, 10 to label
    con.close()
    fake_llm.responder = _responder

    s = label_flow(db=db, source=SOURCE, features="all", explainer="openai:test-model",
                   simulator="lexical", chunk_size=3, task_runner="dask", workers=2, no_progress=True)
    assert sorted(s.labelled) == list(range(2, 12))
    assert {k.feature_id for k in s.skipped} == {0, 1}
    # every explanation request was made once, from the workers; the flow wrote the ledger
    assert len(fake_llm.requests_for("openai")) == 10
    assert _q(db, "SELECT status, count(*) FROM llm_calls GROUP BY ALL") == [("ok", 10)]
    assert _q(db, "SELECT count(*), count(DISTINCT feature_id) FROM explanations") == [(10, 10)]
    assert _q(db, "SELECT count(*) FROM labels") == [(10,)]
    (row,) = _q(db, "SELECT status, params->>'task_runner', prefect_flow_run_id FROM runs")
    assert row[:2] == ("completed", "dask")

    # four chunk task runs of 3 features (the first also holds the dead and the rare one),
    # recorded by Prefect under the flow run
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[row[2]])))
    chunk_runs = [t for t in tasks if t.name.startswith("label-chunk")]
    assert len(chunk_runs) == 4 and all(t.state.is_completed() for t in chunk_runs)

    # the same labels as the thread runner gives
    db2 = str(tmp_path / "thread.duckdb")
    con = open_db(db2)
    build_db(con, n_features=12)
    con.close()
    label_flow(db=db2, source=SOURCE, features="all", explainer="openai:test-model",
               simulator="lexical", chunk_size=3, no_progress=True)
    q = "SELECT feature_id, explanation, round(score, 6) FROM labels ORDER BY 1"
    assert _q(db, q) == _q(db2, q)


def _label_waits_for_a_worker(command: list[str], address: str) -> subprocess.Popen:
    """Run `command` on a cluster with no workers: it says so and waits; then a worker (from this
    environment) comes, and the run ends labelled. Returns the worker, for the caller to end."""
    import threading

    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(150, run.kill)  # a run that never says it must not hang the suite
    watchdog.start()
    worker = None
    try:
        notice = f"the Dask scheduler at {address} has no workers yet: the work waits for them"
        seen = []
        for line in run.stderr:
            seen.append(line)
            if line.startswith(notice):
                break
        assert seen and seen[-1].startswith(notice), "".join(seen)[-3000:]
        worker = subprocess.Popen([DASK, "worker", address, "--nthreads", "1", "--no-dashboard"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rest = run.stderr.read()
        assert run.wait() == 0, rest[-3000:]
    finally:
        watchdog.cancel()
        if run.poll() is None:
            end_process(run)
    return worker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_workers_that_lack_featurescribe_are_one_line_and_no_workers_yet_is_said(tmp_path):
    """The scheduler answers, so the run went on: the worker died unpickling the first chunk
    (ModuleNotFoundError in its log only), and `label` waited for ever without a word. A cluster
    with no workers yet (an adaptive one starts them when tasks arrive) is said, and waited for."""
    from distributed import Client

    db = str(tmp_path / "f.duckdb")
    with closing(open_db(db)) as con:
        build_db(con, n_features=6)
    elsewhere = tmp_path / "elsewhere" / "featurescribe"  # an environment where featurescribe fails to import
    elsewhere.mkdir(parents=True)
    (elsewhere / "__init__.py").write_text("raise ModuleNotFoundError('No module named featurescribe')\n")
    address = f"tcp://127.0.0.1:{_free_port()}"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    scheduler = subprocess.Popen([DASK, "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1],
                                  "--no-dashboard"], **quiet)
    worker = None
    command = [sys.executable, "-m", "featurescribe", "label", "--db", db, "--source", SOURCE, "--features", "all",
               "--explainer", "baseline:tokens", "--simulator", "lexical", "--task-runner", "dask",
               "--dask-address", address, "--no-progress"]
    try:
        def label() -> subprocess.CompletedProcess:
            return subprocess.run(command, capture_output=True, text=True, timeout=120)

        worker = subprocess.Popen([DASK, "worker", address, "--nthreads", "1", "--no-dashboard"],
                                  env={**os.environ, "PYTHONPATH": str(elsewhere.parent)}, **quiet)
        with Client(address, timeout=60, set_as_default=False) as client:
            client.wait_for_workers(1, timeout=90)
        r = label()
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-3000:]
        assert f"1 of the 1 Dask workers at {address} cannot import featurescribe" in r.stderr
        assert "No module named featurescribe" in r.stderr

        end_process(worker)
        with Client(address, timeout=60, set_as_default=False) as client:
            deadline = time.monotonic() + 60
            while client.scheduler_info()["workers"]:  # the scheduler lets the ended worker go
                assert time.monotonic() < deadline, "the scheduler still lists the ended worker"
                time.sleep(0.2)
        assert q(db, "SELECT count(*) FROM runs") == [(0,)]
        worker = _label_waits_for_a_worker(command, address)
        assert q(db, "SELECT status FROM runs") == [("completed",)]
        assert q(db, "SELECT count(*) FROM labels")[0][0] > 0
    finally:
        for proc in (worker, scheduler):
            if proc is not None:
                end_process(proc)
