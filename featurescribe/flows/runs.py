"""The `runs` table: one row per flow run, beside Prefect's own record of it.

`recorded_run(db, flow, params)` wraps a flow's body: it inserts a row (`status='running'`, the
parameters as JSON, Prefect's flow-run id), and sets `completed` or `failed` (with the error) and
`finished_at` when the body ends. The database is opened only for these short writes, so the body
(or a subflow, or a read-only export) opens it as it needs.

A run killed outright (SIGKILL, power loss) cannot record its end. Writers hold the database for
their whole body and DuckDB admits one writing process, so when a top-level flow starts, a row
still `running` belongs to a process that is gone: it is marked `interrupted`.
"""

from __future__ import annotations

import datetime as dt
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from featurescribe.store import runs as sql
from featurescribe.store.connection import open_db


@dataclass
class RunInfo:
    run_id: str
    flow: str
    prefect_flow_run_id: str | None
    status: str = "completed"  # what the row gets when the body ends normally (e.g. 'stopped')
    note: str | None = None  # written to `error` with it (e.g. why it stopped)


def new_run_id(flow: str) -> str:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    return f"{flow}-{stamp}-{uuid.uuid4().hex[:6]}"


def _prefect_ids() -> tuple[str | None, str | None]:
    """(this flow run's id, its parent flow run's id), None outside a flow run."""
    try:
        from prefect.context import FlowRunContext

        ctx = FlowRunContext.get()
        if ctx is None or ctx.flow_run is None:
            return None, None
        fr = ctx.flow_run
        parent = None
        if fr.parent_task_run_id is not None:
            parent = str(fr.parent_task_run_id)
        return str(fr.id), parent
    except Exception:  # Prefect's record is a courtesy; the runs row never depends on it
        return None, None


def _error_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


@contextmanager
def recorded_run(db: str, flow: str, params: dict[str, Any]) -> Iterator[RunInfo]:
    prefect_id, parent = _prefect_ids()
    info = RunInfo(new_run_id(flow), flow, prefect_id)
    con = open_db(db)
    try:
        if parent is None:
            sql.mark_interrupted(con)
        sql.insert_run(con, info.run_id, flow, params, prefect_id)
    finally:
        con.close()
    try:
        yield info
    except BaseException as err:
        status = "cancelled" if isinstance(err, KeyboardInterrupt) else "failed"
        _finish(db, info.run_id, status, _error_line(err))
        raise
    _finish(db, info.run_id, info.status, info.note)


def _finish(db: str, run_id: str, status: str, error: str | None) -> None:
    con = open_db(db)
    try:
        sql.finish_run(con, run_id, status, error)
    finally:
        con.close()
