"""The label flow on a local Dask cluster of 2 workers: same labels as the thread runner, the
LLM calls made in the workers (through the real openai SDK), written by the flow alone."""

from __future__ import annotations

import json

from featurescribe.store import open_db
from tests.test_sampling import SOURCE, build_db


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
