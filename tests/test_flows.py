"""Flows under a Prefect test server: the runs table, the export flow, the pipeline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from featurescribe.store import open_db


def _runs(db: str) -> list[dict]:
    from featurescribe.store.runs import list_runs

    con = open_db(db, read_only=True)
    try:
        return list_runs(con)
    finally:
        con.close()


def _prefect_flow_run(flow_run_id: str):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def test_export_flow_records_its_run(prefect_server, tmp_path):
    from tests.export_fixtures import build_demo_db

    from featurescribe.flows.export_flow import export_flow

    db = str(tmp_path / "x.duckdb")
    build_demo_db(db)
    out = tmp_path / "out"
    result = export_flow(db=db, out=str(out), formats="json,oai", report=True)
    assert (out / "json" / "feature_dictionary.json").is_file()
    assert (out / "oai").is_dir()
    assert (out / "report.html").is_file()

    (row,) = [r for r in _runs(db) if r["run_id"] == result["run_id"]]
    assert row["flow"] == "export" and row["status"] == "completed"
    assert row["finished_at"] >= row["started_at"]
    assert json.loads(row["params"])["formats"] == ["json", "oai"]
    # the same run in Prefect's own record
    fr = _prefect_flow_run(row["prefect_flow_run_id"])
    assert fr.state.is_completed() and fr.parameters["formats"] == "json,oai"


def test_no_progress_reaches_the_export(prefect_server, tmp_path, capsys):
    """`demo --no-progress` still printed 'export json: N/N features' and 'report: ...' lines."""
    from tests.export_fixtures import build_demo_db

    from featurescribe.cli import main
    from featurescribe.flows.export_flow import export_flow

    db = str(tmp_path / "x.duckdb")
    build_demo_db(db)
    export_flow(db=db, out=str(tmp_path / "flow"), formats="json,parquet", report=True, no_progress=True)
    assert main(["export", "--db", db, "--format", "oai", "--out", str(tmp_path / "oai"), "--no-progress"]) == 0
    assert main(["report", "--db", db, "--out", str(tmp_path / "r.html"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "export " not in err and "report:" not in err, err
    assert main(["export", "--db", db, "--format", "oai", "--out", str(tmp_path / "oai")]) == 0
    assert "export oai: " in capsys.readouterr().err  # lines as before without it


def test_failed_flow_is_recorded_failed(prefect_server, tmp_path):
    from featurescribe.errors import FeaturescribeError
    from featurescribe.flows.export_flow import export_flow

    db = str(tmp_path / "empty.duckdb")
    open_db(db).close()
    with pytest.raises(FeaturescribeError):
        export_flow(db=db, out=str(tmp_path / "o"), formats="json", report=False)
    (row,) = _runs(db)
    assert row["status"] == "failed" and row["error"]
    assert _prefect_flow_run(row["prefect_flow_run_id"]).state.is_failed()


def test_running_rows_of_dead_processes_become_interrupted(tmp_path):
    import os
    import socket

    from featurescribe.flows.run_record import mark_dead_runs_interrupted
    from featurescribe.store.runs import insert_run

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    db = str(tmp_path / "r.duckdb")
    con = open_db(db)
    here = socket.gethostname()
    insert_run(con, "label-gone", "label", {"a": 1}, None, here, gone.pid)
    insert_run(con, "label-old", "label", {"a": 1}, None)  # no PID: an older featurescribe's row
    insert_run(con, "label-alive", "label", {"a": 1}, None, here, os.getpid())
    insert_run(con, "label-elsewhere", "label", {"a": 1}, None, here + "-other", gone.pid)
    assert mark_dead_runs_interrupted(con) == 2
    rows = dict(con.execute("SELECT run_id, status FROM runs").fetchall())
    finished = con.execute("SELECT count(*) FROM runs WHERE finished_at IS NOT NULL").fetchone()[0]
    con.close()
    assert rows == {"label-gone": "interrupted", "label-old": "interrupted", "label-alive": "running",
                    "label-elsewhere": "running"}
    assert finished == 2


class _FakeClient:
    def __init__(self, backend: str, concurrency: int):
        import types

        self.backend = backend
        self.settings = types.SimpleNamespace(concurrency=concurrency)


def test_global_limits_are_created_respected_and_held_per_chunk(prefect_server):
    import asyncio

    from prefect.client.orchestration import get_client

    from featurescribe.flows.global_limits import chunk_slots, ensure_global_limits

    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        for name in ("featurescribe-llm-openai", "featurescribe-llm-openai-rpm"):
            try:  # left by an earlier label run on the session's server: this test creates them
                client.delete_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                pass
        client.upsert_global_concurrency_limit_by_name("featurescribe-llm-anthropic", 3)
    limits = ensure_global_limits(["openai:m", "anthropic:m", "local:smollm2-135m", "lexical"],
                                  concurrency=5, rpm=600)
    assert set(limits) == {"openai", "anthropic"}
    assert limits["openai"].limit == 5 and limits["openai"].rate_name == "featurescribe-llm-openai-rpm"
    assert limits["anthropic"].limit == 3  # an existing limit is respected, not changed
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name("featurescribe-llm-anthropic").limit == 3
        assert client.read_global_concurrency_limit_by_name(
            "featurescribe-llm-openai-rpm").slot_decay_per_second == 10.0

    async def two_chunks():
        held = asyncio.Event()
        release = asyncio.Event()

        async def first():
            async with chunk_slots([_FakeClient("anthropic", 2)], limits):
                held.set()
                await release.wait()

        task = asyncio.create_task(first())
        await held.wait()
        # 2 of 3 slots are held: a second chunk wanting 2 waits ...
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(_enter(chunk_slots([_FakeClient("anthropic", 2)], limits)), 1.5)
        release.set()
        await task
        # ... and gets them once the first let go
        await asyncio.wait_for(_enter(chunk_slots([_FakeClient("anthropic", 2)], limits)), 30)

    asyncio.run(two_chunks())


async def _enter(cm):
    async with cm:
        pass


@pytest.mark.slow
def test_pipeline_flow_runs_every_stage_as_a_subflow(prefect_server, tmp_path):
    from featurescribe.flows.pipeline import pipeline_flow

    db = str(tmp_path / "p.duckdb")
    out = tmp_path / "export"
    r = pipeline_flow(db=db, model="smollm2-135m", layer=1, max_tokens=3000, features="0:24",
                      out=str(out), formats="json", no_progress=True)
    assert r["source_id"] == "1-mlp" and r["labelled"] + r["failed"] > 0
    assert (out / "json" / "feature_dictionary.json").is_file() and (out / "report.html").is_file()
    rows = _runs(db)
    assert [(x["flow"], x["status"]) for x in rows] == [
        ("pipeline", "completed"), ("harvest", "completed"), ("label", "completed"), ("export", "completed")]
    # each stage is a subflow of the pipeline's flow run in Prefect
    parent = rows[0]["prefect_flow_run_id"]
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        for x in rows[1:]:
            fr = client.read_flow_run(x["prefect_flow_run_id"])
            task_run = client.read_task_run(fr.parent_task_run_id)
            assert str(task_run.flow_run_id) == parent


def test_a_chunk_that_fails_transiently_is_retried(prefect_server, tmp_path, monkeypatch):
    from tests.test_sampling import SOURCE, build_db

    from featurescribe.flows import label_core
    from featurescribe.flows.label_flow import label_flow

    db = str(tmp_path / "retry.duckdb")
    con = open_db(db)
    build_db(con, n_features=6)
    con.close()
    real = label_core.compute_chunk
    calls = {"n": 0, "user": False}

    async def flaky(prepared, params, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionResetError("the worker lost its connection")
        return await real(prepared, params, **kw)

    monkeypatch.setattr(label_core, "compute_chunk", flaky)
    s = label_flow(db=db, source=SOURCE, features="all", no_progress=True)
    assert calls["n"] == 2 and sorted(s.labelled) == [2, 3, 4, 5]
    assert _runs(db)[0]["status"] == "completed"

    # a user's error is not retried: the run fails at once
    from featurescribe.errors import FeaturescribeError

    async def refused(prepared, params, **kw):
        calls["n"] += 1
        raise FeaturescribeError("the provider refused the API key")

    calls["n"] = 0
    monkeypatch.setattr(label_core, "compute_chunk", refused)
    with pytest.raises(FeaturescribeError):
        label_flow(db=db, source=SOURCE, features="all", redo=True, no_progress=True)
    assert calls["n"] == 1
    assert [r["status"] for r in _runs(db)] == ["completed", "failed"]


def test_the_harvest_flow_takes_harvest_config_fields_only():
    """The deployment's parameters go to `HarvestConfig(**params)` as they are: a name the config
    lacks would fail only when a scheduled run starts."""
    import dataclasses
    import inspect

    from featurescribe.flows.harvest_flow import harvest_flow
    from featurescribe.harvest.harvester import HarvestConfig

    names = set(inspect.signature(harvest_flow.fn).parameters)
    assert names <= {f.name for f in dataclasses.fields(HarvestConfig)}
    assert {"db", "model", "layer", "site", "sae", "corpus", "max_tokens"} <= names


@pytest.mark.parametrize("retry_condition", ["harvest", "label"])
def test_a_full_disk_or_a_users_error_is_not_retried(retry_condition):
    """Trying again seconds later cannot free a disk: the run ends at once with the disk-full line."""
    import errno

    import duckdb
    from prefect.states import Failed

    from featurescribe.errors import BadOption
    from featurescribe.flows import harvest_flow, label_flow

    transient = {"harvest": harvest_flow._transient, "label": label_flow._transient}[retry_condition]
    full = [OSError(errno.ENOSPC, "No space left on device"),
            duckdb.TransactionException('Failed to commit: Could not write file "f.wal": No space left on device')]
    for err in full + [BadOption("--layer 99: the model has 30 layers")]:
        assert transient(None, None, Failed(data=err)) is False, err
    assert transient(None, None, Failed(data=ConnectionResetError("the worker lost its connection"))) is True
