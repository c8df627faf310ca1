"""The `runs` table: one row per flow run, beside Prefect's own record of it.

`recorded_run(db, flow, params)` wraps a flow's body: it inserts a row (`status='running'`, the
parameters as JSON, Prefect's flow-run id), and sets `completed` (or the body's own status),
`failed` (with the error) or `interrupted` (SIGINT/SIGTERM) and `finished_at` when the body ends. Given a path, the database is opened only for these short
writes, so the body (or a subflow, or a read-only export) opens it as it needs; given an open
connection (a run that holds the database throughout), the rows are written on it.

A run killed outright (SIGKILL, power loss) cannot record its end. Writers hold the database for
their whole body and DuckDB admits one writing process, so when a top-level flow starts, a row
still `running` belongs to a process that is gone: it is marked `interrupted`.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from featurescribe.errors import first_error_line
from featurescribe.interrupts import interruption_note, is_interruption
from featurescribe.statuses import RunStatus
from featurescribe.store import runs as sql
from featurescribe.store.connection import open_db


@dataclass
class RunInfo:
    run_id: str
    flow: str
    prefect_flow_run_id: str | None
    status: str = RunStatus.COMPLETED  # what the row gets when the body ends normally (e.g. 'stopped')
    note: str | None = None  # written to `error` with it (e.g. why it stopped)


def new_run_id(flow: str) -> str:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    return f"{flow}-{stamp}-{uuid.uuid4().hex[:6]}"


def _prefect_ids() -> tuple[str | None, str | None]:
    """(this flow run's id, its parent flow run's id), None outside a flow run."""
    if "prefect.context" not in sys.modules:  # no flow has run in this process: no need to import it
        return None, None
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


@contextmanager
def _writing(target: Any) -> Iterator[Any]:
    """A connection to write on: `target` itself, or the database at path `target` for a moment."""
    if not isinstance(target, (str, os.PathLike)):
        yield target
        return
    con = open_db(target)
    try:
        yield con
    finally:
        con.close()


@contextmanager
def recorded_run(target: Any, flow: str, params: dict[str, Any]) -> Iterator[RunInfo]:
    """The body's run row. `target`: a database path, or an open connection to write on."""
    prefect_id, parent = _prefect_ids()
    info = RunInfo(new_run_id(flow), flow, prefect_id)
    with _writing(target) as con:
        if parent is None:
            sql.mark_interrupted(con)
        sql.insert_run(con, info.run_id, flow, params, prefect_id)
    try:
        yield info
    except BaseException as err:
        stopped = is_interruption(err)
        status, note = ((RunStatus.INTERRUPTED, interruption_note(err)) if stopped
                        else (RunStatus.FAILED, first_error_line(err)))
        with _writing(target) as con:
            sql.finish_run(con, info.run_id, status, note)
        raise
    with _writing(target) as con:
        sql.finish_run(con, info.run_id, info.status, info.note)
