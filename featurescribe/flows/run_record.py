"""The `runs` table: one row per flow run, beside Prefect's own record of it.

`recorded_run(db, flow, params)` wraps a flow's body: it inserts a row (`status='running'`, the
parameters as JSON, Prefect's flow-run id), and sets `completed` (or the body's own status),
`failed` (with the error) or `interrupted` (SIGINT/SIGTERM) and `finished_at` when the body ends. Given a path, the database is opened only for these short
writes, so the body (or a subflow, or a read-only export) opens it as it needs; given an open
connection (a run that holds the database throughout), the rows are written on it.

A run killed outright (SIGKILL, power loss) cannot record its end. Each row keeps the host and
PID of its process; when a top-level flow starts, a row still `running` whose process on this host
is gone (or that has no PID: written by an older featurescribe) is marked `interrupted`. Rows of
runs that are alive, here (runs write between each other's transactions) or on another host, stay.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import sys
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from featurescribe.errors import first_error_line
from featurescribe.interrupts import interruption_note, is_interruption
from featurescribe.statuses import RunStatus
from featurescribe.store import runs as sql
from featurescribe.store.connection import session


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


def _process_alive(host: str | None, pid: int | None) -> bool:
    if pid is None:
        return False
    if host != socket.gethostname():
        return True  # cannot tell: leave it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def mark_dead_runs_interrupted(con) -> int:
    """`running` rows whose process is gone become `interrupted`; returns how many."""
    gone = [run_id for run_id, host, pid in sql.running_processes(con) if not _process_alive(host, pid)]
    return sql.mark_interrupted(con, gone)


@contextmanager
def recorded_run(target: Any, flow: str, params: dict[str, Any]) -> Iterator[RunInfo]:
    """The body's run row. `target`: a database path or `Database` (opened for each of its short
    writes), or an open connection to write on."""
    prefect_id, parent = _prefect_ids()
    info = RunInfo(new_run_id(flow), flow, prefect_id)
    with session(target) as con:
        if parent is None:
            mark_dead_runs_interrupted(con)
        sql.insert_run(con, info.run_id, flow, params, prefect_id, socket.gethostname(), os.getpid())
    try:
        yield info
    except BaseException as err:
        stopped = is_interruption(err)
        status, note = ((RunStatus.INTERRUPTED, interruption_note(err)) if stopped
                        else (RunStatus.FAILED, first_error_line(err)))
        with session(target) as con:
            sql.finish_run(con, info.run_id, status, note)
        raise
    with session(target) as con:
        sql.finish_run(con, info.run_id, info.status, info.note)
